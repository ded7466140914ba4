"""Trajectory caches: contents, resumable generation, refusal of mismatched caches, objectives reading them."""

import json
import os

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
    assert cache._layouts == {}  # nothing read at opening
    whole = {k: torch.cat([load_file(str(tmp_path / "c" / f"shard-0000{i}.safetensors"))[k] for i in range(3)])
             for k in ("noise", "sample", "label", "states")}
    idx = torch.tensor([9, 0, 5, 4, 9])
    rows = cache.rows(idx, ("noise", "label"))
    assert set(rows) == {"noise", "label"} and torch.equal(rows["noise"], whole["noise"][idx])
    assert torch.equal(cache.rows(idx)["states"], whole["states"][idx])
    assert sorted(cache._layouts) == [0, 1, 2]
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


def _status_bytes(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self (Linux)")
def test_reading_a_batch_maps_nothing_and_keeps_rss_far_below_the_cache(tmp_path, monkeypatch):
    """Issue #34 item 5: rows are read into tensors of their own (not views of a mapped shard), no cache file stays
    mapped, and reading 64 rows of an 80 MB cache (mnist16-shaped 1x16x16 rows of 18 states, random values written by
    the project's writer, as in scripts/engine_memory.py) grows the process's RSS by far less than the cache."""
    from safetensors.torch import load_file

    from distill.engine import trajectories

    def random_shard(teacher, m, k):
        n, g = trajectories._shard_count(m, k), torch.Generator().manual_seed(k)
        states = torch.randn((n, len(m["ts"]), *m["data_shape"]), generator=g)
        return {"noise": torch.randn((n, *m["data_shape"]), generator=g), "states": states,
                "sample": states[:, -1].contiguous(), "label": torch.randint(0, 10, (n,), generator=g)}

    monkeypatch.setattr(trajectories, "make_shard", random_shard)
    teacher = load_teacher("gmm:ring8")
    teacher.data_shape = (1, 16, 16)  # mnist16's, recorded in the manifest (loading the mnist16 teacher takes 8 s)
    folder = generate(teacher, tmp_path / "c", solver="dpmpp_2m", nfe=16, num_samples=4096, grid="uniform", final="clean",
                      class_labels=True, log=lambda m: None, progress=False)
    cache_bytes = sum(f.stat().st_size for f in folder.iterdir())
    cache = TrajectoryCache(folder)
    cache.rows([1])  # first use: the shard header, lazily imported code
    rss = _status_bytes("VmRSS")
    idx = torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:64]
    rows = cache.rows(idx)
    grown = _status_bytes("VmRSS") - rss
    assert cache_bytes > 75e6 and grown < cache_bytes / 20, (grown, cache_bytes)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in rows.values())
    assert str(folder) not in open("/proc/self/maps").read()
    whole = {k: torch.cat([load_file(str(folder / f"shard-0000{i}.safetensors"))[k] for i in range(4)]) for k in rows}
    assert all(torch.equal(rows[k], whole[k][idx]) for k in rows)
    with pytest.raises(IndexError, match="has rows 0 to 4095, not 4096"):
        cache.rows([3, 4096])
