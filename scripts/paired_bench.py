"""The paired bench of a bench folder's leaderboard entries at large N (``distill.eval.paired_bench``).

    python scripts/paired_bench.py --bench results/mnist16 --num-samples 20000 --out results/mnist16_paired

Every entry of the folder's leaderboard (the teacher converged, the best solver at 1/2/4/8 NFE, every student at every
step count) is sampled as its bench cell on seeds --seed..--seed+N-1, the same for all, and measured against the bench's
data reference (FID at N and at 500..10,000, FID-infinity, the paired delta to the teacher with its 95% interval and
verdict, the delta to the entry ranked above) and against the teacher's own samples on seeds --ref-seed.. (the
teacher-referenced distance; the teacher's row is its floor). Writes OUT/paired.csv, OUT/paired.md (ending with the
few-step goal: each student against the best solver at every NFE up to 4 and its own next smaller step count, with
paired intervals) and OUT/fid_vs_n.png.

Features are cached in --cache under a hash of what made them: ``--shard K/M`` samples only the K-th (0-based) of M
shares of the entries (dealt by NFE, so the shards take about equally long) and writes nothing else, so M processes can
fill the cache; a run without --shard reads it.
"""

from __future__ import annotations

import argparse
import csv
import os as _os
import shlex
import sys as _sys
from pathlib import Path

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

from distill.engine.paths import check_output_dir  # noqa: E402
from distill.eval.teacher_ref import check_disjoint  # noqa: E402


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    k, _, m = text.partition("/")
    if not (k.isdigit() and m.isdigit()) or int(m) < 1 or int(k) >= int(m):
        raise ValueError(f"--shard must be K/M with 0 <= K < M (e.g. 0/2), got {text!r}")
    return int(k), int(m)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, help="a bench folder (its fid_vs_nfe.csv names the entries and settings)")
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0, help="first noise seed of every entry (the bench's own seeds)")
    p.add_argument("--ref-seed", type=int, default=1_000_000, help="first noise seed of the teacher's reference samples")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples of each paired interval")
    p.add_argument("--cache", type=Path, default=Path("runs/teacher_ref"), help="the feature cache folder")
    p.add_argument("--shard", default=None, help="K/M: only sample every M-th entry from the K-th into the cache")
    p.add_argument("--max-nfe", type=int, default=None,
                   help="leave out entries that spend more NFE (the leaderboard marks them 'not run'); the teacher stays")
    p.add_argument("--prepared", type=Path, action="append", default=[],
                   help="a bench folder of prepared samplers with its prepared.json, as scripts/leaderboard.py takes (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="the output folder (required without --shard)")
    args = p.parse_args(argv)
    command = "python scripts/paired_bench.py " + shlex.join(argv if argv is not None else _sys.argv[1:])
    try:
        shard = parse_shard(args.shard)
        if shard is None and args.out is None:
            raise ValueError("--out is required (the folder paired.csv goes to) unless --shard only fills the cache")
        if args.out is not None:
            check_output_dir(args.out, "--out")
        check_disjoint(args.num_samples, {"entry": args.seed, "teacher reference": args.ref_seed})
        table = Path(args.bench) / "fid_vs_nfe.csv"
        if not table.is_file():
            raise FileNotFoundError(f"no bench table {table} (--bench names a folder scripts/bench.py wrote)")
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        from distill.eval import paired_bench as pb
        from distill.eval.bench import make_metric
        from students import load_student
        from teachers import load_teacher

        if args.max_nfe is not None and args.max_nfe < 1:
            raise ValueError(f"--max-nfe must be a positive NFE, got {args.max_nfe}")
        entries, settings = pb.board_entries(rows)
        from distill.eval.leaderboard import read_prepared

        entries += pb.prepared_board_entries(rows, [read_prepared(folder) for folder in args.prepared])
        left_out = [e.label for e in entries if args.max_nfe is not None and e.n > args.max_nfe and not e.teacher]
        entries = [e for e in entries if e.label not in left_out]
        teacher = load_teacher(settings["teacher"])
        if teacher.hash != settings["teacher_hash"]:
            raise ValueError(f"teacher {settings['teacher']!r} is not the one {table} was benched with (hash "
                             f"{teacher.hash[:12]} against {settings['teacher_hash'][:12]}); rerun the bench first")
        cfg = pb.config_of(settings, args.num_samples, args.seed, args.batch_size)
        cfg.validate(teacher)
        metric = make_metric(teacher, cfg)
        if getattr(metric, "reference_id", None) != settings["reference_id"]:
            raise ValueError(f"the bench reference {getattr(metric, 'reference_id', None)} is not the one of {table} "
                             f"({settings['reference_id']}); rerun the bench first")
    except (ValueError, FileNotFoundError) as e:
        _sys.exit(f"error: {e}")

    mine = entries if shard is None else pb.shard_entries(entries, *shard)
    features = {}
    for e in mine:
        print(f"{e.label}: sampling or reading {args.num_samples} samples", flush=True)
        features[e.label] = pb.entry_features(teacher, cfg, metric, e, args.seed, args.num_samples, args.cache, load_student)
    if shard is not None:
        return 0
    from distill.eval.teacher_ref import teacher_features

    teacher_entry = entries[0]
    ref = teacher_features(teacher, cfg, metric, teacher_entry.method, teacher_entry.n, args.ref_seed, args.num_samples,
                           args.cache)
    labels = pb.labels_of(teacher, cfg, args.seed, args.num_samples)
    boot = {}
    out = pb.measure(features, entries, metric.ref_features, ref, labels, resamples=args.resamples, seed=args.seed,
                     bench_n=int(settings["num_samples"]), bootstraps=boot)
    for r in out:
        r.update(seed=args.seed, ref_seed=args.ref_seed, guidance_scale=settings["guidance_scale"], labels=settings["labels"],
                 reference_id=settings["reference_id"], command=command)
    args.out.mkdir(parents=True, exist_ok=True)
    pb.write_csv(args.out / "paired.csv", out)
    header = (f"Paired bench of `{args.bench}` (`{command}`): teacher `{settings['teacher']}`, labels {settings['labels']}"
              + (f", guidance {settings['guidance_scale']}" if settings["guidance_scale"] else "")
              + f", {args.num_samples:,} samples per entry on noise seeds {args.seed}..{args.seed + args.num_samples - 1} "
              f"(the same for every entry), against the data reference `{settings['reference_id']}`; the teacher's "
              f"reference samples on seeds {args.ref_seed}.. ({teacher_entry.label}). Ranked by FID at "
              f"{args.num_samples:,}; intervals: paired bootstrap over the same seeds ({args.resamples} resamples, "
              "within classes), 95%."
              + (f" Left out (over {args.max_nfe} NFE): {', '.join(left_out)}." if left_out else "") + "\n\n")
    pairs = pb.goal_pairs(entries)
    goal = pb.goal_verdicts(features, pairs, metric.ref_features, labels, resamples=args.resamples, seed=args.seed,
                            bootstraps=boot) if pairs else []
    goal_text = (f"\n## The few-step goal\n\nEach student against the best solver at every NFE up to {pb.GOAL_NFE} and against "
                 "its own next smaller step count: FID difference with its 95% paired interval ('below': lower FID).\n\n"
                 + pb.goal_markdown(goal)) if goal else ""
    tmp = args.out / "paired.md.tmp"
    tmp.write_text(header + pb.markdown(out, settings) + goal_text)
    tmp.replace(args.out / "paired.md")
    from distill.eval.plots import fid_vs_n_plot

    fid_vs_n_plot(out, args.out / "fid_vs_n.png")
    print((args.out / "paired.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
