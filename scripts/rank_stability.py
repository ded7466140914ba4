"""Rank stability of bench entries over disjoint noise-seed sets (``distill.eval.rank_stability``).

    python scripts/rank_stability.py --teacher mnist16 --num-samples 2000 --seeds 0,20000,40000 \\
        --entry student:results/mnist16/students/sid_from_pd1_mnist16.safetensors@1 --entry solver:unipc@20 ... \\
        --out results/mnist16_rank_stability

Each entry is sampled as its bench cell (``solver:NAME@NFE`` or ``student:FILE@STEPS``) on seeds s..s+N-1 for each s
of --seeds (ranges must not overlap) and scored by FID against the bench's reference; writes fids.csv (entry, seed,
FID) and stability.json / stability.md (each set's top k, how often the top-k order held, the pairs never reordered).
"""

from __future__ import annotations

import argparse
import json
import os as _os
import sys as _sys
from pathlib import Path

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

from distill.core.atomic import csv_text, reports_write_errors, write_text  # noqa: E402
from distill.engine.paths import check_output_dir  # noqa: E402
from distill.eval.bench.cells import generate  # noqa: E402
from distill.eval.fid import feature_statistics, frechet_distance  # noqa: E402
from distill.eval.paired import feature_bench  # noqa: E402
from distill.eval.rank_stability import stability  # noqa: E402
from distill.eval.teacher_ref import check_disjoint  # noqa: E402
from students import load_student  # noqa: E402
from teachers import load_teacher  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        seeds = []
    if len(seeds) < 2 or min(seeds) < 0:
        raise ValueError(f"cannot parse --seeds {text!r}: expected at least 2 comma-separated non-negative integers such as 0,20000")
    return seeds


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--entry", action="append", default=[], help="solver:NAME@NFE or student:FILE@STEPS (repeatable)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seeds", default="0,20000,40000", help="first seed of each set")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        check_output_dir(args.out, "--out")
        seeds = parse_seeds(args.seeds)
        check_disjoint(args.num_samples, {f"set {i}": s for i, s in enumerate(seeds)})
        if len(args.entry) < max(args.top, 2):
            raise ValueError(f"--entry given {len(args.entry)} times; allowed: at least --top ({args.top}) entries")
        teacher = load_teacher(args.teacher)
        entries, cfg, metric = feature_bench(teacher, args.entry, args.num_samples, seeds[0], args.batch_size, load_student)
    except (ValueError, FileNotFoundError) as e:
        _sys.exit(f"error: {e}")
    ref = feature_statistics(metric.ref_features)
    per_set, rows = [], []
    for s in seeds:
        cfg.seed = s
        fids = {}
        for e in entries:
            fids[e.label] = frechet_distance(*feature_statistics(metric.features(generate(teacher, e.cell(), cfg, e.student)[0])), *ref)
            rows.append({"entry": e.label, "seed": s, "fid": fids[e.label]})
            print(f"seeds {s}..: {e.label}: FID {fids[e.label]:.3f}", flush=True)
        per_set.append(fids)
    out = stability(per_set, args.top)
    out.update(num_samples=args.num_samples, seeds=seeds, command="python scripts/rank_stability.py " + " ".join(argv or _sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "fids.csv", csv_text(rows, ["entry", "seed", "fid"]))  # atomic (distill.core.atomic)
    write_text(args.out / "stability.json", json.dumps(out, indent=1))
    md = [f"Top {args.top} on {len(seeds)} disjoint seed sets of {args.num_samples} samples (`{out['command']}`):", "",
          "| seeds | top |", "|---|---|"] + [f"| {s}.. | {', '.join(t)} |" for s, t in zip(seeds, out["top"])]
    md += ["", f"The top-{args.top} order held on {out['top_k_held']:.0%} of the sets; {out['pairs_kept']:.0%} of the entry "
           f"pairs kept their order on every set."]
    write_text(args.out / "stability.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
