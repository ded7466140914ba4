"""FID vs NFE: every solver and student on one teacher, from the same noise, against the same reference.

A *cell* is one method (a solver, or a student) at one NFE. Every cell draws sample i from noise seed (seed + i)
with its own generator (stochastic solvers draw their step noise from it too), so the noise depends neither on the
method nor on the batch size, and class labels cycle 0..K-1 (or are all -1, unconditional); a text-to-image teacher
takes sample i's prompt from a prompt file in a seeded order (``prompts``), and its latents are decoded by its VAE
before they are measured. Image teachers are measured by ``FidMetric``: FID with its bootstrap spread, KID,
precision and recall against one reference set (named by its content hash, the rows' ``reference_id``) through
torch-fidelity's metric functions, and two memorization statistics (``distill.eval.memorization``); analytic
teachers (``gmm:*``) by exact metrics (``solver_error.exact_metrics``). Each cell appends one row to
``fid_vs_nfe.csv``, written atomically; a cell already there with the same settings is skipped. Data rows measure
real images like a cell, with the cells' sample count and reference: ``floor`` (real images in no other role; exact
samples for analytic teachers) and ``training`` (the model's own training images, what a copying model would
score). Student rows carry their training cost. The plots and the sample grids are drawn from the files alone.

Modules: ``config`` (file names, CSV columns, option parsers, ``BenchConfig``, each sample's condition), ``cells``
(planning the cells, sampling them, keeping their samples), ``student`` (a student's sampling call, teacher check,
training cost and loading), ``metrics`` (``FidMetric``, ``ExactMetric``, ``make_metric``), ``rows`` (the CSV and
``run_bench``), ``tables`` (reading results back, the markdown table), ``plots`` (the pictures: the headline, every
method, the cost) and ``run`` (``benchmark`` and ``redraw``: what ``scripts/bench.py`` runs). Every name is importable
from the package itself.
"""

from distill.eval.bench.cells import Cell, generate, method_stem, plan_cells, save_cell_samples, save_png_folder
from distill.eval.bench.config import (
    CONFIG_FIELDS,
    COST_KEYS,
    COST_PNG,
    CSV,
    DATA_KINDS,
    DEFAULT_NFE,
    EXACT_METRICS,
    FIELDS,
    GRID_ROWS,
    GRID_SAMPLES,
    HEADLINE_PNG,
    PNG,
    PROTOCOL,
    TABLE,
    TEACHER_COST,
    BenchConfig,
    cond_for,
    is_analytic,
    is_image,
    label_mode,
    labels_for,
    parse_int_list,
    parse_methods,
    parse_solvers,
    parse_variant,
    prompt_order,
)
from distill.eval.bench.metrics import ExactMetric, FidMetric, data_splits, make_metric, reference_set
from distill.eval.bench.plots import (
    STUDENT_FAMILIES,
    bench_figure,
    best_solver_per_nfe,
    best_student_per_family,
    cost_figure,
    headline_figure,
    headline_limits,
    plot_bench,
    plot_cost,
    plot_headline,
    save_method_grids,
    student_family,
    student_points,
)
from distill.eval.bench.rows import has_row, read_bench_rows, run_bench, run_cell, run_config
from distill.eval.bench.run import benchmark, check_device, place_teacher, read_teacher_cost, redraw
from distill.eval.bench.student import (
    check_cost,
    check_student,
    check_student_steps,
    load_students,
    read_cost_file,
    student_cost,
    student_root_hash,
    student_sample,
    student_teacher_hash,
)
from distill.eval.bench.tables import _value, converged, current_rows, markdown_table, with_spread  # noqa: F401  (_value: leaderboard)

__all__ = [
    # config
    "CONFIG_FIELDS", "COST_KEYS", "COST_PNG", "CSV", "DATA_KINDS", "DEFAULT_NFE", "EXACT_METRICS", "FIELDS", "GRID_ROWS",
    "GRID_SAMPLES", "HEADLINE_PNG", "PNG", "PROTOCOL", "TABLE", "TEACHER_COST", "BenchConfig", "cond_for", "is_analytic", "is_image",
    "label_mode", "labels_for", "parse_int_list", "parse_methods", "parse_solvers", "parse_variant", "prompt_order",
    # cells
    "Cell", "generate", "method_stem", "plan_cells", "save_cell_samples", "save_png_folder",
    # student
    "check_cost", "check_student", "check_student_steps", "load_students", "read_cost_file", "student_cost", "student_root_hash",
    "student_sample",
    "student_teacher_hash",
    # metrics
    "ExactMetric", "FidMetric", "data_splits", "make_metric", "reference_set",
    # rows
    "has_row", "read_bench_rows", "run_bench", "run_cell", "run_config",
    # tables
    "converged", "current_rows", "markdown_table", "with_spread",
    # plots
    "STUDENT_FAMILIES", "bench_figure", "best_solver_per_nfe", "best_student_per_family", "cost_figure", "headline_figure",
    "headline_limits", "plot_bench", "plot_cost", "plot_headline", "save_method_grids", "student_family", "student_points",
    # run
    "benchmark", "check_device", "place_teacher", "read_teacher_cost", "redraw",
]
