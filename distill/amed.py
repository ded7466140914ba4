"""The AMED time predictor and its training (Zhou et al., CVPR 2024; the authors' ``AMED_predictor`` and loss).

The predictor reads the teacher's bottleneck feature at the start of a step (averaged over channels, as the
authors' code does with the U-Net's 8x8 block), plus sinusoidal embeddings of lam at both ends of the step, and
returns r in (0, 1) (where the intermediate evaluation goes) and a direction scale c in [1 - scale_dir, 1 + scale_dir].
Training: teacher trajectories through the same grids, M sub-steps of an accurate solver between grid points; per
step the student's x_next is pulled to the teacher's (squared error summed over pixels, mean over the batch) and the
optimizer steps after every step index; single-step rules restart each step from the teacher's state, the multistep
rule (2M) from its own. One predictor serves every step count it was trained on.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from distill import prepared
from distill.grids import CLEAN_FINALS, make_grid
from distill.solvers import get_solver, per_sample_noise
from distill.solvers.amed import amed_step
from distill.solvers.common import grid_points, t_batch

PLUGIN_RULES = {"amed": "amed", "euler_amed": "euler", "dpmpp_2m_amed": "dpmpp_2m"}
FREQS = (0.05, 0.1, 0.2, 0.4)  # of the lam embeddings (lam spans about -10..10)


def reduce_features(feat: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> the channel mean [B, H * W] (the authors' reduction); anything else -> flattened."""
    return (feat.mean(1) if feat.ndim == 4 else feat).flatten(1).float()


class AmedPredictor(nn.Module):
    def __init__(self, feature_dim: int, hidden: int = 128, scale_dir: float = 0.01, solver: str = "amed",
                 teacher_hash: str = ""):
        super().__init__()
        if solver not in PLUGIN_RULES:
            raise ValueError(f"unknown AMED solver {solver!r}; allowed: {', '.join(PLUGIN_RULES)}")
        self.feature_dim, self.hidden, self.scale_dir = feature_dim, hidden, scale_dir
        self.solver, self.teacher_hash, self.meta = solver, teacher_hash, {}
        self.norm = nn.LayerNorm(feature_dim)
        self.net = nn.Sequential(nn.Linear(feature_dim + 4 * len(FREQS), hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 2))

    @staticmethod
    def _embed(lam: float, batch: int) -> torch.Tensor:
        ang = torch.tensor([lam * f * 2 * math.pi for f in FREQS])
        return torch.cat([ang.sin(), ang.cos()]).expand(batch, -1)

    def forward(self, feat: torch.Tensor, lam_cur: float, lam_next: float) -> tuple[torch.Tensor, torch.Tensor]:
        z = reduce_features(feat).to(self.norm.weight.device)
        if z.shape[1] != self.feature_dim:
            raise ValueError(f"the AMED predictor takes {self.feature_dim} feature values, the teacher gave {z.shape[1]}")
        emb = torch.cat([self._embed(lam_cur, len(z)), self._embed(lam_next, len(z))], 1).to(z.device)
        out = self.net(torch.cat([self.norm(z), emb], 1))
        r = torch.sigmoid(out[:, 0])
        c = 1 + self.scale_dir * torch.tanh(out[:, 1])
        return r.to(feat.device), c.to(feat.device)

    def save(self, path, meta: dict | None = None) -> None:
        info = {"kind": "amed", "teacher_hash": self.teacher_hash, "solver": self.solver, "feature_dim": self.feature_dim,
                "hidden": self.hidden, "scale_dir": self.scale_dir, **(meta or self.meta)}
        prepared.save_tensors(path, dict(self.state_dict()), info)

    @classmethod
    def load(cls, path, teacher=None) -> "AmedPredictor":
        tensors, meta = prepared.load_tensors(path, "amed", teacher)
        model = cls(int(meta["feature_dim"]), int(meta["hidden"]), float(meta["scale_dir"]), meta["solver"], meta["teacher_hash"])
        model.load_state_dict(tensors)
        model.meta = {k: v for k, v in meta.items() if k not in ("kind", "teacher_hash", "solver", "feature_dim", "hidden", "scale_dir")}
        return model.eval().requires_grad_(False)


@dataclass
class AmedConfig:
    solver: str = "amed"  # amed (AMED-Solver), euler_amed, dpmpp_2m_amed (AMED-Plugin)
    nfe: tuple = (2, 4, 6, 8, 10)  # NFEs trained for, one per batch in turn
    grid: str = "uniform"  # the grid kind the sampler will use (as the bench's --grid)
    final: str = "direct"
    batch_size: int = 64
    num_batches: int = 60
    lr: float = 5e-3  # Adam (the authors: 5e-3)
    teacher_solver: str = "unipc"
    teacher_substeps: int = 6  # teacher steps between two grid points, uniform in lam
    hidden: int = 128
    scale_dir: float = 0.01  # the authors' default
    seed: int = 20_000_000  # noise seeds batch_index * batch_size + i, apart from the bench's
    unconditional: bool = False
    save_every: int = 5  # batches between state saves

    def validate(self) -> None:
        if self.solver not in PLUGIN_RULES:
            raise ValueError(f"unknown AMED solver {self.solver!r}; allowed: {', '.join(PLUGIN_RULES)}")
        if self.final not in CLEAN_FINALS:
            raise ValueError(f"final must be one of {', '.join(CLEAN_FINALS)}, got {self.final!r}")
        spec = get_solver(self.solver)
        for n in self.nfe:
            spec.steps_for_nfe(n, True)  # an NFE the solver cannot spend: one clear error


def teacher_states(teacher, x, pts, cond, cfg: AmedConfig) -> list[torch.Tensor]:
    """The teacher's states at every grid point (fine solves between them; into the clean point: to t_min, then D)."""
    out, solver = [x], get_solver(cfg.teacher_solver)
    for cur, nxt in zip(pts[:-1], pts[1:]):
        if nxt.clean:
            sub = make_grid(teacher.schedule, cfg.teacher_substeps, "logsnr", final="clean", t_max=cur.t)
        else:
            sub = make_grid(teacher.schedule, cfg.teacher_substeps, "logsnr", final="t_min", t_max=cur.t, t_min=nxt.t)
        x = solver.fn(teacher.denoise, x, sub, schedule=teacher.schedule, cond=cond)
        out.append(x)
    return out


def train_batch(teacher, predictor, opt, cfg: AmedConfig, b: int) -> float:
    """One batch: teacher states, then a student step per grid step with an optimizer step after each."""
    spec, rule = get_solver(cfg.solver), PLUGIN_RULES[cfg.solver]
    nfe = cfg.nfe[b % len(cfg.nfe)]
    ts = make_grid(teacher.schedule, spec.steps_for_nfe(nfe, True), cfg.grid, final=cfg.final)
    pts = grid_points(teacher.schedule, ts)
    seeds = range(cfg.seed + b * cfg.batch_size, cfg.seed + (b + 1) * cfg.batch_size)
    dtype = torch.float64 if hasattr(teacher, "sample_data") else torch.float32
    x = per_sample_noise(teacher.data_shape, seeds, dtype) * float(teacher.schedule.init_noise_scale(ts[0]))
    cond = None
    if teacher.num_classes:
        cond = torch.full((len(x),), -1) if cfg.unconditional else torch.tensor(list(seeds)) % teacher.num_classes
    with torch.no_grad():
        target = teacher_states(teacher, x, pts, cond, cfg)
    losses, hist, x_s = [], [], target[0]
    for k, (cur, nxt) in enumerate(zip(pts[:-1], pts[1:])):
        with torch.no_grad():
            d, feat = teacher.denoise(x_s, t_batch(cur, x_s), cond, return_features=True)
        x_next, hist = amed_step(teacher.denoise, x_s, d, feat, cur, nxt, hist, schedule=teacher.schedule, cond=cond,
                                 amed=predictor, rule=rule)
        loss = (x_next - target[k + 1]).float().pow(2).flatten(1).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in predictor.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)  # the authors zero non-finite gradients
        opt.step()
        losses.append(float(loss.detach()))
        hist = [(lam.detach() if torch.is_tensor(lam) else lam, v.detach()) for lam, v in hist]
        x_s = target[k + 1] if rule in ("amed", "euler") else x_next.detach()
    return sum(losses) / max(len(losses), 1)


def feature_dim(teacher) -> int:
    x = torch.zeros(1, *teacher.data_shape, dtype=torch.float64 if hasattr(teacher, "sample_data") else torch.float32)
    with torch.no_grad():
        _, feat = teacher.denoise(x, teacher.schedule.t_max, None if not teacher.num_classes else torch.zeros(1).long(),
                                  return_features=True)
    return reduce_features(feat).shape[1]


def train_amed(teacher, cfg: AmedConfig, state_path=None, progress: bool = True, log=print) -> AmedPredictor:
    """Train (or finish training) a predictor; the state (predictor, optimizer, batch index, minutes) is saved every
    ``save_every`` batches to ``state_path`` and a rerun continues from it (another teacher's or settings' is refused)."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    predictor = AmedPredictor(feature_dim(teacher), cfg.hidden, cfg.scale_dir, cfg.solver, teacher.hash)
    opt = torch.optim.Adam(predictor.parameters(), lr=cfg.lr)
    key = {"teacher_hash": teacher.hash, "config": json.loads(json.dumps(asdict(cfg)))}
    start, minutes, state_path = 0, 0.0, None if state_path is None else Path(state_path)
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["key"]["teacher_hash"] != teacher.hash:
            raise ValueError(f"AMED state {state_path} belongs to teacher {state['key']['teacher_hash'][:12]}, not "
                             f"{teacher.name!r} ({teacher.hash[:12]}); give another --out or delete it")
        if state["key"] != key:
            raise ValueError(f"AMED state {state_path} was made with settings {state['key']['config']}; rerun with them or delete it")
        predictor.load_state_dict(state["predictor"])
        opt.load_state_dict(state["optimizer"])
        start, minutes = state["batch"], state["minutes"]
        torch.set_rng_state(state["rng"])
    clock = time.perf_counter()
    bar = tqdm(range(start, cfg.num_batches), initial=start, total=cfg.num_batches, desc="AMED", disable=not progress)
    for b in bar:
        loss = train_batch(teacher, predictor, opt, cfg, b)
        bar.set_postfix(loss=f"{loss:.4g}")
        if state_path is not None and ((b + 1) % cfg.save_every == 0 or b + 1 == cfg.num_batches):
            now = time.perf_counter()
            minutes, clock = minutes + (now - clock) / 60, now
            state = {"key": key, "predictor": predictor.state_dict(), "optimizer": opt.state_dict(), "batch": b + 1,
                     "minutes": minutes, "rng": torch.get_rng_state()}
            state_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, state_path.with_name(state_path.name + ".tmp"))
            os.replace(state_path.with_name(state_path.name + ".tmp"), state_path)
    if state_path is None:
        minutes += (time.perf_counter() - clock) / 60
    predictor.meta = {"minutes": f"{minutes:.2f}", "config": json.dumps(asdict(cfg)), "teacher": teacher.name}
    return predictor.eval().requires_grad_(False)
