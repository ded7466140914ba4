"""Time per network evaluation spent outside the network: our solvers against the matching diffusers scheduler
(``scripts/solver_overhead.py``). Both loops call the same UNet from the same noise at the same timesteps; the UNet's
forward is timed and subtracted from the wall time of the whole loop, so what remains is the solver (and, for ours,
the teacher's parameterization conversion) per step. Median over ``repeats`` runs.
"""

from __future__ import annotations

import platform
import statistics
import time

import diffusers
import torch

from distill.solvers import SOLVERS, sample


def _explicit(**options):
    """Our arguments for a diffusers multistep scheduler: its own timesteps, then the clean point."""
    return lambda sched: {"timesteps": sched.timesteps.tolist(), **options}


def _deis(sched):  # DEIS ends at t = 0 (sigma > 0), not on clean data
    return {"timesteps": [*sched.timesteps.tolist(), 0], "final": "t_min", "order": 2}


def _singlestep(sched):
    """DPMSolverSinglestep groups its timesteps by ``order_list``: group starts form our grid, inner ones mid_ts."""
    ts, orders, starts, mids = sched.timesteps.tolist(), sched.order_list, [], []
    for t, order in zip(ts, orders):
        if order == 1:
            starts.append(t)
            mids.append([])
        else:
            mids[-1].append(t)
    return {"timesteps": starts, "mid_ts": mids}


def _seeded(**options):
    return lambda sched: {"timesteps": sched.timesteps.tolist(), "generator": torch.Generator().manual_seed(0), **options}


# (our solver, how our arguments follow from the scheduler, diffusers scheduler, its config, its step() kwargs)
PAIRS = [
    ("euler", _explicit(), "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "trailing"}, {}),
    ("dpmpp_2m", _explicit(), "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    ("dpmpp_3m", _explicit(halve_d2=True), "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3},
     {}),
    ("dpmpp_2s", _singlestep, "DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    ("dpmpp_2m_sde", _seeded(), "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
     {"generator": True}),
    ("unipc", _explicit(order=2, variant="bh2"), "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2}, {}),
    ("deis", _deis, "DEISMultistepScheduler", {"solver_order": 2}, {}),
    ("ddpm", _seeded(), "DDPMScheduler", {"clip_sample": False}, {"generator": True}),
]


class TimedForward:
    """Wraps a module's forward and adds up the seconds spent inside it."""

    def __init__(self, module):
        self.seconds, self.calls, self._forward = 0.0, 0, module.forward
        module.forward = self

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self._forward(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def make_unet(channels: int, size: int):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval().requires_grad_(False)


def time_diffusers(scheduler, unet, timer, noise, steps, step_kwargs):
    """Seconds per network evaluation spent outside the network in diffusers' loop."""
    kwargs = {k: torch.Generator().manual_seed(0) if k == "generator" else v for k, v in step_kwargs.items()}
    timer.seconds, timer.calls = 0.0, 0
    t0 = time.perf_counter()
    scheduler.set_timesteps(steps)  # timed, as our grid construction is
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x, **kwargs).prev_sample
    return (time.perf_counter() - t0 - timer.seconds) / timer.calls, timer.calls


def time_ours(teacher, timer, noise, solver, arguments):
    timer.seconds, timer.calls = 0.0, 0
    t0 = time.perf_counter()
    sample(teacher, noise, solver=solver, **arguments)
    return (time.perf_counter() - t0 - timer.seconds) / timer.calls, timer.calls


def measure(make_teacher, shapes: list[str], steps: int, repeats: int, solvers: list[str] = (), log=print) -> list[dict]:
    """One row per (shape BxCxHxW, solver pair); ``make_teacher(unet, scheduler)`` presents the UNet as a teacher with
    the schedule the diffusers scheduler's config describes."""
    rows = []
    with torch.inference_mode():
        for shape in shapes:
            b, c, h, w = map(int, shape.split("x"))
            unet = make_unet(c, h)
            timer = TimedForward(unet)
            noise = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0))
            for solver, our_args, sched_name, overrides, step_kwargs in PAIRS:
                if solver not in SOLVERS or (solvers and solver not in solvers):
                    continue
                scheduler = getattr(diffusers, sched_name)(**overrides)
                teacher = make_teacher(unet, scheduler)
                theirs, ours = [], []
                for _ in range(repeats):
                    sec, nfe = time_diffusers(scheduler, unet, timer, noise, steps, step_kwargs)
                    theirs.append(sec)
                    sec, our_nfe = time_ours(teacher, timer, noise, solver, our_args(scheduler))
                    ours.append(sec)
                    if our_nfe != nfe:
                        raise RuntimeError(f"{solver}: {our_nfe} network calls against diffusers' {nfe}")
                t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
                rows.append({"solver": solver, "diffusers_scheduler": sched_name, "nfe": nfe, "shape": shape,
                             "ours_us_per_nfe": f"{t_ours * 1e6:.1f}", "diffusers_us_per_nfe": f"{t_theirs * 1e6:.1f}",
                             "ratio_ours_over_diffusers": f"{t_ours / t_theirs:.3f}", "repeats": repeats,
                             "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
                             "torch": torch.__version__, "diffusers": diffusers.__version__})
                log({k: rows[-1][k] for k in ("solver", "shape", "ours_us_per_nfe", "diffusers_us_per_nfe",
                                              "ratio_ours_over_diffusers")})
    return rows
