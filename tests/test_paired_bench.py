"""The paired bench (distill/eval/paired_bench.py, scripts/paired_bench.py): verdicts from paired intervals on known
feature sets, the ranking and the entry-above deltas, FID at several N with FID-infinity, the teacher's row as the
floor of the teacher-referenced distance, shards that split the sampling evenly and fill one cache, the command line."""

import csv

import pytest
import torch
from conftest import load_script

from distill.eval.paired_bench import BoardEntry, interval_text, markdown, measure, shard_entries

D = 8


def _gauss(n, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64) + shift


def test_verdicts_ranking_and_floor_on_known_features():
    """Rows i of every set share seed i. 'close' is the teacher's own samples plus a small perturbation: tied with the
    teacher. 'far' is shifted by 0.4 in every feature: above the teacher and above 'close'. The teacher's distance to
    its reference samples on other seeds (the floor) is below far's."""
    n = 1500
    data, teacher_ref = _gauss(3000, seed=1), _gauss(n, seed=2)
    teacher = _gauss(n, seed=3)
    features = {"teacher": teacher, "close": teacher + 0.02 * _gauss(n, seed=4), "far": _gauss(n, shift=0.4, seed=3)}
    entries = [BoardEntry("teacher", "solver", "unipc", 20, teacher=True), BoardEntry("close", "student", "a", 1, "a.st"),
               BoardEntry("far", "student", "b", 1, "b.st")]
    labels = torch.arange(n) % 10
    rows = measure(features, entries, data, teacher_ref, labels, resamples=100, sample_counts=(500, 1000))
    by = {r["entry"]: r for r in rows}
    assert [r["entry"] for r in rows][-1] == "far" and [r["rank"] for r in rows] == [1, 2, 3]
    assert by["teacher"]["verdict_teacher"] == "the teacher" and by["teacher"]["delta_teacher"] == 0.0
    assert by["close"]["verdict_teacher"] == "tied with the teacher", by["close"]
    assert by["far"]["verdict_teacher"] == "above the teacher" and by["far"]["delta_teacher_low"] > 0
    assert by["far"]["delta_teacher"] == pytest.approx(by["far"]["fid"] - by["teacher"]["fid"])
    assert by["far"]["verdict_next"].startswith("above") and by["far"]["next_entry"] in ("teacher", "close")
    assert "next_entry" not in rows[0]  # the first has no entry above it
    assert by["far"]["fd_teacher"] > by["teacher"]["fd_teacher"] + 5 * by["teacher"]["fd_teacher_std"]
    for r in rows:  # FID at 500, 1000 and N; near the data, FID-infinity below FID at 500 (the 1/N bias is positive)
        assert {"fid_500", "fid_1000", f"fid_{n}"} <= set(r) and (r["fid_inf"] < r["fid_500"] or r["entry"] == "far")
    text = markdown(rows, {})
    assert "| 1 | " in text and "tied with the teacher" in text and "(floor)" in text
    assert interval_text(by["far"], "delta_teacher").startswith("+")


def test_fid_infinity_column_reaches_a_known_limit():
    """Generated and reference sets from one Gaussian: FID -> 0 as N grows, so FID-infinity is ~0 (within its fit error
    and the one generated set's noise), while FID at 500 is clearly positive (the 1/N bias)."""
    n = 8000
    data, g = _gauss(20000, seed=5), _gauss(n, seed=6)
    entries = [BoardEntry("t", "solver", "unipc", 20, teacher=True)]
    (row,) = measure({"t": g}, entries, data, _gauss(n, seed=7), None, resamples=20)
    assert row["fid_500"] > 0.05 and abs(row["fid_inf"]) < 0.01 + 3 * row["fid_inf_stderr"] + 0.2 * row["fid"], row


def test_unequal_sample_counts_are_refused():
    entries = [BoardEntry("t", "solver", "unipc", 20, teacher=True), BoardEntry("s", "student", "s", 1, "s.st")]
    with pytest.raises(ValueError, match="a paired bench needs the same seeds"):
        measure({"t": _gauss(600), "s": _gauss(500)}, entries, _gauss(600), _gauss(600), None, resamples=20)
    with pytest.raises(ValueError, match="no teacher converged"):
        measure({"s": _gauss(600)}, entries[1:], _gauss(600), _gauss(600), None, resamples=20)


def test_shards_cover_every_entry_once_with_even_cost():
    entries = [BoardEntry(f"e{i}", "student", f"e{i}", n) for i, n in enumerate([1, 1, 2, 4, 8, 16, 32, 20, 1, 4])]
    shards = [shard_entries(entries, k, 3) for k in range(3)]
    labels = [e.label for s in shards for e in s]
    assert sorted(labels) == sorted(e.label for e in entries) and len(set(labels)) == len(entries)
    loads = [sum(e.n for e in s) for s in shards]
    assert max(loads) - min(loads) <= 32
    assert all([e.n for e in s] == sorted(e.n for e in s) for s in shards)


def test_command_line_shards_fill_the_cache_then_the_table_reads_it(tmp_path, monkeypatch):
    """Bench a tiny teacher, fill the feature cache with two shards, then write the table without sampling again: every
    leaderboard entry has a row with a verdict, a teacher-referenced distance and FID-infinity."""
    teacher = _make_digit_teacher(tmp_path)
    bench = tmp_path / "bench"
    load_script("bench").main(["--teacher", str(teacher), "--solvers", "euler,unipc", "--nfe", "1,2,4", "--num-samples", "24",
                   "--batch-size", "24", "--bootstrap", "10", "--out", str(bench)])
    script = load_script("paired_bench").main
    base = ["--bench", str(bench), "--num-samples", "64", "--batch-size", "32", "--resamples", "20", "--cache", str(tmp_path / "c")]
    assert script([*base, "--shard", "0/2"]) == 0 and script([*base, "--shard", "1/2"]) == 0
    assert not (tmp_path / "out").exists()
    import distill.eval.paired_bench as pb
    import distill.eval.teacher_ref as tr

    def refuse(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(pb, "generate", refuse)
    tr_calls = []
    real = tr.generate
    monkeypatch.setattr(tr, "generate", lambda *a, **k: tr_calls.append(1) or real(*a, **k))
    assert script([*base, "--out", str(tmp_path / "out")]) == 0
    assert len(tr_calls) == 1  # only the teacher's reference samples (disjoint seeds) were drawn
    rows = list(csv.DictReader(open(tmp_path / "out" / "paired.csv")))
    assert len(rows) == 3 and sum(r["teacher"] == "1" for r in rows) == 1  # the teacher (best at 4 NFE), best at 1 and 2
    assert all(r["verdict_teacher"] and r["fd_teacher"] and r["fid_inf"] for r in rows)
    assert (tmp_path / "out" / "paired.md").is_file() and (tmp_path / "out" / "fid_vs_n.png").stat().st_size > 0
    assert script([*base, "--max-nfe", "1", "--out", str(tmp_path / "out1")]) == 0  # the teacher stays
    assert len(list(csv.DictReader(open(tmp_path / "out1" / "paired.csv")))) == 2
    assert "Left out (over 1 NFE): best solver at 2 NFE" in (tmp_path / "out1" / "paired.md").read_text()
    with pytest.raises(SystemExit, match="--out is required"):
        script(base)
    with pytest.raises(SystemExit, match="--shard must be K/M"):
        script([*base, "--shard", "2/2"])
    with pytest.raises(SystemExit, match="overlap"):
        script([*base, "--ref-seed", "10", "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match="no bench table"):
        script(["--bench", str(tmp_path / "none"), "--out", str(tmp_path / "o3")])


def _make_digit_teacher(tmp_path):
    from conftest import save_teacher_folder, tiny_unet
    from diffusers import DDPMScheduler

    return save_teacher_folder(tmp_path / "teacher", tiny_unet(num_class_embeds=10, sample_size=16), DDPMScheduler())


def test_shared_bootstrap_reproduces_the_pairwise_intervals():
    """The one-bootstrap-per-entry intervals equal paired_fid_delta's with the same seed and strata."""
    from distill.eval.fid import paired_fid_delta

    n = 600
    data, ref, teacher = _gauss(1200, seed=1), _gauss(n, seed=2), _gauss(n, seed=3)
    other = teacher + 0.3 * _gauss(n, seed=4)
    labels = torch.arange(n) % 10
    entries = [BoardEntry("t", "solver", "unipc", 20, teacher=True), BoardEntry("s", "student", "s", 1, "s.st")]
    rows = {r["entry"]: r for r in measure({"t": teacher, "s": other}, entries, data, ref, labels, resamples=40, seed=7)}
    d = paired_fid_delta(other, teacher, data, resamples=40, seed=7, strata=labels)
    assert rows["s"]["delta_teacher"] == pytest.approx(d["delta"]) and rows["s"]["delta_teacher_low"] == pytest.approx(d["low"])
    assert rows["s"]["delta_teacher_high"] == pytest.approx(d["high"]) and rows["s"]["verdict_teacher"].startswith(d["verdict"])
    # the goal verdicts reuse those vectors: the same intervals as computing each pair afresh
    from distill.eval.paired_bench import goal_verdicts

    boot = {}
    measure({"t": teacher, "s": other}, entries, data, ref, labels, resamples=40, seed=7, bootstraps=boot)
    feats = {"t": teacher, "s": other}
    fresh = goal_verdicts(feats, [(entries[1], entries[0])], data, labels, resamples=40, seed=7)[0]
    reused = goal_verdicts(feats, [(entries[1], entries[0])], data, labels, resamples=40, seed=7, bootstraps=boot)[0]
    assert {k: pytest.approx(v) if isinstance(v, float) else v for k, v in fresh.items()} == reused


def test_goal_pairs_and_verdicts_judge_a_student_against_the_solvers_and_its_fewer_steps():
    """A 2-step student is compared with the best solver at each NFE up to 4 (not at 8, not the teacher) and with its
    own 1-step entry; on known features a set shifted away from the data is 'above' and one nearer is 'below'."""
    from distill.eval.paired_bench import goal_markdown, goal_pairs, goal_verdicts

    entries = [BoardEntry("teacher", "solver", "unipc", 20, teacher=True), BoardEntry("u1", "solver", "ddpm", 1),
               BoardEntry("u4", "solver", "unipc", 4), BoardEntry("u8", "solver", "unipc", 8),
               BoardEntry("s1", "student", "s", 1, "s.st"), BoardEntry("s2", "student", "s", 2, "s.st"),
               BoardEntry("o1", "student", "o", 1, "o.st")]
    pairs = {(a.label, b.label) for a, b in goal_pairs(entries)}
    assert pairs == {("s1", "u1"), ("s1", "u4"), ("s2", "u1"), ("s2", "u4"), ("s2", "s1"), ("o1", "u1"), ("o1", "u4")}
    n = 1200
    data = _gauss(3000, seed=1)
    base = _gauss(n, seed=3)
    features = {"s2": base, "s1": base + 0.3, "u4": base + 0.3 + 0.02 * _gauss(n, seed=4)}
    by = {(v["entry"], v["against"]): v for v in goal_verdicts(
        features, [(entries[5], entries[4]), (entries[4], entries[2]), (entries[4], entries[5])], data,
        torch.arange(n) % 10, resamples=100)}
    assert by[("s2", "s1")]["verdict"] == "below" and by[("s2", "s1")]["high"] < 0
    assert by[("s1", "s2")]["verdict"] == "above"
    assert by[("s1", "u4")]["verdict"] == "tied with"
    assert "| s2 | s1 |" in goal_markdown(list(by.values()))


def test_prepared_samplers_get_paired_rows_sampled_with_their_variant(tmp_path):
    """A --prepared folder's best sampler per NFE is an entry of the paired bench, sampled with its variant's options
    (here unipc on the karras grid: other samples than plain unipc), cached under a key that holds the variant, and
    left out of the few-step goal (it is not a training-free solver)."""
    import json

    import distill.eval.paired_bench as pb

    teacher = _make_digit_teacher(tmp_path)
    bench, prep = tmp_path / "bench", tmp_path / "prep"
    common = ["--teacher", str(teacher), "--num-samples", "24", "--batch-size", "24", "--bootstrap", "10"]
    load_script("bench").main([*common, "--solvers", "euler,unipc", "--nfe", "1,2,4", "--out", str(bench)])
    load_script("bench").main([*common, "--solvers", "", "--variant", "uk=unipc:grid=karras", "--nfe", "2", "--out", str(prep)])
    (prep / "prepared.json").write_text(json.dumps({"uk": {"variant": "unipc:grid=karras", "prepare": "", "minutes": 0,
                                                           "hardware": "test"}}))
    out = tmp_path / "out"
    assert load_script("paired_bench").main(["--bench", str(bench), "--prepared", str(prep), "--num-samples", "64",
                                             "--batch-size", "32", "--resamples", "20", "--cache", str(tmp_path / "c"),
                                             "--out", str(out)]) == 0
    rows = {(r["method"], int(r["n"])): r for r in csv.DictReader(open(out / "paired.csv"))}
    plain = next(r for (m, n), r in rows.items() if n == 2 and m != "uk")  # the best plain solver at 2 NFE
    assert ("uk", 2) in rows and rows[("uk", 2)]["verdict_teacher"] and rows[("uk", 2)]["fid"] != plain["fid"]
    board = [pb.BoardEntry("t", "solver", "unipc", 8, teacher=True), pb.BoardEntry("s2", "solver", "unipc", 2),
             pb.BoardEntry("p2", "solver", "uk", 2, variant="unipc:grid=karras"), pb.BoardEntry("st", "student", "x", 1, "x.st")]
    assert [(a.label, b.label) for a, b in pb.goal_pairs(board)] == [("st", "s2")]  # not against the prepared sampler
    from distill.eval.bench import read_bench_rows
    from distill.eval.leaderboard import read_prepared

    entry = pb.prepared_board_entries(read_bench_rows(bench / "fid_vs_nfe.csv"), [read_prepared(prep)])[0]
    assert (entry.method, entry.n, entry.variant) == ("uk", 2, "unipc:grid=karras")
    from teachers import load_teacher

    keys = {pb.entry_key(load_teacher(teacher), pb.config_of(read_bench_rows(bench / "fid_vs_nfe.csv")[-1], 64, 0, 32),
                         _Metric(), e, 0, 64) for e in (entry, pb.replace(entry, variant="unipc:grid=logsnr"))}
    assert len(keys) == 2  # another variant under the same label is another cache entry


class _Metric:
    extractor, weights_path = "m", "w"
