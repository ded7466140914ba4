"""A student: a network plus the parameterization that maps (x_t, t) to a sample (DESIGN.md, contract 5).

``parameterization="consistency"``: f(x, t) = c_skip(t) x + c_out(t) D_theta(x, t) with, in the EDM chart
sigma~ = sigma / alpha and s = sigma~(t) - sigma~(t_min),

    c_skip = sigma_data^2 / (s^2 + sigma_data^2),    c_out = s / sqrt(s^2 + sigma_data^2),

Song et al. (2023), Eq. 9 / App. C, written as in LCM (Luo et al. 2023) for a network whose output is
converted to a data prediction D_theta: c_skip(t_min) = 1 and c_out(t_min) = 0, so f(x, t_min) = x exactly
(the boundary condition), and f -> D_theta at high noise. Between, c_skip + c_out exceeds 1 (1.25 at
sigma~ = 0.33 on the cosine schedule) and x is the unscaled x_t, so a student started from the teacher is
biased there (f = 1.25 x0 for D_theta = x0), a bias 4,000 CD steps did not remove
(docs/objectives/consistency.md, "Multistep consistency").

``parameterization="consistency_edm"``: the same boundary applied to the EDM-preconditioned raw output
F = (D_theta - c_skip^EDM x~) / c_out^EDM in the EDM chart x~ = x / alpha (Song et al. 2023, App. C;
ECT, Geng et al. 2024, Sec. 3), with sigma~_min = sigma~(t_min):

    f = c_skip(s) x~ + c_out(s) F,   s = sigma~ - sigma~_min,   c_skip^EDM = sigma_data^2 / (sigma~^2 + sigma_data^2),

so f = D_theta wherever sigma~_min << sigma~ (a teacher-started student is the teacher's denoiser there) and
f(x, t_min) = x / alpha(t_min). ``parameterization="denoiser"``: f = D_theta.

How a student samples is part of the file (``sampler``):
  * ``consistency``: multistep consistency sampling (Song et al. 2023, Algorithm 1): x = f(x_T, T); then
    for each further time tau, re-noise x_tau = alpha(tau) x + sigma(tau) z and apply f again (CD, SLAM and
    one-step generators, which may start below t_max: the first sampling time is where they start);
  * ``ode``: deterministic steps of a registered solver (``sampler_solver``, e.g. ``euler`` = DDIM) over
    the sampling times followed by the clean point, with D_theta as the denoiser (progressive distillation,
    reflow): no re-noising.
  * ``meanflow``: one average-velocity jump per interval, z_r = z_t - (t - r) u(z_t, r, t) in the rectified-flow chart
    (Geng et al. 2025, Alg. 2 and its "Sampling" paragraph), taken as one DDIM step from t to r with the data prediction at the
    extra input ``interval`` = flow_time(t) - flow_time(r) (``distill.objectives.meanflow``).
``sampling_timesteps`` maps a step count to its times; counts not stored come from ``sampling_grid``. ``sample`` takes
only the counts in ``sampling_steps`` (what the file records; a 4-step progressive student refuses 2 steps).
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from distill.core.denoisers import NetDenoiser
from distill.core.grids import explicit_grid, make_grid
from distill.core.param import append_dims
from distill.core.schedules import Schedule, flow_time, schedule_from_config, sigma_tilde

PARAMETERIZATIONS = ("consistency", "consistency_edm", "denoiser")
SAMPLERS = ("consistency", "ode", "meanflow")
MAX_SAMPLING_STEPS = 4


def boundary(schedule: Schedule, t: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency parameterization at times ``t`` (module doc), float64."""
    # t_min as a default-dtype tensor, as callers build their t: c_out(t_min) is then exactly 0
    s = sigma_tilde(schedule, t) - float(sigma_tilde(schedule, torch.tensor([schedule.t_min]))[0])
    sd2 = sigma_data**2
    return sd2 / (s**2 + sd2), s / (s**2 + sd2).sqrt()


def parameterize(parameterization: str, schedule: Schedule, sigma_data: float, x: torch.Tensor, t: torch.Tensor,
                 d: torch.Tensor) -> torch.Tensor:
    """f(x, t) from the data prediction d = D_theta(x, t): d itself, or a x + r d (``f_coefficients``)."""
    if parameterization == "denoiser":
        return d
    coef_x, coef_d = f_coefficients(parameterization, schedule, sigma_data, t)
    return append_dims(coef_x, x.ndim).to(x) * x + append_dims(coef_d, x.ndim).to(x) * d


def f_coefficients(parameterization: str, schedule: Schedule, sigma_data: float, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, r) with f(x, t) = a x + r D_theta at times ``t``, float64: (0, 1) for ``denoiser``, ``edm_boundary`` for
    ``consistency_edm``, (c_skip, c_out) of ``boundary`` for ``consistency`` (module doc)."""
    if parameterization == "denoiser":
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.zeros_like(t), torch.ones_like(t)
    if parameterization == "consistency_edm":
        return edm_boundary(schedule, t, sigma_data)
    return boundary(schedule, t, sigma_data)


def edm_boundary(schedule: Schedule, t: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, r) with f = a x + r D_theta for ``consistency_edm`` (module doc), float64, written in alpha and sigma so
    that alpha = 0 (a flow's t_max) stays finite: with u = sigma - alpha sigma~_min (= alpha s),
    a = c_skip(s) / alpha - r c_skip^EDM / alpha and r = c_out(s) / c_out^EDM (1 where sigma = 0)."""
    t = torch.as_tensor(t, dtype=torch.float64).cpu()
    log_a, log_s = schedule.log_alpha_sigma(t)
    alpha, sigma = log_a.exp(), log_s.exp()
    u = (sigma - alpha * float(sigma_tilde(schedule, schedule.t_min)[0])).clamp_min(0.0)
    sd2a2 = sigma_data**2 * alpha**2
    r = torch.where(sigma > 0, u / sigma.clamp_min(1e-300) * ((sigma**2 + sd2a2) / (u**2 + sd2a2)).sqrt(),
                    torch.ones_like(sigma))
    a = sigma_data**2 * alpha / (u**2 + sd2a2) - r * sigma_data**2 * alpha / (sigma**2 + sd2a2)
    return a, r


class Student(NetDenoiser):
    def __init__(self, net: nn.Module, *, schedule: Schedule, prediction_type: str = "sample",
                 parameterization: str = "consistency", sigma_data: float = 0.5, time_scale: float = 1.0,
                 null_class_label: int | None = None, sampling_grid: str = "karras", sampler: str = "consistency",
                 sampler_solver: str = "euler", sampling_steps: tuple[int, ...] | None = None, info: dict | None = None):
        super().__init__(net, schedule, prediction_type, time_scale=time_scale, null_class_label=null_class_label)
        for key, value, allowed in (("parameterization", parameterization, PARAMETERIZATIONS), ("sampler", sampler, SAMPLERS)):
            if value not in allowed:
                raise ValueError(f"unknown {key} {value!r}; allowed: {', '.join(allowed)}")
        self.parameterization, self.sigma_data = parameterization, sigma_data
        self.sampling_grid, self.sampler, self.sampler_solver = sampling_grid, sampler, sampler_solver
        self.sampling_steps = tuple(sampling_steps or range(1, MAX_SAMPLING_STEPS + 1))  # step counts the file records
        self.info = dict(info or {})  # teacher hash, data shape, lineage ... (strings in the saved metadata)

    # -- the map (x_t, t) -> sample ------------------------------------------------------------------
    def boundary(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) at process times ``t`` [B], float64."""
        return boundary(self.schedule, t, self.sigma_data)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None, *, raw: bool = False,
                **extra) -> torch.Tensor:
        """f(x, t) (module doc); ``raw=True``: the network's own output (for losses in its parameterization)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        if raw:
            return self.raw(x, t, cond, **extra)
        return parameterize(self.parameterization, self.schedule, self.sigma_data, x, t, self.denoise(x, t, cond, **extra))

    # -- sampling ---------------------------------------------------------------------------------------
    def from_data_prediction(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """f(x, t) from a data prediction ``d`` made outside ``denoise`` (SLAM's official form converts eps itself)."""
        return parameterize(self.parameterization, self.schedule, self.sigma_data, x, t, d)

    def sampling_timesteps(self, steps: int) -> torch.Tensor:
        """The ``steps`` decreasing times of a ``steps``-step sample, starting at t_max."""
        stored = self.info.get("sampling_timesteps", {}).get(str(steps))
        if stored is not None:
            return torch.tensor(stored, dtype=torch.float64)
        return make_grid(self.schedule, steps, self.sampling_grid, final="t_min")[:steps]

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int = 1, cond: torch.Tensor | None = None,
               generator: torch.Generator | None = None, timesteps=None, callback=None, **extra) -> torch.Tensor:
        """A ``steps``-step sample from standard-normal ``noise`` with this student's sampler (module doc);
        ``callback(info)`` sees every intermediate state; ``extra`` conditions go to the network. ``steps`` must be one
        of ``sampling_steps`` (the counts the file records, as an exported pipeline's scheduler); ``timesteps`` samples
        any other times."""
        if timesteps is None and steps not in self.sampling_steps:
            raise ValueError(f"this student samples with {', '.join(map(str, self.sampling_steps))} steps (the step counts "
                             f"its file records), not {steps}; pass timesteps= to sample at other times")
        ts = self.sampling_timesteps(steps) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.float64)
        x = noise * float(self.schedule.init_noise_scale(ts[0]))  # as first_step
        if self.sampler == "meanflow":
            return self._mean_flow_sample(x, ts, cond, callback, **extra)
        if self.sampler == "ode":
            from distill.solvers import get_solver

            grid = explicit_grid(self.schedule, ts, final="clean")
            denoiser = (lambda x_, t_, c_: self.denoise(x_, t_, c_, **extra)) if extra else self.denoise
            return get_solver(self.sampler_solver).fn(denoiser, x, grid, schedule=self.schedule, cond=cond, callback=callback)
        for i, t in enumerate(ts):
            if i > 0:
                z = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
                x = float(self.schedule.alpha(t)) * x + float(self.schedule.sigma(t)) * z
            if callback is not None:
                callback({"i": i, "t": float(t), "x": x})
            x = self(x, torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device), cond, **extra)
        return x

    def first_step(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(x, t [B], extra network inputs) of a one-step sample of standard-normal ``noise``: ``self(x, t, cond, **extra)``
        is then that sample, with gradients (the generator of an adversarial head; ``sample`` makes it without). Every
        sampler's one step is one call: f(x, t_1); an ode sampler's Euler step to clean data is D(x, t_1); MeanFlow's
        z_0 = z_1 - (tau_1 - 0) u is D(x, t_1) with the interval input tau_1."""
        ts = self.sampling_timesteps(1)
        x = noise * float(self.schedule.init_noise_scale(ts[0]))
        t = torch.full((noise.shape[0],), float(ts[0]), dtype=torch.float64, device=noise.device)
        if self.sampler != "meanflow":
            return x, t, {}
        tau = flow_time(self.schedule, explicit_grid(self.schedule, ts, final="clean"))
        return x, t, {"interval": torch.full_like(t, float(tau[0] - tau[1]))}

    def _mean_flow_sample(self, x: torch.Tensor, ts: torch.Tensor, cond, callback, **extra) -> torch.Tensor:
        """MeanFlow's k-step sampler (module doc): a DDIM step is the Euler step z_r = z_t - (t - r) u of the flow chart."""
        from distill.solvers.common import ddim_step, grid_points, t_batch

        grid = explicit_grid(self.schedule, ts, final="clean")
        points, taus = grid_points(self.schedule, grid), flow_time(self.schedule, grid)
        for i, (cur, nxt) in enumerate(zip(points[:-1], points[1:])):
            interval = torch.full((x.shape[0],), float(taus[i] - taus[i + 1]), dtype=torch.float64, device=x.device)
            d = self.denoise(x, t_batch(cur, x), cond, interval=interval, **extra)
            if callback is not None:  # as the euler solver reports a step
                callback({"i": i, "t": cur.t, "x": x, "denoised": d})
            x = ddim_step(x, d, cur, nxt)
        return x

    # -- what a student file records -------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        grids = {str(k): self.sampling_timesteps(k).tolist() for k in self.sampling_steps}
        conditions = {name: emb.config for name, emb in self.conditions.items()}
        meta = {"parameterization": self.parameterization, "prediction_type": self.prediction_type,
                "sampler": self.sampler, "sampler_solver": self.sampler_solver, "extra_conditions": json.dumps(conditions),
                "sigma_data": repr(self.sigma_data), "time_scale": repr(self.time_scale),
                "null_class_label": json.dumps(self.null_class_label), "sampling_grid": self.sampling_grid,
                "schedule": json.dumps(self.schedule.config()), "sampling_timesteps": json.dumps(grids)}
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in self.info.items() if k != "sampling_timesteps"})
        return meta


# metadata keys read back into ``Student.info`` (JSON values)
INFO_JSON_KEYS = ("data_shape", "num_classes", "sampling_search", "lineage", "training_cost", "selection")


def student_from_metadata(net: nn.Module, meta: dict[str, str], field=lambda key: f"the {key!r} metadata field") -> Student:
    """Rebuild the Student wrapper around ``net`` from a student file's metadata; ``field(key)`` names a field in the
    sentence that refuses a schedule or sampling times that are not valid."""
    info = {k: v for k, v in meta.items() if k in ("teacher_hash", "teacher", "conditioning", "root_teacher_hash", "root_teacher")}
    info.update({k: json.loads(meta[k]) for k in INFO_JSON_KEYS if k in meta})
    try:
        schedule = schedule_from_config(json.loads(meta["schedule"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field('schedule')} is not a valid noise schedule ({e})") from None
    timesteps = json.loads(meta["sampling_timesteps"])
    problem = sampling_times_problem(timesteps, schedule)
    if problem:
        raise ValueError(f"{field('sampling_timesteps')} {problem}")
    info["sampling_timesteps"] = timesteps
    student = Student(net, schedule=schedule, prediction_type=meta["prediction_type"],
                      parameterization=meta["parameterization"], sigma_data=float(meta["sigma_data"]),
                      time_scale=float(meta["time_scale"]), null_class_label=json.loads(meta["null_class_label"]),
                      sampling_grid=meta["sampling_grid"], sampler=meta.get("sampler", "consistency"),
                      sampler_solver=meta.get("sampler_solver", "euler"), sampling_steps=sorted(map(int, timesteps)), info=info)
    for name, config in json.loads(meta.get("extra_conditions", "{}")).items():
        student.add_condition(name, config["features"], config["scale"], config.get("default"), config.get("kind"))
    return student


def sampling_times_problem(timesteps, schedule: Schedule) -> str | None:
    """Why ``timesteps`` ({"k": the k times of a k-step sample}) cannot be sampled on ``schedule`` (None if it can): each
    list must hold k finite, decreasing times within [t_min, t_max]."""
    if not isinstance(timesteps, dict) or not timesteps:
        return f"is {json.dumps(timesteps)}; allowed: an object mapping step counts to their times"
    slack = 1e-6 * max(1.0, abs(schedule.t_max))
    for key, times in timesteps.items():
        numbers = isinstance(times, list) and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times)
        if not (key.isdigit() and int(key) >= 1 and numbers and len(times) == int(key) and all(math.isfinite(t) for t in times)):
            return f"gives {key!r} steps the times {json.dumps(times)}; allowed: k >= 1 steps with a list of k finite times"
        if any(t > schedule.t_max + slack or t < schedule.t_min - slack for t in times):
            return (f"gives {key} step(s) the times {times}, outside the schedule's [t_min, t_max] = [{schedule.t_min:g}, "
                    f"{schedule.t_max:g}]; allowed: times within it")
        if any(a <= b for a, b in zip(times, times[1:])):
            return f"gives {key} steps the times {times}; allowed: decreasing times"
    return None
