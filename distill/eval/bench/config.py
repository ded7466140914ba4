"""The bench's settings: the file names and CSV columns, the option parsers (``--nfe``, ``--solvers``, ``--variant``),
``BenchConfig`` with its checks, and the condition (class labels or prompts) of each sample."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from distill.core.conditioning import takes_prompts
from distill.core.grids import FINALS, GRIDS
from distill.solvers import get_solver
from distill.solvers.sampling import check_options, check_prepared_files

DEFAULT_NFE = "1,2,3,4,5,6,8,10,15,20,50"
CSV = "fid_vs_nfe.csv"
PNG = "fid_vs_nfe.png"
COST_PNG = "fid_vs_cost.png"
HEADLINE_PNG = "fid_headline.png"  # the results at a glance: best solver per NFE, best student per family, teacher and floor
TEACHER_COST = "teacher_cost.json"  # the teacher's own training cost (keys of COST_KEYS), read by the cost plot
TABLE = "fid_vs_nfe.md"
PROTOCOL = "2"  # issue #13: floor and training rows at the cells' N, bootstrap spread, precision/recall, memorization, cost
COST_KEYS = ("steps", "batch_size", "wall_seconds", "hardware", "teacher_nfe", "trained_params")  # of a student's training_cost
FIELDS = ["method", "kind", "nfe", "steps", "fid", "fid_std", "kid", "precision", "recall", "copy_rate", "closer_to_train",
          "ode_rmse", "swd", "nll", "num_samples", "seed", "seconds_per_sample", "guidance_scale", "grid", "final", "labels",
          "teacher", "teacher_hash", "reference_id", "protocol", "student_path", "student_teacher_hash",
          *(f"cost_{k}" for k in COST_KEYS), "student_sha256"]
# settings shared by every row of one benchmark; a cell is done when a row has its kind, method, NFE and these
CONFIG_FIELDS = ("num_samples", "seed", "guidance_scale", "grid", "final", "labels", "teacher_hash", "reference_id", "protocol")
DATA_KINDS = ("floor", "training")  # rows of real data, measured like a cell at the cells' sample count
EXACT_METRICS = {"ode_rmse": "RMSE vs exact ODE solution", "swd": "sliced W2 to data", "nll": "NLL under the true density"}
BENCH_TAKES = ("generator", "noises")  # solver options the bench sets itself (per-sample step noise), not a --variant
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
    check_options(solver, options, f" of --variant {label}", taken=BENCH_TAKES)
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


def parse_methods(solvers: str, variants: list[str] = ()) -> tuple[list[str], dict]:
    """``--solvers`` and the ``--variant`` texts: the solver names with the variants' labels after them (each once), and
    {label: (solver, options)} (``parse_solvers``, ``parse_variant``)."""
    names = parse_solvers(solvers)
    parsed = {label: (solver, opts) for label, solver, opts in map(parse_variant, variants)}
    return names + [v for v in parsed if v not in names], parsed


@dataclass
class BenchConfig:
    """Settings shared by every cell of one benchmark (validated by ``validate`` before any work)."""

    num_samples: int = 5000  # samples per cell; sample i uses noise seed (seed + i)
    seed: int = 0
    batch_size: int = 500  # samples per call; changes no sample
    grid: str = "uniform"  # time grid of the solvers (distill.core.grids)
    final: str = "direct"  # how the grid ends (distill.core.grids): "direct" spends no step between t_min and clean
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
        for label, (_, options) in self.variants.items():  # a variant's files (ems=, amed=, ...) read before any cell
            try:
                check_prepared_files(options, teacher)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"--variant {label}: {e}") from None


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
