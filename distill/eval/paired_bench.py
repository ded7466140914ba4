"""The paired bench (issue #31): the leaderboard's entries measured so that the leaders can be told apart.

mnist16 has ~5,000 real digits, so the real-data side of FID cannot grow; the generated side can (a 1-4 step student
draws 20,000 images in a minute, the teacher in ~20 CPU minutes). For every entry of a bench folder's leaderboard (the
teacher converged, the best solver at each leaderboard NFE, every student at every step count), sampled as its bench
cell on the SAME noise seeds ``seed..seed+N-1``:

  * ``fid``: FID of the N samples against the bench's data reference, and ``fid_<n>`` at n = 500, 1,000, 2,000, 5,000,
    10,000 (mean of 5 random subsets), with FID-infinity (Chong & Forsyth 2020, ``distill.eval.fid.fid_infinity``) and
    its fit error: how strongly FID depends on N, shown;
  * ``delta_teacher``: FID(entry) - FID(teacher converged) with a 95% paired bootstrap interval over the same resampled
    seeds (``paired_fid_delta``, strata the class labels), and the verdict "below / tied with / above the teacher";
  * ``delta_next``: the same against the entry ranked next above it (by ``fid``): "tied with" comes from this interval;
  * ``fd_teacher``: the Frechet distance to the converged teacher's own samples on disjoint seeds (``--ref-seed``),
    with precision and recall against them (``distill.eval.teacher_ref``); the teacher's own row is the floor (the
    teacher against itself on disjoint seeds at the same N).

The ranking uses ``fid`` at N (against the data reference); ``delta_teacher`` says whether a gap is real. Features
of every entry are cached (safetensors, under a hash of what made them) so that a run can be split over processes
(``--shard K/M``) and resumed."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch_fidelity.metric_prc import prc_features_to_metric

from distill.engine.paths import file_sha256
from distill.eval.bench.cells import Cell, generate
from distill.eval.bench.config import BenchConfig, labels_for
from distill.eval.fid import (
    bootstrap_fid_std,
    feature_statistics,
    fid_infinity,
    frechet_distance,
    normal_interval,
    paired_fid_delta,
    resample_indices,
)
from distill.eval.leaderboard import fid_inf_text, interval_text, leaderboard_rows
from distill.eval.teacher_ref import cached_features, reference_key

SAMPLE_COUNTS = (500, 1000, 2000, 5000, 10000)  # the N at which FID is shown (capped at the run's N)


@dataclass
class BoardEntry:
    """One leaderboard entry: a solver at an NFE, or a student file at a step count."""

    label: str
    kind: str  # "solver" or "student"
    method: str
    n: int  # NFE (solver) or steps (student)
    path: str = ""  # the student file
    teacher: bool = False  # the teacher converged: every delta is against it
    variant: str = ""  # a prepared sampler: its bench variant 'SOLVER:key=value,...' (prepared.json)

    def cell(self) -> Cell:
        return Cell(self.method, self.kind, self.n, self.n)


def board_entries(rows: list[dict]) -> tuple[list[BoardEntry], dict]:
    """The sampled entries of a bench folder's leaderboard (``leaderboard_rows``: the teacher converged first, then the
    best solvers and the students; data rows are not sampled) and the folder's settings (its last cell row)."""
    from distill.eval.bench import converged, current_rows

    cells = current_rows(rows)[0]
    if not cells:
        raise ValueError("the bench folder has no cell rows; run scripts/bench.py on it first")
    best = converged(cells)
    out, seen = [], set()
    for label, r in leaderboard_rows(rows):
        if r["kind"] not in ("solver", "student"):
            continue
        n = int(r["steps"] if r["kind"] == "student" else r["nfe"])
        key = (r["kind"], r["method"], n)
        if key in seen:
            continue
        seen.add(key)
        out.append(BoardEntry(label, r["kind"], r["method"], n, r.get("student_path", ""), teacher=r is best))
    if best is None:  # a guided folder holding students only: the teacher row comes from the main folder
        raise ValueError("the bench folder has no solver cells, so no teacher converged to compare with; bench the "
                         "teacher's solvers into it first")
    out.sort(key=lambda e: not e.teacher)
    return out, cells[-1]


def prepared_board_entries(rows: list[dict], prepared: list[tuple[str, list[dict], dict]]) -> list[BoardEntry]:
    """The leaderboard's prepared-sampler entries (``leaderboard.prepared_entries``: the best of each ``--prepared``
    folder at each NFE) as entries sampled with their bench variant."""
    from distill.eval.leaderboard import prepared_entries

    metas = {m: meta[m] for _, _, meta in prepared for m in meta}
    return [BoardEntry(label, "solver", r["method"], int(r["nfe"]), variant=metas[r["method"]]["variant"])
            for label, r, _, _ in prepared_entries(rows, prepared)]


def variant_files(variant: str) -> dict:
    """sha256 of each existing file a variant's options name (its prepared statistics, grid or predictor)."""
    from distill.eval.bench.config import parse_variant

    _, _, options = parse_variant(f"v={variant}")
    return {k: file_sha256(v) for k, v in options.items() if isinstance(v, str) and Path(v).is_file()}


def config_of(row: dict, num_samples: int, seed: int, batch_size: int) -> BenchConfig:
    """The BenchConfig of a bench folder's cells (guidance, labels, grid, final), at another sample count and seed."""
    g = row.get("guidance_scale", "")
    return BenchConfig(num_samples=num_samples, seed=seed, batch_size=batch_size, grid=row["grid"], final=row["final"],
                       guidance_scale=float(g) if g != "" else None, unconditional=row["labels"] == "uncond")


def entry_key(teacher, cfg: BenchConfig, metric, entry: BoardEntry, seed: int, num_samples: int) -> str:
    """The cache key of an entry's features. A solver entry's key is ``reference_key``'s, so the teacher converged
    shares its cache with ``scripts/teacher_fd.py``; a student's adds its file's content hash and step count."""
    key = reference_key(teacher, cfg, metric, entry.method, entry.n, seed, num_samples)
    if entry.variant:  # a prepared sampler: its options and the content of the files they name
        spec = {"base": key, "variant": entry.variant, "files": variant_files(entry.variant)}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    if entry.kind == "solver":
        return key
    spec = {"base": key, "student": file_sha256(entry.path), "steps": entry.n}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def entry_features(teacher, cfg: BenchConfig, metric, entry: BoardEntry, seed: int, num_samples: int,
                   cache_dir: Path | None, load_student=None, log=print) -> torch.Tensor:
    """Features of ``entry``'s samples on seeds seed..seed+N-1, from ``cache_dir`` when there, else sampled and cached
    (written to a temporary name and renamed, so an interrupted run leaves no partial file)."""
    prefix = "teacher" if entry.kind == "solver" else "entry"
    key = entry_key(teacher, cfg, metric, entry, seed, num_samples)

    def make():
        student, run_cfg = None, replace(cfg, seed=seed, num_samples=num_samples)
        if entry.variant:
            from distill.eval.bench.config import parse_variant

            label, solver, options = parse_variant(f"{entry.method}={entry.variant}")
            run_cfg = replace(run_cfg, variants={label: (solver, options)})
        if entry.kind == "student":
            from distill.eval.bench import check_student

            student = load_student(entry.path)
            check_student(teacher, entry.method, student, near=Path(entry.path).parent)
        return metric.features(generate(teacher, entry.cell(), run_cfg, student)[0])

    meta = {"entry": entry.label, "seed": seed, "num_samples": num_samples}
    return cached_features(cache_dir, prefix, key, meta, entry.label, make, log)


def shard_entries(entries: list[BoardEntry], k: int, m: int) -> list[BoardEntry]:
    """The entries shard ``k`` of ``m`` samples: the entries dealt by sampling cost (NFE, largest first) to the shard
    with the least so far, so M processes finish together; each shard's own in ascending cost."""
    loads, bins = [0] * m, [[] for _ in range(m)]
    for e in sorted(entries, key=lambda e: -e.n):
        i = loads.index(min(loads))
        bins[i].append(e)
        loads[i] += e.n
    return sorted(bins[k], key=lambda e: e.n)


def _strata(labels: torch.Tensor | None) -> torch.Tensor | None:
    return None if labels is None or len(labels.unique()) < 2 else labels


def measure(features: dict[str, torch.Tensor], entries: list[BoardEntry], data_ref: torch.Tensor,
            teacher_ref: torch.Tensor, labels: torch.Tensor | None, *, resamples: int = 200, seed: int = 0,
            sample_counts=SAMPLE_COUNTS, bench_n: int | None = None, prc_samples: int = 5000,
            bootstraps: dict | None = None) -> list[dict]:
    """The paired bench's rows, ranked by FID at N: ``features`` (label -> [N, D], row i from noise seed i, the same
    seeds for every entry), ``data_ref`` the data reference's features, ``teacher_ref`` the teacher's samples on
    disjoint seeds. ``bench_n``: also report FID of the first ``bench_n`` rows (the bench's own cells).

    Every entry's FID is computed once on each of the same ``resamples`` index sets, so every paired interval (to the
    teacher, to the entry above) is a difference of two such vectors: the intervals of ``paired_fid_delta`` with the
    same seed, at one bootstrap per entry instead of one per pair. ``fid_std`` is the spread of that vector. Precision
    and recall against the teacher's samples use the first ``prc_samples`` of each (k-NN over 20,000 x 20,000 is
    costly and they settle well before). ``bootstraps``, when given, receives {label: (FID, its bootstrap vector)} for
    ``goal_verdicts`` to reuse."""
    teacher = next((e for e in entries if e.teacher), None)
    if teacher is None:
        raise ValueError("no teacher converged among the entries: the paired deltas are against it")
    n = len(features[teacher.label])
    strata = _strata(labels)
    ref_stats, teacher_stats = feature_statistics(data_ref), feature_statistics(teacher_ref)
    idxs = resample_indices(n, strata, resamples, seed)
    rows, boot = {}, {}
    for e in entries:
        f = features[e.label]
        if len(f) != n:
            raise ValueError(f"{e.label} has {len(f)} samples and the teacher {n}: a paired bench needs the same seeds")
        row = {"entry": e.label, "kind": e.kind, "method": e.method, "n": e.n, "student_path": e.path,
               "teacher": int(e.teacher), "num_samples": n}
        row["fid"] = frechet_distance(*feature_statistics(f), *ref_stats)
        boot[e.label] = torch.tensor([frechet_distance(*feature_statistics(f[i]), *ref_stats) for i in idxs], dtype=torch.float64)
        row["fid_std"] = float(boot[e.label].std())
        if bench_n:
            row["fid_bench"] = frechet_distance(*feature_statistics(f[:bench_n]), *ref_stats)
        counts = sorted({k for k in sample_counts if k < n} | {n})
        inf = fid_infinity(f, ref_stats, counts if len(counts) >= 3 else None, seed=seed)
        for k, v in inf.points:
            row[f"fid_{k}"] = v
        row.update(fid_inf=inf.fid_inf, fid_inf_stderr=inf.stderr, fid_inf_slope=inf.slope)
        prc = prc_features_to_metric(f[:prc_samples].cpu(), teacher_ref[:prc_samples].cpu(), save_cpu_ram=True, verbose=False)
        row["precision_teacher"], row["recall_teacher"] = prc["precision"], prc["recall"]
        row["fd_teacher"] = frechet_distance(*feature_statistics(f), *teacher_stats)
        row["fd_teacher_std"] = bootstrap_fid_std(f, teacher_stats, resamples=50, seed=seed, strata=strata)
        rows[e.label] = row
    for label, row in rows.items():
        if row["teacher"]:
            row.update(delta_teacher=0.0, delta_teacher_low=0.0, delta_teacher_high=0.0, verdict_teacher="the teacher")
        else:
            d = normal_interval(row["fid"] - rows[teacher.label]["fid"], boot[label] - boot[teacher.label])
            row.update(delta_teacher=d["delta"], delta_teacher_low=d["low"], delta_teacher_high=d["high"],
                       verdict_teacher=f"{d['verdict']} the teacher")
    if bootstraps is not None:
        bootstraps.update({label: (rows[label]["fid"], vector) for label, vector in boot.items()})
    ranked = sorted(rows.values(), key=lambda r: r["fid"])
    for above, row in zip(ranked, ranked[1:]):
        d = normal_interval(row["fid"] - above["fid"], boot[row["entry"]] - boot[above["entry"]])
        row.update(next_entry=above["entry"], delta_next=d["delta"], delta_next_low=d["low"], delta_next_high=d["high"],
                   verdict_next=f"{d['verdict']} {above['entry']}")
    for i, row in enumerate(ranked, 1):
        row["rank"] = i
    return ranked


GOAL_NFE = 4  # the few-step goal: a student's k steps against every solver spending up to this many NFE


def goal_pairs(entries: list[BoardEntry], max_nfe: int = GOAL_NFE) -> list[tuple[BoardEntry, BoardEntry]]:
    """The comparisons a few-step student is judged by: each student entry against the best solver at every NFE up to
    ``max_nfe`` (the leaderboard's best per NFE, so the others are worse there), and against the same student file at
    its next smaller step count."""
    solvers = sorted((e for e in entries if e.kind == "solver" and not e.teacher and not e.variant and e.n <= max_nfe),
                     key=lambda e: e.n)  # training-free solvers: prepared samplers are not in the goal
    pairs = []
    for e in entries:
        if e.kind != "student":
            continue
        pairs += [(e, s) for s in solvers]
        fewer = [o for o in entries if o.kind == "student" and o.path == e.path and o.n < e.n]
        if fewer:
            pairs.append((e, max(fewer, key=lambda o: o.n)))
    return pairs


def goal_verdicts(features: dict[str, torch.Tensor], pairs: list[tuple[BoardEntry, BoardEntry]], data_ref: torch.Tensor,
                  labels: torch.Tensor | None, *, resamples: int = 200, seed: int = 0,
                  bootstraps: dict | None = None) -> list[dict]:
    """FID(a) - FID(b) with its 95% paired interval (``paired_fid_delta``, the same seeds and strata as ``measure``)
    for each pair: 'below' is a lower FID than b at 95%. With ``measure``'s ``bootstraps`` (made with the same
    ``resamples`` and ``seed``) each interval is the difference of the two entries' vectors, as ``measure``'s own."""
    ref = feature_statistics(data_ref)
    out = []
    for a, b in pairs:
        if bootstraps is not None and a.label in bootstraps and b.label in bootstraps:
            (fa, va), (fb, vb) = bootstraps[a.label], bootstraps[b.label]
            d = normal_interval(fa - fb, va - vb)
        else:
            d = paired_fid_delta(features[a.label], features[b.label], ref, resamples=resamples, seed=seed,
                                 strata=_strata(labels))
        out.append({"entry": a.label, "against": b.label, "delta": d["delta"], "low": d["low"], "high": d["high"],
                    "verdict": d["verdict"]})
    return out


def goal_markdown(verdicts: list[dict]) -> str:
    """The goal comparisons as a table (``goal_verdicts``)."""
    lines = ["| entry | against | FID difference [95%] | verdict |", "|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v['entry']} | {v['against']} | {v['delta']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}] | "
                     f"{v['verdict']} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], settings: dict) -> str:
    """The paired bench's table: a line per entry in rank order."""
    n = int(rows[0]["num_samples"])
    counts = [k for k in SAMPLE_COUNTS if k < n and f"fid_{k}" in rows[0]]
    head = ["rank", "entry", f"FID @{n:,}", "delta to the teacher [95%]", "verdict", "delta to the entry above [95%]",
            f"FD to the teacher @{n:,}", "precision / recall vs teacher", *(f"FID @{k:,}" for k in counts),
            "FID-infinity +- fit error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tied = r.get("verdict_next", "")
        values = [str(r["rank"]), r["entry"], f"{float(r['fid']):.2f} +- {float(r['fid_std']):.2f}",
                  interval_text(r, "delta_teacher") if not int(r["teacher"]) else "0 (the teacher)",
                  r["verdict_teacher"], interval_text(r, "delta_next") + (f" ({tied.split(' ')[0]})" if tied else ""),
                  f"{float(r['fd_teacher']):.2f} +- {float(r['fd_teacher_std']):.2f}" + (" (floor)" if int(r["teacher"]) else ""),
                  f"{float(r['precision_teacher']):.3f} / {float(r['recall_teacher']):.3f}",
                  *(f"{float(r[f'fid_{k}']):.2f}" for k in counts), fid_inf_text(r)]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


FIELDS = ["rank", "entry", "kind", "method", "n", "student_path", "teacher", "num_samples", "seed", "ref_seed", "fid",
          "fid_std", "fid_bench", "delta_teacher", "delta_teacher_low", "delta_teacher_high", "verdict_teacher",
          "next_entry", "delta_next", "delta_next_low", "delta_next_high", "verdict_next", "fd_teacher", "fd_teacher_std",
          "precision_teacher", "recall_teacher", *(f"fid_{k}" for k in (*SAMPLE_COUNTS, 20000)), "fid_inf",
          "fid_inf_stderr", "fid_inf_slope", "guidance_scale", "labels", "reference_id", "command"]


def write_csv(path: Path, rows: list[dict]) -> None:
    """Replace ``path`` with ``rows`` (written to a temporary name first: an interrupted run keeps the old file)."""
    extra = sorted({k for r in rows for k in r} - set(FIELDS))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS + extra)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    tmp.replace(path)


def read_paired(path: str | Path) -> dict[tuple[str, str, int], dict]:
    """A paired.csv by (kind, method, n)."""
    with open(path, newline="") as f:
        return {(r["kind"], r["method"], int(r["n"])): r for r in csv.DictReader(f)}


def labels_of(teacher, cfg: BenchConfig, seed: int, n: int):
    return labels_for(teacher, replace(cfg, seed=seed, num_samples=n), 0, n)
