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
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from distill.conditioning import takes_prompts
from distill.eval.fid import EXTRACTOR, bootstrap_fid_std, compute_features, feature_metrics, reference_cache_name, uint8_images
from distill.eval.memorization import Memorization
from distill.eval.solver_error import exact_metrics, make_problem, read_rows, write_rows
from distill.grids import FINALS, GRIDS
from distill.solvers import get_solver, per_sample_noises, sample

DEFAULT_NFE = "1,2,3,4,5,6,8,10,15,20,50"
CSV = "fid_vs_nfe.csv"
PNG = "fid_vs_nfe.png"
COST_PNG = "fid_vs_cost.png"
TEACHER_COST = "teacher_cost.json"  # the teacher's own training cost (keys of COST_KEYS), read by the cost plot
TABLE = "fid_vs_nfe.md"
PROTOCOL = "2"  # issue #13: floor and training rows at the cells' N, bootstrap spread, precision/recall, memorization, cost
COST_KEYS = ("steps", "batch_size", "wall_seconds", "hardware", "teacher_nfe", "trained_params")  # of a student's training_cost
FIELDS = ["method", "kind", "nfe", "steps", "fid", "fid_std", "kid", "precision", "recall", "copy_rate", "closer_to_train",
          "ode_rmse", "swd", "nll", "num_samples", "seed", "seconds_per_sample", "guidance_scale", "grid", "final", "labels",
          "teacher", "teacher_hash", "reference_id", "protocol", "student_path", "student_teacher_hash",
          *(f"cost_{k}" for k in COST_KEYS)]
# settings shared by every row of one benchmark; a cell is done when a row has its kind, method, NFE and these
CONFIG_FIELDS = ("num_samples", "seed", "guidance_scale", "grid", "final", "labels", "teacher_hash", "reference_id", "protocol")
DATA_KINDS = ("floor", "training")  # rows of real data, measured like a cell at the cells' sample count
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


def parse_variant(text: str) -> tuple[str, str, dict]:
    """'LABEL=SOLVER:key=value,key=value' -> (label, solver, options): a solver with named options (a prepared file,
    a searched grid, a hand-off level) benchmarked under its own label. Values: int, float, true/false or text."""
    label, eq, rest = text.partition("=")
    solver, _, opts = rest.partition(":")
    if not eq or not re.fullmatch(r"[A-Za-z0-9._+-]+", label) or not solver:
        raise ValueError(f"cannot parse --variant {text!r}: expected LABEL=SOLVER[:key=value,...] with a label of "
                         "letters, digits and ._+-")
    get_solver(solver)
    options = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"cannot parse option {item!r} of --variant {label}: expected key=value")
        options[key] = _option_value(value)
    return label, solver, options


def _option_value(value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_solvers(text: str) -> list[str]:
    """'euler,heun' -> the names, checked against the registry; 'all': every solver (the stochastic ones draw
    their noise per sample, as the initial noise); 'deterministic': every deterministic solver. Both leave out the
    solvers that need a prepared file (AMED: run them with --variant)."""
    from distill.solvers import SOLVERS

    if text in ("all", "deterministic"):
        return sorted(s for s in SOLVERS if (text == "all" or not SOLVERS[s].stochastic) and not SOLVERS[s].needs)
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
    variants: dict = field(default_factory=dict)  # label -> (solver, options): solvers with named options (--variant)
    prompts: str | None = None  # text-to-image teachers: a prompt dataset (prompts:<file>), sample i's prompt in a seeded order
    _prompt_order: list | None = field(default=None, repr=False)  # the prompts of samples 0..num_samples-1 (filled on use)

    def validate(self, teacher) -> None:
        if self.num_samples < 2 or self.batch_size < 1:
            raise ValueError(f"need num_samples >= 2 and batch_size >= 1, got {self.num_samples} and {self.batch_size}")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; allowed: {', '.join(GRIDS)}")
        if self.final not in FINALS or self.final == "t_min":
            raise ValueError(f"unknown final {self.final!r}; allowed: clean, direct (the bench scores denoised samples)")
        if self.unconditional and teacher.num_classes and not teacher.has_uncond:
            raise ValueError(f"teacher {teacher.name!r} is class-conditional without an unconditional mode; drop --unconditional")
        prompted = takes_prompts(teacher)
        if prompted != (self.prompts is not None):
            raise ValueError(f"teacher {teacher.name!r} is text-conditioned: give a prompt file (--prompts prompts:<file>)"
                             if prompted else f"--prompts is for text-to-image teachers; {teacher.name!r} takes class labels")
        if prompted and self.unconditional:
            raise ValueError("--unconditional is for class-conditional teachers; a text-to-image teacher's prompts set its condition")
        if self.guidance_scale is not None and not prompted and (not teacher.num_classes or self.unconditional or not teacher.has_uncond):
            raise ValueError("classifier-free guidance needs a class-conditional teacher with an unconditional mode, "
                             "sampled with class labels (no --unconditional)")
        if self.save_images and not is_image(teacher):
            raise ValueError(f"--save-images needs an image teacher; {teacher.name!r} makes data of shape {teacher.data_shape}")


def is_image(teacher) -> bool:
    return len(teacher.data_shape) == 3


def is_analytic(teacher) -> bool:
    return hasattr(teacher, "sample_data") and hasattr(teacher, "log_prob")


def label_mode(teacher, cfg: BenchConfig) -> str:
    """'none' (unconditional teacher), 'cycle' (sample i has label i mod K), 'uncond' (label -1), or for a text-to-image
    teacher 'prompts:<sha256 of the ordered prompts, 12 hex>'."""
    if cfg.prompts is not None:
        import hashlib

        return "prompts:" + hashlib.sha256("\n".join(prompt_order(cfg)).encode()).hexdigest()[:12]
    return "none" if not teacher.num_classes else ("uncond" if cfg.unconditional else "cycle")


def prompt_order(cfg: BenchConfig) -> list[str]:
    """The prompts of samples 0..num_samples-1: the prompt dataset in the seeded order of ``PromptDataset.ordered``."""
    if cfg._prompt_order is None:
        from distill.data import load_dataset

        data = load_dataset(cfg.prompts)
        if not hasattr(data, "ordered"):
            raise ValueError(f"--prompts {cfg.prompts!r} is not a prompt dataset; allowed: prompts:<file>, prompts:hf:<name>")
        cfg._prompt_order = data.ordered(cfg.seed, cfg.num_samples)
    return cfg._prompt_order


def cond_for(teacher, cfg: BenchConfig, start: int, stop: int):
    """The condition of samples start..stop-1: class labels (``labels_for``) or the prompts' embeddings."""
    if cfg.prompts is not None:
        return teacher.encode_prompts(prompt_order(cfg)[start:stop])
    return labels_for(teacher, cfg, start, stop)


def labels_for(teacher, cfg: BenchConfig, start: int, stop: int) -> torch.Tensor | None:
    """Class labels of samples start..stop-1 (None for an unconditional or text-to-image teacher)."""
    mode = label_mode(teacher, cfg)
    if mode == "none" or mode.startswith("prompts:"):
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
               log: Callable[[str], None] = print, variants: dict | None = None) -> list[Cell]:
    """Every (solver, NFE) the solver can spend exactly (others skipped with a note), then every (student, steps).
    A k-step student spends k NFE. ``variants`` (label -> (solver, options)) are cells under their label."""
    cells, variants = [], variants or {}
    for s in solvers:
        for n in nfes:
            try:
                cells.append(Cell(s, "solver", n, get_solver(variants.get(s, (s,))[0]).steps_for_nfe(n, True)))
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


def check_student(teacher, name: str, student, allow_other_teacher: bool = False, near: str | Path | None = None) -> None:
    """A student that records the hash of the teacher it was distilled from, or of its chain's first teacher, must
    match the bench's teacher (unless ``allow_other_teacher``; its rows then carry both hashes). ``near``: the folder
    of the student's file, searched by hash for the parents of a chain recorded before ``root_teacher_hash``."""
    want = student_teacher_hash(student)
    if want and want != teacher.hash and not allow_other_teacher and student_root_hash(student, near) != teacher.hash:
        made_from = student.info.get("teacher") or "another teacher"
        raise ValueError(f"student {name!r} was distilled from {made_from!r} (teacher hash {want[:12]}), not from the bench "
                         f"teacher {teacher.name!r} ({teacher.hash[:12]}); pass --allow-other-teacher to bench it anyway")


def student_root_hash(student, near: str | Path | None = None) -> str:
    """The hash of the first teacher of a student's chain (a progressive round's student: the network teacher of
    round 1), ``teachers.student_teacher.root_teacher`` (parents also looked up by hash in ``near``); '' when its file
    records no teacher."""
    from teachers.student_teacher import root_teacher

    return root_teacher(getattr(student, "info", {}), near)[1] if student is not None else ""


def student_teacher_hash(student) -> str:
    """The hash of the teacher a student was distilled from ('' when its file does not record one)."""
    return str(getattr(student, "info", {}).get("teacher_hash", "")) if student is not None else ""


def generate(teacher, cell: Cell, cfg: BenchConfig, student=None) -> tuple[torch.Tensor, float]:
    """The ``cfg.num_samples`` samples of one cell (on the CPU) and the wall seconds spent sampling them."""
    dtype = torch.float64 if is_analytic(teacher) else torch.float32
    solver, variant_options = cfg.variants.get(cell.method, (cell.method, {}))
    stochastic = cell.kind == "solver" and get_solver(solver).stochastic
    out, seconds = [], 0.0
    starts = range(0, cfg.num_samples, cfg.batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc=f"{cell.method} NFE {cell.nfe}", unit="batch", leave=False, disable=len(starts) < 2):
            stop = min(start + cfg.batch_size, cfg.num_samples)
            seeds = range(cfg.seed + start, cfg.seed + stop)
            noise, step_noises = per_sample_noises(teacher.data_shape, seeds, cell.steps if stochastic else 0, dtype)
            noise = noise.to(cfg.device)
            cond = cond_for(teacher, cfg, start, stop)
            cond = None if cond is None else cond.to(cfg.device)
            options = {"noises": [z.to(cfg.device) for z in step_noises]} if stochastic else {}
            t0 = time.perf_counter()
            if cell.kind == "solver":
                kwargs = {"grid": cfg.grid, "final": cfg.final, "guidance_scale": cfg.guidance_scale, **variant_options}
                x = sample(teacher, noise, solver=solver, nfe=cell.nfe, cond=cond, **kwargs, **options)
            else:
                x = student_sample(student, noise, cell.steps, cond, seed=cfg.seed + start, guidance_scale=cfg.guidance_scale)
            if x.is_cuda:
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            if hasattr(teacher, "decode"):  # a latent teacher: measure images, not latents (decoding is not timed)
                x = teacher.decode(x)
            out.append(x.cpu())
    return torch.cat(out), seconds


# -- metrics -----------------------------------------------------------------------------------------
class FidMetric:
    """FID (with its bootstrap spread), KID, precision and recall against a reference set, and the memorization
    statistics against a training and a held-out set; the data rows (``DATA_KINDS``) are real sets measured the
    same way at the cells' sample count: the floor (real images in no other role) and the training data."""

    def __init__(self, reference: torch.Tensor, *, extractor: str = EXTRACTOR, weights_path: str | None = None,
                 cache_root: str | None = None, kid_subset_size: int = 1000, bootstrap: int = 100,
                 floor_set: torch.Tensor | None = None, floor_name: str = "held-out data",
                 train_set: torch.Tensor | None = None, heldout_set: torch.Tensor | None = None):
        self.extractor, self.weights_path, self.kid_subset_size, self.bootstrap = extractor, weights_path, kid_subset_size, bootstrap
        self.reference_id = reference_cache_name(reference, extractor)
        self.reference = reference  # written as PNGs by --save-images, for torch-fidelity's own CLI
        self.ref_features = self.cached_features(reference, cache_root)
        self.sets = {"floor": floor_set, "training": train_set}
        self.names = {"floor": f"data floor ({floor_name})", "training": "training data"}
        self.memorization = None if train_set is None or heldout_set is None else Memorization(train_set, heldout_set)

    def cached_features(self, reference: torch.Tensor, cache_root: str | None) -> torch.Tensor:
        """The reference's features, kept in ``cache_root/<reference_id>.pt`` (named by content) when given."""
        path = Path(cache_root) / f"{self.reference_id}.pt" if cache_root else None
        if path is not None and path.is_file():
            return torch.load(path)
        features = self.features(reference)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(features, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
        return features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num(x.float(), nan=0.0, posinf=1.0, neginf=-1.0)  # a diverged sample is a bad image, not a crash
        return compute_features(x, extractor=self.extractor, weights_path=self.weights_path)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None, memorization: bool = True) -> dict:
        """The metrics of samples ``x``; ``labels``, the class each sample was asked for, keep the class counts fixed in
        the bootstrap (they are fixed on fresh noise seeds too: sample i always has label i mod K)."""
        gen = self.features(x)
        out = feature_metrics(gen, self.ref_features, kid_subset_size=self.kid_subset_size)
        out["fid_std"] = bootstrap_fid_std(gen, self.ref_features, resamples=self.bootstrap, strata=labels) if self.bootstrap else ""
        if memorization and self.memorization is not None:
            out.update(self.memorization(x))
        return out

    def check(self, num_samples: int) -> None:
        """Every data row has exactly the cells' sample count, or the run stops before any work."""
        for kind, pool in self.sets.items():
            if pool is not None and len(pool) < num_samples:
                raise ValueError(f"the {self.names[kind]} set has {len(pool)} images, fewer than the {num_samples} samples per "
                                 f"cell; allowed: --num-samples up to {len(pool)}, so that every row shares the sample count")

    def data_kinds(self) -> list[str]:
        return [k for k, pool in self.sets.items() if pool is not None]

    def data_row(self, kind: str, n: int) -> dict:
        """A real set of ``n`` images measured like a cell. The floor's memorization columns stay blank: half of its
        images are training images (mnist16 has 1,000 unseen digits), which the statistics would flag by design."""
        pool = self.sets[kind]
        x = pool[:n] if kind == "floor" else pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:n]]
        return {"method": self.names[kind], **self(x, memorization=kind == "training")}


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

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        return exact_metrics(self.problem, x)

    def check(self, num_samples: int) -> None:
        pass

    def data_kinds(self) -> list[str]:
        return ["floor"]

    def data_row(self, kind: str, n: int) -> dict:
        return {"method": "data floor (exact samples)", "swd": self.problem.swd_floor, "nll": self.problem.nll_floor}


# -- the run -----------------------------------------------------------------------------------------
def run_config(teacher, cfg: BenchConfig, reference_id: str) -> dict[str, str]:
    """The CONFIG_FIELDS of this run's rows, as the CSV stores them."""
    scale = "" if cfg.guidance_scale is None else f"{cfg.guidance_scale:g}"
    return {"num_samples": str(cfg.num_samples), "seed": str(cfg.seed), "guidance_scale": scale, "grid": cfg.grid,
            "final": cfg.final, "labels": label_mode(teacher, cfg), "teacher_hash": teacher.hash, "reference_id": reference_id,
            "protocol": PROTOCOL}


def read_bench_rows(path: str | Path) -> list[dict]:
    """The rows of a bench CSV; files written before the ``final`` column existed used ``final="clean"``, before
    the ``protocol`` column protocol 1 (the floor at its own size, no spread); other missing columns are blank."""
    rows = read_rows(path)
    for r in rows:
        r.setdefault("final", "clean")
        r.setdefault("protocol", "1")
        for k in FIELDS:
            r.setdefault(k, "")
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
              student_columns: dict | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run every cell not yet in ``out/fid_vs_nfe.csv`` (then the data rows), rewriting the CSV after each.

    ``metric(x, labels=) -> {column: value}`` with ``reference_id``, ``check(n)``, ``data_kinds()`` and ``data_row(kind, n)``
    (``FidMetric``, ``ExactMetric``); ``students`` maps a student cell's method name to an object with
    ``.sample(noise, steps=, cond=)``, ``student_columns`` to extra columns of its rows (path, training cost).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, students, student_columns = out / CSV, students or {}, student_columns or {}
    metric.check(cfg.num_samples)
    rows = read_bench_rows(csv_path)
    config = run_config(teacher, cfg, metric.reference_id)
    todo = [c for c in cells if not has_row(rows, config, c.kind, c.method, c.nfe)]
    if len(todo) < len(cells):
        log(f"{len(cells) - len(todo)} of {len(cells)} cells already in {csv_path}; skipped")
    reference = getattr(metric, "reference", None)
    if cfg.save_images and reference is not None and not (out / "images" / "reference").is_dir():
        save_png_folder(reference, out / "images" / "reference")  # what torch-fidelity's CLI compares a cell's folder with
    for cell in tqdm(todo, desc="FID vs NFE", disable=not todo):
        rows.append(run_cell(teacher, cell, cfg, metric, out, students.get(cell.method), log)
                    | student_columns.get(cell.method, {}) | config)
        write_rows(csv_path, rows, FIELDS)
    for kind in metric.data_kinds():  # real data at the cells' sample count, against the same reference
        if not has_row(rows, config, kind):
            rows.append({**metric.data_row(kind, cfg.num_samples), "kind": kind, "teacher": teacher.name, **config})
            write_rows(csv_path, rows, FIELDS)
    return rows


def run_cell(teacher, cell: Cell, cfg: BenchConfig, metric, out: Path, student, log: Callable[[str], None]) -> dict:
    """Sample one cell, keep its pictures, and return its row (without the run's settings)."""
    x, seconds = generate(teacher, cell, cfg, student)
    bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    if bad:
        log(f"note: {cell.method} at {cell.nfe} NFE gave {bad} non-finite samples")
    if is_image(teacher):
        save_cell_samples(x, cell, out)
    if cfg.save_images:
        save_png_folder(x, out / "images" / cell.name)
    labels = labels_for(teacher, cfg, 0, cfg.num_samples)
    return {"method": cell.method, "kind": cell.kind, "nfe": str(cell.nfe), "steps": str(cell.steps), **metric(x, labels=labels),
            "seconds_per_sample": seconds / len(x), "teacher": teacher.name, "student_teacher_hash": student_teacher_hash(student)}


# -- pictures ----------------------------------------------------------------------------------------
def current_rows(rows: list[dict]) -> tuple[list[dict], dict[str, dict], int]:
    """The cell rows with the settings of the last cell row written, the data rows (``DATA_KINDS``) of the same
    settings by kind, and how many cell rows of other settings there are. Protocol 1 files kept their floor at its
    own size; their floor is matched without the sample count."""
    cells = [r for r in rows if r["kind"] not in DATA_KINDS]
    if not cells:
        return [], {}, len(rows)
    config = {k: cells[-1][k] for k in CONFIG_FIELDS}
    mine = [r for r in cells if all(r[k] == v for k, v in config.items())]
    loose = config["protocol"] == "1"
    data = {r["kind"]: r for r in rows if r["kind"] in DATA_KINDS
            and all(r[k] == v for k, v in config.items() if not (loose and k == "num_samples"))}
    return mine, data, len(cells) - len(mine)


def _value(row: dict, key: str) -> float:
    return float(row[key]) if row.get(key, "") != "" else math.nan


def with_spread(row: dict, key: str, digits: int = 1) -> str:
    """'12.3' or, with a bootstrap spread, '12.3 +- 0.4'."""
    text = f"{_value(row, key):.{digits}f}"
    return text + (f" +- {_value(row, key + '_std'):.{digits}f}" if row.get(key + "_std", "") != "" else "")


def converged(cells: list[dict], key: str = "fid") -> dict | None:
    """The teacher's converged value: the best solver at the largest NFE run."""
    solvers = [r for r in cells if r["kind"] == "solver"]
    if not solvers:
        return None
    top = max(int(r["nfe"]) for r in solvers)
    return min((r for r in solvers if int(r["nfe"]) == top), key=lambda r: _value(r, key))


def markdown_table(rows: list[dict], key: str | None = None) -> str:
    """A markdown table of ``key`` (default: fid, or swd for analytic teachers; '+-' the bootstrap spread): a row
    per solver, then per student, a column per NFE, '-' where a method has no cell; then the data rows."""
    cells, data, _ = current_rows(rows)
    if not cells:
        raise ValueError("no benchmark cells to tabulate")
    key = key or ("fid" if cells[0].get("fid", "") != "" else "swd")
    nfes = sorted({int(r["nfe"]) for r in cells})
    value = {(r["kind"], r["method"], int(r["nfe"])): r for r in cells}
    lines = [f"| {key} | " + " | ".join(f"{n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for kind in ("solver", "student"):
        for method in dict.fromkeys(r["method"] for r in cells if r["kind"] == kind):
            label = f"`{method}`" + (" (student)" if kind == "student" else "")
            vals = [value.get((kind, method, n)) for n in nfes]
            lines.append(f"| {label} | " + " | ".join("-" if r is None else with_spread(r, key) for r in vals) + " |")
    lines.append("")
    for row in data.values():
        if row.get(key, "") != "":
            lines.append(f"{row['method']} ({row['num_samples']} samples): {with_spread(row, key, 2)}  ")
    return "\n".join(lines) + "\n"


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
