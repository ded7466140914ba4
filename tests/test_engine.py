"""The engine's contracts for every objective family (issue: network roles, lineage, per-network optimization)."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import load_script, save_teacher_folder
from distill_helpers import RING8, ROOT, TINY, run, same_tensors, subprocess_env, tensors, tiny_cfg
from toy_objectives import ToyVSD  # registers the toy objectives

from distill.engine.config import ConfigError
from distill.engine.train import lr_lambda
from students import build_student, load_student
from teachers import load_teacher


def _toy_teacher(tmp_path):
    """A random ToyMLP teacher on the ring8 data shape, as a diffusers folder (a network teacher for copies)."""
    from diffusers import DDPMScheduler

    from teachers.toy_mlp import ToyMLP

    torch.manual_seed(0)
    return save_teacher_folder(tmp_path / "toy_teacher", ToyMLP(dim=2, hidden=16, layers=1), DDPMScheduler(clip_sample=False))


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _launch2(out, *sets, port):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(ROOT / "tests" / "distill_with_toys.py"), "--config", str(RING8), "--output-dir", str(out),
           "--set", *TINY, *sets]
    return subprocess.run(cmd, env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)


# -- defects -------------------------------------------------------------------------------------------
def test_lr_schedule_is_a_function_of_the_global_step(tmp_path):
    """A network updated every other step follows the schedule at the global step: cosine ends near 0, not at 50%."""
    run(tiny_cfg(tmp_path / "r", "objective={name: test_partial_critic}", "max_steps=40", "log_every=1",
                 "optim.lr_schedule=cosine", "optim.warmup_steps=4", "optim.lr=0.01"))
    factor = lr_lambda(4, 40, "cosine")
    rows = _metrics(tmp_path / "r")
    for name, offset in (("student", 0), ("critic", 1)):
        lrs = [(r["step"] - 1, r["lr"]) for r in rows if r["network"] == name]
        assert [s for s, _ in lrs] == list(range(offset, 40, 2))
        assert all(lr == pytest.approx(0.01 * factor(s), rel=1e-12) for s, lr in lrs)
    assert lrs[-1][1] < 0.01 * 0.01  # the critic's last update (step 39) is under 1% of its base lr, not ~50%


def test_linear_schedule_decays_to_zero():
    f = lr_lambda(0, 10, "linear")
    assert [f(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_schedules_follow_diffusers_after_the_warm_up(schedule):
    """After the warm-up the factor is diffusers' get_scheduler's; during it, diffusers' factor one step later."""
    from diffusers.optimization import get_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler(f"{schedule}_with_warmup" if schedule == "constant" else schedule, opt,
                        num_warmup_steps=7, num_training_steps=50).lr_lambdas[0]
    ours = lr_lambda(7, 50, schedule)
    assert [ours(s) for s in range(7)] == pytest.approx([ref(s + 1) for s in range(7)], abs=1e-15)
    assert [ours(s) for s in range(7, 51)] == pytest.approx([ref(s) for s in range(7, 51)], abs=1e-15)


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path):
    out = tmp_path / "r"
    assert run(tiny_cfg(out, "max_steps=8"), stop_at=4) is None
    with pytest.raises(ConfigError, match=r"differs from the one checkpoint .*step-4.* in objective.target_ema \(0.95 -> 0.9\), "
                                          r"optim.lr \(0.001 -> 0.002\)"):
        run(tiny_cfg(out, "max_steps=8", "optim.lr=0.002", "objective.target_ema=0.9"), resume="latest")
    with pytest.raises(ConfigError, match="is at step 4, beyond max_steps 3"):
        run(tiny_cfg(out, "max_steps=3"), resume="latest")
    before = (out / "config.yaml").read_text()
    assert "lr: 0.001" in before  # the refusals wrote nothing
    run(tiny_cfg(out, "max_steps=10", "log_every=5"), resume="latest")  # length and logging may change
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 10


def test_two_processes_with_a_network_that_skips_parameters(tmp_path):
    """DDP needs find_unused_parameters when a loss leaves parameters unused on some steps: the objective declares
    it and the run works on 2 processes; switched off in the config, DDP fails as users reported."""
    ok = _launch2(tmp_path / "ok", "objective={name: test_partial_critic}", "max_steps=6", port=29531)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "ok" / "student.safetensors").is_file()
    bad = _launch2(tmp_path / "bad", "objective={name: test_partial_critic}", "max_steps=6", "ddp.find_unused_parameters=false",
                   port=29533)
    assert bad.returncode != 0 and "Expected to have finished reduction" in bad.stderr


# -- a three-network objective: fake-score copy of the teacher + discriminator head ------------------------
def _vsd(tmp_path, name, *extra):
    teacher = _toy_teacher(tmp_path)
    return tiny_cfg(tmp_path / name, f"teacher={teacher}", "objective={name: test_vsd}", "max_steps=9", "checkpoint_every=3",
                    "log_every=3", *extra)


def test_fake_score_and_discriminator_objective_resumes_bit_identically_and_exports_only_the_student(tmp_path):
    run(_vsd(tmp_path, "full"))
    assert run(_vsd(tmp_path, "part"), stop_at=4) is None
    run(_vsd(tmp_path, "part"), resume="latest")
    for name in ("student.safetensors", "student_ema.safetensors", "networks.safetensors"):
        assert same_tensors(tmp_path / "full" / name, tmp_path / "part" / name), name
    student = tensors(tmp_path / "full" / "student.safetensors")
    others = tensors(tmp_path / "full" / "networks.safetensors")
    assert not any(k.startswith(("fake_score", "disc")) for k in student)
    assert {k.split(".")[0] for k in others} == {"fake_score", "disc", "counter"}
    teacher = load_teacher(tmp_path / "toy_teacher")
    assert not torch.equal(others["fake_score.net.mlp.inp.weight"], teacher.unet.mlp.inp.weight)  # the copy trained
    rows = _metrics(tmp_path / "full")
    assert {"dm", "gan"} <= set(next(r for r in rows if r["network"] == "student"))  # named components logged
    assert {"real_logit", "fake_logit"} <= set(next(r for r in rows if r["network"] == "disc"))
    assert next(r for r in rows if r["network"] == "disc")["lr"] == 1e-3  # its own declared lr
    assert float(others["counter.seen"]) == 3 * 32  # a checkpointed helper: 3 student updates of batch 32
    assert ToyVSD.started[-1] == (4, 2 * 32)  # on_start ran after the restore, with the restored statistics


def test_init_also_takes_other_networks_and_helpers_from_the_parent_run(tmp_path):
    run(_vsd(tmp_path, "r1"))
    parent = tensors(tmp_path / "r1" / "networks.safetensors")
    run(_vsd(tmp_path, "r2", f"init_from={tmp_path / 'r1'}", "init_also=[fake_score, counter]", "max_steps=1"))
    child = tensors(tmp_path / "r2" / "networks.safetensors")  # one step: only the student updated
    assert all(torch.equal(child[k], parent[k]) for k in parent if k.startswith("fake_score."))
    assert float(child["counter.seen"]) == 96 + 32  # the parent's count, plus this run's one update
    assert not torch.equal(child["disc.body.0.weight"], parent["disc.body.0.weight"])  # not asked for: fresh
    with pytest.raises(ConfigError, match=r"'init_also' names \['critic'\]; allowed: fake_score, disc, counter"):
        run(_vsd(tmp_path, "r3", f"init_from={tmp_path / 'r1'}", "init_also=[critic]"))


def test_fake_score_and_discriminator_objective_on_two_processes(tmp_path):
    teacher = _toy_teacher(tmp_path)
    done = _launch2(tmp_path / "two", f"teacher={teacher}", "objective={name: test_vsd}", "max_steps=6", port=29535)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(tensors(tmp_path / "two" / "networks.safetensors")["counter.seen"]) == 2 * 32  # reduced over both ranks


def test_per_network_settings_and_parameter_groups_from_the_config(tmp_path):
    out = tmp_path / "r"
    run(tiny_cfg(out, "objective={name: test_partial_critic}", "max_steps=4",
                 "networks={critic: {lr: 0.05, betas: [0.5, 0.9]}, student: {param_groups: [{match: blocks., lr: 0.2}]}}"))
    ckpt = out / "checkpoints" / "step-4"
    student_opt = json.loads((ckpt / "optimizer.json").read_text())["param_groups"]
    critic_opt = json.loads((ckpt / "optimizer_1.json").read_text())["param_groups"]
    assert [g["initial_lr"] for g in student_opt] == [0.001, 0.2] and len(student_opt[1]["params"]) == 2  # one block: w, b
    assert critic_opt[0]["initial_lr"] == 0.05 and critic_opt[0]["betas"] == [0.5, 0.9]
    with pytest.raises(ConfigError, match=r"'networks' names \['fake'\], which this objective does not train; allowed: student, critic"):
        run(tiny_cfg(tmp_path / "bad", "objective={name: test_partial_critic}", "networks={fake: {lr: 0.1}}"))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) networks.critic.learning_rate"):
        tiny_cfg(tmp_path / "bad2", "networks={critic: {learning_rate: 0.1}}")


def test_gradient_accumulation_splits_each_step_into_micro_batches(tmp_path):
    sizes = []
    from distill.objectives.consistency import ConsistencyDistillation

    original = ConsistencyDistillation.loss

    def spy(self, name, nets, batch):
        sizes.append(batch.size)
        return original(self, name, nets, batch)

    ConsistencyDistillation.loss = spy
    try:
        run(tiny_cfg(tmp_path / "r", "gradient_accumulation_steps=4", "max_steps=2"))
    finally:
        ConsistencyDistillation.loss = original
    assert sizes == [8] * 8  # batch 32 = 4 micro-batches of 8, per step
    with pytest.raises(ConfigError, match="must be divisible by the 1 process\\(es\\) x 3 gradient accumulation"):
        run(tiny_cfg(tmp_path / "bad", "gradient_accumulation_steps=3"))


# -- lineage ---------------------------------------------------------------------------------------------
def test_init_from_chain_student_teaches_the_next_round_and_round_two_resumes_bit_identically(tmp_path):
    distill = load_script("distill").main
    assert distill(["--config", str(RING8), "--output-dir", str(tmp_path / "r1"), "--set", *TINY, "max_steps=6"]) == 0
    parent = tmp_path / "r1" / "student.safetensors"
    round2 = ["--config", str(RING8), "--set", *TINY, "max_steps=8", "checkpoint_every=2", f"teacher=student:{parent}",
              f"init_from={parent}"]
    assert distill([*round2, "--output-dir", str(tmp_path / "full")]) == 0
    killed = tmp_path / "killed"
    assert run(tiny_cfg(killed, "max_steps=8", "checkpoint_every=2", f"teacher=student:{parent}", f"init_from={parent}"),
               stop_at=3) is None
    assert distill([*round2, "--output-dir", str(killed), "--resume", "latest"]) == 0
    assert same_tensors(tmp_path / "full" / "student.safetensors", killed / "student.safetensors")
    # lineage recorded in the run folder and in the exported student
    from distill.engine.train import file_sha256

    digest = file_sha256(parent)
    assert yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())["init_from_sha256"] == digest
    child = load_student(tmp_path / "full" / "student.safetensors")
    assert child.info["lineage"] == {"init_from": str(parent), "sha256": digest}
    teacher = load_teacher(f"student:{parent}")
    assert child.info["teacher_hash"] == teacher.hash == digest
    # the student-teacher denoises exactly as the round-1 student
    first, x = load_student(parent), torch.randn(5, 2)
    t = torch.full((5,), 0.5, dtype=torch.float64)
    assert torch.equal(teacher.denoise(x, t), first(x, t))
    with pytest.raises(ConfigError, match="'init_from_sha256' is 00, but .* has sha256"):
        run(tiny_cfg(tmp_path / "pinned", f"init_from={parent}", "init_from_sha256='00'"))


def test_init_from_starts_from_the_parent_weights(tmp_path):
    run(tiny_cfg(tmp_path / "r1", "max_steps=4"))
    parent = tmp_path / "r1" / "student.safetensors"
    cfg = tiny_cfg(tmp_path / "r2", f"init_from={tmp_path / 'r1'}")
    child = build_student(cfg.student, load_teacher(cfg.teacher), None, init_from=parent)
    assert same_state(child.net.state_dict(), load_student(parent).net.state_dict())
    with pytest.raises(ValueError, match="does not fit the student network"):
        build_student(tiny_cfg(tmp_path / "r3", "student.model.hidden=16").student, load_teacher(cfg.teacher), None, init_from=parent)


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the student and denoiser contracts ------------------------------------------------------------------
def test_extra_condition_is_zero_at_initialisation_survives_copies_and_files(tmp_path):
    cfg = tiny_cfg(tmp_path / "r")
    student = build_student(cfg.student, load_teacher(cfg.teacher))
    x, t = torch.randn(4, 2), torch.full((4,), 0.3, dtype=torch.float64)
    before = student(x, t)
    student.add_condition("gamma")
    assert torch.equal(student(x, t, gamma=torch.rand(4)), before)  # zero-initialised projection
    with torch.no_grad():
        student.conditions["gamma"].proj.bias.fill_(0.5)
    g = torch.rand(4)
    moved = student(x, t, gamma=g)
    assert not torch.equal(moved, before)
    twin = copy.deepcopy(student)
    assert torch.equal(twin(x, t, gamma=g), moved) and torch.equal(student(x, t), before)  # the hook follows the copy
    with pytest.raises(ValueError, match=r"extra conditions \['w'\] are not inputs of this network; it takes: gamma"):
        student(x, t, w=g)
    from distill.engine.export import save_student

    save_student(student, tmp_path / "s.safetensors")
    assert torch.equal(load_student(tmp_path / "s.safetensors")(x, t, gamma=g), moved)


def test_ode_sampler_takes_solver_steps_with_the_students_denoiser(tmp_path):
    from distill.core.grids import explicit_grid
    from distill.solvers import SOLVERS

    cfg = tiny_cfg(tmp_path / "r", "student.parameterization=denoiser", "student.sampler=ode", "student.sampling_steps=[1, 2, 8]")
    student = build_student(cfg.student, load_teacher(cfg.teacher)).eval()
    noise = torch.randn(6, 2)
    ts = student.sampling_timesteps(8)
    ref = SOLVERS["euler"].fn(student.denoise, noise.clone(), explicit_grid(student.schedule, ts), schedule=student.schedule)
    seen = []
    assert torch.equal(student.sample(noise, 8, callback=seen.append), ref) and len(seen) == 8
    from distill.engine.export import save_student

    save_student(student, tmp_path / "s.safetensors")
    loaded = load_student(tmp_path / "s.safetensors")
    assert loaded.sampler == "ode" and loaded.sampling_steps == (1, 2, 8)
    assert torch.equal(loaded.sample(noise, 8), ref)


def test_one_conversion_for_teachers_students_and_copies(make_teacher_folder):
    from distill.core.denoisers import NetDenoiser
    from distill.engine.roles import teacher_copy

    for prediction in ("epsilon", "v_prediction", "sample"):
        folder, net, _ = make_teacher_folder(prediction_type=prediction, name=prediction)
        teacher = load_teacher(folder)
        assert isinstance(teacher.model, NetDenoiser)
        copy_ = teacher_copy(teacher)
        x, t = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 500.0, 990.0], dtype=torch.float64)
        assert torch.equal(copy_(x, t), teacher.denoise(x, t)) and copy_.net.training
        assert all(p.requires_grad for p in copy_.parameters()) and not any(p.requires_grad for p in teacher.unet.parameters())
    with pytest.raises(ValueError, match="has no network to copy"):
        teacher_copy(load_teacher("gmm:ring8"))


def test_lora_disabled_runs_the_frozen_base_network(make_teacher_folder):
    from distill.engine.roles import lora_disabled
    from distill.engine.run_config import LoraSettings, StudentConfig

    folder, _, _ = make_teacher_folder(prediction_type="epsilon")
    teacher = load_teacher(folder)
    student = build_student(StudentConfig(arch="teacher", parameterization="denoiser"), teacher,
                            LoraSettings(rank=2, alpha=2, target_modules=["conv1", "conv2"]))
    with torch.no_grad():
        for n, p in student.net.named_parameters():
            if "lora_B" in n:
                p.normal_()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100.0, 700.0], dtype=torch.float64)
    adapted = student(x, t)
    with lora_disabled(student.net):
        base = student(x, t)
    assert torch.allclose(base, teacher.denoise(x, t), atol=1e-5) and not torch.allclose(adapted, base)
    assert torch.equal(student(x, t), adapted)  # enabled again on leaving
