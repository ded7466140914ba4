"""PSO fine-tuning (pso, its hinge variant, pso_online) and the naive baseline (finetune) on the analytic ring: the
transition log-probability against torch.distributions, zero logits at step 0, the hinge margin, bit-identical
resume, tiny end-to-end runs, option errors, the rewards and the mnist16 stroke subset."""

import json

import pytest
import torch
from distill_helpers import ROOT, run, same_tensors, tensors, tiny_cfg

from distill.engine.config import ConfigError
from distill.objectives.base import Batch
from distill.objectives.pso import gaussian_log_prob, hinge_loss, pso_logits, pso_loss, transition_log_prob
from distill.objectives.rewards import get_reward

LORA = "lora={rank: 2, alpha: 2, target_modules: [inp, out.1]}"


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny consistency student of gmm:ring8 (12 steps), the student every fine-tuning run starts from."""
    out = tmp_path_factory.mktemp("parent") / "cd"
    run(tiny_cfg(out, "ema_decay=null"))
    return out / "student.safetensors"


def pso_cfg(tmp_path, parent, folder, name, *sets):
    extra = {"pso": ["objective.num_references=16"], "pso_online": ["objective.reward=mean_ink", "objective.steps=3"],
             "finetune": []}[name]
    return tiny_cfg(tmp_path / folder, f"objective={{name: {name}}}", f"init_from={parent}", *extra, "max_steps=6",
                    "checkpoint_every=3", "log_every=1", "batch_size=8", "optim.lr=0.01", *sets)


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# -- the math --------------------------------------------------------------------------------------------------
def test_transition_log_prob_is_the_gaussian_of_the_renoising_step(parent):
    from students import load_student

    student = load_student(parent)
    g = torch.Generator().manual_seed(0)
    states = []
    student.sample(torch.randn(5, 2, generator=g), 3, generator=g, callback=lambda s: states.append(s))
    x, t, x_next, t_next = states[0]["x"], states[0]["t"], states[1]["x"], states[1]["t"]
    tt, tn = torch.full((5,), t, dtype=torch.float64), torch.full((5,), t_next, dtype=torch.float64)
    with torch.no_grad():
        ours = transition_log_prob(student, x, tt, x_next, tn)
        mean = float(student.schedule.alpha(torch.tensor(t_next))) * student(x, tt)
    normal = torch.distributions.Normal(mean, float(student.schedule.sigma(torch.tensor(t_next))))
    assert torch.allclose(ours, normal.log_prob(x_next).mean(1), atol=1e-5)
    std = torch.tensor([0.5, 2.0])[:, None]
    y, m = torch.randn(2, 7), torch.randn(2, 7)
    assert torch.allclose(gaussian_log_prob(y, m, std), torch.distributions.Normal(m, std).log_prob(y).mean(1), atol=1e-6)


def test_hinge_gradient_vanishes_past_the_margin():
    logits = torch.tensor([0.1, 0.5, -0.2], requires_grad=True)
    hinge_loss(logits, 5.0).sum().backward()
    assert logits.grad.tolist() == [-5.0, 0.0, -5.0]  # beta logits = 0.5 (inside), 2.5 (past 1), -1 (inside)
    x = torch.tensor([1.0], requires_grad=True)  # through L_theta: past the margin no gradient reaches the model
    hinge_loss(-(0.01 * x - 0.1 * 3.0), 5.0).sum().backward()
    assert x.grad.item() == 0.0


def test_pso_logits_and_loss_follow_the_formula():
    lt, lr_, rt, rr = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.5]), torch.tensor([2.5])
    logits = pso_logits(lt, lr_, rt, rr, 0.1)
    assert torch.allclose(logits, torch.tensor([(1.5 - 0.25) - (1.0 - 0.2)]))
    assert torch.allclose(pso_loss(logits, 3.0), -torch.nn.functional.logsigmoid(3.0 * logits))


@pytest.mark.parametrize("lora", [True, False])
def test_logits_are_exactly_zero_at_step_zero(tmp_path, parent, lora):
    from distill.engine.train import start
    from students import build_student
    from teachers import load_teacher

    cfg = pso_cfg(tmp_path, parent, "r", "pso", *([LORA] if lora else []))
    run_, step = start(cfg, load_teacher, build_student, None, lambda m: None)
    obj = run_.objective
    assert (obj.reference is None) == lora and bool(obj.bank.filled) and obj.bank.x.abs().sum() > 0
    x0, _ = run_.data.batch(torch.arange(8))
    batch = Batch(0, torch.Generator().manual_seed(1), torch.device("cpu"), 8, x0=x0)
    out = obj.loss("student", run_.nets, batch)
    assert torch.equal(out["logits"], torch.zeros(8))
    prior = obj.o.prior_weight * out["reference"]  # + prior_weight L_theta(rho), as the released code for pso too
    assert obj.o.prior_weight > 0 and float(prior.abs().sum()) > 0
    assert torch.allclose(out["loss"], torch.log(torch.tensor(2.0)) + prior)


# -- through the trainer -----------------------------------------------------------------------------------------
RUNS = [("pso", []), ("pso", ["objective.loss=hinge"]), ("pso", [LORA]), ("pso_online", []), ("pso_online", [LORA]),
        ("finetune", []), ("finetune", ["objective.time_sampling=uniform", "objective.weighting=uniform"])]


@pytest.mark.parametrize("name,sets", RUNS)
def test_each_objective_runs_end_to_end(tmp_path, parent, name, sets):
    out = run(pso_cfg(tmp_path, parent, "r", name, *sets))
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(r["grad_norm"] > 0 for r in rows[1:])
    before, after = tensors(parent), tensors(out / "student.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    from students import load_student

    meta_times = load_student(out / "student.safetensors").info["sampling_timesteps"]
    assert meta_times == load_student(parent).info["sampling_timesteps"]  # the parent's sampling times are kept
    if name == "pso":
        assert {"logits", "target", "reference"} <= set(rows[-1])
    if name == "pso_online":
        assert {"reward", "ties"} <= set(rows[-1])


@pytest.mark.parametrize("name,sets", [("pso", []), ("pso", [LORA]), ("pso_online", [])])
def test_resume_after_a_stop_is_bit_identical(tmp_path, parent, name, sets):
    run(pso_cfg(tmp_path, parent, "full", name, *sets, "max_steps=8"))
    assert run(pso_cfg(tmp_path, parent, "part", name, *sets, "max_steps=8"), stop_at=4) is None
    run(pso_cfg(tmp_path, parent, "part", name, *sets, "max_steps=8"), resume="latest")
    for f in ("student.safetensors", "student_ema.safetensors", "networks.safetensors"):
        if (tmp_path / "full" / f).exists():
            assert same_tensors(tmp_path / "full" / f, tmp_path / "part" / f), f


# -- options, rewards, data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,sets,message", [
    ("pso", ["objective.loss=dpo"], "config key 'objective.loss' is 'dpo'; allowed: logistic, hinge"),
    ("pso", ["objective.weighting=edm"], "allowed: snr, uniform"),
    ("pso", ["objective.ref_weight=-1"], "config key 'objective.ref_weight' must be at least 0"),
    ("pso_online", ["objective.reward=pickscore"], "config key 'objective.reward' is 'pickscore'; allowed: class_confidence, mean_ink"),
    ("pso_online", ["objective.steps=1"], "config key 'objective.steps' must be at least 2"),
    ("pso_online", ["objective.reward_sign=2"], "allowed: 1.0, -1.0"),
    ("finetune", ["objective.time_sampling=karras"], "allowed: grid, uniform"),
])
def test_bad_options_are_refused_in_one_sentence(tmp_path, parent, name, sets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run(pso_cfg(tmp_path, parent, "r", name, *sets))


def test_odd_online_batch_is_refused(tmp_path, parent):
    with pytest.raises(ConfigError, match="needs an even per-process batch"):
        run(pso_cfg(tmp_path, parent, "r", "pso_online", "batch_size=7"))


def test_rewards():
    from distill.data import mnist16

    digits = mnist16("heldout")
    x, y = digits.x[:64], digits.labels[:64]
    confidence = get_reward("class_confidence")(x, y)
    assert confidence.shape == (64,) and confidence.mean() > 0.8  # the committed classifier knows real digits
    assert get_reward("class_confidence", reward_class=3)(x, None)[y == 3].mean() > 0.8
    with pytest.raises(ValueError, match="needs class labels or the option 'reward_class'"):
        get_reward("class_confidence")(x, None)
    ink = get_reward("mean_ink")(x, None)
    assert torch.allclose(ink, ((x + 1) / 2).flatten(1).mean(1)) and torch.equal(get_reward("mean_ink", -1.0)(x, None), -ink)
    with pytest.raises(ValueError, match="unknown reward 'lpips'; allowed: class_confidence, mean_ink"):
        get_reward("lpips")


def test_mnist16_thick_stroke_quarter():
    from distill.data import load_dataset, mean_ink

    full, thick = load_dataset("mnist16"), load_dataset("mnist16", stroke="thick", fraction=0.25)
    assert len(thick) == 1000 and thick.labels.bincount().tolist() == [round(0.25 * int(n)) for n in full.labels.bincount()]
    assert mean_ink(thick.x).mean() > mean_ink(full.x).mean() + 0.03
    for c in range(10):  # every kept digit has at least the ink of every dropped digit of its class
        kept = mean_ink(thick.x[thick.labels == c]).min()
        assert (mean_ink(full.x[full.labels == c]) > kept).sum() < (thick.labels == c).sum()
    assert torch.equal(thick.x, load_dataset("mnist16", stroke="thick", fraction=0.25).x)  # deterministic
    with pytest.raises(ValueError, match="dataset option 'stroke' is 'bold'; allowed: thick, thin"):
        load_dataset("mnist16", stroke="bold")
    with pytest.raises(ValueError, match="allowed: split, stroke, fraction"):
        load_dataset("mnist16", ink=1)


# -- the mnist16 configs ---------------------------------------------------------------------------------------
CONFIGS = ["pso_mnist16", "pso_online_mnist16", "finetune_mnist16"]


@pytest.mark.parametrize("name", CONFIGS)
def test_mnist16_configs_load(name):
    from distill.engine.run_config import load_run_config

    cfg = load_run_config(ROOT / "configs" / "distill" / f"{name}.yaml")
    assert cfg.init_from == "results/mnist16/students/cd_mnist16.safetensors" and cfg.lora is not None
    assert cfg.objective["name"] == name.removesuffix("_mnist16")


def test_class_conditional_references_match_the_target_labels(tmp_path):
    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config
    from distill.engine.train import start
    from students import build_student
    from teachers import load_teacher

    sets = [f"init_from={ROOT / 'results/mnist16/students/cd_mnist16.safetensors'}", "objective.num_references=20",
            "objective.reference_steps=1", f"output_dir={tmp_path / 'r'}"]
    cfg = load_run_config(ROOT / "configs" / "distill" / "pso_mnist16.yaml", parse_overrides(sets))
    run_, _ = start(cfg, load_teacher, build_student, None, lambda m: None)
    obj = run_.objective
    assert obj.bank.labels.tolist() == [i % 10 for i in range(20)]
    assert obj.student.sampling_timesteps(4).tolist()[0] == 999.0 and len(obj.grid()) == 4  # the parent's tuned times
    x0, cond = run_.data.batch(torch.arange(12))
    refs = obj.references_for(Batch(0, torch.Generator().manual_seed(0), torch.device("cpu"), 12, x0=x0, cond=cond))
    rows = [int((obj.bank.x == r).flatten(1).all(1).nonzero()[0]) for r in refs]
    assert [obj.bank.labels[i].item() for i in rows] == cond.tolist()
    from distill.eval.fid import load_classifier

    with torch.no_grad():  # the references are digits of their label (the student's one-step samples)
        assert (load_classifier()(obj.bank.x).argmax(1) == obj.bank.labels).float().mean() >= 0.8


def test_style_statistics_on_known_images():
    from conftest import load_script

    # sample i is a constant image at ink level i / 10 (x = 2 ink - 1): mean 0.45, 10th percentile 0.09 (linear quantile)
    x = (torch.arange(10, dtype=torch.float32) / 10 * 2 - 1).view(10, 1, 1, 1).expand(10, 1, 4, 4)
    row = load_script("style_stats").statistics(x, None, None)
    assert row["mean_ink"] == pytest.approx(0.45) and row["ink_p10"] == pytest.approx(0.09)
    assert row["on_fraction"] == pytest.approx(0.4)  # ink 0.6, 0.7, 0.8, 0.9 are above half


def test_style_stats_script(tmp_path):
    from conftest import load_script

    cd = ROOT / "results/mnist16/students/cd_mnist16.safetensors"
    bench = tmp_path / "bench.csv"
    bench.write_text("method,kind,steps,fid,fid_std,num_samples\ncd_mnist16,student,1,21.5,1.7,20\n")
    assert load_script("style_stats").main(["--students", f"a={cd},b={cd}", "--student-steps", "1", "--num-samples", "20",
                                            "--grid-samples", "4", "--out", str(tmp_path), "--bench-csv", str(bench)]) == 0
    rows = (tmp_path / "style.csv").read_text().splitlines()
    assert rows[0] == "kind,name,steps,num_samples,mean_ink,ink_std,ink_p10,on_fraction,accuracy" and len(rows) == 5
    assert rows[1].split(",")[4] == rows[2].split(",")[4]  # the same file, the same noise: the same statistic
    assert (tmp_path / "before_after_b.png").is_file()
    import csv

    joined = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["name"], r["ink_progress"], r["fid"], r["fid_change"]) for r in joined] == [("a", "0.0", "21.5", "0.0"),
                                                                                          ("b", "0.0", "21.5", "0.0")]


@pytest.mark.parametrize("name,port", [("pso_online", 29583)])  # its loss calls the network on every transition at once
def test_runs_on_two_processes(tmp_path, parent, name, port):
    import subprocess
    import sys

    from distill_helpers import subprocess_env

    extra = ["objective.num_references=16"] if name == "pso" else ["objective.reward=mean_ink", "objective.steps=3"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(ROOT / "scripts" / "distill.py"), "--config", str(ROOT / "configs" / "distill" / "cd_ring8.yaml"),
           "--output-dir", str(tmp_path / "two"), "--set", "student.model.hidden=32", "student.model.layers=1", "batch_size=8",
           f"objective={{name: {name}}}", f"init_from={parent}", "checkpoint_every=4", "log_every=2", "max_steps=4", LORA, *extra]
    done = subprocess.run(cmd, env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two" / "student.safetensors").is_file()
