"""Knowledge distillation of a teacher's deterministic sampler (Luhman & Luhman 2021, "Knowledge Distillation in Iterative
Generative Models for Improved Sampling Speed"): the "denoising student" maps the initial noise x_T of a teacher ODE solve
to the solve's output x_0 in one step, by regression on the (x_T, x_0) pairs:

    L = d( D_student(x_T, t_max), x_0 )        (their Eq. 11 with d = l2: the student's one DDIM step to clean data)

``steps: K > 1``: the teacher's trajectory is cut into K segments (K + 1 of its grid points, evenly spread, first and
last included, as reflow's phases) and each is regressed on its own from the teacher's state z_s at its start (teacher
forcing, no student rollout): L = d( DDIM(z_s, D_student(z_s, s), s -> e), z_e ), the student's one step against the
teacher's state at the segment's end, so that the student samples with one DDIM step per segment (the times its file
records). K = 1 is the paper's loss. The pairs come from a trajectory cache made with ``--final clean``
(``source: trajectories``; the paper draws an offline set of 1.024M DDIM pairs) or from a teacher solve of fresh noise
at every step (``source: online``: ``solver`` at ``nfe`` on a ``grid``, ending on clean data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.core.grids import GRIDS, make_grid
from distill.engine.config import ConfigError, at_least, choice
from distill.objectives.base import Batch, Network, Objective, register_objective
from distill.objectives.losses import DISTANCES, distance
from distill.objectives.progressive import check_ode_student
from distill.objectives.reflow import phase_bounds
from distill.solvers import SOLVERS, get_solver, sample
from distill.solvers.common import ddim_step, grid_points

SOURCES = ("trajectories", "online")


@dataclass
class KDOptions:
    source: str = choice("trajectories", SOURCES)  # a trajectory cache (--final clean), or teacher solves every step
    steps: int = at_least(1, 1)  # K: the student's steps, one per segment of the teacher's trajectory (1: the paper's)
    distance: str = choice("l2", DISTANCES)  # l2: the paper's Eq. 11 (mean over dimensions); huber / pseudo_huber
    huber_c: float | None = None  # c of huber (null: 0.001) or pseudo_huber (null: 0.00054 sqrt(data dimension))
    solver: str = choice("heun", sorted(SOLVERS))  # source online: the teacher's solver
    nfe: int = at_least(35, 1)  # source online: its network evaluations per sample
    grid: str = choice("logsnr", GRIDS)  # source online: the spacing of its grid


@register_objective
class KnowledgeDistillation(Objective):
    name = "kd"
    needs = frozenset({"trajectories"})
    Options = KDOptions
    cache_keys = ("noise", "sample", "label")

    def __init__(self, options: KDOptions, ctx):
        super().__init__(options, ctx)
        self.teacher, self.student, self.schedule = ctx.teacher, ctx.student, ctx.teacher.schedule
        check_ode_student(self.student, self.name)
        self.ts = self._grid(options, ctx.cache)
        grid = "the trajectory cache" if options.source == "trajectories" else "the online solver's grid"
        self.bounds = phase_bounds(len(self.ts), options.steps, "steps", grid)
        self.points = grid_points(self.schedule, self.ts)
        if options.steps > 1:
            self.cache_keys = ("states", "label")
        self.student.sampling_steps = (options.steps,)
        self.student.info["sampling_timesteps"] = {str(options.steps): [float(self.ts[i]) for i in self.bounds[:-1]]}
        self.student.info["kd"] = {"steps": options.steps, "source": options.source, "distance": options.distance,
                                   "teacher_solver": options.solver if ctx.cache is None else ctx.cache.manifest.get("solver"),
                                   "teacher_nfe": options.nfe if ctx.cache is None else ctx.cache.manifest.get("nfe")}

    def _grid(self, o: KDOptions, cache) -> torch.Tensor:
        """The teacher's grid, ending on clean data: the cache's, or the online solver's."""
        if o.source == "online":
            if cache is not None:
                raise ConfigError("objective.source is 'online' (the teacher solves fresh noise every step) but config key "
                                  "'trajectories' names a cache; set it to null, or set objective.source 'trajectories'")
            self.needs = frozenset({"teacher"})
            return make_grid(self.schedule, get_solver(o.solver).steps_for_nfe(o.nfe, True), o.grid, final="clean")
        if cache is None:
            raise ConfigError("objective 'kd' with source 'trajectories' regresses a trajectory cache: set config key "
                              "'trajectories' to a cache made by scripts/make_trajectories.py --final clean with this teacher")
        if float(cache.ts[-1]) > self.schedule.t_clean:
            raise ConfigError(f"trajectory cache {str(cache.folder)!r} ends at t = {float(cache.ts[-1]):g}, not on clean data; "
                              f"make it with scripts/make_trajectories.py --final clean")
        return cache.ts

    def networks(self) -> list[Network]:
        # the official training.py (CIFAR-10, CelebA settings): Adam betas (0.9, 0.98), no weight decay
        return [Network("student", self.student, betas=(0.9, 0.98), weight_decay=0.0)]

    @torch.no_grad()
    def prepare(self, batch: Batch, nets) -> Batch:
        """source online: solve the teacher's ODE from fresh noise and keep its states at the segment bounds."""
        if self.o.source != "online":
            return batch
        noise = batch.randn((batch.size, *self.teacher.data_shape))
        classes = self.student.info.get("num_classes") or 0
        if batch.cond is None and classes:  # a class-conditional student without data: a random class per sample
            batch.cond = torch.randint(0, classes, (batch.size,), generator=batch.g).to(batch.device)
        states: dict[int, torch.Tensor] = {}

        def keep(info):
            if info["i"] in self.bounds:
                states[info["i"]] = info["x"].clone()

        x0 = sample(self.teacher, noise, solver=self.o.solver, timesteps=self.ts[:-1], final="clean", cond=batch.cond,
                    callback=keep)
        states[len(self.ts) - 1] = x0
        batch.extra["states"] = torch.stack([states[i] for i in self.bounds], 1)
        return batch

    def boundary_states(self, batch: Batch) -> torch.Tensor:
        """[B, K + 1, ...]: the teacher's states at the K + 1 segment bounds (x_T first, x_0 last)."""
        if self.o.source == "online":
            return batch.extra["states"]
        traj = batch.traj
        if self.o.steps == 1:
            x_T = traj["noise"] * float(self.schedule.init_noise_scale(self.ts[0]))
            return torch.stack([x_T, traj["sample"]], 1)
        return traj["states"][:, self.bounds]

    def loss(self, name, nets, batch: Batch):
        states = self.boundary_states(batch).to(batch.device)
        k = torch.randint(0, self.o.steps, (len(states),), generator=batch.g)
        rows, bounds = torch.arange(len(states)), torch.tensor(self.bounds)
        z_s, z_e = states[rows, k], states[rows, k + 1]
        d = nets["student"](z_s, self.ts[bounds[k]].to(batch.device), batch.cond)  # one call: DDP sees one forward
        pred = torch.empty_like(z_s)
        for kk in k.unique().tolist():  # the DDIM step is affine in D: per segment, no further network call
            m = (k == kk).to(batch.device)
            pred[m] = ddim_step(z_s[m], d[m], self.points[self.bounds[kk]], self.points[self.bounds[kk + 1]])
        return distance(pred, z_e, self.o.distance, self.o.huber_c)  # Luhman & Luhman 2021, Eq. 11 (l2) for K = 1
