"""``compile: true`` (distill.engine.compile) and ``mixed_precision: bf16`` on the CPU against the eager float32 trainer.

The compiled runs use inductor: the default tests take about 50 s on a cold inductor cache (C++ kernels for the tiny
MLP's two graphs, with and without gradients) and 20 s on a warm one (/tmp/torchinductor_<user>); the slow ones (a tiny
UNet, LoRA, two processes) several minutes cold; the tiny-UNet SiD one runs only with DISTILL_LONG_TESTS=1."""

from __future__ import annotations

import json
import os

import pytest
import torch
from distill_helpers import run, same_tensors, tensors, tiny_cfg
from torch import nn
from torch._dynamo.utils import counters

from distill.engine.compile import CompileError, compile_module
from distill.engine.run_files import config_changes
from distill.engine.run_setup import bf16_warning
from distill.objectives.base import unwrap

STEPS = ["max_steps=20", "log_every=1", "checkpoint_every=10"]


def losses(folder) -> torch.Tensor:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["loss"] for r in rows], dtype=torch.float64)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change: start and leave it blank."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_compiled_run_matches_eager_keeps_file_keys_and_resumes_exactly(tmp_path):
    """cd_ring8 (tiny MLP student + EMA target), 20 steps: the compiled run's per-step losses agree with eager's to
    rtol 1e-5 (measured: at most 8e-7 relative; inductor reorders float32 sums, so not bit for bit); the student file,
    networks.safetensors and the checkpoint's network files hold the eager run's keys (no ``_orig_mod.``); a compiled
    run stopped at step 10 and resumed compiled ends bit-identical to the uninterrupted compiled run."""
    eager, compiled, resumed = tmp_path / "eager", tmp_path / "compiled", tmp_path / "resumed"
    run(tiny_cfg(eager, *STEPS))
    counters.clear()
    run(tiny_cfg(compiled, *STEPS, "compile=true"))
    assert counters["stats"]["unique_graphs"] >= 2  # with and without gradients: compiled, not eager
    a, b = losses(eager), losses(compiled)
    assert len(a) == 20 and torch.allclose(b, a, rtol=1e-5, atol=0), ((b - a).abs() / a.abs()).max()
    for name in ("student.safetensors", "student_ema.safetensors", "networks.safetensors",
                 "checkpoints/step-10/model.safetensors"):
        assert tensors(compiled / name).keys() == tensors(eager / name).keys(), name
    assert not any("_orig_mod" in k for k in tensors(compiled / "networks.safetensors"))
    assert run(tiny_cfg(resumed, *STEPS, "compile=true"), stop_at=10) is None
    run(tiny_cfg(resumed, *STEPS, "compile=true"), resume="latest")
    assert same_tensors(resumed / "student.safetensors", compiled / "student.safetensors")
    assert torch.equal(losses(resumed), b)


def test_compile_is_a_key_a_resume_may_change():
    assert config_changes({"compile": False, "seed": 0}, {"compile": True, "seed": 0}) == []


def test_bf16_autocast_on_the_cpu_stays_near_float32(tmp_path, fresh_accelerate_state, capsys):
    """mixed_precision bf16 runs on the CPU (accelerate's torch.autocast("cpu", bfloat16) around the student's forward):
    over 20 cd_ring8 steps the losses agree with float32 to rtol 1e-2 (measured: at most 1.2e-3 relative; bf16 keeps 8
    bits of mantissa). The analytic teacher has no network to cast; saved weights stay float32. On a CPU without bf16
    instructions the run says it will be slow (bf16 matrix products emulated)."""
    run(tiny_cfg(tmp_path / "fp32", *STEPS))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    run(tiny_cfg(tmp_path / "bf16", *STEPS, "mixed_precision=bf16"))
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(b) == 20 and torch.isfinite(b).all()
    assert not torch.equal(a, b) and torch.allclose(b, a, rtol=1e-2, atol=0), ((b - a).abs() / a.abs()).max()
    assert all(v.dtype == torch.float32 for v in tensors(tmp_path / "bf16" / "student.safetensors").values())
    slow = not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert ("mixed_precision bf16 on a CPU without bf16 instructions" in capsys.readouterr().out) == slow


def test_bf16_warning_only_for_bf16_on_a_cpu_without_bf16_instructions():
    cpu = torch.device("cpu")
    assert bf16_warning("no", cpu) is None and bf16_warning("bf16", torch.device("cuda", 0)) is None
    assert (bf16_warning("bf16", cpu) is None) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_unwrap_sees_through_torch_compile_wrappers():
    net = nn.Linear(2, 2)
    assert unwrap(torch.compile(net)) is net  # lazy: nothing is compiled here
    assert set(unwrap(torch.compile(net)).state_dict()) == {"weight", "bias"}


def test_a_network_that_fails_to_compile_is_named_in_one_sentence():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no kernel for this op")

    net = nn.Linear(2, 2)
    compile_module("fake_score", net, backend=broken_backend)
    assert set(net.state_dict()) == {"weight", "bias"}  # compiled in place: the same module and keys
    with pytest.raises(CompileError, match=r"^compile: true: torch.compile failed on network 'fake_score' \(Linear\): "
                                           r"RuntimeError: no kernel for this op; set compile: false to run it eagerly$"):
        net(torch.zeros(1, 2))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DISTILL_LONG_TESTS"), reason="about 5 minutes of cold inductor compilation of three "
                    "UNets: DISTILL_LONG_TESTS=1 runs it")
def test_compiled_two_network_run_on_a_tiny_unet_matches_eager(tmp_path):
    """SiD (sid_mnist16.yaml) on a tiny class-conditional UNet teacher: the student, the fake score and the teacher's
    UNet compiled; 6 steps of both networks' losses agree with eager's to rtol 1e-4, atol 1e-6 (measured: at most
    2.1e-5 relative, on the generator loss, a difference of near-equal terms; its first value is 0 eager and 4e-8
    compiled, the fake score being the teacher's copy), and the files hold the eager run's keys. About 5 minutes on a
    cold inductor cache (several UNet graphs: batch sizes, with and without gradients), seconds on a warm one."""
    from conftest import save_teacher_folder, tiny_unet
    from diffusers import DDPMScheduler
    from distill_helpers import ROOT

    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config

    teacher = save_teacher_folder(tmp_path / "teacher", tiny_unet(num_class_embeds=4), DDPMScheduler(),
                                  teacher_json={"num_classes": 3, "null_class_label": 3})

    def sid(out, *extra):
        overrides = [f"teacher={teacher}", "batch_size=8", "max_steps=6", "log_every=1", "checkpoint_every=3",
                     f"output_dir={out}", *extra]
        return run(load_run_config(ROOT / "configs" / "distill" / "sid_mnist16.yaml", parse_overrides(overrides)))

    sid(tmp_path / "eager")
    sid(tmp_path / "compiled", "compile=true")
    rows = {k: [json.loads(line) for line in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
            for k in ("eager", "compiled")}
    a = torch.tensor([r["loss"] for r in rows["eager"]], dtype=torch.float64)
    b = torch.tensor([r["loss"] for r in rows["compiled"]], dtype=torch.float64)
    assert {r["network"] for r in rows["eager"]} == {"student", "fake_score"} and len(a) == 12
    assert torch.allclose(b, a, rtol=1e-4, atol=1e-6), ((b - a).abs() / a.abs().clamp_min(1e-6)).max()
    for name in ("student.safetensors", "networks.safetensors", "checkpoints/step-3/model_1.safetensors"):
        assert tensors(tmp_path / "compiled" / name).keys() == tensors(tmp_path / "eager" / name).keys(), name


@pytest.mark.slow
def test_compiled_lora_run_matches_eager_and_exports_the_same_files(tmp_path):
    """A LoRA student (adapters on the MLP's ``inp`` and ``out.1``) compiled: 8 steps within rtol 1e-5 of eager, the
    final merged student file and the PEFT adapter hold the eager run's keys (the merge copies the network: eager)."""
    lora = "lora={rank: 2, alpha: 2, target_modules: [inp, out.1]}"
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run(tiny_cfg(eager, lora, "max_steps=8", "log_every=1"))
    counters.clear()
    run(tiny_cfg(compiled, lora, "max_steps=8", "log_every=1", "compile=true"))
    assert counters["stats"]["unique_graphs"] >= 2
    a, b = losses(eager), losses(compiled)
    assert torch.allclose(b, a, rtol=1e-5, atol=0), ((b - a).abs() / a.abs()).max()
    assert tensors(compiled / "student.safetensors").keys() == tensors(eager / "student.safetensors").keys()
    assert not any("lora" in k for k in tensors(compiled / "student.safetensors"))
    assert sorted(p.name for p in (compiled / "lora_adapter").iterdir()) == sorted(p.name for p in (eager / "lora_adapter").iterdir())


@pytest.mark.slow
def test_compiled_three_network_objective_on_two_processes(tmp_path):
    """DDP (two gloo ranks) over compiled networks: the toy VSD objective (student, a fake-score copy of a ToyMLP teacher,
    a discriminator head on its bottleneck) with compile: true finishes, and its files hold the keys of the same run
    uncompiled on one process. A few minutes: each rank compiles on a cold inductor cache of its own."""
    from test_engine import _launch2, _toy_teacher  # and the toy objectives, registered

    teacher = _toy_teacher(tmp_path)
    common = [f"teacher={teacher}", "objective={name: test_vsd}", "max_steps=6"]
    done = _launch2(tmp_path / "two", *common, "compile=true", port=29597)
    assert done.returncode == 0, done.stderr[-3000:]
    run(tiny_cfg(tmp_path / "one", *common))
    for name in ("student.safetensors", "networks.safetensors", "checkpoints/step-4/model_1.safetensors"):
        assert tensors(tmp_path / "two" / name).keys() == tensors(tmp_path / "one" / name).keys(), name
