"""FID against training steps, from the tune-split scores a student's selection recorded (``select_student.py``).

    python scripts/selection_curve.py results/mnist16/students/scm_mnist16.safetensors \\
        results/mnist16/students/meanflow_mnist16.safetensors --out results/mnist16/students/curves

Each student file's ``selection`` record holds the tune FID of every candidate it was chosen among. Candidates named
``<anything>_<raw|ema>_<step>.safetensors`` (as the exports of a run's checkpoints are named here) become one curve
per weight kind; the chosen one is marked. Writes ``<out>.png`` and ``<out>.md`` (a table per student). These are tune
numbers (1,000 digits never used for reporting), the numbers the choice was made on, not the bench's.
"""

from __future__ import annotations

import argparse
import os as _os
import re
import sys as _sys
from pathlib import Path

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

from distill.core.atomic import write_text  # noqa: E402
from distill.eval.select import read_selection  # noqa: E402

NAME = re.compile(r"_(raw|ema)_(\d+)\.safetensors$")


def curve_points(record: dict) -> dict[str, list[tuple[int, float]]]:
    """{weights kind: [(step, tune FID)] sorted by step} of a selection record's candidates named as the module says."""
    points: dict[str, list[tuple[int, float]]] = {}
    for name, fid in record["candidates"].items():
        m = NAME.search(name)
        if m:
            points.setdefault(m.group(1), []).append((int(m.group(2)), float(fid)))
    return {k: sorted(v) for k, v in sorted(points.items())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("students", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output stem: <out>.png and <out>.md")
    p.add_argument("--line", nargs="*", default=[], metavar="LABEL=FID",
                   help="horizontal reference lines, tune FIDs at the same N (e.g. 'unipc 4 NFE=31.3')")
    args = p.parse_args(argv)
    try:
        refs = [(label, float(value)) for label, _, value in (item.rpartition("=") for item in args.line)]
    except ValueError:
        print(f"error: --line takes LABEL=FID items, got {args.line}", file=_sys.stderr)
        return 1
    curves = {}
    for path in args.students:
        record = read_selection(path) if path.is_file() else None
        points = curve_points(record) if record else {}
        if not points:
            print(f"error: {path} records no selection among checkpoint exports named *_<raw|ema>_<step>.safetensors",
                  file=_sys.stderr)
            return 1
        curves[path.stem] = (record, points)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    import shlex

    lines = ["# FID against training steps (tune split)", "",
             "`python scripts/selection_curve.py " + shlex.join(argv if argv is not None else _sys.argv[1:]) + "`", ""]
    for ax, (name, (record, points)) in zip(axes[0], curves.items()):
        chosen = NAME.search(record["chosen"])
        for kind, pts in points.items():
            ax.plot([s for s, _ in pts], [f for _, f in pts], marker="o", label=f"{kind} weights")
        if chosen:
            fid = record["candidates"][record["chosen"]]
            ax.plot([int(chosen.group(2))], [fid], marker="*", markersize=14, color="k", linestyle="", label="chosen")
        for i, (label, value) in enumerate(refs):
            ax.axhline(value, linestyle="--", color=f"C{i + 3}", linewidth=1, label=label)
        ax.set(title=f"{name}, {record['steps']} step(s)", xlabel="training step", ylabel=f"tune FID ({record['split']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        seeds = record.get("seeds", ["?", "?"])
        lines += [f"## `{name}`: {record['steps']} sampling step(s), noise seeds {seeds[0]}..{seeds[-1]}, "
                  f"split `{record['split']}`", "", "| training step | " + " | ".join(f"{k} weights" for k in points) + " |",
                  "|---|" + "---|" * len(points)]
        steps = sorted({s for pts in points.values() for s, _ in pts})
        for step in steps:
            cells = [next((f"{f:.2f}" for s, f in pts if s == step), "") for pts in points.values()]
            lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
        lines += ["", f"Chosen: `{record['chosen']}`." + "".join(f" {label}: {value:.2f}." for label, value in refs), ""]
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
