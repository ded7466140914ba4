"""The bench's pictures (distill/eval/bench/plots.py) from a synthetic bench CSV of 38 rows: the headline keeps its y axis
to the informative range and one student per family, and no legend or label covers the data."""

import itertools

import pytest
from matplotlib.text import Text

from distill.eval.bench import (
    FIELDS,
    bench_figure,
    best_student_per_family,
    cost_figure,
    current_rows,
    headline_figure,
    plot_headline,
    redraw,
    student_family,
)
from distill.eval.plots import plt
from distill.eval.solver_error import write_rows

CONFIG = {"num_samples": "2000", "seed": "0", "guidance_scale": "", "grid": "uniform", "final": "direct", "labels": "cycle",
          "teacher": "mnist16", "teacher_hash": "abc", "reference_id": "ref-1", "protocol": "2"}
TEACHER, TEACHER_STD, FLOOR, FLOOR_STD = 11.6, 0.9, 11.3, 1.5


def _row(kind, method, nfe, fid, std=1.0, **extra):
    return {**{k: "" for k in FIELDS}, "kind": kind, "method": method, "nfe": str(nfe), "steps": str(nfe), "fid": str(fid),
            "fid_std": str(std), **CONFIG, **extra}


@pytest.fixture
def rows():
    """5 solvers at 5 NFEs (every one at FID 1000 at 1 NFE, heun diverging), 9 costed student cells of 7 families' files
    (two of the cd family), the data floor and the training data."""
    curves = {"euler": (1000, 120, 35, 17, 13), "heun": (1000, 1100, 1150, 1160, 1200), "unipc": (1000, 117, 16, 12.0, TEACHER),
              "ipndm": (1000, 116, 18, 12.5, 11.9), "dpmpp_2m": (1000, 130, 20, 13, 12.2)}
    out = [_row("solver", m, n, f, 0.9) for m, fids in curves.items() for n, f in zip((1, 2, 4, 8, 20), fids)]
    students = [("cd_mnist16", 1, 18.4, 5580), ("cd_mnist16", 2, 18.5, 5580), ("cd_edm_mnist16", 1, 15.9, 7000),
                ("progressive_mnist16_4", 4, 13.2, 4000), ("sid_from_pd1_mnist16", 1, 12.0, 6000),
                ("dmd2_from_pd1_mnist16", 1, 13.4, 6100), ("reflow_mnist16", 2, 17.3, 3000),
                ("uni_instruct_from_sid_mnist16", 1, 12.05, 6200), ("fdistill_js_from_pd1_mnist16", 1, 13.1, 5900)]
    out += [_row("student", m, k, f, 1.0, student_path=f"results/mnist16/students/{m}.safetensors", cost_wall_seconds=str(s),
                 cost_teacher_nfe=str(s * 100)) for m, k, f, s in students]
    out += [_row("floor", "data floor (floor vs reference)", "", FLOOR, FLOOR_STD), _row("training", "training data", "", 7.4, 1.4)]
    return out


def _boxes_apart(a, b, margin: float = 0.0) -> bool:
    """No overlap of two window extents deeper than ``margin`` pixels in either direction."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) <= margin or min(a.y1, b.y1) - max(a.y0, b.y0) <= margin


def test_student_family_is_the_file_name_prefix():
    names = {"cd_edm_w_mnist16": "cd", "dmd2_from_pd1_mnist16": "dmd2", "dmd_mnist16": "dmd", "sid_cfg2_from_pd1_mnist16": "sid",
             "uni_instruct_from_sid_mnist16": "uni_instruct", "progressive_mnist16_8": "progressive", "vsd": "vsd",
             "results/x/slam_edm_mnist16.safetensors": "slam", "cdx_mnist16": "cdx_mnist16", "pso_online_mnist16": "pso"}
    assert {name: student_family(name) for name in names} == names


def test_headline_shows_the_informative_range_and_one_student_per_family(rows):
    assert len(rows) == 36
    fig = headline_figure(rows)
    ax = fig.axes[0]
    bottom, top = ax.get_ylim()
    assert top < 1000  # the 1-NFE solvers (FID 1000) are off the top
    assert bottom <= TEACHER - TEACHER_STD and TEACHER + TEACHER_STD <= top <= 2.5 * TEACHER + 1e-9  # the teacher's band inside
    assert FLOOR - FLOOR_STD - 0.1 * (top - bottom) < bottom <= FLOOR - FLOOR_STD  # just below the floor's band
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    families = [label.split(":")[0] for label in labels if ": " in label and "teacher" not in label and "floor" not in label]
    assert families == ["cd", "dmd2", "fdistill", "progressive", "reflow", "sid", "uni_instruct"]
    assert any(label.startswith("cd: cd_edm_mnist16, 1 step (15.9 +- 1.0)") for label in labels)  # the family's best file
    assert labels.count("best solver at each NFE") == 1 and not any("heun" in label or "euler" in label for label in labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert _boxes_apart(ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer))
    plt.close(fig)
    cells = current_rows(rows)[0]
    assert best_student_per_family(cells)["cd"]["method"] == "cd_edm_mnist16"


def test_every_method_plot_keeps_its_legend_beside_the_axes(rows):
    fig = bench_figure(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert len(ax.get_legend().get_texts()) == 5 + 8 + 3  # solvers, student files, teacher, floor, training
        assert _boxes_apart(ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer))
    plt.close(fig)


def test_cost_plot_labels_its_points_without_a_legend_or_overlaps(rows):
    fig = cost_figure(rows, {"wall_seconds": 9000, "hardware": "1 CPU thread"})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_legend() is None
        texts = [t for t in ax.texts if isinstance(t, Text)]
        names = [t.get_text() for t in texts]
        assert sum(name.startswith(("cd_mnist16 (", "sid_from_pd1_mnist16 (1 step)")) for name in names) == 2  # one per student
        assert any(name.startswith("teacher converged") for name in names) and "data floor" in names
        boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the letters, not the line to the point
        clashes = [(a.get_text(), b.get_text()) for (a, ba), (b, bb) in itertools.combinations(zip(texts, boxes), 2)
                   if not _boxes_apart(ba, bb, margin=2.0)]
        assert not clashes
    plt.close(fig)


def test_redraw_writes_the_headline_beside_fid_vs_nfe(rows, tmp_path):
    write_rows(tmp_path / "fid_vs_nfe.csv", rows, FIELDS)
    redraw(tmp_path)
    for name in ("fid_vs_nfe.png", "fid_headline.png", "fid_vs_cost.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    exact = [{**r, "fid": "", "fid_std": "", "swd": "0.1", "ode_rmse": "0.01"} for r in rows]  # an analytic teacher: no FID
    assert headline_figure(exact) is None and not plot_headline(exact, tmp_path / "none.png")
