"""Noise processes x_t = alpha(t) x0 + sigma(t) eps.

Every schedule maps a process time ``t`` (the teacher's native unit: an integer-valued diffusers
timestep for discrete VP, sigma for EDM, ...) to ``alpha(t)``, ``sigma(t)`` and the half log-SNR
``lam(t) = log(alpha / sigma)`` (the lambda of DPM-Solver, Lu et al. 2022, Sec. 3.1), and back with
``t_of_lam``. Time runs from ``t_max`` (noise) down to ``t_min`` (the least noisy time the model was
trained on). The special time ``t_clean`` (< t_min, or equal to it where sigma vanishes there) stands
for clean data: alpha = 1, sigma = 0, lam = +inf. Solvers end a grid on it to return the denoised
sample, as diffusers does with ``final_sigmas_type="zero"`` / ``set_alpha_to_one=True``.

All arithmetic is float64; callers cast coefficients to the sample dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _t64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class Schedule:
    """Base class: subclasses implement ``_log_alpha_sigma`` for t > t_clean and ``_t_of_lam``."""

    kind: str = "base"
    t_min: float
    t_max: float
    t_clean: float

    # -- subclass hooks ---------------------------------------------------------------------------
    def _log_alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _t_of_lam(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        """Plain-data description, enough to rebuild the schedule with ``schedule_from_config``."""
        raise NotImplementedError

    # -- public API -------------------------------------------------------------------------------
    def log_alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        t = _t64(t)
        clean = t <= self.t_clean
        if not bool(clean.any()):  # the common case: no masking needed
            return self._log_alpha_sigma(t)
        log_a, log_s = self._log_alpha_sigma(t.masked_fill(clean, self.t_min))
        return log_a.masked_fill(clean, 0.0), log_s.masked_fill(clean, -math.inf)

    def alpha(self, t) -> torch.Tensor:
        return self.log_alpha_sigma(t)[0].exp()

    def sigma(self, t) -> torch.Tensor:
        return self.log_alpha_sigma(t)[1].exp()

    def lam(self, t) -> torch.Tensor:
        log_a, log_s = self.log_alpha_sigma(t)
        return log_a - log_s

    def t_of_lam(self, lam) -> torch.Tensor:
        lam = _t64(lam)
        clean = torch.isposinf(lam)
        t = self._t_of_lam(torch.where(clean, torch.zeros_like(lam), lam))
        return torch.where(clean, torch.full_like(t, self.t_clean), t)

    def init_noise_scale(self, t) -> torch.Tensor:
        """Scale of x_T for unit-variance noise: sqrt(alpha^2 + sigma^2) (1 for VP and RF, sqrt(1 + sigma^2)
        for EDM/VE), the ``init_noise_sigma`` convention of diffusers' schedulers."""
        return (self.alpha(t) ** 2 + self.sigma(t) ** 2).sqrt()

    def is_clean(self, t) -> torch.Tensor:
        return _t64(t) <= self.t_clean

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k not in ("kind", "trained_betas"))
        return f"{type(self).__name__}({args})"


# ------------------------------------------------------------------------------------------------
# Discrete VP (DDPM): a beta table, exactly as diffusers' DDPMScheduler builds it.
# ------------------------------------------------------------------------------------------------
def _betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = cos^2(((t + s) / (1 + s)) pi / 2), s = 0.008.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        t1, t2 = i / num_train_timesteps, (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def beta_table(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """The float32 beta table diffusers builds for the same arguments (bit-identical)."""
    if trained_betas is not None:
        return torch.tensor(list(trained_betas), dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # the latent-diffusion schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(num_train_timesteps)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; allowed: {', '.join(BETA_SCHEDULES)}")


class DiscreteVP(Schedule):
    """DDPM's discrete VP process (Ho et al. 2020, Eq. 4): alpha_t^2 = prod_{s<=t} (1 - beta_s).

    At integer timesteps ``alphas_cumprod`` equals diffusers' table bit for bit; between them lam is
    interpolated linearly. t_min = 0, t_max = N - 1, and t_clean = -1 (diffusers' ``set_alpha_to_one``).
    """

    kind = "discrete_vp"

    def __init__(
        self,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        trained_betas: Sequence[float] | None = None,
    ):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.trained_betas = None if trained_betas is None else [float(b) for b in trained_betas]
        betas = beta_table(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        if not bool(((betas >= 0) & (betas < 1)).all()):
            raise ValueError(f"the discrete_vp beta table runs from {float(betas.min()):g} to {float(betas.max()):g} "
                             f"(beta_start {beta_start}, beta_end {beta_end}); allowed: betas in [0, 1)")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32, as diffusers
        acp = self.alphas_cumprod.double()
        if not bool((acp > 0).all()):
            raise ValueError("the beta table reaches alphas_cumprod = 0 (zero terminal SNR), which has no finite log-SNR")
        self._log_alpha = 0.5 * acp.log()
        self._log_sigma = 0.5 * torch.log1p(-acp)
        self._lam = self._log_alpha - self._log_sigma  # decreasing in t
        self.t_min, self.t_max, self.t_clean = 0.0, float(num_train_timesteps - 1), -1.0

    def _log_alpha_sigma(self, t):
        t = t.clamp(self.t_min, self.t_max)
        i0 = t.long()  # floor, t >= 0
        w = t - i0
        if not bool(w.any()):  # integer timesteps: the table itself
            return self._log_alpha[i0], self._log_sigma[i0]
        i0 = i0.clamp(max=self.num_train_timesteps - 2)
        w = t - i0
        lam = torch.lerp(self._lam[i0], self._lam[i0 + 1], w)
        return -0.5 * torch.nn.functional.softplus(-2 * lam), -0.5 * torch.nn.functional.softplus(2 * lam)

    def _t_of_lam(self, lam):
        table = self._lam
        lam = lam.clamp(table[-1], table[0])
        idx = torch.searchsorted(-table, -lam.contiguous())  # first i with table[i] <= lam
        i = (idx - 1).clamp(0, self.num_train_timesteps - 2)
        w = (table[i] - lam) / (table[i] - table[i + 1])
        return i + w.clamp(0, 1)

    def config(self):
        return {
            "kind": self.kind,
            "beta_schedule": self.beta_schedule,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "trained_betas": self.trained_betas,
        }


# ------------------------------------------------------------------------------------------------
# Continuous VP
# ------------------------------------------------------------------------------------------------
class VPLinear(Schedule):
    """Continuous VP-SDE with linear beta(t) (Song et al. 2021, Eq. 33); t in [t_min, 1], t_clean = 0."""

    kind = "vp_linear"

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        if not (beta_0 >= 0 and beta_1 >= 0 and beta_0 + beta_1 > 0 and 0 <= t_min < t_max):
            raise ValueError(f"vp_linear schedule with beta_0 {beta_0}, beta_1 {beta_1}, t_min {t_min}, t_max {t_max}; "
                             f"allowed: beta_0 >= 0 and beta_1 >= 0 (not both 0), 0 <= t_min < t_max")
        self.beta_0, self.beta_1 = beta_0, beta_1
        self.t_min, self.t_max, self.t_clean = t_min, t_max, 0.0

    def _log_alpha_sigma(self, t):
        log_a = -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        return log_a, 0.5 * torch.log(-torch.expm1(2 * log_a))

    def _t_of_lam(self, lam):
        # DPM-Solver (Lu et al. 2022), Appendix: closed-form inverse of lambda(t) for the linear schedule.
        tmp = 2 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2 * lam, torch.zeros_like(lam))
        delta = self.beta_0**2 + tmp
        return tmp / (delta.sqrt() + self.beta_0) / (self.beta_1 - self.beta_0)

    def config(self):
        return {"kind": self.kind, "beta_0": self.beta_0, "beta_1": self.beta_1, "t_min": self.t_min, "t_max": self.t_max}


class VPCosine(Schedule):
    """Continuous cosine VP (Nichol & Dhariwal 2021, Eq. 17); t in [t_min, 0.9946] as in DPM-Solver."""

    kind = "vp_cosine"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        self.s = s
        self.t_min, self.t_max, self.t_clean = t_min, t_max, 0.0
        self._log_alpha_0 = math.log(math.cos(s / (1 + s) * math.pi / 2))

    def _log_alpha_sigma(self, t):
        log_a = torch.log(torch.cos((t + self.s) / (1 + self.s) * math.pi / 2)) - self._log_alpha_0
        return log_a, 0.5 * torch.log(-torch.expm1(2 * log_a))

    def _t_of_lam(self, lam):
        log_a = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        return 2 * (1 + self.s) / math.pi * torch.arccos(torch.exp(log_a + self._log_alpha_0)) - self.s

    def config(self):
        return {"kind": self.kind, "s": self.s, "t_min": self.t_min, "t_max": self.t_max}


# ------------------------------------------------------------------------------------------------
# Variance exploding, EDM, rectified flow
# ------------------------------------------------------------------------------------------------
class VE(Schedule):
    """VE-SDE (Song et al. 2021, Eq. 31): alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t for
    t in (0, 1]; t = 0 stands for clean data."""

    kind = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5, t_max: float = 1.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.t_min, self.t_max, self.t_clean = t_min, t_max, 0.0
        self._log_ratio = math.log(sigma_max / sigma_min)

    def _log_alpha_sigma(self, t):
        return torch.zeros_like(t), math.log(self.sigma_min) + t * self._log_ratio

    def _t_of_lam(self, lam):
        return (-lam - math.log(self.sigma_min)) / self._log_ratio

    def config(self):
        return {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "t_min": self.t_min, "t_max": self.t_max}


class EDM(Schedule):
    """EDM (Karras et al. 2022, Table 1): alpha = 1, sigma(t) = t; t in [0.002, 80], t_clean = 0."""

    kind = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_min, self.t_max, self.t_clean = sigma_min, sigma_max, 0.0

    def _log_alpha_sigma(self, t):
        return torch.zeros_like(t), torch.log(t)

    def _t_of_lam(self, lam):
        return torch.exp(-lam)

    def config(self):
        return {"kind": self.kind, "sigma_min": self.t_min, "sigma_max": self.t_max}


class RectifiedFlow(Schedule):
    """Rectified flow (Liu et al. 2022): alpha = 1 - t, sigma = t; t in [t_min, 1], t_clean = 0.

    At t = 1 the state is pure noise and lam = -inf; grids spaced in lam start from ``t_max`` but
    space their other points from lam = ``-lam_floor`` (see ``distill.core.grids``).
    """

    kind = "rectified_flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0):
        self.t_min, self.t_max, self.t_clean = t_min, t_max, 0.0

    def _log_alpha_sigma(self, t):
        return torch.log1p(-t), torch.log(t)

    def _t_of_lam(self, lam):
        return torch.sigmoid(-lam)  # sigma / (alpha + sigma) with alpha / sigma = e^lam

    def config(self):
        return {"kind": self.kind, "t_min": self.t_min, "t_max": self.t_max}


SCHEDULES: dict[str, type[Schedule]] = {
    cls.kind: cls for cls in (DiscreteVP, VPLinear, VPCosine, VE, EDM, RectifiedFlow)
}


def integer_times(schedule) -> bool:
    """Whether ``schedule`` is trained on integer timesteps 0..N-1 (``DiscreteVP``: it has ``num_train_timesteps``)."""
    return getattr(schedule, "num_train_timesteps", None) is not None


def sigma_tilde(schedule, t) -> torch.Tensor:
    """sigma(t) / alpha(t), EDM's sigma (the noise level of x_t / alpha), float64 on the CPU, flattened."""
    log_a, log_s = schedule.log_alpha_sigma(torch.as_tensor(t, dtype=torch.float64).cpu().reshape(-1))
    return (log_s - log_a).exp()


def flow_time(schedule, t) -> torch.Tensor:
    """The rectified-flow time tau = sigma / (alpha + sigma) of process time ``t``: the time with the same log-SNR on
    alpha = 1 - tau, sigma = tau (0 at clean data). In the chart z = x / (alpha + sigma) every schedule's
    probability-flow ODE is the rectified flow's (``distill.solvers.common.chart_scale``)."""
    return torch.sigmoid(-schedule.lam(t))


def time_of_flow(schedule, tau) -> torch.Tensor:
    """The process time whose flow time is ``tau`` (the inverse of ``flow_time``, the identity on a rectified-flow
    schedule), forward-mode differentiable in tau."""
    tau = torch.as_tensor(tau, dtype=torch.float64)
    if schedule.kind == "rectified_flow":
        return tau
    return schedule.t_of_lam(torch.log1p(-tau) - torch.log(tau))  # lam = log(alpha / sigma) = log((1 - tau) / tau)


def trig_time(schedule, t, sigma_data: float) -> torch.Tensor:
    """The TrigFlow time of process time ``t`` (Lu & Song 2024, Sec. 2: x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I)):
    the time with the same log-SNR, sigma_d tan(t) = sigma / alpha, i.e. t = atan2(sigma, alpha sigma_d) in [0, pi/2]
    (pi/2 where alpha = 0). The state is x_trig = x cos(t) / alpha = x sigma_d / sqrt(alpha^2 sigma_d^2 + sigma^2)
    (``trig_scale``); float64."""
    log_a, log_s = schedule.log_alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
    return torch.atan2(log_s.exp(), log_a.exp() * sigma_data)


def time_of_trig(schedule, t, sigma_data: float) -> torch.Tensor:
    """The process time whose TrigFlow time is ``t`` (the inverse of ``trig_time``), forward-mode differentiable in t:
    lam = log(alpha / sigma) = -log(sigma_d tan t)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return schedule.t_of_lam(-math.log(sigma_data) - torch.log(torch.tan(t)))


def trig_scale(schedule, t, sigma_data: float) -> torch.Tensor:
    """x / x_trig = sqrt(alpha^2 sigma_d^2 + sigma^2) / sigma_d at process time ``t`` (``trig_time``): the factor from the
    TrigFlow state to the process state of the same log-SNR, finite where alpha = 0; forward-mode differentiable."""
    log_a, log_s = schedule.log_alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
    return ((2 * log_a).exp() * sigma_data**2 + (2 * log_s).exp()).sqrt() / sigma_data


def schedule_from_config(config: dict) -> Schedule:
    """Rebuild a schedule from ``Schedule.config()`` output."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}; allowed: {', '.join(SCHEDULES)}")
    return SCHEDULES[kind](**config)


def get_schedule(name_or_schedule: str | Schedule) -> Schedule:
    """A schedule by kind name with its default parameters (``vp_linear``, ``edm``, ...), or pass-through."""
    if isinstance(name_or_schedule, Schedule):
        return name_or_schedule
    if name_or_schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {name_or_schedule!r}; allowed: {', '.join(SCHEDULES)}")
    return SCHEDULES[name_or_schedule]()
