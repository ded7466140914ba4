"""Greedy choice of multistep sampling times (distill.eval.tune, scripts/tune_steps.py)."""

import pytest
import torch
from conftest import load_script

from distill.core.schedules import DiscreteVP
from distill.eval.tune import candidate_times, greedy_timesteps


@pytest.fixture(scope="module")
def mnist16_student(tmp_path_factory):
    """The committed mnist16 teacher's network as an untrained one-step student file."""
    from distill.engine.export import save_student
    from distill.engine.run_config import StudentConfig
    from students.build import build_student
    from teachers import load_teacher

    cfg = StudentConfig(arch="teacher", sampling_grid="uniform", class_conditional=True)
    return save_student(build_student(cfg, load_teacher("mnist16")), tmp_path_factory.mktemp("s") / "student.safetensors")


def test_greedy_search_finds_the_minimum_of_a_known_score():
    s = DiscreteVP()
    cands = candidate_times(s, 12)
    assert len(cands) == 12 and all(s.t_min < t < s.t_max for t in cands) and cands == sorted(cands, reverse=True)
    lam = lambda t: float(s.lam(torch.tensor([t], dtype=torch.float64))[0])  # noqa: E731
    target = [999.0, 600.0, 250.0]  # the score is the squared log-SNR distance to these times
    score = lambda ts: sum((lam(a) - lam(b)) ** 2 for a, b in zip(ts, target))  # noqa: E731
    times, rows = greedy_timesteps(s, 3, score, cands)
    assert times[1] == [999.0] and times[3][:2] == times[2]  # k-step times extend the (k-1)-step ones
    coarse = min(cands, key=lambda t: abs(lam(t) - lam(600.0)))
    assert abs(lam(times[2][1]) - lam(600.0)) <= abs(lam(coarse) - lam(600.0))  # refinement never loses
    assert abs(lam(times[2][1]) - lam(600.0)) < 0.5 and abs(lam(times[3][2]) - lam(250.0)) < 0.5
    assert all(r["steps"] in (2, 3) for r in rows) and len(rows) >= 12


def test_greedy_search_rejects_bad_input():
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        greedy_timesteps(DiscreteVP(), 0, lambda ts: 0.0)


def test_greedy_search_below_the_smallest_candidate_halves_the_rest_in_log_snr():
    s = DiscreteVP()  # a 2-step optimum at the smallest candidate once made the 3-step search fail
    times, _ = greedy_timesteps(s, 3, lambda ts: 0.0, [999.5], refine=False)
    lam = s.lam(torch.tensor(times[3], dtype=torch.float64))
    assert times[3][:2] == times[2] and s.t_min < times[3][2] < times[3][1] < 999.0
    assert float(lam[2] - lam[1]) == pytest.approx(float(s.lam(torch.tensor([s.t_min], dtype=torch.float64))[0] - lam[2]))


def test_tune_steps_script_writes_the_times_into_the_student(tmp_path, mnist16_student):
    from students import load_student

    out = tmp_path / "tuned.safetensors"
    main = load_script("tune_steps").main
    assert main([str(mnist16_student), "--out", str(out), "--max-steps", "2", "--num-samples", "40", "--candidates", "3"]) == 0
    before, after = load_student(mnist16_student), load_student(out)
    t2 = after.sampling_timesteps(2).tolist()
    assert t2[0] == 999.0 and 0 < t2[1] < 999 and after.info["sampling_search"]["num_samples"] == 40
    assert after.info["sampling_search"]["reference"] == "mnist16:tune"  # not data the benchmark reports on
    assert torch.equal(after.sampling_timesteps(3), before.sampling_timesteps(3))  # untuned step counts keep theirs
    noise = torch.randn(2, 1, 16, 16)
    labels = torch.tensor([3, 7])
    assert torch.equal(after.sample(noise, 1, labels), before.sample(noise, 1, labels))  # the weights are unchanged
    assert main([str(mnist16_student), "--out", str(out), "--max-steps", "9"]) == 1


def test_tune_steps_keeps_a_one_step_generators_own_time_and_records_the_new_counts(tmp_path, mnist16_student):
    """A one-step generator trained at another input time (SiD's start_sigma) and recording only 1 step: the search
    starts from its own time (it once restarted at t_max, changing the 1-step sample) and the file records 2 steps."""
    from distill.engine.export import save_student
    from students import load_student

    one = load_student(mnist16_student)
    one.sampling_steps = (1,)
    one.info["sampling_timesteps"] = {"1": [754.8]}
    src = save_student(one, tmp_path / "one.safetensors")
    before = load_student(src)
    assert before.sampling_steps == (1,)
    out = tmp_path / "tuned.safetensors"
    main = load_script("tune_steps").main
    assert main([str(src), "--out", str(out), "--max-steps", "2", "--num-samples", "40", "--candidates", "3"]) == 0
    after = load_student(out)
    assert after.sampling_steps == (1, 2)
    assert after.sampling_timesteps(1).tolist() == [754.8]
    t2 = after.sampling_timesteps(2).tolist()
    assert t2[0] == 754.8 and 0 < t2[1] < 754.8
    noise, labels = torch.randn(2, 1, 16, 16), torch.tensor([3, 7])
    assert torch.equal(after.sample(noise, 1, labels), before.sample(noise, 1, labels))
