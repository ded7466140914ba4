"""Teachers from local diffusers folders: layouts, parameterizations, class conditioning, clear errors."""

import json

import pytest
import torch
from conftest import save_teacher_folder, tiny_unet

from distill.core.param import to_x0
from teachers import load_teacher

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_pipeline_folder_denoiser_converts_the_unet_output(make_teacher_folder, prediction_type):
    folder, net, _ = make_teacher_folder(prediction_type)
    teacher = load_teacher(folder).to(torch.float64)
    assert teacher.data_shape == (1, 8, 8) and teacher.num_classes == 0 and teacher.schedule.kind == "discrete_vp"
    t = torch.tensor([700.0, 20.0], dtype=torch.float64)
    with torch.no_grad():
        out = net(X, t).sample
    a, s = teacher.schedule.alpha(t), teacher.schedule.sigma(t)
    expected = {"epsilon": (X - s[:, None, None, None] * out) / a[:, None, None, None], "sample": out,
                "v_prediction": a[:, None, None, None] * X - s[:, None, None, None] * out}[prediction_type]
    assert torch.allclose(teacher.denoise(X, t), expected, atol=1e-10)
    assert torch.allclose(expected, to_x0(out, prediction_type, X, a, s), atol=1e-10)


def test_unet_folder_with_scheduler_config_inside_or_beside(tmp_path):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    inside = save_teacher_folder(tmp_path / "inside", tiny_unet(), sched, layout="unet")
    beside = tmp_path / "beside"
    tiny_unet().save_pretrained(beside / "unet")
    sched.save_pretrained(beside / "scheduler")
    a, b = load_teacher(inside), load_teacher(beside / "unet")
    assert torch.equal(a.schedule.alphas_cumprod, sched.alphas_cumprod) and a.hash == b.hash
    assert a.denoise(X.float(), 500.0).shape == (2, 1, 8, 8)


def test_content_hash_names_the_weights(make_teacher_folder, tmp_path):
    folder, _, sched = make_teacher_folder()
    assert load_teacher(folder).hash == load_teacher(folder).hash
    other = save_teacher_folder(tmp_path / "other", tiny_unet(seed=1), sched)
    assert load_teacher(other).hash != load_teacher(folder).hash


def test_class_conditional_unet_with_and_without_a_null_class(make_teacher_folder):
    plain, _, _ = make_teacher_folder(num_class_embeds=4, name="plain")
    teacher = load_teacher(plain)
    assert teacher.num_classes == 4 and not teacher.has_uncond
    teacher.denoise(X.float(), 10.0, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="class-conditional without an unconditional mode: pass cond"):
        teacher.denoise(X.float(), 10.0)

    dropped, net, _ = make_teacher_folder(num_class_embeds=4, teacher_json={"num_classes": 3, "null_class_label": 3},
                                          name="dropped")
    teacher = load_teacher(dropped).to(torch.float64)
    assert teacher.num_classes == 3 and teacher.has_uncond
    t = torch.full((2,), 10.0, dtype=torch.float64)
    with torch.no_grad():
        null = net(X, t, class_labels=torch.tensor([3, 3])).sample
    a, s = teacher.schedule.alpha(t)[0], teacher.schedule.sigma(t)[0]
    assert torch.allclose(teacher.denoise(X, t), (X - s * null) / a, atol=1e-10)
    assert torch.allclose(teacher.denoise(X, t, torch.tensor([-1, -1])), teacher.denoise(X, t), atol=0)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 2\]"):
        teacher.denoise(X, t, torch.tensor([3, 0]))


def test_flow_matching_teacher_calls_the_net_at_t_times_1000(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    folder = save_teacher_folder(tmp_path / "flow", tiny_unet(), FlowMatchEulerDiscreteScheduler())
    teacher = load_teacher(folder).to(torch.float64)
    net = UNet2DModel.from_pretrained(folder / "unet").double()
    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    with torch.no_grad():
        v = net(X, t * 1000).sample
    assert torch.allclose(teacher.denoise(X, t), X - t[:, None, None, None] * v, atol=1e-10)


def test_teacher_folders_also_load_as_diffusers_pipelines(make_teacher_folder):
    from diffusers import DDPMPipeline

    folder, _, _ = make_teacher_folder()
    pipe = DDPMPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.unet.config.sample_size == 8


def test_bad_folders_fail_with_one_clear_sentence(tmp_path, make_teacher_folder):
    with pytest.raises(FileNotFoundError, match="teacher 'nowhere' is neither gmm:<preset>"):
        load_teacher("nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has neither model_index.json nor config.json; expected a diffusers pipeline"):
        load_teacher(tmp_path / "empty")
    tiny_unet().save_pretrained(tmp_path / "lonely")
    with pytest.raises(FileNotFoundError, match="has no scheduler config"):
        load_teacher(tmp_path / "lonely")
    folder, _, _ = make_teacher_folder(name="nosched")
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks scheduler/scheduler_config.json"):
        load_teacher(folder)
    folder, _, _ = make_teacher_folder(name="edm")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EDMEulerScheduler"}))
    with pytest.raises(ValueError, match="unsupported scheduler 'EDMEulerScheduler'"):
        load_teacher(folder)
    folder, _, _ = make_teacher_folder(name="other")
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(FileNotFoundError, match="lacks a vae .*a text-to-image teacher needs unet, vae, text_encoder"):
        load_teacher(folder)


def test_shared_time_fast_path_equals_per_sample_times(make_teacher_folder):
    folder, _, _ = make_teacher_folder("v_prediction")
    teacher = load_teacher(folder).to(torch.float64)
    for t in (999.0, 500.0, 0.25):  # integer and interpolated timesteps; the second call hits the cache
        shared = torch.tensor(t, dtype=torch.float64).expand(2)
        for _ in range(2):
            assert torch.equal(teacher.denoise(X, shared), teacher.denoise(X, torch.full((2,), t, dtype=torch.float64)))
    mixed = torch.tensor([999.0, 3.5], dtype=torch.float64)
    assert torch.allclose(teacher.denoise(X, mixed)[1], teacher.denoise(X[1:], mixed[1:])[0], atol=1e-12)
