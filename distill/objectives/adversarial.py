"""An adversarial head any objective can add (config ``adversarial:``), and GDD's pure-GAN distillation (``gdd``).

Generator: the student's one-step sample x = G(z) = f_theta(s(t_1) z, t_1) from fresh noise z (its own first sampling
time t_1 and input scale, the interval input of a MeanFlow student: exactly what ``Student.sample`` does in one step),
with gradients. Discriminator: one logit l(x_t, t) = h(phi(x_t, t)) per sample, a small head h on the bottleneck
features phi of

  * ``features: teacher``   the frozen teacher network (LADD; GDD reads frozen features too, of ImageNet networks on clean
                            images: this workbench has no such network offline, the teacher is the pretrained one);
  * ``features: fake_score`` a trainable copy of the teacher fitted to the student's samples by denoising score matching
                            (DMD2's fake score, whose encoder the BCE trains as well: DMD2, Sec. 4.3),

at noise levels t drawn from the reference distribution (``time_sampling``: ``noise_levels.times_of_u``), real and fake
noised alike. Losses, non-saturating (Goodfellow et al. 2014; DMD2, Eqs. 4-5):

    L_D = softplus(-l(real_t)) + softplus(l(fake_t))  [+ r1_gamma / 2 ||d l(real_t) / d real_t||^2, Mescheder 2018 Eq. 9]
    L_G = softplus(-l(fake_t))                          added to the objective's student loss with weight ``g_weight``.

The discriminator is its own network (``discriminator``: its own optimizer, config ``networks.discriminator``; reference
Adam betas (0, 0.99) of GDD's ``train.py``). ``gdd`` (Zheng & Yang 2024, "Diffusion Models Are Innate One-Step
Generators") is the same head with no other term: the generator starts as the teacher's network and L_G is its loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from distill.core.conditioning import cat_cond
from distill.engine.config import ConfigError, at_least, choice
from distill.objectives.base import Batch, Network, Objective, register_objective, unwrap
from distill.objectives.critic import discriminator_bce
from distill.objectives.distribution_matching_options import _range, check_unit_range
from distill.objectives.losses import add_noise
from distill.objectives.noise_levels import TIME_SAMPLINGS, by_band, sample_u, times_of_u

FEATURES = ("teacher", "fake_score")
GAN_BETAS = (0.0, 0.99)  # GDD train.py: Adam(betas=[0, 0.99], eps=1e-8) for generator and discriminator


@dataclass
class AdversarialOptions:
    """Config ``adversarial:`` (any objective) and the options of ``gdd``."""

    g_weight: float = at_least(0.01, 0.0)  # weight of L_G in the student's loss (DMD2: 3e-3 beside its DM loss)
    features: str = choice("teacher", FEATURES)  # the head reads the frozen teacher's bottleneck, or a fake score's
    time_sampling: str = choice("lognormal", TIME_SAMPLINGS)  # the discriminator's noise levels (module doc)
    t_range: list = _range([0.0, 1.0])  # [lo, hi] of the unit draw u mapped to times
    lognormal_mean: float = -1.2  # log sigma~ ~ N(mean, std^2) of time_sampling lognormal (EDM's training distribution)
    lognormal_std: float = at_least(1.2, 1e-6)
    rho: float = at_least(7.0, 1e-6)  # time_sampling karras
    start_step: int = at_least(0, 0)  # L_G from this step on (the discriminator trains from step 0)
    head_hidden: int = at_least(64, 1)
    r1_gamma: float = at_least(0.0, 0.0)  # R1 penalty on real samples (GDD: 1e-4); one process only
    fake_score_weight: float = at_least(1.0, 0.0)  # features fake_score: weight of its denoising loss

    def __post_init__(self):
        check_unit_range(self.t_range, "adversarial.t_range")


class Discriminator(nn.Module):
    """``forward(x_t, t, cond) -> (data prediction, logit [B])`` of one network call: the fake score's (trained) or the
    frozen teacher's (not a submodule: never trained or checkpointed here)."""

    def __init__(self, head: nn.Module, score: nn.Module | None = None, teacher_net: nn.Module | None = None):
        super().__init__()
        self.head, self.score = head, score
        self._teacher_net = [teacher_net]

    def forward(self, x, t, cond=None):
        net = self.score if self.score is not None else self._teacher_net[0]
        d, feats = net.features(x, t, cond)
        return d, self.head(feats)


class AdversarialHead:
    """The generator's sample, the discriminator and both GAN losses, for the ``adversarial:`` wrapper and ``gdd``."""

    def __init__(self, o: AdversarialOptions, ctx, prefix: str = "adversarial"):
        self.o, self.ctx, self.prefix = o, ctx, prefix
        self.teacher, self.student, self.schedule = ctx.teacher, ctx.student, ctx.teacher.schedule
        s = self.student
        if s.sampler == "ode" and (s.sampler_solver != "euler" or s.parameterization != "denoiser"):
            raise ConfigError(f"{prefix} needs the student's one-step sample, which an ode sampler makes in one network "
                              f"call only with student.sampler_solver euler and student.parameterization denoiser (got "
                              f"{s.sampler_solver!r}, {s.parameterization!r})")
        if o.r1_gamma > 0 and ctx.num_processes > 1:
            raise ConfigError(f"config key '{prefix}.r1_gamma' needs one process (DDP does not take the double backward "
                              f"of R1); set it to 0 or launch one process")
        net = getattr(self.teacher, "model", None)
        if net is None:
            raise ConfigError(f"{prefix} reads a network's features, but {self.teacher.name!r} is analytic (no network); "
                              f"use a network teacher")
        if o.features == "fake_score":
            score = ctx.teacher_copy(trainable=True)
            self.module = Discriminator(ctx.discriminator_head(score, hidden=o.head_hidden), score=score)
        else:
            self.module = Discriminator(ctx.discriminator_head(net, hidden=o.head_hidden), teacher_net=net)

    def network(self) -> Network:
        return Network("discriminator", self.module, betas=GAN_BETAS, weight_decay=0.0)

    def on(self, step: int) -> bool:
        return self.o.g_weight > 0 and step >= self.o.start_step

    def generate(self, student_net, batch: Batch, cond) -> torch.Tensor:
        """The student's one-step sample of fresh noise (module doc), through ``student_net`` (the DDP wrapper when
        distributed); with gradients unless called under ``no_grad``."""
        x, t, extra = unwrap(student_net).first_step(batch.randn((batch.size, *self.teacher.data_shape)))
        return student_net(x, t, cond, **extra)

    def noised(self, x: torch.Tensor, batch: Batch):
        o = self.o
        u = sample_u(len(x), batch.g, o.t_range)
        t = times_of_u(self.schedule, u, o.time_sampling, o.rho, (o.lognormal_mean, o.lognormal_std)).to(x.device)
        return add_noise(self.schedule, x, batch.randn(x.shape, x.dtype), t), t

    def generator_term(self, nets, batch: Batch, cond) -> torch.Tensor:
        """L_G [B] of the student's one-step sample of fresh noise, through the frozen discriminator."""
        x = self.generate(nets["student"], batch, cond)
        fake_t, t = self.noised(x, batch)
        return F.softplus(-nets["discriminator"](fake_t, t, cond)[1])

    def discriminator_loss(self, nets, batch: Batch) -> dict:
        """L_D on the batch's real samples and the student's (without gradients to it); with ``features: fake_score``
        also the fake score's denoising loss on the same call (one DDP forward)."""
        cond, n = batch.cond, batch.size
        if batch.x0 is None:
            raise ConfigError(f"{self.prefix} needs real samples: set config key 'dataset'")
        with torch.no_grad():
            x = self.generate(nets["student"], batch, cond)
        real_t, t_r = self.noised(batch.x0, batch)
        fake_t, t_f = self.noised(x, batch)
        rows, ts, conds = [real_t, fake_t], [t_r, t_f], [cond, cond]
        if self.o.features == "fake_score":
            x_t, t = self.noised(x, batch)
            rows, ts, conds = rows + [x_t], ts + [t], conds + [cond]
        if self.o.r1_gamma > 0:
            real_t = real_t.detach().requires_grad_(True)
            rows[0] = real_t
        d, logit = nets["discriminator"](torch.cat(rows), torch.cat(ts), None if cond is None else cat_cond(conds))
        l_real, l_fake = logit[:n], logit[n:2 * n]
        gan_d = discriminator_bce(l_real, l_fake)
        out = {"gan_d": gan_d.detach().mean(), "real_logit": l_real.detach().mean(), "fake_logit": l_fake.detach().mean(),
               **by_band(self.schedule, torch.cat([t_r, t_f]), 2 * torch.cat([F.softplus(-l_real), F.softplus(l_fake)]), "gan_d")}
        total = gan_d
        if self.o.r1_gamma > 0:
            (grad,) = torch.autograd.grad(l_real.sum(), real_t, create_graph=True)
            r1 = grad.pow(2).flatten(1).sum(1)
            total, out["r1"] = total + 0.5 * self.o.r1_gamma * r1, r1.detach().mean()
        if self.o.features == "fake_score":
            dsm = (d[2 * n:] - x).pow(2).flatten(1).mean(1)  # the data-prediction denoising loss (DMD, Eq. 6)
            total, out["fake_score"] = total + self.o.fake_score_weight * dsm, dsm.detach().mean()
        return {"loss": total, **out}


class Adversarial(Objective):
    """``adversarial:`` on any objective: its networks, data and losses, plus ``discriminator`` and L_G in the
    student's loss. Everything else (helpers, frozen modules, prepare, after_update, the result) is the objective's."""

    def __init__(self, inner: Objective, options: AdversarialOptions, ctx):
        self.inner = inner
        names = [n.name for n in inner.networks()]
        if "discriminator" in names:
            raise ConfigError(f"objective {inner.name!r} already trains a network named 'discriminator'; remove config key 'adversarial'")
        if "fake_score" in names and options.features == "fake_score" and options.fake_score_weight > 0:
            raise ConfigError(f"objective {inner.name!r} trains its own fake score: its GAN is objective.gan_g_weight / "
                              f"gan_d_weight (dmd2, sid, fdistill, uni_instruct); with 'adversarial' allowed: features "
                              f"teacher, or features fake_score with fake_score_weight 0 (a separate discriminator network)")
        if "trajectories" in inner.needs and "data" not in inner.needs:
            raise ConfigError(f"adversarial needs real samples beside the objective's batches, but objective {inner.name!r} "
                              f"reads a trajectory cache whose labels the data's would replace; allowed: objectives that read "
                              f"'data' or the teacher (consistency, scm, meanflow, progressive, the distribution-matching family)")
        super().__init__(options, ctx)
        self.head = AdversarialHead(options, ctx)
        self.needs = frozenset(inner.needs | {"data"})

    # what the trainer reads, from the objective
    name = property(lambda self: self.inner.name)
    cache_keys = property(lambda self: self.inner.cache_keys)
    supports_accumulation = property(lambda self: self.inner.supports_accumulation)
    find_unused_parameters = True

    @property
    def _specs(self):
        return self.__dict__.get("_all_specs")

    @_specs.setter
    def _specs(self, specs):  # the trainer's resolved declarations: the objective's go to it (its ``updates`` reads them)
        self.__dict__["_all_specs"] = specs
        self.inner._specs = [s for s in specs if s.name != "discriminator"]

    def networks(self) -> list[Network]:
        return [*self.inner.networks(), self.head.network()]

    def updates(self, step: int) -> list[str]:
        spec = next(s for s in (self._specs or self.networks()) if s.name == "discriminator")
        return [*self.inner.updates(step), *(["discriminator"] if step % spec.every == spec.offset else [])]

    def helpers(self):
        return self.inner.helpers()

    def frozen(self):
        return self.inner.frozen()

    def on_start(self, ctx, step):
        self.inner.on_start(ctx, step)

    def prepare(self, batch, nets):
        return self.inner.prepare(batch, nets)

    def after_update(self, name, nets, step):
        if name != "discriminator":
            self.inner.after_update(name, nets, step)

    def save_result(self, folder, student, ema, training_config, final):
        self.inner.save_result(folder, student, ema, training_config, final)

    def loss(self, name, nets, batch: Batch):
        if name == "discriminator":
            return self.head.discriminator_loss(nets, batch)
        out = self.inner.loss(name, nets, batch)
        if name != "student" or not self.head.on(batch.step):
            return out
        gan_g = self.head.generator_term(nets, batch, batch.cond)
        out = dict(out) if isinstance(out, dict) else {"loss": out}
        out["loss"] = out["loss"] + self.head.o.g_weight * gan_g.mean()  # the trainer's mean: mean(L) + w mean(L_G)
        out["gan_g"] = gan_g.detach().mean()
        return out


def with_adversarial(objective: Objective, options: AdversarialOptions | None, ctx) -> Objective:
    """``objective``, or ``objective`` with the adversarial head when config ``adversarial`` is set."""
    return objective if options is None else Adversarial(objective, options, ctx)


@dataclass
class GDDOptions(AdversarialOptions):
    g_weight: float = at_least(1.0, 1e-12)  # L_G is the whole loss; only its scale relative to the lr matters


@register_objective
class GDD(Objective):
    """GDD: the one-step student from the teacher's network trained by L_G alone (module doc)."""

    name = "gdd"
    needs = frozenset({"data"})
    Options = GDDOptions
    find_unused_parameters = True

    def __init__(self, options: GDDOptions, ctx):
        super().__init__(options, ctx)
        self.head = AdversarialHead(options, ctx, prefix="objective 'gdd'")
        self.student = ctx.student

    def networks(self) -> list[Network]:
        return [Network("student", self.student, betas=GAN_BETAS, weight_decay=0.0), self.head.network()]

    def loss(self, name, nets, batch: Batch):
        if name == "discriminator":
            return self.head.discriminator_loss(nets, batch)
        gan_g = self.head.generator_term(nets, batch, batch.cond)
        return {"loss": self.o.g_weight * gan_g, "gan_g": gan_g.detach().mean()}
