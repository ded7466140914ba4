"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al. 2023, Sec. 3.2) for any teacher.

On a uniform grid of lam = log(alpha / sigma) from lam(t_max) to lam(t_min), with data x0 noised by the forward
process (x = alpha x0 + sigma z, as the authors' EMS script), per data dimension:
  l   = E[sigma v * (d eps / dx . v)]            Hutchinson estimate of diag(sigma d eps / dx), Rademacher v (Eq. 13)
  l_d = dl/dlam                                   central differences, then a moving average of half-width ``smooth``
  f   = (sigma eps - l x) / alpha,  f_d = e^{-lam} ((l - 1) eps + d eps / dlam) - l_d x / alpha   (df/dlam on the ODE)
  s, b = the per-dimension least squares f_d ~ s f + b (Eq. 14)
where d eps / dlam along the ODE is one forward-mode JVP with tangent (dx/dlam, 1), dx/dlam = (dlog alpha/dlam) x
- sigma eps. The same x0, z and v serve every grid point (common random numbers), so differences in lam see no
sampling noise. The work is split into units (one pass over the samples at one grid point), each saved to a
state file as it ends, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from distill.core.atomic import write_with
from distill.core.safe_files import load_weights_only
from distill.solvers.prepared.dpm_v3.solver import EMS


@dataclass
class EmsConfig:
    n_lams: int = 40  # grid intervals: n_lams + 1 points, uniform in lam
    num_samples: int = 512  # data points (the paper: 4096)
    batch_size: int = 128
    smooth: int = 5  # half-width of the moving average of l_d (the authors' script: 5)
    seed: int = 0  # data subset, noise z and probes v

    def validate(self) -> None:
        if self.n_lams < 2 or self.num_samples < 2 or self.batch_size < 1 or self.smooth < 0:
            raise ValueError(f"need n_lams >= 2, num_samples >= 2, batch_size >= 1, smooth >= 0; got {asdict(self)}")


def lam_grid(schedule, n_lams: int) -> torch.Tensor:
    lo, hi = float(schedule.lam(schedule.t_max)), float(schedule.lam(schedule.t_min))
    if not (torch.isfinite(torch.tensor([lo, hi])).all()):
        raise ValueError("EMS need a finite log-SNR at t_max and t_min")
    # the ends pulled inside by 1e-9 of the range: at exactly t_max / t_min the schedule's clamps make every
    # derivative in lam zero (one-sided), which turned s and b at t_max into 1e5-sized noise on mnist16's schedule
    pad = 1e-9 * (hi - lo)
    return torch.linspace(lo + pad, hi - pad, n_lams + 1, dtype=torch.float64)


def _sdpa_math():
    """Forward-mode AD has no rule for the fused CPU attention kernel; the math kernel is plain ops."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:
        return contextlib.nullcontext()


def eps_function(denoiser, schedule, cond):
    """(x, lam [B]) -> eps, differentiable in both (forward mode)."""

    def eps(x, lam):
        t = schedule.t_of_lam(lam)
        log_a, log_s = schedule.log_alpha_sigma(t)
        shape = (-1,) + (1,) * (x.ndim - 1)
        a, s = log_a.exp().reshape(shape).to(x.dtype), log_s.exp().reshape(shape).to(x.dtype)
        return (x - a * denoiser(x, t, cond)) / s

    return eps


def _dlog_alpha_dlam(schedule, lam: float) -> float:
    fn = lambda v: schedule.log_alpha_sigma(schedule.t_of_lam(v))[0]  # noqa: E731
    return float(torch.func.jvp(fn, (torch.tensor(lam, dtype=torch.float64),), (torch.tensor(1.0, dtype=torch.float64),))[1])


class EmsRun:
    """The EMS of one teacher: ``run()`` does the units not yet in the state file and returns the ``EMS``."""

    def __init__(self, denoiser, schedule, x0, cond, cfg: EmsConfig, *, teacher_hash: str, state_path=None,
                 device: str = "cpu"):
        cfg.validate()
        self.denoiser, self.schedule, self.cfg, self.device = denoiser, schedule, cfg, device
        self.teacher_hash, self.state_path = teacher_hash, None if state_path is None else Path(state_path)
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(len(x0), generator=g)[: cfg.num_samples]
        if len(idx) < cfg.num_samples:
            raise ValueError(f"num_samples {cfg.num_samples} exceeds the {len(x0)} data points given")
        self.x0, self.cond = x0[idx].float(), None if cond is None else cond[idx]
        self.z = torch.randn(self.x0.shape, generator=g)
        self.v = torch.randint(0, 2, self.x0.shape, generator=g).float() * 2 - 1
        self.lams = lam_grid(schedule, cfg.n_lams)
        self.state = self._load_state()

    # -- state ----------------------------------------------------------------------------------------
    def _key(self) -> dict:
        return {"teacher_hash": self.teacher_hash, "config": asdict(self.cfg)}

    def _load_state(self) -> dict:
        if self.state_path is None or not self.state_path.is_file():
            return {**self._key(), "l": {}, "sb": {}}
        state = load_weights_only(self.state_path, "EMS state")  # tensors and plain data only: a pickle runs no code
        if state.get("teacher_hash") != self.teacher_hash:
            raise ValueError(f"EMS state {self.state_path} belongs to teacher {str(state.get('teacher_hash'))[:12]}, "
                             f"not {self.teacher_hash[:12]}; give another --out or delete it")
        if state.get("config") != asdict(self.cfg):
            raise ValueError(f"EMS state {self.state_path} was made with settings {state.get('config')}, not "
                             f"{asdict(self.cfg)}; rerun with those settings or delete it")
        return state

    def _save_state(self) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_with(self.state_path, lambda tmp: torch.save(self.state, tmp))  # atomic (distill.core.atomic)

    # -- units ----------------------------------------------------------------------------------------
    def _batches(self):
        n, bs = len(self.x0), self.cfg.batch_size
        for start in range(0, n, bs):
            sl = slice(start, min(start + bs, n))
            cond = None if self.cond is None else self.cond[sl].to(self.device)
            yield self.x0[sl].to(self.device), self.z[sl].to(self.device), self.v[sl].to(self.device), cond

    def _coefficients(self, lam: float):
        t = self.schedule.t_of_lam(torch.tensor(lam, dtype=torch.float64))
        log_a, log_s = self.schedule.log_alpha_sigma(t)
        return float(log_a.exp()), float(log_s.exp())

    def l_at(self, j: int) -> torch.Tensor:
        """l at grid point j: mean over the samples of sigma v * (d eps/dx . v) (one JVP per batch)."""
        lam = float(self.lams[j])
        a, s = self._coefficients(lam)
        total = torch.zeros(self.x0.shape[1:], dtype=torch.float64)
        for x0, z, v, cond in self._batches():
            x, lam_b = a * x0 + s * z, torch.full((len(x0),), lam, dtype=torch.float64, device=x0.device)
            _, jv = torch.func.jvp(eps_function(self.denoiser, self.schedule, cond), (x, lam_b), (v, torch.zeros_like(lam_b)))
            total += (s * v * jv).double().sum(0).cpu()
        return total / len(self.x0)

    def sb_at(self, j: int, l: torch.Tensor, l_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s, b at grid point j by least squares of f_d on f over the samples."""
        lam = float(self.lams[j])
        a, s = self._coefficients(lam)
        dlog_a = _dlog_alpha_dlam(self.schedule, lam)
        sums = torch.zeros((4, *self.x0.shape[1:]), dtype=torch.float64)
        l_j, ld_j = l[j].to(self.device), l_d[j].to(self.device)
        for x0, z, _, cond in self._batches():
            x, lam_b = a * x0 + s * z, torch.full((len(x0),), lam, dtype=torch.float64, device=x0.device)
            fn = eps_function(self.denoiser, self.schedule, cond)
            with torch.no_grad():
                eps = fn(x, lam_b)
            x_dot = (dlog_a * x - s * eps).to(x.dtype)  # dx/dlam on the ODE
            eps, eps_dot = torch.func.jvp(fn, (x, lam_b), (x_dot, torch.ones_like(lam_b)))
            eps, eps_dot, xd = eps.double(), eps_dot.double(), x.double()
            f = (s * eps - l_j * xd) / a
            f_d = (s / a) * ((l_j - 1) * eps + eps_dot) - ld_j * xd / a
            sums += torch.stack([f.sum(0), f_d.sum(0), (f * f).sum(0), (f * f_d).sum(0)]).cpu()
        m_f, m_fd, m_ff, m_ffd = sums / len(self.x0)
        var, cov = m_ff - m_f**2, m_ffd - m_f * m_fd
        s_j = cov / var.clamp(min=1e-12)
        return s_j, m_fd - s_j * m_f

    # -- the run --------------------------------------------------------------------------------------
    def l_derivative(self, l: torch.Tensor) -> torch.Tensor:
        """dl/dlam by central differences (second-order one-sided at the ends), then a moving average of half-width ``smooth``."""
        d = torch.empty_like(l)
        dl = self.lams[1] - self.lams[0]
        d[1:-1] = (l[2:] - l[:-2]) / (2 * dl)
        d[0] = (-3 * l[0] + 4 * l[1] - l[2]) / (2 * dl)  # second-order one-sided at the ends
        d[-1] = (3 * l[-1] - 4 * l[-2] + l[-3]) / (2 * dl)
        k = self.cfg.smooth
        if k == 0:
            return d
        return torch.stack([d[max(0, j - k): j + k + 1].mean(0) for j in range(len(d))])

    def run(self, progress: bool = True) -> EMS:
        n = len(self.lams)
        units = [("l", j) for j in range(n)] + [("sb", j) for j in range(n)]
        todo = [u for u in units if u[1] not in self.state[u[0]]]
        l = l_d = None
        clock = time.perf_counter()
        with _sdpa_math(), tqdm(total=len(units), initial=len(units) - len(todo), desc="EMS", disable=not progress) as bar:
            for kind, j in todo:
                if kind == "l":
                    self.state["l"][j] = self.l_at(j)
                else:
                    if l is None:
                        l = torch.stack([self.state["l"][i] for i in range(n)])
                        l_d = self.l_derivative(l)
                    self.state["sb"][j] = self.sb_at(j, l, l_d)
                now = time.perf_counter()
                self.state["minutes"] = self.state.get("minutes", 0.0) + (now - clock) / 60  # preparation cost, all runs
                clock = now
                self._save_state()
                bar.update(1)
        l = torch.stack([self.state["l"][i] for i in range(n)])
        s, b = (torch.stack([self.state["sb"][i][k] for i in range(n)]) for k in (0, 1))
        return EMS(self.lams, l, s, b, self.teacher_hash, {"config": asdict(self.cfg)})
