"""Export: student files round trip, clear errors, LoRA on a UNet student (trains only the adapter, merges), diffusers folders."""

import importlib.util

import pytest
import torch
from conftest import save_teacher_folder, tiny_unet
from distill_helpers import ROOT, run, tensors, tiny_cfg
from safetensors.torch import save_file

from distill.engine.export import read_student_file
from distill.engine.trajectories import generate
from students import build_student, load_student
from teachers import load_teacher


def _export_cli():
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_exported_student_samples_like_the_trained_one(tmp_path):
    built = []

    def keep(*args):
        built.append(build_student(*args))
        return built[-1]

    run(tiny_cfg(tmp_path / "r", "max_steps=6"), build_student=keep)
    assert _export_cli()([str(tmp_path / "r"), "--out", str(tmp_path / "s.safetensors")]) == 0
    assert _export_cli()([str(tmp_path / "r" / "checkpoints" / "step-4"), "--out", str(tmp_path / "e.safetensors"), "--ema"]) == 0
    trained, loaded = built[0].eval(), load_student(tmp_path / "s.safetensors")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(trained.sample(noise, 1), loaded.sample(noise, 1))
    g = [torch.Generator().manual_seed(1) for _ in range(2)]
    assert torch.equal(trained.sample(noise, 3, generator=g[0]), loaded.sample(noise, 3, generator=g[1]))
    _, meta = read_student_file(tmp_path / "s.safetensors")
    assert meta["parameterization"] == "consistency" and meta["teacher_hash"] == load_teacher("gmm:ring8").hash
    assert '"kind": "vp_linear"' in meta["schedule"] and '"max_steps": 6' in meta["training_config"]
    assert "1" in meta["sampling_timesteps"] and meta["network_class"] == "TimeMLP"
    ema = load_student(tmp_path / "e.safetensors")
    assert not torch.equal(ema.sample(noise, 1), loaded.sample(noise, 1))


def test_truncated_file_and_foreign_file_give_one_clear_sentence(tmp_path):
    run(tiny_cfg(tmp_path / "r", "max_steps=2"))
    good = (tmp_path / "r" / "student.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cut.safetensors' is not a readable safetensors file \(truncated or corrupt"):
        load_student(tmp_path / "cut.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="has no fewstep-distill/student metadata: it was not written by distill.engine.export"):
        load_student(tmp_path / "plain.safetensors")
    assert _export_cli()([str(tmp_path / "cut.safetensors"), "--out", str(tmp_path / "x.safetensors")]) == 1
    with pytest.raises(FileNotFoundError, match="no EMA student file in"):
        load_student(__import__("distill.engine.export").engine.export.resolve_student_file(tmp_path, ema=True))


@pytest.fixture
def unet_teacher(tmp_path):
    from diffusers import DDPMScheduler

    folder = save_teacher_folder(tmp_path / "teacher", tiny_unet(), DDPMScheduler(prediction_type="epsilon"))
    teacher = load_teacher(folder)
    cache = generate(teacher, tmp_path / "traj", solver="euler", nfe=4, num_samples=16, shard_size=16, log=lambda m: None)
    return folder, cache


def test_lora_cd_on_a_unet_teacher_trains_only_the_adapter_and_export_merges(tmp_path, unet_teacher):
    folder, cache = unet_teacher
    built = []

    def keep(*args):
        built.append(build_student(*args))
        return built[-1]

    cfg = tiny_cfg(tmp_path / "r", f"teacher={folder}", "student.arch=teacher", "student.model={}", f"trajectories={cache}",
                   "objective.source=trajectories", "dataset=null", "lora={rank: 2, alpha: 2, target_modules: [conv1, conv2]}",
                   "batch_size=4", "max_steps=3", "checkpoint_every=3", "optim.lr=0.01")
    teacher = load_teacher(folder)
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 999.0], dtype=torch.float64)
    assert torch.allclose(build_student(cfg.student, teacher).denoise(x, t), teacher.denoise(x, t), atol=1e-5)  # a copy
    run(cfg, build_student=keep)
    student = built[0].eval()
    trained = {n for n, p in student.net.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    base = {k.replace(".base_layer", ""): v for k, v in student.net.state_dict().items() if "lora_" not in k}
    teacher_state = teacher.unet.state_dict()
    assert all(torch.equal(v, teacher_state[k].float()) for k, v in base.items())  # base weights untouched
    assert any(p.abs().sum() > 0 for n, p in student.net.named_parameters() if "lora_B" in n)  # adapter moved

    merged = tensors(tmp_path / "r" / "student.safetensors")
    assert not any("lora" in k for k in merged)
    adapter = tmp_path / "r" / "checkpoints" / "step-3" / "student.safetensors"  # checkpoints keep the adapter
    assert any("lora_A" in k for k in tensors(adapter))
    with torch.no_grad():
        expect = student(x, t)
        for path in (tmp_path / "r" / "student.safetensors", adapter):
            err = (load_student(path)(x, t) - expect).abs().max()
            assert err <= 1e-6 * expect.abs().max(), (path, err)  # merged float32 weights round: compare to the output scale (~1e2)
    assert not torch.allclose(load_student(path)(x, t), build_student(cfg.student, teacher)(x, t), atol=1e-4)

    # the adapter in PEFT's own layout: written at the end of the run, and by export --peft from a checkpoint
    from diffusers import UNet2DModel
    from peft import PeftModel

    assert _export_cli()([str(tmp_path / "r" / "checkpoints" / "step-3"), "--out", str(tmp_path / "k.safetensors"),
                          "--keep-lora", "--peft", str(tmp_path / "peft")]) == 0
    for adapter_dir in (tmp_path / "r" / "lora_adapter", tmp_path / "peft"):
        assert (adapter_dir / "adapter_config.json").is_file()
        base = UNet2DModel.from_pretrained(folder / "unet", local_files_only=True)
        peft_net = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        with torch.no_grad():
            ours = student.net(x.float(), t.float()).sample
            theirs = peft_net(x.float(), t.float()).sample
        assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()
    # a finished run's files are merged: keeping the adapter from them is refused
    assert _export_cli()([str(tmp_path / "r"), "--out", str(tmp_path / "m.safetensors"), "--keep-lora"]) == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_unet_student_as_a_diffusers_folder(tmp_path, unet_teacher):
    from diffusers import UNet2DModel

    folder, cache = unet_teacher
    cfg = tiny_cfg(tmp_path / "r", f"teacher={folder}", "student.arch=teacher", "student.model={}", f"trajectories={cache}",
                   "objective.source=trajectories", "dataset=null", "batch_size=4", "max_steps=1")
    run(cfg)
    assert _export_cli()([str(tmp_path / "r"), "--out", str(tmp_path / "s.safetensors"), "--diffusers", str(tmp_path / "dif")]) == 0
    unet = UNet2DModel.from_pretrained(tmp_path / "dif" / "unet", local_files_only=True)
    student = load_student(tmp_path / "s.safetensors")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, student.net(x, t).sample)
    assert (tmp_path / "dif" / "student.json").is_file()


@pytest.mark.parametrize("sampler, parameterization", [("consistency", "consistency"), ("consistency", "consistency_edm"),
                                                       ("ode", "denoiser")])
def test_exported_pipeline_folder_samples_in_stock_diffusers_like_the_student(tmp_path, sampler, parameterization,
                                                                              remote_code_cache):
    """ConsistencyModelPipeline.from_pretrained(folder, trust_remote_code=True) with the exported FewStepScheduler (its
    source in the folder) reproduces Student.sample at 1 and at several steps, from the same generator (initial noise,
    then re-noising draws). Without this project on the import path: tests/test_diffusers_clean_load.py."""
    from diffusers import ConsistencyModelPipeline, DDPMScheduler

    teacher = save_teacher_folder(tmp_path / "teacher", tiny_unet(num_class_embeds=4), DDPMScheduler(prediction_type="v_prediction"),
                                  teacher_json={"num_classes": 3, "null_class_label": 3})
    cfg = tiny_cfg(tmp_path / "r", f"teacher={teacher}", "student.arch=teacher", "student.model={}", "student.class_conditional=true",
                   f"student.sampler={sampler}", f"student.parameterization={parameterization}", "student.sampling_grid=uniform")
    student = build_student(cfg.student, load_teacher(teacher)).eval()
    from students.diffusers_export import save_diffusers

    with torch.no_grad():
        for p in student.net.parameters():  # a non-trivial network, not the random init only
            p.add_(0.01 * torch.randn_like(p))
    save_diffusers(student, tmp_path / "pipe")
    pipe = ConsistencyModelPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([0, 2, 1])
    for steps in (1, 3):
        ours = student.sample(torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(7)), steps, cond=labels,
                              generator=_after_noise(7, (3, 1, 8, 8)))
        theirs = pipe(batch_size=3, num_inference_steps=steps, class_labels=labels, output_type="pt",
                      generator=torch.Generator().manual_seed(7)).images
        assert torch.allclose(theirs, (ours / 2 + 0.5).clamp(0, 1), atol=1e-6), (steps, (theirs - (ours / 2 + 0.5).clamp(0, 1)).abs().max())
    with pytest.raises(ValueError, match="records sampling times for 1, 2, 3, 4 steps, not 6"):
        pipe(batch_size=1, num_inference_steps=6, class_labels=[0])


def _after_noise(seed, shape):
    """A generator in the state the pipeline's is in after drawing the initial noise (re-noising draws follow)."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=g)
    return g
