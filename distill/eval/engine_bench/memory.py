"""Peak memory of training (issue #34, item 5): from trajectory caches of growing size, of a two-network objective, and
from an HF image dataset on disk of growing size (issue #33).

    python scripts/engine_memory.py [--sizes 10000 30000 100000] [--steps 50] [--sid-steps 5] [--out results/engine]
        [--tmp /tmp] [--parts caches sid dataset] [--previous OLD/memory.json]
        [--dataset-sizes 10000 100000] [--dataset-steps 30]

1. Caches. For each size, a cache shaped like the mnist16 pairs (``configs/distill/reflow_mnist16.yaml``: 1x16x16,
   DPM-Solver++(2M) at 16 NFE on a uniform grid ending on clean data, class labels, 1,024 rows a shard) is
   synthesized in ``--tmp`` by the project's own writer (``distill.engine.trajectories.generate``: the same manifest,
   shard names, metadata and atomic writes), with random tensors in place of the teacher's solves. A child process
   then trains on it (``kd`` on the noise and sample rows, and ``reflow`` with 2 phases on the state rows: mnist16
   teacher copy, batch 64, one thread) and reports ``ru_maxrss`` (from ``wait4``), its /proc/self/status (VmHWM,
   RssAnon, RssFile) and, from /proc/self/smaps, the resident bytes of its mappings of the cache's files. The bytes
   the run reads from the cache are batch x steps x the row bytes of the keys read. The cache is deleted after.
2. Two networks. SiD (data-free, prompts) on the tiny text-to-image pipeline of tests/conftest.py, and on a copy
   whose UNet is wider, against the sum of its networks: per trained network its parameters, gradients and Adam
   states (as held by the optimizer), plus the frozen networks' parameters (teacher UNet, text encoder, VAE) and
   the EMA copies.
3. An HF image dataset (``--parts dataset``, not run by default): ``distill.eval.engine_bench.memory_dataset``.

Writes ``memory.json`` and ``memory.md`` in ``--out``. Parts not run this time are kept from the ``memory.json``
already there (with their own command and date), so ``--parts dataset`` adds its section without erasing the others.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from distill.eval.engine_bench import ROOT, cpu_model, memory_dataset
from distill.eval.engine_bench.processes import MB, mapped_rss, mib, proc_status, run_child

CACHE_RUNS = {  # name -> (config, overrides, cache keys read)
    "kd": ("kd_mnist16.yaml", [], ("noise", "sample", "label")),
    "reflow_2_phases": ("reflow_mnist16.yaml", ["objective.phases=2"], ("states", "label")),
}


# -- the cache runs --------------------------------------------------------------------------------------
@contextlib.contextmanager
def random_shards():
    """``trajectories.make_shard`` replaced by random tensors of the same shapes and dtypes (no teacher solves)."""
    import torch

    from distill.engine import trajectories

    def make_shard(teacher, m, k):
        n, g = trajectories._shard_count(m, k), torch.Generator().manual_seed(m["seed"] * 1_000_003 + k)
        states = torch.randn((n, len(m["ts"]), *m["data_shape"]), generator=g)
        return {"noise": torch.randn((n, *m["data_shape"]), generator=g), "states": states,
                "sample": states[:, -1].contiguous(), "label": torch.randint(0, teacher.num_classes, (n,), generator=g)}

    real, trajectories.make_shard = trajectories.make_shard, make_shard
    try:
        yield
    finally:
        trajectories.make_shard = real


def synthesize_cache(folder: Path, num_samples: int) -> Path:
    """A cache of the mnist16 pairs' settings (module doc), written by ``trajectories.generate``."""
    from distill.engine.trajectories import generate
    from distill.eval.engine_bench import load_teacher

    with random_shards():
        return generate(load_teacher("mnist16"), folder, solver="dpmpp_2m", nfe=16, num_samples=num_samples, grid="uniform",
                        final="clean", class_labels=True, log=lambda m: None, progress=False)


def row_bytes(folder: Path, keys) -> int:
    """Bytes of one row of ``keys`` in the cache."""
    from distill.engine.trajectories import TrajectoryCache

    row = TrajectoryCache(folder).rows([0], keys)
    return sum(v.numel() * v.element_size() for v in row.values())


def cache_child(spec: dict) -> dict:
    """In the child: train ``spec['objective']`` on the cache, then report memory."""
    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config
    from distill.engine.train import run_steps, start
    from distill.eval.engine_bench import build_student, load_teacher

    config, extra, _ = CACHE_RUNS[spec["objective"]]
    before = proc_status()
    cfg = load_run_config(ROOT / "configs" / "distill" / config, parse_overrides([
        f"trajectories={spec['cache']}", f"max_steps={spec['steps']}", f"checkpoint_every={spec['steps']}",
        f"log_every={spec['steps']}", "batch_size=64", *extra, f"output_dir={spec['out']}"]))
    run, step = start(cfg, load_teacher, build_student, None, lambda m: None)
    with run.lock:
        run_steps(run, step, None, lambda m: None)
    return {"after_imports": before, "end": proc_status(), "cache_mapped_rss": mapped_rss(Path(spec["cache"]))}


def measure_caches(sizes: list[int], steps: int, tmp: Path, log) -> list[dict]:
    rows = []
    for n in sizes:
        folder = tmp / f"cache_{n}"
        try:
            t0 = time.time()
            synthesize_cache(folder, n)
            cache_bytes = sum(f.stat().st_size for f in folder.iterdir())
            log(f"cache of {n} rows: {cache_bytes / MB:.0f} MiB in {time.time() - t0:.0f} s")
            for objective, (_, _, keys) in CACHE_RUNS.items():
                r = run_child({"kind": "cache", "objective": objective, "cache": str(folder), "steps": steps,
                               "out": str(tmp / f"run_{objective}_{n}")})
                rows.append({"objective": objective, "num_samples": n, "cache_bytes": cache_bytes, "keys": list(keys),
                             "row_bytes": row_bytes(folder, keys), "steps": steps, "batch_size": 64, **r})
                rows[-1]["read_bytes"] = rows[-1]["row_bytes"] * 64 * steps
                log(f"  {objective}: peak RSS {r['ru_maxrss'] / MB:.0f} MiB, cache pages resident "
                    f"{r['cache_mapped_rss'] / MB:.1f} MiB")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            for objective in CACHE_RUNS:
                shutil.rmtree(tmp / f"run_{objective}_{n}", ignore_errors=True)
    return rows


# -- the two-network run ---------------------------------------------------------------------------------
def sd_pipeline(root: Path, width: tuple[int, int] | None) -> Path:
    """The tiny pipeline of tests/conftest.py; with ``width``, its UNet replaced by a wider one (same layout)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_sd_pipeline

    folder, pipe = tiny_sd_pipeline(root)
    if width:
        from diffusers import UNet2DConditionModel

        config = {**dict(pipe.unet.config), "block_out_channels": list(width), "norm_num_groups": 32, "attention_head_dim": 8}
        UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    return folder


def unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def network_bytes(run) -> dict[str, int]:
    """Parameters + gradients + Adam states of each trained network, the frozen networks' and the EMA copies' tensors."""
    import torch

    from distill.objectives.base import unwrap

    trained = [p for params in run.trainable.values() for p in params]
    state = [v for opt in run.opts.values() for s in opt.state.values() for v in s.values()
             if isinstance(v, torch.Tensor) and v.numel() > 1]
    teacher = run.ctx.teacher
    frozen = [m for m in vars(teacher).values() if isinstance(m, torch.nn.Module)]
    frozen += [m for m in run.objective.frozen().values()]
    copies = [*run.objective.helpers().values(), *([run.ema] if run.ema is not None else [])]
    trained_ids = {p.untyped_storage().data_ptr() for p in trained}
    frozen_tensors = [t for m in frozen for t in [*m.parameters(), *m.buffers()] if t.untyped_storage().data_ptr() not in trained_ids]
    return {"trained_params": unique_bytes(trained), "gradients": unique_bytes(trained), "adam_states": unique_bytes(state),
            "frozen_params": unique_bytes(frozen_tensors),
            "ema_copies": unique_bytes(t for m in copies for t in m.state_dict().values()),
            "trained_networks": {n: sum(p.numel() for p in ps) for n, ps in run.trainable.items()},
            "all_networks_count": len({id(unwrap(m)) for m in run.nets.values()}) + len(frozen)}


def sid_child(spec: dict) -> dict:
    """In the child: SiD on the pipeline for a few steps, then report memory and the networks' bytes."""
    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config
    from distill.engine.train import run_steps, start
    from distill.eval.engine_bench import build_student, load_teacher

    before = proc_status()
    cfg = load_run_config(ROOT / "configs" / "distill" / "sid_mnist16.yaml", parse_overrides([
        f"teacher={spec['pipeline']}", f"dataset={spec['prompts']}", "student.class_conditional=false",
        "objective.guidance_scale=2.0", f"batch_size={spec['batch_size']}", f"max_steps={spec['steps']}",
        f"checkpoint_every={spec['steps']}", f"log_every={spec['steps']}", f"output_dir={spec['out']}"]))
    run, step = start(cfg, load_teacher, build_student, None, lambda m: None)
    set_up = proc_status()
    with run.lock:
        run_steps(run, step, None, lambda m: None)
    return {"after_imports": before, "after_setup": set_up, "end": proc_status(), "networks": network_bytes(run)}


def measure_sid(steps: int, tmp: Path, log) -> list[dict]:
    rows = []
    for name, width in (("tiny", None), ("wide UNet (64, 128)", (64, 128))):
        root = tmp / f"sd_{'wide' if width else 'tiny'}"
        try:
            folder = sd_pipeline(root / "pipe", width)
            (root / "p.txt").write_text("the cat\na red fox\nthe sea\na dog\n")
            r = run_child({"kind": "sid", "pipeline": str(folder), "prompts": f"prompts:{root / 'p.txt'}", "steps": steps,
                           "batch_size": 64, "out": str(root / "run")})
            nets = r["networks"]
            total = sum(v for k, v in nets.items() if isinstance(v, int) and k != "all_networks_count")
            rows.append({"pipeline": name, "steps": steps, "batch_size": 64, "network_bytes_total": total, **r})
            log(f"SiD on the {name} pipeline: peak RSS {r['ru_maxrss'] / MB:.0f} MiB, networks {total / MB:.1f} MiB")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return rows


# -- the HF image dataset runs ---------------------------------------------------------------------------
def hardware() -> str:
    return f"{platform.system()} {platform.release()} {platform.machine()}, {cpu_model()}, {os.cpu_count()} CPUs"


def cache_table(rows: list[dict]) -> list[str]:
    lines = ["| objective | rows | cache MiB | keys | steps | read MiB | cache resident MiB | peak RSS MiB | delta MiB "
             "| anon MiB | file MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        base.setdefault(r["objective"], r["ru_maxrss"])
        lines.append(f"| {r['objective']} | {r['num_samples']:,} | {mib(r['cache_bytes'])} | {', '.join(r['keys'])} | "
                     f"{r['steps']} | {mib(r['read_bytes'])} | {mib(r['cache_mapped_rss'])} | {mib(r['ru_maxrss'])} | "
                     f"{mib(r['ru_maxrss'] - base[r['objective']])} | {mib(r['end']['RssAnon'])} | {mib(r['end']['RssFile'])} |")
    return lines


def kept_note(result: dict, part: str) -> list[str]:
    kept = result.get("kept", {}).get(part)
    return [f"Kept from an earlier run ({kept['date']}): `{kept['command']}`.", ""] if kept else []


def markdown(result: dict) -> str:
    lines = ["# Training memory (issue #34, item 5)", ""]
    if result.get("caches") or result.get("sid"):
        lines += [f"Command: `{result['command']}`  ",
                  f"Hardware: {result['hardware']}; torch {result['torch']}; {result['date']}.", ""]
    if result.get("caches"):
        lines += ["## Trajectory caches (mnist16-shaped, synthesized; batch 64, one thread)", "", *kept_note(result, "caches"),
                  "Peak RSS: `ru_maxrss` of the child (`wait4`). Anon / file: RssAnon / RssFile at the end of the run. Cache "
                  "resident: bytes of the cache's files mapped into the process (/proc/self/smaps). Read: batch x steps x "
                  "row bytes of the keys read. Delta: peak RSS minus that of the same objective on the smallest cache.", "",
                  *cache_table(result["caches"])]
    if result.get("caches") and result.get("previous"):
        prev = result["previous"]
        lines += ["", f"The same runs with the previous reader ({prev['reader']}; {prev['command']}, {prev['date']}):", "",
                  *cache_table(prev["caches"])]
    if result.get("sid"):
        lines += ["", "## A two-network objective: SiD on the tiny text-to-image pipeline (tests/conftest.py)", "",
                  *kept_note(result, "sid"),
                  "Networks: per trained network (generator, fake score) parameters + gradients + Adam states (as held by "
                  "the optimizer), the frozen networks' tensors (teacher UNet, text encoder, VAE) and the EMA copies. Growth: "
                  "peak RSS minus the RSS after the trainer's imports (torch) of the same process; peak - setup: minus the "
                  "RSS once the networks, optimizers and accelerator are built (the rest is the steps' activations and "
                  "temporaries).", "",
                  "| pipeline | trained params | params MiB | grads MiB | Adam MiB | frozen MiB | EMA MiB | networks MiB "
                  "| after imports MiB | after setup MiB | peak RSS MiB | growth MiB | peak - setup MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["sid"]:
            n = r["networks"]
            lines.append(f"| {r['pipeline']} | {sum(n['trained_networks'].values()):,} | {mib(n['trained_params'])} | "
                         f"{mib(n['gradients'])} | {mib(n['adam_states'])} | {mib(n['frozen_params'])} | "
                         f"{mib(n['ema_copies'])} | {mib(r['network_bytes_total'])} | {mib(r['after_imports']['VmRSS'])} | "
                         f"{mib(r['after_setup']['VmRSS'])} | {mib(r['ru_maxrss'])} | "
                         f"{mib(r['ru_maxrss'] - r['after_imports']['VmRSS'])} | {mib(r['ru_maxrss'] - r['after_setup']['VmRSS'])} |")
    lines += memory_dataset.markdown_lines(result.get("dataset"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    p.add_argument("--steps", type=int, default=50, help="training steps on each cache")
    p.add_argument("--sid-steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "engine")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--parts", nargs="+", choices=("caches", "sid", "dataset"), default=["caches", "sid"],
                   help="what to measure (dataset: an HF image dataset, not run by default); parts not run are kept from "
                   "the memory.json already in --out")
    p.add_argument("--dataset-sizes", type=int, nargs="+", default=[10_000, 100_000], help="rows of the HF image datasets")
    p.add_argument("--dataset-steps", type=int, default=30, help="training steps on each dataset (the resume check: 2x)")
    p.add_argument("--previous", type=Path, default=None, help="a memory.json of an earlier reader, shown beside")
    p.add_argument("--previous-reader", default="memory-mapped: safetensors safe_open + get_slice, rows concatenated")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        report = {"cache": cache_child, "sid": sid_child, "dataset": memory_dataset.dataset_child}[spec["kind"]](spec)
        Path(spec["report"]).write_text(json.dumps(report))
        return 0
    import torch

    from distill.core.atomic import write_text

    log = lambda m: print(m, flush=True)  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="engine_memory_", dir=args.tmp))
    try:
        caches = measure_caches(sorted(args.sizes), args.steps, tmp, log) if "caches" in args.parts else []
        sid = measure_sid(args.sid_steps, tmp, log) if "sid" in args.parts else []
        dataset = (memory_dataset.measure_dataset(sorted(args.dataset_sizes), args.dataset_steps, tmp, log)
                   if "dataset" in args.parts else {})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    command = "python scripts/engine_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    here = {"command": command, "hardware": hardware(), "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    result = {**here, "caches": caches, "sid": sid}
    if dataset:
        import datasets

        result["dataset"] = {**here, "datasets": datasets.__version__, **dataset}
    if args.previous:
        result["previous"] = {**json.loads(args.previous.read_text()), "reader": args.previous_reader}
        for key in ("previous", "dataset", "kept"):
            result["previous"].pop(key, None)
    result = merge_earlier(result, args.out / "memory.json", args.parts)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "memory.json", json.dumps(result, indent=1))
    write_text(args.out / "memory.md", markdown(result))
    log(f"wrote {args.out / 'memory.json'} and {args.out / 'memory.md'}")
    return 0


def merge_earlier(result: dict, path: Path, parts) -> dict:
    """``result`` with the parts not run this time taken from the earlier ``memory.json`` at ``path`` (if any): the
    dataset part carries its own command and date; caches and sid share the top-level ones, so when only one of them
    (or neither) ran, the other's earlier command and date are kept beside it (``kept``)."""
    if not path.is_file():
        return result
    earlier = json.loads(path.read_text())
    if "dataset" not in parts and earlier.get("dataset"):
        result["dataset"] = earlier["dataset"]
    ran = [p for p in ("caches", "sid") if p in parts]
    if not ran:  # neither: the earlier top level stands as it was
        return {**result, **{k: v for k, v in earlier.items() if k != "dataset"}, **({"dataset": result["dataset"]}
                                                                                    if result.get("dataset") else {})}
    for part in ("caches", "sid"):
        if part not in ran and earlier.get(part):
            result[part] = earlier[part]
            result.setdefault("kept", {})[part] = earlier.get("kept", {}).get(part) or {
                "command": earlier["command"], "date": earlier["date"]}
    if "caches" not in ran and "previous" not in result and earlier.get("previous"):
        result["previous"] = earlier["previous"]
    return result
