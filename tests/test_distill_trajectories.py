"""Trajectory caches: contents, resumable generation, refusal of mismatched caches, objectives reading them."""

import json

import pytest
import torch
from distill_helpers import run, tiny_cfg

from distill.engine.trajectories import TrajectoryCache, generate, open_cache
from distill.solvers import sample
from teachers import load_teacher

SETTINGS = {"solver": "euler", "nfe": 4, "num_samples": 10, "shard_size": 4, "seed": 5}


def test_cache_holds_noise_every_grid_state_and_the_solver_output(tmp_path):
    teacher = load_teacher("gmm:ring8")
    cache = TrajectoryCache(generate(teacher, tmp_path / "c", log=lambda m: None, **SETTINGS))
    m = cache.manifest
    assert m["teacher_hash"] == teacher.hash and m["solver"] == "euler" and m["nfe"] == 4 and m["num_shards"] == 3
    assert len(m["ts"]) == 5 and m["ts"][0] == teacher.schedule.t_max and m["ts"][-1] == teacher.schedule.t_min
    d = cache.rows(torch.arange(10))
    assert d["states"].shape == (10, 5, 2) and d["noise"].shape == (10, 2) and bool((d["label"] == -1).all())
    assert torch.equal(d["states"][:, -1], d["sample"])
    assert torch.allclose(d["states"][:, 0], d["noise"] * float(teacher.schedule.init_noise_scale(m["ts"][0])))
    expect = sample(teacher, d["noise"][4:8], solver="euler", timesteps=m["ts"], final="t_min")  # shard 1 alone
    assert torch.equal(expect, d["sample"][4:8])


def test_rows_are_read_lazily_in_the_order_asked_and_only_the_keys_asked(tmp_path):
    from safetensors.torch import load_file

    cache = TrajectoryCache(generate(load_teacher("gmm:ring8"), tmp_path / "c", log=lambda m: None, **SETTINGS))
    assert cache._open == {}  # nothing read at opening
    whole = {k: torch.cat([load_file(str(tmp_path / "c" / f"shard-0000{i}.safetensors"))[k] for i in range(3)])
             for k in ("noise", "sample", "label", "states")}
    idx = torch.tensor([9, 0, 5, 4, 9])
    rows = cache.rows(idx, ("noise", "label"))
    assert set(rows) == {"noise", "label"} and torch.equal(rows["noise"], whole["noise"][idx])
    assert torch.equal(cache.rows(idx)["states"], whole["states"][idx])
    assert sorted(cache._open) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"unknown trajectory keys \['x'\]; allowed: noise, states, sample, label"):
        cache.rows(idx, ("x",))


def test_generation_resumes_redoing_only_missing_or_truncated_shards(tmp_path):
    teacher = load_teacher("gmm:ring8")
    first = TrajectoryCache(generate(teacher, tmp_path / "c", log=lambda m: None, **SETTINGS)).rows(torch.arange(10))
    (tmp_path / "c" / "shard-00001.safetensors").unlink()  # never written
    shard2 = tmp_path / "c" / "shard-00002.safetensors"
    shard2.write_bytes(shard2.read_bytes()[:100])  # killed mid-write (not via the atomic rename, but anyway)
    with pytest.raises(ValueError, match="is incomplete \\(shard 1 missing or truncated\\); rerun"):
        TrajectoryCache(tmp_path / "c")
    messages = []
    generate(teacher, tmp_path / "c", log=messages.append, **SETTINGS)
    assert messages == ["shard 2/3: 4 trajectories", "shard 3/3: 2 trajectories"]
    again = TrajectoryCache(tmp_path / "c").rows(torch.arange(10))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_mismatched_cache_is_refused(tmp_path):
    ring, aniso = load_teacher("gmm:ring8"), load_teacher("gmm:aniso2d")
    generate(ring, tmp_path / "c", log=lambda m: None, **SETTINGS)
    with pytest.raises(ValueError, match="was made with solver='euler', not the 'heun' asked for"):
        generate(ring, tmp_path / "c", log=lambda m: None, **{**SETTINGS, "solver": "heun", "nfe": 6})
    with pytest.raises(ValueError, match="was made with teacher_hash="):
        generate(aniso, tmp_path / "c", log=lambda m: None, **SETTINGS)
    with pytest.raises(ValueError, match=f"was made with teacher_hash='{ring.hash}', not the '{aniso.hash}'"):
        open_cache(tmp_path / "c", teacher_hash=aniso.hash)
    with pytest.raises(ValueError, match="was made with teacher_hash"):  # the trainer checks the teacher too
        run(tiny_cfg(tmp_path / "r", "teacher=gmm:aniso2d", f"trajectories={tmp_path / 'c'}", "objective.source=trajectories"))
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["solver"] == "euler"  # nothing damaged


def test_consistency_distillation_reads_pairs_from_the_cache(tmp_path, monkeypatch):
    teacher = load_teacher("gmm:ring8")
    generate(teacher, tmp_path / "c", log=lambda m: None, **{**SETTINGS, "num_samples": 64, "shard_size": 64})
    calls = []
    monkeypatch.setattr(type(teacher), "denoise", lambda *a, **k: calls.append(1))  # no teacher call allowed
    cfg = tiny_cfg(tmp_path / "r", f"trajectories={tmp_path / 'c'}", "objective.source=trajectories", "dataset=null", "max_steps=4")
    run(cfg)
    assert not calls and (tmp_path / "r" / "student.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(r["loss"] > 0 for r in rows)
