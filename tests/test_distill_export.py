"""Export: student files round trip, clear errors, LoRA on a UNet student (trains only the adapter, merges), diffusers folders."""

import importlib.util

import pytest
import torch
from conftest import save_teacher_folder, tiny_unet
from distill_helpers import ROOT, run, tensors, tiny_cfg
from safetensors.torch import save_file

from distill.export import read_student_file
from distill.trajectories import generate
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
    with pytest.raises(ValueError, match="has no fewstep-distill/student metadata: it was not written by distill.export"):
        load_student(tmp_path / "plain.safetensors")
    assert _export_cli()([str(tmp_path / "cut.safetensors"), "--out", str(tmp_path / "x.safetensors")]) == 1
    with pytest.raises(FileNotFoundError, match="no EMA student file in"):
        load_student(__import__("distill.export").export.resolve_student_file(tmp_path, ema=True))


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
