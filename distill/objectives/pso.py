"""Fine-tuning distilled students: PSO, Pairwise Sample Optimization (Miao et al., ICLR 2025), offline and online,
and the naive baseline (``finetune``). Notes on the released code: ``../shared/ALGORITHMS.md`` section 7.

The reference model p_ref is the student as it was at step 0: with LoRA (config ``lora:``, the default of the
shipped configs) the same network with its adapters disabled (``distill.engine.roles.lora_disabled``); with full
fine-tuning a frozen copy (a checkpointed helper, so a resumed run keeps the step-0 weights).

``pso`` (offline): a target set (config ``dataset`` + ``dataset_options``) and ``num_references`` reference samples
x^rho drawn once from the student at step 0 (``reference_steps`` steps, seed ``reference_seed``; kept in the
checkpointed helper ``references``, the k-th with label k mod K for a K-class student). Each target x^tau is paired
with a random reference of its label; the pair shares the noise z and a time t drawn from the student's own
``grid_steps``-step sampling times. With the per-sample x0 loss L(x) = w(t) ||f(alpha x + sigma z, t) - x||^2
(mean over dimensions; w = alpha^2 / sigma^2, the sigma~^-2 EDM weight of the paper's code, or 1), d =
``ref_weight``:

    logistic:  logits = (L_ref(tau) - d L_ref(rho)) - (L_theta(tau) - d L_theta(rho)),  loss = -log sigmoid(beta logits)
    hinge:     logits = -(L_theta(tau) - d L_theta(rho)),  loss = relu(1 - beta logits)
    both:      + prior_weight L_theta(rho) (the released code adds it to pso and pso_db alike; before 0.3: hinge only)

(the logistic loss is the PSO objective L_PSO of Miao et al. 2025 in the diffusion-loss form of their released
``train_pso_sdxl_turbo_dreambooth.py``; the hinge is that code's ``pso_db``, which calls no reference network. The
paper's equation numbers were not checked: its full text was out of reach, see ALGORITHMS.md 7 and 13).

``pso_online``: for each conditioning, two stochastic ``steps``-step trajectories of the current student's
consistency sampler, x_{k+1} = alpha_{k+1} f(x_k, t_k) + sigma_{k+1} z, ranked by a reward (``distill.objectives.rewards``).
Each re-noising transition is Gaussian, log p(x_{k+1} | x_k) = log N(x_{k+1}; alpha_{k+1} f(x_k, t_k),
sigma_{k+1}^2 I) averaged over dimensions; per transition r = clip(p_theta / p_ref, 1 - eps, 1 + eps) and
loss = -log sigmoid(beta (log r_win - log r_lose)), averaged over the steps - 1 stochastic transitions (ties: 0).

``finetune``: the naive baseline, the target half of ``pso`` alone, loss = L_theta(tau) (at the same grid times
and weights by default, or ``time_sampling: uniform`` for the plain diffusion loss over all times).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.engine.config import ConfigError, at_least, choice
from distill.engine.roles import lora_disabled
from distill.objectives.base import Batch, Network, Objective, register_objective, unwrap
from distill.objectives.diffusion import sample_times
from distill.objectives.losses import alpha_sigma, denoising_loss
from distill.objectives.rewards import CLASSIFIER_CLASSES, REWARDS, get_reward

LOSSES = ("logistic", "hinge")
WEIGHTINGS = ("snr", "uniform")
TIME_SAMPLINGS = ("grid", "uniform")
DEFAULT_BETA = {"logistic": 200.0, "hinge": 5.0}  # the released code's (pso_dog.sh: pso_db beta 5)


# -- shared pieces ------------------------------------------------------------------------------------------
def inherit_sampling_times(student) -> None:
    """A fine-tuned student samples at its parent's times: copy the ``init_from`` file's stored sampling times."""
    lineage = student.info.get("lineage") or {}
    if not lineage.get("init_from"):
        return
    import json

    from distill.engine.export import read_student_file

    meta = read_student_file(lineage["init_from"])[1]
    stored = json.loads(meta.get("sampling_timesteps", "{}"))
    student.info["sampling_timesteps"] = {k: v for k, v in stored.items() if int(k) in student.sampling_steps}


def loss_weight(schedule, t: torch.Tensor, like: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t) [B]: alpha^2 / sigma^2 (``snr``: the paper's sigma~^-2, i.e. the epsilon-MSE) or 1 (``uniform``)."""
    if weighting == "uniform":
        return torch.ones(len(t), dtype=like.dtype, device=like.device)
    a, s = alpha_sigma(schedule, t, like)
    return (a / s).pow(2).flatten(1)[:, 0]


def x0_loss(model, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor, cond, weighting: str) -> torch.Tensor:
    """L(x0) = w(t) mean_d (f(alpha x0 + sigma z, t) - x0)^2 per sample (Miao et al. 2025's per-sample loss)."""
    net = unwrap(model)
    return loss_weight(net.schedule, t, x0, weighting) * denoising_loss(model, x0, t, z, cond, space="x0")


@contextlib.contextmanager
def as_reference(student: nn.Module, frozen_copy: nn.Module | None):
    """The reference model: the frozen copy, or the LoRA student with its adapters off."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    with lora_disabled(student.net):
        yield student


def class_count(student) -> int:
    return int(getattr(student, "info", {}).get("num_classes", 0) or 0)


def pso_logits(l_theta_tau, l_theta_rho, l_ref_tau, l_ref_rho, ref_weight: float) -> torch.Tensor:
    """(L_ref(tau) - d L_ref(rho)) - (L_theta(tau) - d L_theta(rho)): L_PSO's margin (Miao et al. 2025; ALGORITHMS.md 7.3)."""
    return (l_ref_tau - ref_weight * l_ref_rho) - (l_theta_tau - ref_weight * l_theta_rho)


def pso_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta logits): L_PSO (Miao et al. 2025; ALGORITHMS.md 7.1)."""
    return F.softplus(-beta * logits)


def hinge_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """relu(1 - beta logits): the released code's ``pso_db`` (zero gradient past the margin beta logits >= 1)."""
    return F.relu(1 - beta * logits)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) averaged over dimensions, per sample (``std`` broadcast, [B, 1, ...] or a scalar)."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    elem = -(x - mean).pow(2) / (2 * std.pow(2)) - std.log() - 0.5 * math.log(2 * math.pi)
    return elem.expand_as(x).flatten(1).mean(1)


def transition_log_prob(model, x: torch.Tensor, t: torch.Tensor, x_next: torch.Tensor, t_next: torch.Tensor,
                        cond=None) -> torch.Tensor:
    """log p(x_next | x) of the consistency re-noising sampler, x_next = alpha(t_next) f(x, t) + sigma(t_next) z
    (Miao et al. 2025's distilled transition; ``distilled_step_with_logprob``), averaged over dimensions."""
    a, s = alpha_sigma(unwrap(model).schedule, t_next, x)
    return gaussian_log_prob(x_next, a * model(x, t, cond), s)


class SampleBank(nn.Module):
    """Reference samples and labels kept as buffers (checkpointed with the run, so a resume reuses them)."""

    def __init__(self, n: int, shape):
        super().__init__()
        self.register_buffer("x", torch.zeros(n, *shape))
        self.register_buffer("labels", torch.full((n,), -1, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))


# -- offline PSO --------------------------------------------------------------------------------------------
@dataclass
class PSOOptions:
    loss: str = choice("logistic", LOSSES)  # logistic: the PSO loss against the reference; hinge: pso_db (no reference)
    beta: float | None = at_least(None, 0.0)  # null: the released code's (logistic 200, hinge 5)
    ref_weight: float = at_least(0.1, 0.0)  # d: down-weighting of the reference sample's term (neg_defactor)
    prior_weight: float = at_least(0.5, 0.0)  # weight of L_theta(rho), fitting the model's own samples (both losses, as the code)
    num_references: int = at_least(64, 1)  # reference samples drawn once at step 0
    reference_steps: int = at_least(4, 1)  # student steps of each reference sample
    reference_seed: int = 0
    grid_steps: int = at_least(4, 1)  # pairs' times: the student's grid_steps-step sampling times
    weighting: str = choice("snr", WEIGHTINGS)  # w(t) of the x0 loss: alpha^2/sigma^2 (the paper's) or 1
    inherit_times: bool = True  # the student keeps its init_from parent's stored sampling times


class FineTuneBase(Objective):
    """What ``pso`` and ``finetune`` share: the student's grid, inherited sampling times, the x0 loss."""

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.student, self.schedule = ctx.student, ctx.student.schedule
        if options.inherit_times:
            inherit_sampling_times(self.student)
        self.num_classes = class_count(self.student)

    def networks(self) -> list[Network]:
        return [Network("student", self.student)]

    def grid(self) -> torch.Tensor:
        return self.student.sampling_timesteps(self.o.grid_steps)

    def grid_times(self, batch: Batch, n: int) -> torch.Tensor:
        ts = self.grid()
        return ts[torch.randint(0, len(ts), (n,), generator=batch.g)].to(batch.device)


@register_objective
class PSO(FineTuneBase):
    name = "pso"
    needs = frozenset({"data", "pairs"})
    Options = PSOOptions

    def __init__(self, options: PSOOptions, ctx):
        super().__init__(options, ctx)
        from distill.engine.lora import has_lora

        if self.num_classes and options.num_references < self.num_classes:
            raise ConfigError(f"config key 'objective.num_references' is {options.num_references}; allowed: at least the "
                              f"{self.num_classes} classes (one reference per class or more)")
        self.beta = DEFAULT_BETA[options.loss] if options.beta is None else options.beta
        lora = has_lora(self.student.net)
        self.reference = None if lora or options.loss == "hinge" else ctx.student_copy(trainable=False)
        shape = tuple(self.student.info.get("data_shape") or ctx.teacher.data_shape)
        self.bank = SampleBank(options.num_references, shape)

    def helpers(self):
        return {"references": self.bank, **({"reference": self.reference} if self.reference is not None else {})}

    # -- references: drawn once at step 0, restored from the checkpoint on resume --------------------------------
    def on_start(self, ctx, step):
        if bool(self.bank.filled):
            return
        if step > 0:
            raise RuntimeError("the PSO reference samples are missing from the resumed checkpoint")
        n, k = self.o.num_references, self.num_classes
        g = torch.Generator().manual_seed(self.o.reference_seed)
        labels = torch.arange(n) % k if k else None
        with as_reference(self.student, self.reference) as ref:
            for i in range(0, n, 256):
                noise = torch.randn((min(256, n - i), *self.bank.x.shape[1:]), generator=g).to(ctx.device)
                cond = None if labels is None else labels[i:i + 256].to(ctx.device)
                self.bank.x[i:i + len(noise)] = ref.sample(noise, self.o.reference_steps, cond, generator=g).float()
        if labels is not None:
            self.bank.labels.copy_(labels)
        self.bank.filled.fill_(True)

    def references_for(self, batch: Batch) -> torch.Tensor:
        """One random reference per target, of the target's label when the student is class-conditional."""
        n, k = self.o.num_references, self.num_classes
        if batch.cond is None or not k:
            idx = torch.randint(0, n, (batch.size,), generator=batch.g)
        else:
            idx = torch.randint(0, n // k, (batch.size,), generator=batch.g) * k + batch.cond.cpu().clamp_min(0)
        return self.bank.x[idx.to(self.bank.x.device)].to(batch.x0)

    # -- the loss ---------------------------------------------------------------------------------------------
    def loss(self, name, nets, batch):
        tau, rho = batch.x0, self.references_for(batch)
        t = self.grid_times(batch, batch.size)
        z = batch.randn(tau.shape, tau.dtype)
        x0, tt, zz = torch.cat([tau, rho]), torch.cat([t, t]), torch.cat([z, z])  # shared noise and time
        cc = None if batch.cond is None else torch.cat([batch.cond, batch.cond])
        l_theta = x0_loss(nets["student"], x0, tt, zz, cc, self.o.weighting).chunk(2)
        if self.o.loss == "hinge":
            logits = -(l_theta[0] - self.o.ref_weight * l_theta[1])
            loss = hinge_loss(logits, self.beta) + self.o.prior_weight * l_theta[1]
            return {"loss": loss, "logits": logits.detach(), "target": l_theta[0].detach(), "reference": l_theta[1].detach()}
        with torch.no_grad(), as_reference(unwrap(nets["student"]), self.reference) as ref:
            l_ref = x0_loss(ref, x0, tt, zz, cc, self.o.weighting).chunk(2)
        logits = pso_logits(*l_theta, *l_ref, self.o.ref_weight)
        loss = pso_loss(logits, self.beta) + self.o.prior_weight * l_theta[1]
        return {"loss": loss, "logits": logits.detach(), "target": l_theta[0].detach(),
                "reference": l_theta[1].detach()}


# -- the naive baseline ---------------------------------------------------------------------------------------
@dataclass
class FineTuneOptions:
    time_sampling: str = choice("grid", TIME_SAMPLINGS)  # grid: the student's grid_steps-step times (as pso); uniform: all times
    grid_steps: int = at_least(4, 1)
    weighting: str = choice("snr", WEIGHTINGS)  # w(t) of the x0 loss
    inherit_times: bool = True


@register_objective
class FineTune(FineTuneBase):
    name = "finetune"
    needs = frozenset({"data"})
    Options = FineTuneOptions

    def loss(self, name, nets, batch):
        if self.o.time_sampling == "grid":
            t = self.grid_times(batch, batch.size)
        else:
            t = sample_times(self.schedule, batch.size, batch.g).to(batch.device)
        z = batch.randn(batch.x0.shape, batch.x0.dtype)
        return x0_loss(nets["student"], batch.x0, t, z, batch.cond, self.o.weighting)


# -- online PSO -----------------------------------------------------------------------------------------------
@dataclass
class PSOOnlineOptions:
    reward: str = choice("class_confidence", sorted(REWARDS))  # distill.objectives.rewards name
    reward_sign: float = choice(1.0, (1.0, -1.0))  # -1: prefer lower rewards (mean_ink -1: thin strokes)
    reward_class: int | None = at_least(None, 0)  # class_confidence of an unconditional student: the requested class
    steps: int = at_least(4, 2)  # trajectory steps (steps - 1 stochastic transitions are trained)
    beta: float = at_least(50.0, 0.0)
    clip: float = at_least(0.1, 0.0, 1.0)  # eps: log-prob ratios clipped to [1 - eps, 1 + eps]
    inherit_times: bool = True


def check_reward_class(reward_class: int | None, teacher) -> None:
    """``reward_class`` must be one of the teacher's K classes (the classifier's 10 for an unconditional teacher)."""
    k = teacher.num_classes or CLASSIFIER_CLASSES
    if reward_class is not None and reward_class >= k:
        whose = f"teacher {teacher.name!r}" if teacher.num_classes else "the mnist16 classifier"
        raise ConfigError(f"config key 'objective.reward_class' is {reward_class}; allowed: 0..{k - 1} (the {k} classes "
                          f"of {whose})")


@register_objective
class PSOOnline(Objective):
    name = "pso_online"
    needs = frozenset({"pairs"})
    Options = PSOOnlineOptions

    def __init__(self, options: PSOOnlineOptions, ctx):
        super().__init__(options, ctx)
        from distill.engine.lora import has_lora

        self.student = ctx.student
        if options.inherit_times:
            inherit_sampling_times(self.student)
        if self.student.sampler != "consistency":
            raise ConfigError(f"objective 'pso_online' needs a student with the consistency (re-noising) sampler; this one "
                              f"has {self.student.sampler!r}")
        self.num_classes = class_count(self.student)
        check_reward_class(options.reward_class, ctx.teacher)
        self.reward = get_reward(options.reward, options.reward_sign, reward_class=options.reward_class)
        self.reference = None if has_lora(self.student.net) else ctx.student_copy(trainable=False)

    def networks(self) -> list[Network]:
        return [Network("student", self.student)]

    def helpers(self):
        return {} if self.reference is None else {"reference": self.reference}

    def prepare(self, batch: Batch, nets):
        """Two trajectories per conditioning (samples i and i + B/2), their states and rewards."""
        if batch.size % 2:
            raise ConfigError(f"objective 'pso_online' needs an even per-process batch (pairs of trajectories); got {batch.size}")
        half, student = batch.size // 2, nets["student"]
        cond = None
        if self.num_classes:
            cond = torch.randint(0, self.num_classes, (half,), generator=batch.g).repeat(2).to(batch.device)
        shape = (batch.size, *tuple(student.info.get("data_shape") or self.ctx.teacher.data_shape))
        states = []
        x = student.sample(batch.randn(shape), self.o.steps, cond, generator=batch.g, callback=lambda s: states.append(s["x"]))
        r = self.reward(x, cond).float()
        batch.cond = cond
        batch.extra.update(states=states, ts=student.sampling_timesteps(self.o.steps), sign=torch.sign(r[:half] - r[half:]),
                           reward=r)
        return batch

    def loss(self, name, nets, batch):
        states, ts, sign = batch.extra["states"], batch.extra["ts"], batch.extra["sign"]
        n, b, eps = len(states) - 1, batch.size, self.o.clip  # the stochastic transitions x_k -> x_{k+1} (not the last step)
        x, x_next = torch.cat(states[:-1]), torch.cat(states[1:])  # all transitions in one network call (DDP: one forward)
        t, t_next = (ts[:-1].repeat_interleave(b).to(batch.device), ts[1:].repeat_interleave(b).to(batch.device))
        cond = None if batch.cond is None else batch.cond.repeat(n)
        logp = transition_log_prob(nets["student"], x, t, x_next, t_next, cond)
        with torch.no_grad(), as_reference(unwrap(nets["student"]), self.reference) as ref:
            logp_ref = transition_log_prob(ref, x, t, x_next, t_next, cond)
        ratio = (logp - logp_ref).exp()
        log_ratio = ratio.clamp(1 - eps, 1 + eps).log().view(n, 2, b // 2)
        margin = sign * (log_ratio[:, 0] - log_ratio[:, 1])  # winner minus loser, per transition and pair
        loss = (F.softplus(-self.o.beta * margin) * sign.abs()).mean(0)
        return {"loss": loss, "reward": batch.extra["reward"].mean(), "ties": (sign == 0).float().mean(),
                "clipped": ((ratio < 1 - eps) | (ratio > 1 + eps)).float().mean()}
