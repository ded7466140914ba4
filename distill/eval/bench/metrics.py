"""What a cell is measured with: ``FidMetric`` (FID with its bootstrap spread, KID, precision, recall and the
memorization statistics against real image sets) and ``ExactMetric`` (an analytic teacher's exact metrics), and
``make_metric``, which picks one for a teacher and loads its reference sets."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.core.atomic import write_with
from distill.core.safe_files import load_weights_only
from distill.data import MNIST16_SPLITS, load_dataset
from distill.eval.bench.config import BenchConfig, is_analytic, is_image, labels_for
from distill.eval.fid import EXTRACTOR, INCEPTION, bootstrap_fid_std, compute_features, feature_metrics, reference_cache_name
from distill.eval.memorization import Memorization
from distill.eval.solver_error import exact_metrics, make_problem


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
            return load_weights_only(path, "FID feature cache")  # tensors only: a crafted pickle runs no code
        features = self.features(reference)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_with(path, lambda tmp: torch.save(features, tmp))  # atomic (distill.core.atomic)
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


def reference_set(name: str, split: str, image_column: str, data_shape) -> torch.Tensor:
    """All images of a dataset split as one tensor in [-1, 1] at the teacher's resolution."""
    if name == "mnist16":
        return load_dataset("mnist16", split).x
    channels, resolution = data_shape[0], data_shape[-1]
    ds = load_dataset(name, split, image_column=image_column, resolution=resolution, channels=channels)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def data_splits(reference_dataset: str, reference: str | None = None, floor_split: str | None = None,
                train_split: str | None = None, heldout_split: str | None = None) -> dict[str, str | None]:
    """The splits of the reference, the floor, the training data and the held-out data (mnist16 defaults: the
    benchmark's own three-way split of distill.data)."""
    mnist = reference_dataset == "mnist16"
    return {"reference": reference or ("reference" if mnist else "train"),
            "floor": floor_split or ("floor" if mnist else None),
            "train": train_split or ("train" if mnist else None),
            "heldout": heldout_split or ("heldout" if mnist else None)}


def make_metric(teacher, cfg: BenchConfig, *, reference_dataset: str = "mnist16", reference: str | None = None,
                floor_split: str | None = None, train_split: str | None = None, heldout_split: str | None = None,
                image_column: str = "image", inception_weights: str | None = None, fid_cache: str | None = "runs/fid_cache",
                kid_subset_size: int = 1000, bootstrap: int = 100, reference_steps: int = 500):
    """ExactMetric for analytic teachers; FidMetric (mnist16 classifier, or Inception for other datasets) for images.
    The keywords are ``scripts/bench.py``'s options of the same names (``data_splits`` for the splits)."""
    if is_analytic(teacher):
        return ExactMetric(teacher, cfg, reference_steps)
    if not is_image(teacher):
        raise ValueError(f"the bench measures image teachers (FID) and analytic gmm:* teachers (exact metrics); "
                         f"{teacher.name!r} makes data of shape {teacher.data_shape}")
    extractor, weights = EXTRACTOR, None
    splits = data_splits(reference_dataset, reference, floor_split, train_split, heldout_split)
    shape = getattr(teacher, "image_shape", teacher.data_shape)  # a latent teacher is measured on decoded images
    if reference_dataset == "mnist16":
        if shape[0] != 1:
            raise ValueError(f"teacher {teacher.name!r} makes {shape[0]}-channel images: measure it with "
                             "torch-fidelity's Inception, giving --reference-dataset hf:<name or folder> and --inception-weights PATH")
        for split in splits.values():
            if split is not None and split not in MNIST16_SPLITS:
                raise ValueError(f"unknown mnist16 split {split!r}; allowed: {', '.join(MNIST16_SPLITS)}")
    elif reference_dataset.startswith("hf:"):
        extractor = INCEPTION
        if inception_weights is None:
            raise ValueError("FID with torch-fidelity's Inception needs --inception-weights PATH (a local .pth of its "
                             "weights, as nothing is downloaded by default) or --inception-weights download")
        if inception_weights != "download":
            if not Path(inception_weights).is_file():
                raise FileNotFoundError(f"no Inception weights file at {inception_weights!r} (--inception-weights)")
            weights = inception_weights
    else:
        raise ValueError(f"unknown --reference-dataset {reference_dataset!r}; allowed: mnist16, hf:<name or folder>")
    sets = {k: None if v is None else reference_set(reference_dataset, v, image_column, shape) for k, v in splits.items()}
    return FidMetric(sets["reference"], extractor=extractor, weights_path=weights, cache_root=fid_cache,
                     kid_subset_size=kid_subset_size, bootstrap=bootstrap, floor_set=sets["floor"],
                     floor_name=f"{splits['floor']} vs {splits['reference']}", train_set=sets["train"], heldout_set=sets["heldout"])
