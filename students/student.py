"""A student: a network plus the parameterization that maps (x_t, t) to a sample (DESIGN.md, contract 5).

``parameterization="consistency"``: f(x, t) = c_skip(t) x + c_out(t) D_theta(x, t) with, in the EDM chart
sigma~ = sigma / alpha and s = sigma~(t) - sigma~(t_min),

    c_skip = sigma_data^2 / (s^2 + sigma_data^2),    c_out = s / sqrt(s^2 + sigma_data^2),

Song et al. (2023), Eq. 9 / App. C, written as in LCM (Luo et al. 2023) for a network whose output is
converted to a data prediction D_theta: c_skip(t_min) = 1 and c_out(t_min) = 0, so f(x, t_min) = x exactly
(the boundary condition), and f -> D_theta at high noise. ``parameterization="denoiser"``: f = D_theta.

``sample(noise, steps)`` is multistep consistency sampling (Song et al. 2023, Algorithm 1): x = f(x_T, T);
then for each further time tau, re-noise x_tau = alpha(tau) x + sigma(tau) z and apply f again.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from distill.grids import make_grid
from distill.param import append_dims, to_x0
from distill.schedules import Schedule, schedule_from_config

PARAMETERIZATIONS = ("consistency", "denoiser")
MAX_SAMPLING_STEPS = 4


class Student(nn.Module):
    def __init__(self, net: nn.Module, *, schedule: Schedule, prediction_type: str = "sample",
                 parameterization: str = "consistency", sigma_data: float = 0.5, time_scale: float = 1.0,
                 null_class_label: int | None = None, sampling_grid: str = "karras", info: dict | None = None):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; allowed: {', '.join(PARAMETERIZATIONS)}")
        self.net, self.schedule = net, schedule
        self.prediction_type, self.parameterization = prediction_type, parameterization
        self.sigma_data, self.time_scale, self.null_class_label = sigma_data, time_scale, null_class_label
        self.sampling_grid = sampling_grid
        self.info = dict(info or {})  # teacher hash, data shape, ... (strings in the saved metadata)
        self._sigma_tilde_min = float(self._sigma_tilde(torch.tensor([schedule.t_min]))[0])

    # -- the map (x_t, t) -> sample ------------------------------------------------------------------
    def _labels(self, cond, x):
        if cond is None or self.null_class_label is None:
            return cond
        cond = cond.to(x.device)
        return torch.where(cond < 0, torch.full_like(cond, self.null_class_label), cond)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """D_theta(x, t): the network output converted to a data prediction."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        dtype = next(self.net.parameters()).dtype  # run the network in its own dtype (e.g. float64 noise in a bench)
        out = self.net(x.to(dtype), (t * self.time_scale).to(dtype), class_labels=self._labels(cond, x))
        out = getattr(out, "sample", out).to(x.dtype)
        log_a, log_s = self.schedule.log_alpha_sigma(t.cpu())
        return to_x0(out, self.prediction_type, x, log_a.exp().to(x.device), log_s.exp().to(x.device))

    def _sigma_tilde(self, t: torch.Tensor) -> torch.Tensor:
        log_a, log_s = self.schedule.log_alpha_sigma(torch.as_tensor(t, dtype=torch.float64).cpu())
        return (log_s - log_a).exp()

    def boundary(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) at process times ``t`` [B], float64."""
        s = self._sigma_tilde(t) - self._sigma_tilde_min
        sd2 = self.sigma_data**2
        return sd2 / (s**2 + sd2), s / (s**2 + sd2).sqrt()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        d = self.denoise(x, t, cond)
        if self.parameterization == "denoiser":
            return d
        c_skip, c_out = self.boundary(t)
        return append_dims(c_skip, x.ndim).to(x) * x + append_dims(c_out, x.ndim).to(x) * d

    # -- sampling ---------------------------------------------------------------------------------------
    def sampling_timesteps(self, steps: int) -> torch.Tensor:
        """The ``steps`` decreasing times of a ``steps``-step sample, starting at t_max."""
        stored = self.info.get("sampling_timesteps", {}).get(str(steps))
        if stored is not None:
            return torch.tensor(stored, dtype=torch.float64)
        return make_grid(self.schedule, steps, self.sampling_grid, final="t_min")[:steps]

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int = 1, cond: torch.Tensor | None = None,
               generator: torch.Generator | None = None, timesteps=None) -> torch.Tensor:
        """Multistep consistency sampling from standard-normal ``noise`` (see the module doc)."""
        ts = self.sampling_timesteps(steps) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.float64)
        x = noise * float(self.schedule.init_noise_scale(ts[0]))
        for i, t in enumerate(ts):
            if i > 0:
                z = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
                x = float(self.schedule.alpha(t)) * x + float(self.schedule.sigma(t)) * z
            x = self(x, torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device), cond)
        return x

    # -- what a student file records -------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        grids = {str(k): self.sampling_timesteps(k).tolist() for k in range(1, MAX_SAMPLING_STEPS + 1)}
        meta = {"parameterization": self.parameterization, "prediction_type": self.prediction_type,
                "sigma_data": repr(self.sigma_data), "time_scale": repr(self.time_scale),
                "null_class_label": json.dumps(self.null_class_label), "sampling_grid": self.sampling_grid,
                "schedule": json.dumps(self.schedule.config()), "sampling_timesteps": json.dumps(grids)}
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in self.info.items() if k != "sampling_timesteps"})
        return meta


def student_from_metadata(net: nn.Module, meta: dict[str, str]) -> Student:
    """Rebuild the Student wrapper around ``net`` from a student file's metadata."""
    info = {k: v for k, v in meta.items() if k in ("teacher_hash", "teacher")}
    info.update({k: json.loads(meta[k]) for k in ("data_shape", "num_classes", "sampling_search") if k in meta})
    info["sampling_timesteps"] = json.loads(meta["sampling_timesteps"])
    return Student(net, schedule=schedule_from_config(json.loads(meta["schedule"])), prediction_type=meta["prediction_type"],
                   parameterization=meta["parameterization"], sigma_data=float(meta["sigma_data"]),
                   time_scale=float(meta["time_scale"]), null_class_label=json.loads(meta["null_class_label"]),
                   sampling_grid=meta["sampling_grid"], info=info)
