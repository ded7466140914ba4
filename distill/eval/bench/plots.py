"""The pictures, drawn from the files alone: FID (or the exact metrics) vs NFE, FID vs distillation cost, and the
sample grid of each method."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from distill.eval.bench.cells import method_stem
from distill.eval.bench.config import EXACT_METRICS, GRID_ROWS
from distill.eval.bench.tables import _value, converged, current_rows


def _draw_method(ax, pts: list[tuple[int, float, float]], **style) -> None:
    """A line through (nfe, value) with error bars of the spread where there is one."""
    x, y, err = zip(*pts)
    if any(math.isfinite(e) for e in err):
        ax.errorbar(x, y, yerr=[e if math.isfinite(e) else 0 for e in err], capsize=2, **style)
    else:
        ax.plot(x, y, **style)


def plot_bench(rows: list[dict], path: str | Path) -> None:
    """FID (or the exact metrics) vs NFE, log x: a line per solver, distinct markers per student (error bars: the
    bootstrap spread), the teacher's converged value (best solver at the largest NFE), the data floor and the
    training data as horizontal lines."""
    from distill.eval.plots import plt

    cells, data, others = current_rows(rows)
    if not cells:
        raise ValueError("no benchmark cells to plot")
    exact = any(r.get("ode_rmse", "") != "" for r in cells)
    panels = EXACT_METRICS if exact else {"fid": "FID"}
    solvers = [r for r in cells if r["kind"] == "solver"]
    markers = iter("*DPXs^vph" * 4)
    students = {m: next(markers) for m in dict.fromkeys(r["method"] for r in cells if r["kind"] == "student")}
    outside = len({r["method"] for r in solvers}) + len(students) > 10  # a long legend goes beside the axes, not on the lines
    fig, axes = plt.subplots(1, len(panels), figsize=((6.5 + 2.5 * outside) * len(panels), 4.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels.items()):
        def points(kind, method):
            mine = [r for r in cells if r["kind"] == kind and r["method"] == method]
            return sorted((int(r["nfe"]), _value(r, key), _value(r, key + "_std")) for r in mine)

        for i, method in enumerate(dict.fromkeys(r["method"] for r in solvers)):
            # ten colours, then the same ones dashed, then dotted: no two solvers share a line
            _draw_method(ax, points("solver", method), marker="o", ls=("-", "--", ":")[i // 10 % 3], color=f"C{i % 10}", ms=3, label=method)
        for method, marker in students.items():
            _draw_method(ax, points("student", method), marker=marker, ls=":", ms=11, mec="k", label=f"{method} (student)")
        best = converged(cells, key)
        if best is not None:
            ax.axhline(_value(best, key), color="0.4", ls="-.", lw=1, label=f"teacher converged ({best['method']}, {best['nfe']} NFE)")
        for kind, row in data.items():
            if row.get(key, "") != "":
                ax.axhline(_value(row, key), color="k", ls="--" if kind == "floor" else ":", lw=1,
                           label=f"{row['method']}, {row['num_samples']} samples")
        values = [_value(r, key) for r in cells] + [_value(r, key) for r in data.values()]
        ticks = sorted({int(r["nfe"]) for r in cells})
        ax.set_xscale("log")
        if key == "nll":  # may be negative; symlog keeps diverged cells from flattening the rest
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=min(v for v in values if math.isfinite(v)) - 1.0)
        elif all(v > 0 for v in values if math.isfinite(v)):
            ax.set_yscale("log")
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("NFE")
        ax.set_ylabel(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if outside else {}))
    fig.suptitle(_title(cells[-1], others), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _title(r0: dict, others: int) -> str:
    guidance = f", guidance {r0['guidance_scale']}" if r0["guidance_scale"] else ""
    hidden = f"; {others} rows of other settings not shown" if others else ""
    spread = "; error bars: bootstrap spread" if r0.get("fid_std", "") != "" else ""
    return (f"{r0['teacher']}: {r0['num_samples']} samples, seed {r0['seed']}, labels {r0['labels']}{guidance}, "
            f"grid {r0['grid']} (final {r0.get('final', 'clean')}){spread},\nreference {r0['reference_id']}{hidden}")


def student_points(cells: list[dict]) -> list[dict]:
    """One row per student with a recorded training cost: its best FID over the step counts run."""
    costed = [r for r in cells if r["kind"] == "student" and r.get("cost_wall_seconds", "") != ""]
    best = {}
    for r in costed:
        if r["method"] not in best or _value(r, "fid") < _value(best[r["method"]], "fid"):
            best[r["method"]] = r
    return list(best.values())


def plot_cost(rows: list[dict], path: str | Path, teacher_cost: dict | None = None) -> bool:
    """FID against distillation cost, log x: one point per student (its best step count, bootstrap error bar) at its
    training wall hours and, in a second panel, the teacher network evaluations it spent; the teacher's own
    training time as a vertical line, its converged FID and the data floor as horizontal ones. False (nothing
    drawn) when no student row records a cost."""
    from distill.eval.plots import plt

    cells, data, _ = current_rows(rows)
    points = student_points(cells)
    if not points:
        return False
    axes_keys = {"cost_wall_seconds": "training wall hours (hardware: see the table)",
                 "cost_teacher_nfe": "teacher evaluations spent (images x NFE)"}
    axes_keys = {k: v for k, v in axes_keys.items() if any(r.get(k, "") != "" for r in points)}
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(6 * len(axes_keys), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], axes_keys.items()):
        scale = 1 / 3600 if key == "cost_wall_seconds" else 1
        xs = [_value(r, key) * scale for r in points if r.get(key, "") != ""]
        if teacher_cost and key == "cost_wall_seconds" and teacher_cost.get("wall_seconds"):
            xs.append(float(teacher_cost["wall_seconds"]) * scale)
        ax.set_xlim(min(xs) / 3, max(xs) * 3)  # a decade of room around a single point
        for i, r in enumerate(points):
            if r.get(key, "") != "":
                ax.errorbar(_value(r, key) * scale, _value(r, "fid"), yerr=_value(r, "fid_std") if r.get("fid_std") else None,
                            marker="*DPXs^vph"[i % 9], ms=11, mec="k", color=f"C{i % 10}", capsize=2,
                            label=f"{r['method']} ({r['steps']} step{'s' if r['steps'] != '1' else ''})")
        if teacher_cost and key == "cost_wall_seconds" and teacher_cost.get("wall_seconds"):
            ax.axvline(float(teacher_cost["wall_seconds"]) / 3600, color="C3", ls="-", lw=1,
                       label=f"teacher's own training ({teacher_cost.get('hardware', '?')})")
        best = converged(cells)
        if best is not None:
            ax.axhline(_value(best, "fid"), color="0.4", ls="-.", lw=1, label=f"teacher converged ({best['method']}, {best['nfe']} NFE)")
        if "floor" in data:
            ax.axhline(_value(data["floor"], "fid"), color="k", ls="--", lw=1, label=data["floor"]["method"])
        ax.set_xscale("log")
        ax.tick_params(axis="x", which="minor", labelbottom=False)
        ax.set_xlabel(label)
        ax.set_ylabel("FID")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(cells[-1], 0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def save_method_grids(out: str | Path) -> list[Path]:
    """samples/<kind>-<method>.png from the kept samples: one row per NFE (up to GRID_ROWS, spread over those run)."""
    from safetensors import safe_open

    from distill.eval.plots import save_image_grid

    out = Path(out)
    found: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for f in sorted((out / "samples").glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            meta = g.metadata()
            found.setdefault((meta["kind"], meta["method"]), {})[int(meta["nfe"])] = g.get_tensor("samples")
    written = []
    for (kind, method), by_nfe in found.items():
        nfes = sorted(by_nfe)
        pick = sorted({nfes[round(i * (len(nfes) - 1) / (GRID_ROWS - 1))] for i in range(GRID_ROWS)}) if len(nfes) > 1 else nfes
        width = min(len(by_nfe[n]) for n in pick)
        path = out / "samples" / f"{method_stem(kind, method)}.png"
        save_image_grid(torch.cat([by_nfe[n][:width] for n in pick]), path, nrow=width,
                        title=f"{method} ({kind}); rows: NFE {', '.join(map(str, pick))}")
        written.append(path)
    return written
