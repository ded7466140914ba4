"""Trajectory caches: teacher probability-flow ODE trajectories stored as sharded safetensors + a manifest.

A cache folder holds ``manifest.json`` (format, teacher name and hash, solver, NFE, grid kind, final, the
grid times ``ts``, guidance scale, seed, sample and shard counts, data shape) and ``shard-00000.safetensors``,
... with, per sample: ``noise`` (the standard-normal initial noise), ``states`` [K + 1, ...] (the state at
every grid time, recorded by the solver callback; the last is the solver's output), ``sample`` (= the last
state) and ``label`` (-1: unconditional). Shard k draws its noise and labels from
``torch.Generator().manual_seed(seed * 1_000_003 + k)``, so any shard can be regenerated alone.

A text-to-image teacher's cache stores its prompts by reference, never as embeddings: the manifest names a prompt
dataset (``prompts``: ``prompts:<file>`` or ``prompts:hf:<...>``) and the sha256 of its prompt list
(``prompts_hash``), sample j is the j-th prompt of that dataset's seeded order (``PromptDataset.order(seed)``), and
its ``label`` is that prompt's index in the list; ``TrajectoryCache.prompt_texts(labels)`` reads them back, and the
trainer encodes them with the teacher's (cached) text encoder per batch.

The manifest also records each shard's sha256 (``shard_sha256``, written as each shard is written). ``generate``
resumes: a shard that opens with the expected count, number and sha256 is kept, anything else is redone; a folder
whose manifest disagrees with the settings asked for is refused. Opening a cache refuses a manifest that does not
describe its shards (counts that do not add up, extra shard files, a shard copied over another); a manifest written
before hashes were kept is read without the hash check. ``open_cache`` refuses a cache made by
another teacher or with other settings. Objectives read rows with ``TrajectoryCache.rows(indices)``: one ``pread``
per row and key, nothing memory-mapped, so that a run's memory does not grow with the cache.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from distill.core.atomic import write_text, write_with
from distill.core.conditioning import takes_prompts
from distill.core.file_cache import cached_text
from distill.core.grids import CLEAN_FINALS, make_grid
from distill.core.safe_files import read_json
from distill.engine.paths import file_sha256
from distill.solvers import get_solver, sample

FORMAT = "fewstep-distill/trajectories"
MANIFEST = "manifest.json"
MATCH_KEYS = ("format", "teacher_hash", "solver", "nfe", "grid", "final", "guidance_scale", "seed", "num_samples",
              "shard_size", "data_shape", "class_labels", "prompts", "prompts_hash")


def cache_settings(teacher, *, solver: str, nfe: int, num_samples: int, shard_size: int = 1024, grid: str = "logsnr",
                   final: str = "t_min", guidance_scale: float | None = None, seed: int = 0,
                   class_labels: bool = False, prompts: str | None = None) -> dict:
    """The manifest of a cache for these settings (validated: solver, NFE, grid; ``prompts``: a prompt dataset
    for a text-to-image teacher, module doc)."""
    if num_samples < 1 or shard_size < 1:
        raise ValueError(f"num_samples and shard_size must be at least 1, got {num_samples} and {shard_size}")
    if class_labels and not teacher.num_classes:
        raise ValueError(f"class_labels needs a class-conditional teacher; {teacher.name!r} has no classes")
    text_to_image = takes_prompts(teacher)
    if (prompts is not None) != text_to_image:
        raise ValueError(f"prompts (a prompt file) go with a text-to-image teacher, and a text-to-image teacher needs "
                         f"them; teacher {teacher.name!r} is {'text-to-image' if text_to_image else 'not text-to-image'}")
    steps = get_solver(solver).steps_for_nfe(nfe, final in CLEAN_FINALS)
    ts = make_grid(teacher.schedule, steps, grid, final=final)
    return {"format": FORMAT, "teacher": str(teacher.name), "teacher_hash": teacher.hash, "solver": solver, "nfe": nfe,
            "grid": grid, "final": final, "ts": ts.tolist(), "guidance_scale": guidance_scale, "seed": seed,
            "num_samples": num_samples, "shard_size": shard_size, "num_shards": math.ceil(num_samples / shard_size),
            "data_shape": list(teacher.data_shape), "class_labels": class_labels,
            **({"prompts": prompts, "prompts_hash": _prompt_dataset(prompts).content_hash()} if prompts else {})}


def _prompt_dataset(spec: str):
    from distill.data import load_dataset

    return load_dataset(spec)


def check_match(folder: Path, have: dict, want: dict) -> None:
    for key in MATCH_KEYS:
        if key in want and have.get(key) != want[key]:
            raise ValueError(f"trajectory cache {str(folder)!r} was made with {key}={have.get(key)!r}, not the "
                             f"{want[key]!r} asked for; use another folder or delete this cache")


def read_manifest(folder: Path) -> dict:
    """A cache's manifest.json; garbage or a value other than a JSON object is refused, naming the file."""
    m = read_json(folder / MANIFEST, "trajectory cache manifest")
    if not isinstance(m, dict):
        raise ValueError(f"trajectory cache manifest {str(folder / MANIFEST)!r} holds a JSON {type(m).__name__}, not an object; "
                         "delete the cache and make it again")
    return m


def _shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def _shard_count(m: dict, k: int) -> int:
    return min(m["shard_size"], m["num_samples"] - k * m["shard_size"])


def shard_metadata(path: Path) -> dict | None:
    """A shard's metadata (``shard``: its number, ``count``: its rows), or None when it is missing, truncated or foreign."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() if set(f.keys()) == set(KEYS) else None
    except Exception:  # missing, truncated or foreign: redo it
        return None


def shard_complete(path: Path, count: int) -> bool:
    meta = shard_metadata(path)
    return meta is not None and meta.get("count") == str(count)


def _shard_kept(folder: Path, m: dict, k: int) -> bool:
    """Whether ``generate`` keeps shard ``k``: complete, with its own number, and the sha256 recorded for it (if any)."""
    path, meta = _shard_path(folder, k), shard_metadata(_shard_path(folder, k))
    if meta is None or meta.get("count") != str(_shard_count(m, k)) or meta.get("shard", str(k)) != str(k):
        return False
    recorded = m.get("shard_sha256", {}).get(str(k))
    return recorded is None or recorded == shard_sha256(path)


def shard_sha256(path: Path) -> str:
    """The sha256 of a shard's bytes, kept in the file cache by path, size and mtime (``distill.core.file_cache``): a
    cache is hashed once, not at every start. It catches a shard copied over another or changed in place; an edit that
    keeps a shard's size and mtime goes unseen."""
    return cached_text([path], "trajectory-shard-sha256", lambda: file_sha256(path))


def make_shard(teacher, m: dict, k: int) -> dict[str, torch.Tensor]:
    """Trajectories of shard ``k``: the solver run on the manifest's grid, every state recorded."""
    n, g = _shard_count(m, k), torch.Generator().manual_seed(m["seed"] * 1_000_003 + k)
    noise = torch.randn((n, *m["data_shape"]), generator=g)
    label = torch.randint(0, teacher.num_classes, (n,), generator=g) if m["class_labels"] else torch.full((n,), -1)
    cond = label if m["class_labels"] else None
    if m.get("prompts"):  # sample j: the j-th prompt of the seeded order; label = its index in the prompt list
        prompts = _prompt_dataset(m["prompts"])
        label = torch.tensor(prompts.order(m["seed"], k * m["shard_size"] + n)[k * m["shard_size"]:])
        cond = teacher.encode_prompts([prompts.prompts[j] for j in label.tolist()])
    states: dict[int, torch.Tensor] = {}
    ts = m["ts"] if m["final"] == "t_min" else m["ts"][:-1]  # explicit_grid appends the clean point again
    x = sample(teacher, noise, solver=m["solver"], timesteps=ts, final=m["final"], guidance_scale=m["guidance_scale"],
               cond=cond, callback=lambda info: states.__setitem__(info["i"], info["x"].clone()))
    stacked = torch.stack([states[i] for i in range(len(m["ts"]) - 1)] + [x], dim=1)
    return {"noise": noise, "states": stacked.float().contiguous(), "sample": x.float().contiguous(), "label": label}


def generate(teacher, out: str | Path, *, log=print, progress: bool = True, **settings) -> Path:
    """Make (or finish) the cache in ``out``; ``settings`` are those of ``cache_settings``."""
    from safetensors.torch import save_file

    out, m = Path(out), cache_settings(teacher, **settings)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        have = read_manifest(out)
        check_match(out, have, m)
        m["shard_sha256"] = dict(have.get("shard_sha256") or {})
    else:
        m["shard_sha256"] = {}
        write_text(out / MANIFEST, json.dumps(m, indent=1))
    hashes = m["shard_sha256"]  # shard -> sha256 of its file, recorded as each is written; a shard that differs is redone
    todo = [k for k in range(m["num_shards"]) if not _shard_kept(out, m, k)]
    done = m["num_samples"] - sum(_shard_count(m, k) for k in todo)
    bar = tqdm(total=m["num_samples"], initial=done, desc="trajectories", unit="traj", mininterval=5, disable=not progress)
    with bar:  # closed however the loop ends, so that an error message starts on a line of its own
        for k in todo:
            path, count = _shard_path(out, k), _shard_count(m, k)
            with torch.no_grad():
                tensors = make_shard(teacher, m, k)
            meta = {"format": FORMAT, "shard": str(k), "count": str(count)}
            write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # atomic: a full disk keeps the shards before
            hashes[str(k)] = shard_sha256(path)
            write_text(out / MANIFEST, json.dumps(m, indent=1))
            bar.update(count)
            log(f"shard {k + 1}/{m['num_shards']}: {count} trajectories")
    missing = [k for k in range(m["num_shards"]) if str(k) not in hashes]  # shards of a cache made before hashes were kept
    if missing:
        hashes.update({str(k): shard_sha256(_shard_path(out, k)) for k in missing})
        write_text(out / MANIFEST, json.dumps(m, indent=1))
    return out


def manifest_problem(folder: Path, m: dict) -> str | None:
    """Why a cache's manifest does not describe the shard files beside it (None if it does): sample and shard counts
    that do not add up, shard files it does not count, a shard with another row count, number or sha256 than it says.
    A manifest without ``shard_sha256`` (a cache made before hashes were kept) is not hash-checked."""
    n, size, shards = m.get("num_samples"), m.get("shard_size"), m.get("num_shards")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (n, size, shards)) or shards != math.ceil(n / size):
        return (f"says num_samples={n!r}, shard_size={size!r} and num_shards={shards!r}, which do not add up (num_shards "
                f"must be num_samples / shard_size rounded up)")
    extra = sorted(p.name for p in folder.glob("shard-*.safetensors") if p.name not in {_shard_path(folder, k).name for k in range(shards)})
    if extra:
        return f"counts {shards} shards, but the folder also holds {', '.join(extra)}"
    hashes = m.get("shard_sha256") or {}
    for k in range(shards):
        path, count = _shard_path(folder, k), _shard_count(m, k)
        meta = shard_metadata(path)
        if meta is None:
            continue  # missing or truncated: TrajectoryCache says so
        if meta.get("count") != str(count):
            return (f"says shard {k} holds {count} trajectories (num_samples={n}, shard_size={size}), but {path.name} "
                    f"holds {meta.get('count')}")
        if meta.get("shard", str(k)) != str(k):
            return f"lists {path.name} as shard {k}, but that file is shard {meta['shard']} (a copy of another shard)"
        if str(k) in hashes and hashes[str(k)] != shard_sha256(path):
            return (f"records another sha256 for {path.name} than the file has (a copy of another shard, or changed "
                    f"since it was made)")
    return None


KEYS = ("noise", "states", "sample", "label")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def shard_layout(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """Each tensor of a safetensors file as (dtype, shape, byte offset of its data in the file), from its header: 8
    bytes (little-endian header size), the JSON header, then the data (``data_offsets`` count from the header's end)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: (_DTYPES[v["dtype"]], tuple(v["shape"]), 8 + size + v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


class TrajectoryCache:
    """A complete cache, read lazily: ``rows`` reads only the rows and keys asked for, each row with one ``pread``
    into the tensor returned. Nothing of a shard is memory-mapped or kept, so a run's memory does not grow with the cache:
    a mapping keeps resident every page it touched and the kernel maps the cached pages around each one too (64 rows of
    an 80 MB cache left 61 MB resident: scripts/engine_memory.py, results/engine/memory.md). The shards' pages stay in
    the kernel's page cache, shared by the ranks and reclaimable."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / MANIFEST).is_file():
            raise FileNotFoundError(f"{str(self.folder)!r} is not a trajectory cache (no {MANIFEST})")
        self.manifest = m = read_manifest(self.folder)
        problem = manifest_problem(self.folder, m)
        if problem:
            raise ValueError(f"trajectory cache manifest {str(self.folder / MANIFEST)!r} {problem}; the cache cannot be "
                             f"trusted: make it again with scripts/make_trajectories.py into a new folder")
        for k in range(m["num_shards"]):
            if not shard_complete(_shard_path(self.folder, k), _shard_count(m, k)):
                raise ValueError(f"trajectory cache {str(self.folder)!r} is incomplete (shard {k} missing or truncated); "
                                 f"rerun scripts/make_trajectories.py with the same arguments to finish it")
        self.ts = torch.tensor(m["ts"], dtype=torch.float64)
        self.num_samples, self.shard_size = m["num_samples"], m["shard_size"]
        self._layouts: dict[int, dict] = {}  # shard -> shard_layout, read on first use
        self._prompts: list[str] | None = None

    def prompt_texts(self, labels: torch.Tensor) -> list[str]:
        """The prompts of a text-to-image cache's rows (their ``label``s index the manifest's prompt dataset, whose
        prompt list must still hash as recorded)."""
        if self._prompts is None:
            spec = self.manifest.get("prompts")
            if not spec:
                raise ValueError(f"trajectory cache {str(self.folder)!r} holds no prompts (not a text-to-image teacher's)")
            ds = _prompt_dataset(spec)
            if ds.content_hash() != self.manifest["prompts_hash"]:
                raise ValueError(f"the prompts {spec!r} of trajectory cache {str(self.folder)!r} changed since it was made "
                                 f"(sha256 differs); restore them or make the cache again")
            self._prompts = ds.prompts
        return [self._prompts[int(j)] for j in labels.tolist()]

    def _layout(self, k: int) -> dict:
        if k not in self._layouts:
            self._layouts[k] = shard_layout(_shard_path(self.folder, k))
        return self._layouts[k]

    def rows(self, indices, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """The cache rows ``indices`` (global sample numbers, in that order), only ``keys`` (default: all)."""
        keys = tuple(keys or KEYS)
        unknown = sorted(set(keys) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown trajectory keys {unknown}; allowed: {', '.join(KEYS)}")
        where = [divmod(int(i), self.shard_size) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        bad = [s * self.shard_size + j for s, j in where if not 0 <= s * self.shard_size + j < self.num_samples]
        if bad:
            raise IndexError(f"trajectory cache {str(self.folder)!r} has rows 0 to {self.num_samples - 1}, not {bad[0]}")
        dtype, shape, _ = zip(*(self._layout(0)[key] for key in keys))
        out = {key: torch.empty((len(where), *shape[n][1:]), dtype=dtype[n]) for n, key in enumerate(keys)}
        files: dict[int, int] = {}
        try:
            for r, (s, j) in enumerate(where):
                if s not in files:
                    files[s] = os.open(_shard_path(self.folder, s), os.O_RDONLY)
                for key in keys:
                    if not _read_row(files[s], self._layout(s)[key], j, out[key][r]):
                        raise ValueError(f"{str(_shard_path(self.folder, s))!r} ends inside row {j} of {key!r}: the trajectory "
                                         f"cache was damaged after it was made; rerun scripts/make_trajectories.py to redo it")
        finally:
            for fd in files.values():
                os.close(fd)
        return out


def _read_row(fd: int, layout: tuple, j: int, into: torch.Tensor) -> bool:
    """Read row ``j`` of the tensor at ``layout`` (``shard_layout``) of the open file ``fd`` into ``into``; False if the
    file ends first."""
    buf = into.view(-1).view(torch.uint8).numpy()
    return os.preadv(fd, [buf], layout[2] + j * buf.nbytes) == buf.nbytes


def open_cache(folder: str | Path, **expect) -> TrajectoryCache:
    """Open a cache, refusing it unless every given manifest key (``teacher_hash=...``, ``solver=...``) matches."""
    cache = TrajectoryCache(folder)
    check_match(cache.folder, cache.manifest, expect)
    return cache
