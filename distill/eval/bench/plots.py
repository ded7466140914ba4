"""The pictures, drawn from the files alone: the headline (the best solver per NFE as one line, the best student of each
family, the converged teacher and the data floor as bands), FID (or the exact metrics) vs NFE with every method, FID vs
distillation cost, and the sample grid of each method. Legends stand beside the axes and the cost plot labels its
points directly, so no key covers a point. ``*_figure`` builds a figure (what the tests measure), ``plot_*`` saves it."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from distill.eval.bench.cells import method_stem
from distill.eval.bench.config import EXACT_METRICS, GRID_ROWS
from distill.eval.bench.tables import _value, converged, current_rows, with_spread

# a student's family: the prefix of its file name (the bench names a student by its file's stem), longest match first
STUDENT_FAMILIES = ("uni_instruct", "progressive", "fdistill", "reflow", "dmd2", "slam", "dmd", "vsd", "sid", "pso", "cd")
MARKERS = "*DPXs^vph<>8"
HEADLINE_TOP = 2.5  # the headline's y axis ends at this multiple of the teacher's converged FID


def _draw_method(ax, pts: list[tuple[int, float, float]], **style) -> None:
    """A line through (nfe, value) with error bars of the spread where there is one."""
    x, y, err = zip(*pts)
    if any(math.isfinite(e) for e in err):
        ax.errorbar(x, y, yerr=[e if math.isfinite(e) else 0 for e in err], capsize=2, **style)
    else:
        ax.plot(x, y, **style)


def _legend_beside(ax, entries: int) -> None:
    """The legend to the right of the axes, never over the data (two columns past 18 entries)."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, ncol=1 + (entries > 18))


def _save(fig, path: str | Path) -> None:
    from distill.eval.plots import save_figure

    save_figure(fig, path, dpi=130, bbox_inches="tight")  # "tight": the canvas takes in the legend beside the axes


def plot_bench(rows: list[dict], path: str | Path) -> None:
    """``bench_figure`` saved to ``path``."""
    from distill.eval.plots import plt

    fig = bench_figure(rows)
    _save(fig, path)
    plt.close(fig)


def bench_figure(rows: list[dict]):
    """FID (or the exact metrics) vs NFE, log x: a line per solver, distinct markers per student (error bars: the
    bootstrap spread), the teacher's converged value (best solver at the largest NFE), the data floor and the
    training data as horizontal lines; the legend beside the axes."""
    from distill.eval.plots import plt

    cells, data, others = current_rows(rows)
    if not cells:
        raise ValueError("no benchmark cells to plot")
    exact = any(r.get("ode_rmse", "") != "" for r in cells)
    panels = EXACT_METRICS if exact else {"fid": "FID"}
    solvers = [r for r in cells if r["kind"] == "solver"]
    markers = iter(MARKERS * 4)
    students = {m: next(markers) for m in dict.fromkeys(r["method"] for r in cells if r["kind"] == "student")}
    entries = len({r["method"] for r in solvers}) + len(students) + 1 + len(data)
    fig, axes = plt.subplots(1, len(panels), figsize=((6.5 + 2.8 * (1 + (entries > 18))) * len(panels), 4.8), squeeze=False)
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
        _legend_beside(ax, entries)
    fig.suptitle(_title(cells[-1], others), fontsize=8)
    fig.tight_layout()
    return fig


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


def student_family(method: str) -> str:
    """The family of a student named by its file's stem (``load_students``; a path when stems clash): the longest of
    ``STUDENT_FAMILIES`` that the name starts with as a whole word (``dmd2_from_pd1_mnist16`` -> dmd2, ``cd_edm_mnist16``
    -> cd), else the name itself, a family of one."""
    name = Path(method).stem
    return next((f for f in STUDENT_FAMILIES if name == f or name.startswith(f + "_")), name)


def best_solver_per_nfe(cells: list[dict], key: str = "fid") -> list[dict]:
    """The solver row with the lowest ``key`` at each NFE run, by NFE."""
    by_nfe: dict[int, dict] = {}
    for r in (r for r in cells if r["kind"] == "solver" and math.isfinite(_value(r, key))):
        if int(r["nfe"]) not in by_nfe or _value(r, key) < _value(by_nfe[int(r["nfe"])], key):
            by_nfe[int(r["nfe"])] = r
    return [by_nfe[n] for n in sorted(by_nfe)]


def best_student_per_family(cells: list[dict], key: str = "fid") -> dict[str, dict]:
    """{family: its student row (any step count) with the lowest ``key``} (``student_family``), families sorted."""
    best: dict[str, dict] = {}
    for r in (r for r in cells if r["kind"] == "student" and math.isfinite(_value(r, key))):
        family = student_family(r["method"])
        if family not in best or _value(r, key) < _value(best[family], key):
            best[family] = r
    return dict(sorted(best.items()))


def headline_limits(cells: list[dict], data: dict[str, dict]) -> tuple[float, float]:
    """The headline's FID range: from just below the data floor's band (or the teacher's, or a student below them)
    to ``HEADLINE_TOP`` x the teacher's converged FID (the floor's without solvers), never cutting the teacher's band."""
    teacher, floor = converged(cells), data.get("floor")
    bands = [(_value(r, "fid"), _value(r, "fid_std")) for r in (teacher, floor) if r is not None and r.get("fid", "") != ""]
    bands = [(v, s if math.isfinite(s) else 0.0) for v, s in bands]
    lows = [v - s for v, s in bands] + [_value(r, "fid") - (_value(r, "fid_std") if r.get("fid_std") else 0.0)
                                        for r in best_student_per_family(cells).values()]
    anchor = bands[0] if bands else (max(v for v in (_value(r, "fid") for r in cells) if math.isfinite(v)), 0.0)
    top = max(HEADLINE_TOP * anchor[0], anchor[0] + 1.5 * anchor[1])
    bottom = min(lows) if lows else 0.0
    return max(0.0, bottom - 0.05 * (top - bottom)), top


def plot_headline(rows: list[dict], path: str | Path) -> bool:
    """``headline_figure`` saved to ``path``; False (nothing drawn) when the rows carry no FID (analytic teachers)."""
    from distill.eval.plots import plt

    fig = headline_figure(rows)
    if fig is None:
        return False
    _save(fig, path)
    plt.close(fig)
    return True


def headline_figure(rows: list[dict]):
    """The results at a glance, FID vs NFE (log x): the best solver at each NFE as one line (named where the winning
    solver changes), the best student of each family (``best_student_per_family``) as a marker with its bootstrap error
    bar (students at one NFE spread sideways a little so their bars stay apart), the teacher converged and the data
    floor as bands (value +- spread); the legend, beside the axes, gives each entry's FID, also for one above the range.
    The y axis is linear over ``headline_limits``, from just below the floor to 2.5 x the teacher: the entries a reader
    compares lie within a few FID of the teacher, and a linear axis shows those gaps and error bars at their true size,
    where a log axis would spend its height on the diverged solver cells (FID 100-1000) that this figure leaves to
    fid_vs_nfe.png. None when the rows carry no FID."""
    from distill.eval.plots import plt

    cells, data, others = current_rows(rows)
    if not any(math.isfinite(_value(r, "fid")) for r in cells):
        return None
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    bottom, top = headline_limits(cells, data)
    best = best_solver_per_nfe(cells)
    if best:
        _draw_method(ax, [(int(r["nfe"]), _value(r, "fid"), _value(r, "fid_std")) for r in best], marker="o", ms=4, color="C0",
                     label="best solver at each NFE")
        shown = [r for r in best if _value(r, "fid") <= top]
        for before, r in zip([None] + shown, shown):  # the solver's name where the winner changes
            if before is None or before["method"] != r["method"]:
                ax.annotate(r["method"], (int(r["nfe"]), _value(r, "fid")), xytext=(3, 5), textcoords="offset points",
                            fontsize=6.5, color="C0")
    families = best_student_per_family(cells)
    at_nfe: dict[int, list[str]] = {}
    for family, r in families.items():
        at_nfe.setdefault(int(r["nfe"]), []).append(family)
    for i, (family, r) in enumerate(families.items()):
        group = at_nfe[int(r["nfe"])]
        x = int(r["nfe"]) * 1.08 ** (group.index(family) - (len(group) - 1) / 2)
        err = _value(r, "fid_std") if r.get("fid_std") else None
        ax.errorbar(x, _value(r, "fid"), yerr=err, marker=MARKERS[i % len(MARKERS)], ms=9, mec="k", color=f"C{i % 9 + 1}",
                    ls="none", capsize=2, label=f"{family}: {r['method']}, {_steps(r)} ({with_spread(r, 'fid')})")
    for row, style, name in ((converged(cells), dict(color="C3", ls="-."), "teacher converged"),
                             (data.get("floor"), dict(color="k", ls="--"), "data floor")):
        if row is not None and row.get("fid", "") != "":
            value, spread = _value(row, "fid"), _value(row, "fid_std") if row.get("fid_std") else 0.0
            ax.axhspan(value - spread, value + spread, color=style["color"], alpha=0.12, lw=0)
            what = f" ({row['method']}, {row['nfe']} NFE)" if row["kind"] == "solver" else ""
            ax.axhline(value, lw=1, label=f"{name}{what}: {with_spread(row, 'fid')}", **style)
    ticks = sorted({int(r["nfe"]) for r in cells})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()
    ax.set_ylim(bottom, top)
    ax.set_xlabel("NFE (student: sampling steps)")
    ax.set_ylabel("FID")
    ax.grid(True, alpha=0.3)
    _legend_beside(ax, len(families) + 3)
    fig.suptitle(_title(cells[-1], others) + "; bands: value +- spread; every entry: fid_vs_nfe.png", fontsize=8)
    fig.tight_layout()
    return fig


def _steps(row: dict) -> str:
    return f"{row['steps']} step{'s' if row['steps'] != '1' else ''}"


def label_box(text, renderer):
    """The window extent of a text's own letters: an annotation's ``get_window_extent`` adds its line to the point."""
    from matplotlib.text import Annotation, Text

    if isinstance(text, Annotation):
        text.update_positions(renderer)
    return Text.get_window_extent(text, renderer)


def _overlap(a, b, pad: float = 1.0) -> bool:
    return a.x0 < b.x1 - pad and b.x0 < a.x1 - pad and a.y0 < b.y1 - pad and b.y0 < a.y1 - pad


def _place_labels(ax, anchors: list[tuple[float, float]], labels: list[str], fixed=()) -> list:
    """Label points directly (after the layout is final): each label beside its point, to the right or else the left,
    moved up or down by whole label heights to the nearest place inside the axes where it covers no point, no label
    placed before it and none of the ``fixed`` texts; a thin line joins it to its point."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform(xy) for xy in anchors]
    taken = [label_box(t, renderer) for t in fixed] + [Bbox.from_bounds(x - 5, y - 5, 10, 10) for x, y in dots]
    placed = []
    for i in sorted(range(len(anchors)), key=lambda i: anchors[i][1]):  # bottom up
        ann = ax.annotate(labels[i], anchors[i], xytext=(7, 0), textcoords="offset points", fontsize=6.5, va="center",
                          arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5", shrinkA=0, shrinkB=5))
        step = label_box(ann, renderer).height * 72 / ax.figure.dpi + 1
        first_free = None
        for k in range(8 * len(anchors) + 2):  # offsets 0, +1, -1, +2, -2, ... heights, each on the right then the left
            j = k // 2
            ann.xyann = ((7, -7)[k % 2], step * ((j + 1) // 2) * (1 if j % 2 else -1))
            ann.set_ha(("left", "right")[k % 2])
            box = label_box(ann, renderer)
            if not any(_overlap(box, other) for other in taken):
                first_free = first_free or (ann.xyann, ann.get_ha())
                if frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1:
                    break
        else:  # no free place inside the axes: the nearest free one outside
            if first_free is not None:
                ann.xyann = first_free[0]
                ann.set_ha(first_free[1])
        taken.append(label_box(ann, renderer))
        placed.append(ann)
    return placed


def plot_cost(rows: list[dict], path: str | Path, teacher_cost: dict | None = None) -> bool:
    """``cost_figure`` saved to ``path``; False (nothing drawn) when no student row records a cost."""
    from distill.eval.plots import plt

    fig = cost_figure(rows, teacher_cost)
    if fig is None:
        return False
    _save(fig, path)
    plt.close(fig)
    return True


def cost_figure(rows: list[dict], teacher_cost: dict | None = None):
    """FID against distillation cost, log x: one point per student (its best step count, bootstrap error bar), labelled
    beside it, at its training wall hours and, in a second panel, the teacher network evaluations it spent; the
    teacher's own training time as a vertical line, its converged FID and the data floor as horizontal ones, each
    named on the line. No legend. None when no student row records a cost."""
    from distill.eval.plots import plt

    cells, data, _ = current_rows(rows)
    points = student_points(cells)
    if not points:
        return None
    axes_keys = {"cost_wall_seconds": "training wall hours (hardware: see the table)",
                 "cost_teacher_nfe": "teacher evaluations spent (images x NFE)"}
    axes_keys = {k: v for k, v in axes_keys.items() if any(r.get(k, "") != "" for r in points)}
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(7 * len(axes_keys), 5.5), squeeze=False)
    labelled = []
    for ax, (key, label) in zip(axes[0], axes_keys.items()):
        scale = 1 / 3600 if key == "cost_wall_seconds" else 1
        mine = [r for r in points if r.get(key, "") != ""]
        xs = [_value(r, key) * scale for r in mine]
        own = None  # the teacher's own training hours
        if teacher_cost and key == "cost_wall_seconds" and teacher_cost.get("wall_seconds"):
            own = float(teacher_cost["wall_seconds"]) * scale
            xs.append(own)
        ax.set_xlim(min(xs) / 3, max(xs) * 3)  # a decade of room around a single point
        for i, r in enumerate(mine):
            ax.errorbar(_value(r, key) * scale, _value(r, "fid"), yerr=_value(r, "fid_std") if r.get("fid_std") else None,
                        marker=MARKERS[i % 9], ms=9, mec="k", color=f"C{i % 10}", capsize=2)
        fixed = []
        if own is not None:
            ax.axvline(own, color="C3", ls="-", lw=1)
            fixed.append(ax.text(own, 0.98, f" teacher's own training ({teacher_cost.get('hardware', '?')})", rotation=90,
                                 va="top", ha="right", fontsize=6.5, color="C3", transform=ax.get_xaxis_transform()))
        best = converged(cells)
        for row, style, name, va in ((best, dict(color="0.4", ls="-."), "teacher converged", "bottom"),
                                     (data.get("floor"), dict(color="k", ls="--"), "data floor", "top")):
            if row is not None and row.get("fid", "") != "":
                ax.axhline(_value(row, "fid"), lw=1, **style)
                what = f" ({row['method']}, {row['nfe']} NFE)" if row["kind"] == "solver" else ""
                fixed.append(ax.text(0.01, _value(row, "fid"), f"{name}{what}", va=va, fontsize=6.5, color=style["color"],
                                     transform=ax.get_yaxis_transform()))
        ax.set_xscale("log")
        ax.tick_params(axis="x", which="minor", labelbottom=False)
        ax.set_xlabel(label)
        ax.set_ylabel("FID")
        ax.grid(True, which="both", alpha=0.3)
        labelled.append((ax, [(_value(r, key) * scale, _value(r, "fid")) for r in mine], [f"{r['method']} ({_steps(r)})" for r in mine],
                         fixed))
    fig.suptitle(_title(cells[-1], 0), fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()  # the axes' limits and places final before the labels are placed in display units
    for ax, anchors, labels, fixed in labelled:  # after the layout: the labels are placed in display units
        _place_labels(ax, anchors, labels, fixed)
    return fig


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
