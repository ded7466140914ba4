"""Time per sampling step spent outside the network: our solvers vs the matching diffusers scheduler.

    python scripts/solver_overhead.py --out results/solver_overhead.csv

Both loops call the same UNet from the same noise at the same timesteps; the UNet's forward is timed
and subtracted from the wall time of the whole loop, so what remains is the solver (and, for ours,
the teacher's parameterization conversion) per step. Median over --repeats runs.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import diffusers
import torch

from distill.solvers import SOLVERS, sample
from teachers.diffusers_folder import DiffusersTeacher, schedule_from_scheduler_config

# (our solver, our options, diffusers scheduler class name, scheduler config overrides)
PAIRS = [
    ("euler", {}, "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "trailing"}),
    ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
]


class TimedForward:
    """Wraps a module's forward and adds up the seconds spent inside it."""

    def __init__(self, module):
        self.seconds, self._forward = 0.0, module.forward
        module.forward = self

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self._forward(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out


def make_unet(channels: int, size: int):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval().requires_grad_(False)


def time_diffusers(scheduler, unet, timer, noise, steps, step_kwargs):
    scheduler.set_timesteps(steps)
    timer.seconds = 0.0
    t0 = time.perf_counter()
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x, **step_kwargs).prev_sample
    return (time.perf_counter() - t0 - timer.seconds) / steps, [int(t) for t in scheduler.timesteps]


def time_ours(teacher, timer, noise, solver, timesteps, options):
    timer.seconds = 0.0
    t0 = time.perf_counter()
    sample(teacher, noise, solver=solver, timesteps=timesteps, **options)
    return (time.perf_counter() - t0 - timer.seconds) / len(timesteps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--shapes", default="16x3x32x32,1x4x64x64", help="comma-separated BxCxHxW")
    p.add_argument("--out", type=Path, default=Path("results/solver_overhead.csv"))
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            b, c, h, w = map(int, shape.split("x"))
            unet = make_unet(c, h)
            timer = TimedForward(unet)
            noise = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0))
            for solver, options, sched_name, overrides in PAIRS:
                if solver not in SOLVERS:
                    continue
                scheduler = getattr(diffusers, sched_name)(**overrides)
                schedule, prediction, scale = schedule_from_scheduler_config(dict(scheduler.config))
                teacher = DiffusersTeacher(unet, schedule, prediction, time_scale=scale, content_hash="bench")
                theirs, ours = [], []
                for _ in range(args.repeats):
                    sec, timesteps = time_diffusers(scheduler, unet, timer, noise, args.steps, {})
                    theirs.append(sec)
                    ours.append(time_ours(teacher, timer, noise, solver, timesteps, options))
                t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
                rows.append({"solver": solver, "diffusers_scheduler": sched_name, "steps": args.steps, "shape": shape,
                             "ours_us_per_step": f"{t_ours * 1e6:.1f}", "diffusers_us_per_step": f"{t_theirs * 1e6:.1f}",
                             "ratio_ours_over_diffusers": f"{t_ours / t_theirs:.3f}", "repeats": args.repeats,
                             "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                             "torch": torch.__version__, "diffusers": diffusers.__version__})
                print(rows[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
