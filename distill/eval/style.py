"""Style statistics of samples against a target set (``scripts/style_stats.py``): mean ink, the stroke area, the
classifier's accuracy on the requested labels, and style joined with a bench's FID rows."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from distill.data import mean_ink


def statistics(x: torch.Tensor, labels: torch.Tensor | None, classifier) -> dict:
    on = ((x.float().clamp(-1, 1) + 1) / 2 > 0.5).flatten(1).float().mean(1)  # stroke area, blind to blur's grey halo
    ink = mean_ink(x)
    row = {"mean_ink": float(ink.mean()), "ink_std": float(ink.std()), "ink_p10": float(ink.float().quantile(0.1)),
           "on_fraction": float(on.mean())}  # ink_p10: the worst decile's edge when the reward is mean ink
    if labels is not None:
        with torch.no_grad():
            row["accuracy"] = float((classifier(x.clamp(-1, 1)).argmax(1) == labels).float().mean())
    return row


def target_options(text: str) -> dict:
    pairs = [kv.split("=", 1) for kv in text.split(",") if kv]
    try:
        if any(len(kv) != 2 for kv in pairs):
            raise ValueError
        return {k: (float(v) if k == "fraction" else v) for k, v in pairs}
    except ValueError:
        raise ValueError(f"cannot parse --target-options {text!r}: expected key=value items such as stroke=thick,"
                         "fraction=0.25 (fraction a number)") from None


def parse_students(text: str) -> dict[str, str]:
    """'name=path,...' -> {name: path}, in order (the first is the 'before' student)."""
    items = [item.split("=", 1) for item in text.split(",") if item]
    if not items or any(len(kv) != 2 or not all(kv) for kv in items):
        raise ValueError(f"cannot parse --students {text!r}: expected comma-separated name=path items")
    return dict(items)


def joined_rows(rows: list[dict], bench_csv: Path, students: dict) -> list[dict]:
    """Style and FID side by side, with progress toward the target and the FID change against the first student."""
    with open(bench_csv) as f:
        fid = {(r["method"], int(r["steps"])): r for r in csv.DictReader(f) if r["kind"] == "student"}
    target = next(r["mean_ink"] for r in rows if r["kind"] == "target")
    cells = {(r["name"], r["steps"]): r for r in rows if r["kind"] == "student"}
    first, out = next(iter(students)), []
    for (name, k), r in cells.items():
        f, f0 = fid.get((Path(students[name]).stem, k)), fid.get((Path(students[first]).stem, k))
        before = cells[(first, k)]["mean_ink"]
        out.append({"name": name, "steps": k, "num_samples": r["num_samples"], "mean_ink": round(r["mean_ink"], 4),
                    "target_ink": round(target, 4), "ink_progress": round((r["mean_ink"] - before) / (target - before), 3),
                    "ink_p10": round(r["ink_p10"], 4),
                    "on_fraction": round(r["on_fraction"], 4), "accuracy": round(r["accuracy"], 4),
                    "fid": f and f["fid"], "fid_std": f and f["fid_std"],
                    "fid_change": f and f0 and round(float(f["fid"]) - float(f0["fid"]), 3),
                    "fid_samples": f and f["num_samples"], "student": students[name]})
    return out
