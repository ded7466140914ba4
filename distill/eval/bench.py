"""FID vs NFE: every solver and student on one teacher, from the same noise, against the same reference.

A *cell* is one method (a solver, or a student) at one NFE. Every cell draws sample i from noise seed
(seed + i) with its own generator (stochastic solvers draw their step noise from it too), so the noise
depends neither on the method nor on the batch size, and class labels cycle 0..K-1 (or are all -1,
unconditional). Image teachers are measured by FID / KID
through ``fid_kid`` (the reference statistics cached under a content-hash name, which is the rows'
``reference_id``); analytic teachers (``gmm:*``) by exact metrics (``solver_error.exact_metrics``). Each
cell appends one row to ``fid_vs_nfe.csv``, written atomically; a cell already there with the same
settings is skipped. A ``floor`` row holds the data floor: a second data split (exact samples for
analytic teachers) measured like a cell. The plot and the sample grids are drawn from the files alone.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from distill.eval.fid import EXTRACTOR, fid_kid, reference_cache_name, uint8_images
from distill.eval.solver_error import exact_metrics, make_problem, read_rows, write_rows
from distill.grids import FINALS, GRIDS
from distill.solvers import get_solver, per_sample_noises, sample

DEFAULT_NFE = "1,2,3,4,5,6,8,10,15,20,50"
CSV = "fid_vs_nfe.csv"
PNG = "fid_vs_nfe.png"
TABLE = "fid_vs_nfe.md"
FIELDS = ["method", "kind", "nfe", "steps", "fid", "kid", "ode_rmse", "swd", "nll", "num_samples", "seed", "seconds_per_sample",
          "guidance_scale", "grid", "final", "labels", "teacher", "teacher_hash", "reference_id", "student_teacher_hash"]
# settings shared by every row of one benchmark; a cell is done when a row has its kind, method, NFE and these
CONFIG_FIELDS = ("num_samples", "seed", "guidance_scale", "grid", "final", "labels", "teacher_hash", "reference_id")
EXACT_METRICS = {"ode_rmse": "RMSE vs exact ODE solution", "swd": "sliced W2 to data", "nll": "NLL under the true density"}
GRID_SAMPLES = 10  # samples kept per cell for the picture of each method (one per class for 10 classes)
GRID_ROWS = 4  # NFEs shown in the picture of each method


def parse_int_list(text: str, option: str = "--nfe") -> list[int]:
    """'1,2,4' -> [1, 2, 4]; anything else is an error naming the option."""
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"cannot parse {option} {text!r}: expected comma-separated positive integers such as 1,2,4")
    return list(dict.fromkeys(values))


def parse_solvers(text: str) -> list[str]:
    """'euler,heun' -> the names, checked against the registry; 'all': every solver (the stochastic ones draw
    their noise per sample, as the initial noise); 'deterministic': every deterministic solver."""
    from distill.solvers import SOLVERS

    if text in ("all", "deterministic"):
        return sorted(s for s in SOLVERS if text == "all" or not SOLVERS[s].stochastic)
    names = [s for s in text.split(",") if s]
    for name in names:
        get_solver(name)  # unknown name: ValueError listing the valid ones
    return names


@dataclass
class BenchConfig:
    """Settings shared by every cell of one benchmark (validated by ``validate`` before any work)."""

    num_samples: int = 5000  # samples per cell; sample i uses noise seed (seed + i)
    seed: int = 0
    batch_size: int = 500  # samples per call; changes no sample
    grid: str = "uniform"  # time grid of the solvers (distill.grids)
    final: str = "direct"  # how the grid ends (distill.grids): "direct" spends no step between t_min and clean
    guidance_scale: float | None = None  # classifier-free guidance of the teacher's solvers; None: the plain model
    unconditional: bool = False  # a class-conditional teacher sampled with label -1 instead of labels 0..K-1 in turn
    save_images: bool = False  # also write one PNG per sample under images/<cell>/
    device: str = "cpu"  # where the noise goes (the teacher must already be there)

    def validate(self, teacher) -> None:
        if self.num_samples < 2 or self.batch_size < 1:
            raise ValueError(f"need num_samples >= 2 and batch_size >= 1, got {self.num_samples} and {self.batch_size}")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; allowed: {', '.join(GRIDS)}")
        if self.final not in FINALS or self.final == "t_min":
            raise ValueError(f"unknown final {self.final!r}; allowed: clean, direct (the bench scores denoised samples)")
        if self.unconditional and teacher.num_classes and not teacher.has_uncond:
            raise ValueError(f"teacher {teacher.name!r} is class-conditional without an unconditional mode; drop --unconditional")
        if self.guidance_scale is not None and (not teacher.num_classes or self.unconditional or not teacher.has_uncond):
            raise ValueError("classifier-free guidance needs a class-conditional teacher with an unconditional mode, "
                             "sampled with class labels (no --unconditional)")
        if self.save_images and not is_image(teacher):
            raise ValueError(f"--save-images needs an image teacher; {teacher.name!r} makes data of shape {teacher.data_shape}")


def is_image(teacher) -> bool:
    return len(teacher.data_shape) == 3


def is_analytic(teacher) -> bool:
    return hasattr(teacher, "sample_data") and hasattr(teacher, "log_prob")


def label_mode(teacher, cfg: BenchConfig) -> str:
    """'none' (unconditional teacher), 'cycle' (sample i has label i mod K) or 'uncond' (label -1)."""
    return "none" if not teacher.num_classes else ("uncond" if cfg.unconditional else "cycle")


def labels_for(teacher, cfg: BenchConfig, start: int, stop: int) -> torch.Tensor | None:
    """Class labels of samples start..stop-1 (None for an unconditional teacher)."""
    mode = label_mode(teacher, cfg)
    if mode == "none":
        return None
    i = torch.arange(start, stop)
    return torch.full_like(i, -1) if mode == "uncond" else i % teacher.num_classes


# -- cells -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    method: str  # solver name, or student name
    kind: str  # "solver" or "student"
    nfe: int
    steps: int

    @property
    def name(self) -> str:
        """A file name for this cell."""
        return f"{method_stem(self.kind, self.method)}_nfe{self.nfe}"


def method_stem(kind: str, method: str) -> str:
    """A file name for a method: its kind and its name with unsafe characters replaced."""
    return f"{kind}-{re.sub(r'[^A-Za-z0-9._-]', '_', method)}"


def plan_cells(solvers: list[str], nfes: list[int], students: list[str] = (), student_steps: list[int] = (),
               log: Callable[[str], None] = print) -> list[Cell]:
    """Every (solver, NFE) the solver can spend exactly (others skipped with a note), then every (student, steps).
    A k-step student spends k NFE."""
    cells = []
    for s in solvers:
        for n in nfes:
            try:
                cells.append(Cell(s, "solver", n, get_solver(s).steps_for_nfe(n, True)))
            except ValueError as e:
                log(f"note: cell skipped: {e}")
    return cells + [Cell(name, "student", k, k) for name in students for k in student_steps]


def student_sample(student, noise: torch.Tensor, steps: int, cond: torch.Tensor | None, seed: int,
                   guidance_scale: float | None = None) -> torch.Tensor:
    """The bench's one call into a student (DESIGN.md, contract 5): ``student.sample(noise, steps=k, cond=labels)``,
    under torch's default generator seeded with ``seed`` (restored afterwards), so multistep re-noising repeats.
    A guidance-distilled student (one that takes ``w``) gets the bench's guidance scale as its input: still one
    network call, 1 NFE, per step."""
    devices = [noise.device] if noise.is_cuda else []
    takes_w = guidance_scale is not None and "w" in getattr(student, "conditions", {})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return student.sample(noise, steps=steps, cond=cond, **({"w": guidance_scale} if takes_w else {}))


def check_student(teacher, name: str, student, allow_other_teacher: bool = False) -> None:
    """A student that records the hash of the teacher it was distilled from must match the bench's teacher
    (unless ``allow_other_teacher``; its rows then carry both hashes)."""
    want = student_teacher_hash(student)
    if want and want != teacher.hash and not allow_other_teacher:
        made_from = student.info.get("teacher") or "another teacher"
        raise ValueError(f"student {name!r} was distilled from {made_from!r} (teacher hash {want[:12]}), not from the bench "
                         f"teacher {teacher.name!r} ({teacher.hash[:12]}); pass --allow-other-teacher to bench it anyway")


def student_teacher_hash(student) -> str:
    """The hash of the teacher a student was distilled from ('' when its file does not record one)."""
    return str(getattr(student, "info", {}).get("teacher_hash", "")) if student is not None else ""


def generate(teacher, cell: Cell, cfg: BenchConfig, student=None) -> tuple[torch.Tensor, float]:
    """The ``cfg.num_samples`` samples of one cell (on the CPU) and the wall seconds spent sampling them."""
    dtype = torch.float64 if is_analytic(teacher) else torch.float32
    stochastic = cell.kind == "solver" and get_solver(cell.method).stochastic
    out, seconds = [], 0.0
    with torch.inference_mode():
        for start in range(0, cfg.num_samples, cfg.batch_size):
            stop = min(start + cfg.batch_size, cfg.num_samples)
            seeds = range(cfg.seed + start, cfg.seed + stop)
            noise, step_noises = per_sample_noises(teacher.data_shape, seeds, cell.steps if stochastic else 0, dtype)
            noise = noise.to(cfg.device)
            cond = labels_for(teacher, cfg, start, stop)
            cond = None if cond is None else cond.to(cfg.device)
            options = {"noises": [z.to(cfg.device) for z in step_noises]} if stochastic else {}
            t0 = time.perf_counter()
            if cell.kind == "solver":
                x = sample(teacher, noise, solver=cell.method, nfe=cell.nfe, grid=cfg.grid, final=cfg.final, cond=cond,
                           guidance_scale=cfg.guidance_scale, **options)
            else:
                x = student_sample(student, noise, cell.steps, cond, seed=cfg.seed + start, guidance_scale=cfg.guidance_scale)
            if x.is_cuda:
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            out.append(x.cpu())
    return torch.cat(out), seconds


# -- metrics -----------------------------------------------------------------------------------------
class FidMetric:
    """FID / KID against a reference set through ``fid_kid``; the floor is ``floor_set`` against the reference."""

    def __init__(self, reference: torch.Tensor, *, extractor: str = EXTRACTOR, weights_path: str | None = None,
                 cache_root: str | None = None, kid_subset_size: int = 1000, floor_set: torch.Tensor | None = None,
                 floor_name: str = "held-out data"):
        self.reference, self.extractor, self.weights_path = reference, extractor, weights_path
        self.cache_root, self.kid_subset_size = cache_root, kid_subset_size
        self.floor_set, self.floor_name = floor_set, floor_name
        self.reference_id = reference_cache_name(reference, extractor)

    def __call__(self, x: torch.Tensor) -> dict:
        x = torch.nan_to_num(x.float(), nan=0.0, posinf=1.0, neginf=-1.0)  # a diverged sample is a bad image, not a crash
        return fid_kid(x, self.reference, extractor=self.extractor, kid_subset_size=self.kid_subset_size,
                       weights_path=self.weights_path, cache_root=self.cache_root)

    def floor_size(self, num_samples: int) -> int:
        return 0 if self.floor_set is None else min(num_samples, len(self.floor_set))

    def floor(self, n: int) -> dict:
        return {"method": f"data floor ({self.floor_name})", **self(self.floor_set[:n])}


class ExactMetric:
    """Exact metrics of an analytic teacher's samples; the reference ODE solution is computed on first use."""

    def __init__(self, teacher, cfg: BenchConfig, reference_steps: int = 500):
        self.teacher, self.cfg, self.reference_steps = teacher, cfg, reference_steps
        self.reference_id = f"exact-ode-rk4-{reference_steps}"
        self._problem = None

    @property
    def problem(self):
        if self._problem is None:
            cfg = self.cfg
            self._problem = make_problem(self.teacher, cfg.num_samples, cfg.seed, self.reference_steps,
                                         cond=labels_for(self.teacher, cfg, 0, cfg.num_samples), guidance_scale=cfg.guidance_scale)
        return self._problem

    def __call__(self, x: torch.Tensor) -> dict:
        return exact_metrics(self.problem, x)

    def floor_size(self, num_samples: int) -> int:
        return num_samples

    def floor(self, n: int) -> dict:
        return {"method": "data floor (exact samples)", "swd": self.problem.swd_floor, "nll": self.problem.nll_floor}


# -- the run -----------------------------------------------------------------------------------------
def run_config(teacher, cfg: BenchConfig, reference_id: str) -> dict[str, str]:
    """The CONFIG_FIELDS of this run's rows, as the CSV stores them."""
    scale = "" if cfg.guidance_scale is None else f"{cfg.guidance_scale:g}"
    return {"num_samples": str(cfg.num_samples), "seed": str(cfg.seed), "guidance_scale": scale, "grid": cfg.grid,
            "final": cfg.final, "labels": label_mode(teacher, cfg), "teacher_hash": teacher.hash, "reference_id": reference_id}


def read_bench_rows(path: str | Path) -> list[dict]:
    """The rows of a bench CSV; files written before the ``final`` column existed used ``final="clean"``."""
    rows = read_rows(path)
    for r in rows:
        r.setdefault("final", "clean")
    return rows


def has_row(rows: list[dict], config: dict[str, str], kind: str, method: str | None = None, nfe: int | None = None) -> bool:
    return any(r["kind"] == kind and (method is None or r["method"] == method) and (nfe is None or r["nfe"] == str(nfe))
               and all(r[k] == v for k, v in config.items()) for r in rows)


def save_png_folder(x: torch.Tensor, folder: Path) -> None:
    """One PNG per sample (000000.png, ...), for external FID tools; written to a temp folder, then renamed."""
    import shutil

    from PIL import Image

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    u8 = uint8_images(torch.nan_to_num(x.float()))
    u8 = u8[:, :1] if x.shape[1] == 1 else u8
    for i, img in enumerate(u8.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp / f"{i:06d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def save_cell_samples(x: torch.Tensor, cell: Cell, out: Path) -> None:
    """The first GRID_SAMPLES samples of a cell, for the method's picture."""
    from safetensors.torch import save_file

    (out / "samples").mkdir(parents=True, exist_ok=True)
    meta = {"method": cell.method, "kind": cell.kind, "nfe": str(cell.nfe)}
    save_file({"samples": x[:GRID_SAMPLES].float().contiguous()}, str(out / "samples" / f"{cell.name}.safetensors"), metadata=meta)


def run_bench(teacher, cells: list[Cell], cfg: BenchConfig, metric, out: str | Path, *, students: dict | None = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Run every cell not yet in ``out/fid_vs_nfe.csv`` (then the data floor), rewriting the CSV after each.

    ``metric(x) -> {column: value}`` with ``reference_id``, ``floor_size(n)`` and ``floor(n)`` (``FidMetric``,
    ``ExactMetric``); ``students`` maps a student cell's method name to an object with ``.sample(noise, steps=, cond=)``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, students = out / CSV, students or {}
    rows = read_bench_rows(csv_path)
    config = run_config(teacher, cfg, metric.reference_id)
    todo = [c for c in cells if not has_row(rows, config, c.kind, c.method, c.nfe)]
    if len(todo) < len(cells):
        log(f"{len(cells) - len(todo)} of {len(cells)} cells already in {csv_path}; skipped")
    for cell in tqdm(todo, desc="FID vs NFE", disable=not todo):
        x, seconds = generate(teacher, cell, cfg, students.get(cell.method))
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        if bad:
            log(f"note: {cell.method} at {cell.nfe} NFE gave {bad} non-finite samples")
        if is_image(teacher):
            save_cell_samples(x, cell, out)
        if cfg.save_images:
            save_png_folder(x, out / "images" / cell.name)
        rows.append({"method": cell.method, "kind": cell.kind, "nfe": str(cell.nfe), "steps": str(cell.steps), **metric(x),
                     "seconds_per_sample": seconds / len(x), "teacher": teacher.name, **config,
                     "student_teacher_hash": student_teacher_hash(students.get(cell.method))})
        write_rows(csv_path, rows, FIELDS)
    n_floor = metric.floor_size(cfg.num_samples)
    floor_config = {**config, "num_samples": str(n_floor)}
    if n_floor and not has_row(rows, floor_config, "floor"):
        rows.append({**metric.floor(n_floor), "kind": "floor", "teacher": teacher.name, **floor_config})
        write_rows(csv_path, rows, FIELDS)
    return rows


# -- pictures ----------------------------------------------------------------------------------------
def current_rows(rows: list[dict]) -> tuple[list[dict], dict | None, int]:
    """The cell rows with the settings of the last cell row written, the matching floor row, and how many rows
    of other settings there are."""
    cells = [r for r in rows if r["kind"] != "floor"]
    if not cells:
        return [], None, len(rows)
    config = {k: cells[-1][k] for k in CONFIG_FIELDS}
    mine = [r for r in cells if all(r[k] == v for k, v in config.items())]
    floors = [r for r in rows if r["kind"] == "floor" and all(r[k] == v for k, v in config.items() if k != "num_samples")]
    return mine, (floors[-1] if floors else None), len(cells) - len(mine)


def _value(row: dict, key: str) -> float:
    return float(row[key]) if row.get(key, "") != "" else math.nan


def markdown_table(rows: list[dict], key: str | None = None) -> str:
    """A markdown table of ``key`` (default: fid, or swd for analytic teachers): a row per solver, then per
    student, a column per NFE, '-' where a method has no cell; the data floor, if any, as a last line."""
    cells, floor, _ = current_rows(rows)
    if not cells:
        raise ValueError("no benchmark cells to tabulate")
    key = key or ("fid" if cells[0].get("fid", "") != "" else "swd")
    nfes = sorted({int(r["nfe"]) for r in cells})
    value = {(r["kind"], r["method"], int(r["nfe"])): _value(r, key) for r in cells}
    lines = [f"| {key} | " + " | ".join(f"{n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for kind in ("solver", "student"):
        for method in dict.fromkeys(r["method"] for r in cells if r["kind"] == kind):
            label = f"`{method}`" + (" (student)" if kind == "student" else "")
            vals = [value.get((kind, method, n)) for n in nfes]
            lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
    if floor is not None and floor.get(key, "") != "":
        lines.append(f"\n{floor['method']} ({floor['num_samples']} samples): {_value(floor, key):.2f}")
    return "\n".join(lines) + "\n"


def plot_bench(rows: list[dict], path: str | Path) -> None:
    """FID (or the exact metrics) vs NFE, log x: a line per solver, distinct markers per student, the teacher's
    converged value (best solver at the largest NFE) and the data floor as horizontal lines."""
    from distill.eval.plots import plt

    cells, floor, others = current_rows(rows)
    if not cells:
        raise ValueError("no benchmark cells to plot")
    exact = any(r.get("ode_rmse", "") != "" for r in cells)
    panels = EXACT_METRICS if exact else {"fid": "FID"}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    solvers = [r for r in cells if r["kind"] == "solver"]
    markers = iter("*DPXs^vph" * 4)
    students = {m: next(markers) for m in dict.fromkeys(r["method"] for r in cells if r["kind"] == "student")}
    for ax, (key, title) in zip(axes[0], panels.items()):
        for i, method in enumerate(dict.fromkeys(r["method"] for r in solvers)):
            pts = sorted((int(r["nfe"]), _value(r, key)) for r in solvers if r["method"] == method)
            # ten colours, then the same ones dashed, then dotted: no two solvers share a line
            ax.plot(*zip(*pts), marker="o", ls=("-", "--", ":")[i // 10 % 3], color=f"C{i % 10}", ms=3, label=method)
        for method, marker in students.items():
            pts = sorted((int(r["nfe"]), _value(r, key)) for r in cells if r["kind"] == "student" and r["method"] == method)
            ax.plot(*zip(*pts), marker=marker, ls=":", ms=11, mec="k", label=f"{method} (student)")
        if solvers:
            top = max(int(r["nfe"]) for r in solvers)
            best = min((r for r in solvers if int(r["nfe"]) == top), key=lambda r: _value(r, key))
            ax.axhline(_value(best, key), color="0.4", ls="-.", lw=1, label=f"teacher converged ({best['method']}, {top} NFE)")
        if floor is not None and floor.get(key, "") != "":
            ax.axhline(_value(floor, key), color="k", ls="--", lw=1, label=f"{floor['method']}, {floor['num_samples']} samples")
        values = [_value(r, key) for r in cells] + ([_value(floor, key)] if floor and floor.get(key, "") != "" else [])
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
        ax.legend(fontsize=7)
    r0 = cells[-1]
    guidance = f", guidance {r0['guidance_scale']}" if r0["guidance_scale"] else ""
    hidden = f"; {others} rows of other settings not shown" if others else ""
    fig.suptitle(f"{r0['teacher']}: {r0['num_samples']} samples, seed {r0['seed']}, labels {r0['labels']}{guidance}, "
                 f"grid {r0['grid']} (final {r0.get('final', 'clean')}),\nreference {r0['reference_id']}{hidden}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


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
