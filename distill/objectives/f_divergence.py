"""f-distill and Uni-Instruct: distribution matching weighted by the density ratio r = p_t / q_t (part 2 of the family
in ``distribution_matching.py``, whose generator, fake score, discriminator head, TTUR and GAN terms they reuse).

r comes per sample from the discriminator head trained with the non-saturating BCE on noised real and generator
samples (``discriminator_bce``: at its optimum logit = log p_t / q_t), clipped, divided by its running mean in the
sample's time bin (FastGen's ratio normalisation; the bin means are all-reduced across processes and checkpointed as
the helper ``ratio_stats``), then turned into weights divided by their global batch mean:

  fdistill     (Xu, Nie & Vahdat 2025, the f-divergence gradient of their Sec. 3): the DMD gradient times
               h(r) = f''(r) r^2, grad_x = h(r) (D_fake - D_real)(x_t) / mean_d |x - D_real|; rkl (h = 1) is DMD2.
  uni_instruct (Wang et al. 2025): A(r) L_SIM + B(r) L_DI with L_SIM the SiD loss at alpha = 1 (gradients through x_t
               into both frozen networks) and L_DI whose x-gradient is (D_real - D_fake) |D_real - D_fake| / w;
               A = h(r), B = -r^2 h''(r). The released code's five branches (fkl: r L_SIM; jeffreys: mixes of L_SIM and
               r L_SIM; js: r/(1+r) L_SIM + 2r^2/(1+r)^3 L_DI; chi2: 2r^2 L_SIM - 4r^2 L_DI; rkl: L_SIM) all fit this
               rule; the paper's coefficient table was not seen. rkl is SiD with alpha = 1.

Notes on the public code: ``../shared/ALGORITHMS.md`` sections 3 and 5 (its rkl weight is a 0-d tensor that the
normaliser cannot take; Uni-Instruct's ratio is built from a batch-mean BCE times C*H*W and is ~1: not done here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from distill.engine.config import ConfigError, at_least, choice
from distill.objectives.base import register_objective
from distill.objectives.critic import discriminator_bce  # noqa: F401  (named in the module doc)
from distill.objectives.distribution_matching import DMD, DistributionMatching, gradient_form, sid_loss
from distill.objectives.distribution_matching_options import FAKE_WEIGHTINGS, GanOptions, _range
from distill.objectives.losses import LOSS_SPACES
from distill.objectives.noise_levels import TIME_SAMPLINGS


# -- divergences: f, h(r) = f''(r) r^2 and h'' in closed form ------------------------------------------------------
@dataclass(frozen=True)
class Divergence:
    f: Callable[[torch.Tensor], torch.Tensor]  # the generator of D_f(p || q) = E_q f(p / q), f(1) = 0
    h: Callable[[torch.Tensor], torch.Tensor]  # f''(r) r^2: the weight of the score difference (f-distill)
    h2: Callable[[torch.Tensor], torch.Tensor]  # h''(r): Uni-Instruct's DI weight is -r^2 h''(r)


DIVERGENCES = {
    "rkl": Divergence(lambda r: -r.log(), torch.ones_like, torch.zeros_like),  # KL(q || p)
    "fkl": Divergence(lambda r: r * r.log(), lambda r: r, torch.zeros_like),  # KL(p || q)
    "js": Divergence(lambda r: r * r.log() - (1 + r) * ((1 + r) / 2).log(), lambda r: r / (1 + r), lambda r: -2 / (1 + r) ** 3),
    "softened_rkl": Divergence(lambda r: (1 + r) * ((1 + r) / (2 * r)).log(), lambda r: 1 / (1 + r), lambda r: 2 / (1 + r) ** 3),
    "hellinger": Divergence(lambda r: (r.sqrt() - 1) ** 2, lambda r: r.sqrt() / 2, lambda r: -r.pow(-1.5) / 8),  # squared
    "jeffreys": Divergence(lambda r: (r - 1) * r.log(), lambda r: 1 + r, torch.zeros_like),  # KL(p || q) + KL(q || p)
    "neyman": Divergence(lambda r: (1 - r) ** 2 / r, lambda r: 2 / r, lambda r: 4 / r ** 3),  # Neyman chi^2
    "chi2": Divergence(lambda r: (r - 1) ** 2, lambda r: 2 * r * r, lambda r: torch.full_like(r, 4.0)),  # Pearson chi^2
}
FDISTILL_DIVERGENCES = ("rkl", "fkl", "js", "softened_rkl", "hellinger", "jeffreys", "neyman")  # f-distill's table + FastGen
UNI_DIVERGENCES = ("fkl", "rkl", "js", "jeffreys", "chi2")  # the released Uni-Instruct code's branches


def ratio_of_logit(logit: torch.Tensor, logit_clip: float, ratio_clip) -> torch.Tensor:
    """r = exp(clamp(logit)) clamped to [lo, hi], float64 (FastGen's ``_get_f_div_weighting_h``, step 1)."""
    return logit.detach().double().clamp(-logit_clip, logit_clip).exp().clamp(*ratio_clip)


class RatioStatistics(nn.Module):
    """Running mean of r in ``bins`` equal bins of t over [t_lo, t_hi]: means <- ema means + (1 - ema) batch mean, for
    the bins the global batch fills (sums and counts all-reduced, so every rank holds the same means)."""

    def __init__(self, bins: int, t_lo: float, t_hi: float, ema: float):
        super().__init__()
        self.t_lo, self.t_hi, self.ema = float(t_lo), float(t_hi), float(ema)
        self.register_buffer("means", torch.ones(bins, dtype=torch.float64))

    def index(self, t: torch.Tensor) -> torch.Tensor:
        u = (t.double().to(self.means.device) - self.t_lo) / (self.t_hi - self.t_lo)
        return (u * len(self.means)).floor().clamp(0, len(self.means) - 1).long()

    @torch.no_grad()
    def update(self, r: torch.Tensor, t: torch.Tensor, reduce) -> None:
        n, idx = len(self.means), self.index(t)
        r = r.double().to(self.means.device)
        local = torch.zeros(2 * n, dtype=torch.float64, device=self.means.device)
        local.index_add_(0, idx, r).index_add_(0, idx + n, torch.ones_like(r))
        both = reduce(local, "sum")
        sums, counts = both[:n], both[n:]
        new = self.ema * self.means + (1 - self.ema) * sums / counts.clamp(min=1)
        self.means.copy_(torch.where(counts > 0, new, self.means))

    def normalise(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return r / self.means[self.index(t)].to(r.device)


# -- options ------------------------------------------------------------------------------------------------------
@dataclass
class RatioOptions(GanOptions):
    """Options of the ratio-weighted objectives (config ``objective:``), beside the family's and the GAN's."""

    divergence: str = "rkl"
    logit_clip: float = at_least(10.0, 0.0)  # |logit| <= this before exp (FastGen: 10)
    ratio_clip: list = _range([0.1, 20.0])  # [lo, hi] of r (FastGen: ratio_lower / ratio_upper)
    ratio_normalisation: bool = True  # divide r by its running mean in the sample's time bin (FastGen: on)
    ratio_bins: int = at_least(10, 1)  # bins uniform in t over [t_min, t_max] (FastGen: 10)
    ratio_ema: float = at_least(0.0, 0.0, 1.0)  # running-mean decay of the bin means (FastGen: 0 on CIFAR-10, 0.5 on ImageNet-64)
    ratio_start_step: int = at_least(0, 0)  # before this step the weights are 1 (rkl): the discriminator trains first

    def __post_init__(self):
        super().__post_init__()
        lo_hi = self.ratio_clip
        ok = isinstance(lo_hi, (list, tuple)) and len(lo_hi) == 2 and all(isinstance(v, (int, float)) for v in lo_hi)
        if not ok or not 0 < lo_hi[0] <= lo_hi[1]:
            raise ConfigError(f"config key 'objective.ratio_clip' is {lo_hi!r}; allowed: [lo, hi] with 0 < lo <= hi")


@dataclass
class FDistillOptions(RatioOptions):
    divergence: str = choice("js", FDISTILL_DIVERGENCES)  # the paper's best on ImageNet-64 (FastGen CIFAR-10: fkl)
    critic_steps: int = at_least(5, 1)  # FastGen: student_update_freq 5
    gan_g_weight: float = at_least(1e-3, 0.0)  # FastGen: 1e-3 (CIFAR-10)
    gan_d_weight: float = at_least(1e-2, 0.0)


@dataclass
class UniInstructOptions(RatioOptions):
    divergence: str = choice("fkl", UNI_DIVERGENCES)  # the released recipes' "Forward-KL"
    t_range: list = _range([0.0, 0.8])  # t ~ U[0, 800/1000] of the Karras grid (as SiD)
    start_sigma: float | None = at_least(2.5, 1e-6)  # G(2.5 z, sigma = 2.5): init_sigma of the released code
    fake_time_sampling: str | None = choice("lognormal", (None, *TIME_SAMPLINGS))  # critic: sigma ~ lognormal(-1.2, 1.2)
    fake_loss_space: str = choice("x0", LOSS_SPACES)  # critic: lambda(sigma) ||D_fake - x||^2 (fsim_loss.py)
    fake_loss_weighting: str = choice("edm", FAKE_WEIGHTINGS)
    gan_time_sampling: str = choice("lognormal", TIME_SAMPLINGS)  # the discriminator at the critic's sigma
    gan_g_weight: float = at_least(1e-2, 0.0)
    gan_d_weight: float = at_least(1.0, 0.0)  # the critic's BCE beside the denoising loss at weight 1 (lsd = 1)


# -- the objectives -------------------------------------------------------------------------------------------------
class RatioWeighted(DistributionMatching):
    """Shared: the density ratio from the discriminator head, its time-bin normalisation, the divergence weights."""

    has_gan = True
    supports_accumulation = False  # the weights are normalised by whole-batch statistics

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        o = options
        if o.divergence != "rkl" and o.gan_d_weight == 0:
            raise ConfigError(f"config key 'objective.gan_d_weight' is 0 but divergence {o.divergence!r} reads the density "
                              f"ratio from the discriminator, which then never trains; allowed: a value > 0 (or divergence rkl)")
        if o.divergence != "rkl" and o.ratio_start_step < o.gan_start_step:
            raise ConfigError(f"config key 'objective.ratio_start_step' ({o.ratio_start_step}) is before "
                              f"'objective.gan_start_step' ({o.gan_start_step}), so the ratio would come from an untrained "
                              f"discriminator; allowed: ratio_start_step >= gan_start_step")
        self.div = DIVERGENCES[o.divergence]
        self.stats = RatioStatistics(o.ratio_bins, self.schedule.t_min, self.schedule.t_max, o.ratio_ema)
        self._step = 0

    def helpers(self) -> dict[str, nn.Module]:
        return {"ratio_stats": self.stats}

    def generator_loss(self, nets, batch):
        self._step = batch.step
        return super().generator_loss(nets, batch)

    @torch.no_grad()
    def ratio_weights(self, logit: torch.Tensor, t: torch.Tensor, di: bool = False):
        """(A = h(r), B = -r^2 h''(r) or None, components), both divided by the global batch mean of h; A = 1 and no
        update of the statistics before ``ratio_start_step``."""
        r = ratio_of_logit(logit, self.o.logit_clip, self.o.ratio_clip)
        terms = {"ratio": r.float()}
        if self._step < self.o.ratio_start_step:
            return torch.ones_like(r), None, terms
        if self.o.ratio_normalisation:
            self.stats.update(r, t, self.ctx.reduce)
            r = self.stats.normalise(r, t)
        a = self.div.h(r)  # h(r) = f''(r) r^2 weights s_q - s_p in grad D_f(p_t || q_t) (Xu, Nie & Vahdat 2025, Sec. 3)
        scale = self.ctx.reduce(a.mean().reshape(1), "mean")[0].clamp(min=1e-12)  # not + 1e-6: rkl stays exactly 1
        b = -r * r * self.div.h2(r) / scale if di else None
        terms["weight_max"] = (a / scale).max().float()
        return a / scale, b, terms


@register_objective
class FDistill(RatioWeighted):
    """f-distill: the DMD2 generator gradient times h(r) = f''(r) r^2 per sample; rkl is DMD2 exactly."""

    name = "fdistill"
    Options = FDistillOptions
    reference_weight_decay = 0.01  # FastGen's default optimizer: AdamW (0.9, 0.999), weight decay 0.01
    matching_loss = DMD.matching_loss

    def weighted_fake(self, x_t, t, cond, nets):
        d_fake, logit = nets["fake_score"](x_t, t, cond, logits=True)  # one call: D_fake and the head's logit at x_t
        h, _, terms = self.ratio_weights(logit, t)
        return d_fake, h, terms


@register_objective
class UniInstruct(RatioWeighted):
    """Uni-Instruct: A(r) L_SIM + B(r) L_DI per sample with r = exp(logit) of the head on the fake-score encoder."""

    name = "uni_instruct"
    Options = UniInstructOptions
    reference_betas = (0.0, 0.999)  # built on SiD's code: the same Adam betas for both networks

    def matching_loss(self, x, x_t, t, cond, nets):
        d_real = self.real(x_t, t, cond)
        d_fake, logit = nets["fake_score"](x_t, t, cond, logits=True)  # gradients through x_t into both networks
        sim, w = sid_loss(x, d_real, d_fake, 1.0)
        a, b, terms = self.ratio_weights(logit, t, di=self.o.divergence in ("js", "chi2"))
        # A(r) L_SIM + B(r) L_DI (Wang et al. 2025, the tractable loss of the expanded f-divergence; A, B: module doc)
        out = {"dm": a.to(sim) * sim, "sim": sim.detach(), "normaliser": w.flatten(), **terms}
        if b is not None and self._step >= self.o.ratio_start_step:
            with torch.no_grad():
                delta = d_real - d_fake
                g = delta * delta.flatten(1).norm(dim=1).reshape(w.shape) / w  # x-gradient of L_DI (Wang et al. 2025)
            di = gradient_form(x, b.reshape(w.shape).to(g) * g)
            out["dm"], out["di"] = out["dm"] + di, di.detach()
        return out
