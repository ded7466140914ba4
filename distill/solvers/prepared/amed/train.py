"""Training of the AMED time predictor (Zhou et al., CVPR 2024; the authors' loss): teacher trajectories through the
same grids, M sub-steps of an accurate solver between grid points; per step the student's x_next is pulled to the
teacher's and the optimizer steps after every step index (see ``distill.solvers.prepared.amed.predictor``)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from distill.core.atomic import write_with
from distill.core.grids import CLEAN_FINALS, make_grid
from distill.core.safe_files import load_weights_only
from distill.solvers import get_solver, per_sample_noise
from distill.solvers.common import grid_points, t_batch
from distill.solvers.prepared.amed.predictor import PLUGIN_RULES, AmedPredictor, reduce_features
from distill.solvers.prepared.amed.solver import amed_step


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
        counts = {"num_batches": self.num_batches, "batch_size": self.batch_size, "save_every": self.save_every,
                  "teacher_substeps": self.teacher_substeps, "hidden": self.hidden}
        small = [f"{k} (--{k.replace('_', '-')}) is {v}" for k, v in counts.items() if v < 1]
        if small:  # num_batches 0 would write an untrained predictor
            raise ValueError(f"AMED setting {' and '.join(small)}; allowed: at least 1 for each of {', '.join(counts)} "
                             "(no batch: an untrained predictor)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr is {self.lr}; allowed: a finite number > 0")
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
        state = load_weights_only(state_path, "AMED state")  # tensors and plain data only: a pickle runs no code
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
            write_with(state_path, lambda tmp: torch.save(state, tmp))  # atomic (distill.core.atomic)
    if state_path is None:
        minutes += (time.perf_counter() - clock) / 60
    predictor.meta = {"minutes": f"{minutes:.2f}", "config": json.dumps(asdict(cfg)), "teacher": teacher.name}
    return predictor.eval().requires_grad_(False)
