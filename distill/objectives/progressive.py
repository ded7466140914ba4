"""Progressive distillation (Salimans & Ho, ICLR 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", Algorithm 2): an N-step deterministic student learns to take in one DDIM step what the teacher takes in two.

On the teacher's 2N-step grid t_0 = t_max > t_1 > ... > t_2N = clean (the student's grid is every other point):

    x ~ data,  i ~ U{0, ..., N-1},  eps ~ N(0, I),   z_t = alpha(t) x + sigma(t) eps,  (t, t', t'') = t_{2i, 2i+1, 2i+2}
    z_t'  = DDIM(z_t,  x^(z_t, t),   t -> t')       z_t'' = DDIM(z_t', x^(z_t', t'), t' -> t'')     (teacher, no clip)
    x~ = the x0 for which DDIM(z_t, x0, t -> t'') = z_t''       (Alg. 2, "x~ = (z'' - (s''/s) z) / (a'' - (s''/s) a)")
    x~ = x^(z_t', t')  when t'' is the clean point (the last step goes to the teacher's data prediction)
    L = w(t) || x^_student(z_t, t) - x~ ||^2   (mean over dimensions)

with the DDIM step of ``distill.solvers.common.ddim_step`` (affine in x0, so it is inverted with itself), and the
weights of Sec. 4 / the code's ``mean_loss_weight_type``: ``constant`` (x-MSE), ``snr`` (= eps-MSE, SNR = a^2/s^2),
``snr_trunc`` (max(SNR, 1): "truncated SNR", the paper's default) and ``v_mse`` (SNR + 1, = v-MSE).

The student parameterization is the student network's output: ``x`` (prediction_type ``sample``), ``v``
(``v_prediction``) or ``both`` (the network predicts x and eps, mixed by sigma^2 / (alpha^2 + sigma^2)); ``eps`` is
refused (x = (z - sigma eps) / alpha blows up as alpha -> 0, where a few-step student must predict x). The student
samples with DDIM (``sampler: ode``, ``sampler_solver: euler``) on its own N-point grid, which its file records.
Halving rounds N -> N/2 -> ... chain runs with ``init_from`` and ``teacher: student:<file>`` (scripts/progressive.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.core.grids import GRIDS, make_grid
from distill.engine.config import ConfigError, at_least, choice
from distill.objectives.base import Batch, Network, Objective, register_objective
from distill.objectives.losses import add_noise, alpha_sigma
from distill.solvers.common import ddim_step, grid_points

WEIGHTINGS = ("constant", "snr", "snr_trunc", "v_mse")
PARAMETERIZATIONS = {"x": "sample", "v": "v_prediction", "both": "both", "eps": "epsilon"}  # option -> prediction_type


@dataclass
class ProgressiveOptions:
    student_steps: int = at_least(4, 1)  # N: the student's steps; the teacher takes 2N on the same grid
    grid: str = choice("uniform", GRIDS)  # spacing of the teacher's 2N steps (a student-teacher's own grid wins)
    parameterization: str | None = choice(None, (None, *PARAMETERIZATIONS))  # x | v | both (eps refused); null: the student's
    weighting: str = choice("snr_trunc", WEIGHTINGS)  # loss weight w(t) (Salimans & Ho 2022, Sec. 4)


def teacher_grid(teacher, steps: int, kind: str) -> torch.Tensor:
    """The teacher's ``steps``-step grid ending on the clean point: a student-teacher's recorded sampling times
    (its own grid), otherwise ``kind`` spacing from t_max to t_min with the last point made clean."""
    schedule = teacher.schedule
    recorded = getattr(teacher, "sampling_timesteps", None)
    if recorded is not None:
        ts = recorded(steps)
        return torch.cat([ts, torch.tensor([schedule.t_clean], dtype=torch.float64)])
    return make_grid(schedule, steps, kind, final="direct")


def ddim_inverse(z: torch.Tensor, z_next: torch.Tensor, cur, nxt) -> torch.Tensor:
    """The x0 with ddim_step(z, x0, cur, nxt) = z_next: the step is affine in x0, A z + B x0, so
    x0 = (z_next - step(z, 0)) / step(0, 1) (Salimans & Ho 2022, Alg. 2's x~, with the project's DDIM step)."""
    b = ddim_step(torch.zeros_like(z[:1]), torch.ones_like(z[:1]), cur, nxt)
    return (z_next - ddim_step(z, torch.zeros_like(z), cur, nxt)) / b


@torch.no_grad()
def progressive_target(denoiser, z: torch.Tensor, i: torch.Tensor, grid: torch.Tensor, schedule, cond=None):
    """(x~, z_t'') for states ``z`` at times grid[2 i]: two teacher DDIM steps t -> t' -> t'' (one batched
    denoiser call each, per-sample times) and the student's target x~ (module doc). ``grid`` has 2N + 1 points."""
    pts = grid_points(schedule, grid)
    i = i.cpu()
    t, t1 = grid[2 * i].to(z.device), grid[2 * i + 1].to(z.device)
    x_hat = denoiser(z, t, cond)
    z1 = torch.empty_like(z)
    for k in i.unique().tolist():
        m = (i == k).to(z.device)
        z1[m] = ddim_step(z[m], x_hat[m], pts[2 * k], pts[2 * k + 1])
    x_hat1 = denoiser(z1, t1, cond)
    z2, target = torch.empty_like(z), torch.empty_like(z)
    for k in i.unique().tolist():
        m = (i == k).to(z.device)
        z2[m] = ddim_step(z1[m], x_hat1[m], pts[2 * k + 1], pts[2 * k + 2])
        target[m] = x_hat1[m] if pts[2 * k + 2].clean else ddim_inverse(z[m], z2[m], pts[2 * k], pts[2 * k + 2])
    return target, z2


def loss_weight(kind: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """w(t) on the x-MSE: ``snr`` = eps-MSE, ``snr_trunc`` = max(x-, eps-MSE), ``v_mse`` = v-MSE (Salimans & Ho 2022, Sec. 4)."""
    snr = (alpha / sigma) ** 2
    return {"constant": torch.ones_like(snr), "snr": snr, "snr_trunc": snr.clamp(min=1.0), "v_mse": snr + 1.0}[kind]


def check_parameterization(option: str | None, student) -> str:
    """The student parameterization (x | v | both), refusing eps and a mismatch with the student network."""
    own = next((k for k, v in PARAMETERIZATIONS.items() if v == student.prediction_type), student.prediction_type)
    chosen = own if option is None else option
    if "eps" in (chosen, own):
        raise ConfigError("progressive distillation refuses an eps-parameterized student: x = (z - sigma eps) / alpha "
                          "blows up as alpha -> 0, where a few-step student must predict x from nearly pure noise "
                          "(Salimans & Ho 2022, Sec. 4); use objective.parameterization x, v or both")
    if chosen not in ("x", "v", "both"):
        raise ConfigError(f"progressive distillation needs a student predicting x, v or both, not {own!r}; allowed: x, v, both")
    if PARAMETERIZATIONS[chosen] != student.prediction_type:
        raise ConfigError(f"config key 'objective.parameterization' is {chosen!r} but the student network predicts "
                          f"{student.prediction_type!r} (student.prediction_type, or the teacher's with arch: teacher); "
                          f"set student.prediction_type {PARAMETERIZATIONS[chosen]!r} or objective.parameterization {own!r}")
    return chosen


def check_ode_student(student, name: str) -> None:
    if student.sampler != "ode" or student.sampler_solver != "euler" or student.parameterization != "denoiser":
        raise ConfigError(f"objective {name!r} trains a deterministic DDIM student: set student.sampler 'ode', "
                          f"student.sampler_solver 'euler' and student.parameterization 'denoiser' (got "
                          f"{student.sampler!r}, {student.sampler_solver!r}, {student.parameterization!r})")


@register_objective
class ProgressiveDistillation(Objective):
    name = "progressive"
    needs = frozenset({"teacher", "data"})
    Options = ProgressiveOptions

    def __init__(self, options: ProgressiveOptions, ctx):
        super().__init__(options, ctx)
        self.teacher, self.student, self.schedule = ctx.teacher, ctx.student, ctx.teacher.schedule
        check_ode_student(self.student, self.name)
        self.parameterization = check_parameterization(options.parameterization, self.student)
        n = options.student_steps
        self.grid = teacher_grid(self.teacher, 2 * n, options.grid)  # t_0 > ... > t_2N = clean
        self.student_grid = self.grid[::2]
        # the student's file records its N-step grid (without the clean point) and how it was made
        self.student.sampling_steps = (n,)
        self.student.info["sampling_timesteps"] = {str(n): self.student_grid[:-1].tolist()}
        self.student.info["progressive"] = {"student_steps": n, "teacher_steps": 2 * n, "grid": options.grid,
                                            "parameterization": self.parameterization, "weighting": options.weighting}

    def networks(self) -> list[Network]:
        return [Network("student", self.student)]

    def loss(self, name, nets, batch: Batch):
        x0, n = batch.x0, self.o.student_steps
        i = torch.randint(0, n, (len(x0),), generator=batch.g)
        eps = batch.randn(x0.shape, x0.dtype)
        t = self.grid[2 * i]
        z = add_noise(self.schedule, x0, eps, t)
        target, _ = progressive_target(self.teacher.denoise, z, i, self.grid, self.schedule, batch.cond)
        x_hat = nets["student"](z, t.to(x0.device), batch.cond)
        a, s = alpha_sigma(self.schedule, t, x_hat)
        w = loss_weight(self.o.weighting, a.flatten(), s.flatten())
        return w * (x_hat - target.to(x_hat.dtype)).pow(2).flatten(1).mean(1)
