"""f-distill and Uni-Instruct: distribution matching weighted by the density ratio r = p_t / q_t (part 2 of the family
in ``distribution_matching.py``, whose generator, fake score, discriminator head, TTUR and GAN terms they reuse).

r comes per sample from the discriminator head trained with the non-saturating BCE on noised real and generator
samples (``discriminator_bce``: at its optimum logit = log p_t / q_t), clipped, divided by its running mean in the
sample's time bin (FastGen's ratio normalisation; the bin means are all-reduced across processes and checkpointed as
the helper ``ratio_stats``), then turned into weights divided by their global batch mean:

  fdistill     (Xu, Nie & Vahdat 2025, the f-divergence gradient of their Sec. 3): the DMD gradient times
               h(r) = f''(r) r^2, grad_x = h(r) (D_fake - D_real)(x_t) / mean_d |x - D_real|; rkl (h = 1) is DMD2.
  uni_instruct (Wang et al. 2025): the gradient of the diffusion expansion D_f(p_0 || q_0) = int g(t)^2 / 2 F_t dt with
               F_t = E_{q_t}[h(r) |s_p - s_q|^2] (d/dt D_f(p_t || q_t) = -g^2 / 2 F_t). Derivation (``expanded_f_loss``):
               grad F_t = d/dtheta E[K(x_t)] with every function frozen at the current theta and K = (h + r h') |delta|^2
               + 2 h delta.s_q + 2 h div(delta), delta = s_p - s_q (the theta-dependence of r and s_q integrated by
               parts). Stein's identity E[A(x_t).eps] = sigma E[div A(x_t)] removes the divergence, and with s_p + eps /
               sigma = alpha (D_real - x) / sigma^2, delta = alpha (D_real - D_fake) / sigma^2 and grad h(r(x_t)) =
               h'(r) r delta (exact scores), 2 alpha^2 / sigma^4 times the gradient of
                 L = h (D_r - D_f).(D_r - x) - (h + r h') / 2 |D_r - D_f|^2 + x . sg[alpha^2 / sigma^2 c (D_r - D_f)],
                 c = r h' (D_r - D_f).(D_r - x) - r (2 h' + r h'') / 2 |D_r - D_f|^2
               (h, r h', r^2 h'' detached, D_r and D_f frozen networks with gradients through x_t, x = G(z)) is grad F_t.
               rkl (h = 1) is SiD with alpha = 1/2; the released code's branches differ: fkl r L_SIM (alpha = 1, without
               the grad-r term), js r/(1+r) L_SIM + 2r^2/(1+r)^3 L_DI, chi2 r^2 (2 L_SIM - 4 L_DI). On two exact Gaussian
               cases (tests/test_fdistill.py) the released fkl is 0.80x and 1.70x the exact gradient of the generator's
               scale, and our earlier rule with the released coefficients 0.69-5.1x; we follow the derivation, for every
               divergence (the released code's js and chi2 call backward on non-scalar tensors and cannot run as released).

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
from distill.objectives.distribution_matching import DMD, DistributionMatching, dmd_normaliser
from distill.objectives.distribution_matching_options import FAKE_WEIGHTINGS, GanOptions, _range
from distill.objectives.losses import LOSS_SPACES, alpha_sigma
from distill.objectives.noise_levels import TIME_SAMPLINGS


# -- divergences: f, h(r) = f''(r) r^2 and h'' in closed form ------------------------------------------------------
@dataclass(frozen=True)
class Divergence:
    f: Callable[[torch.Tensor], torch.Tensor]  # the generator of D_f(p || q) = E_q f(p / q), f(1) = 0
    h: Callable[[torch.Tensor], torch.Tensor]  # f''(r) r^2: the weight of the score difference (f-distill)
    h1: Callable[[torch.Tensor], torch.Tensor]  # h'(r) and
    h2: Callable[[torch.Tensor], torch.Tensor]  # h''(r): the terms of the expanded gradient (uni_instruct)


_zero, _one = torch.zeros_like, torch.ones_like
DIVERGENCES = {
    "rkl": Divergence(lambda r: -r.log(), _one, _zero, _zero),  # KL(q || p)
    "fkl": Divergence(lambda r: r * r.log(), lambda r: r, _one, _zero),  # KL(p || q)
    "js": Divergence(lambda r: r * r.log() - (1 + r) * ((1 + r) / 2).log(), lambda r: r / (1 + r), lambda r: 1 / (1 + r) ** 2,
                     lambda r: -2 / (1 + r) ** 3),
    "softened_rkl": Divergence(lambda r: (1 + r) * ((1 + r) / (2 * r)).log(), lambda r: 1 / (1 + r), lambda r: -1 / (1 + r) ** 2,
                               lambda r: 2 / (1 + r) ** 3),
    "hellinger": Divergence(lambda r: (r.sqrt() - 1) ** 2, lambda r: r.sqrt() / 2, lambda r: r.rsqrt() / 4,
                            lambda r: -r.pow(-1.5) / 8),  # squared Hellinger
    "jeffreys": Divergence(lambda r: (r - 1) * r.log(), lambda r: 1 + r, _one, _zero),  # KL(p || q) + KL(q || p)
    "neyman": Divergence(lambda r: (1 - r) ** 2 / r, lambda r: 2 / r, lambda r: -2 / r ** 2, lambda r: 4 / r ** 3),  # Neyman chi^2
    "chi2": Divergence(lambda r: (r - 1) ** 2, lambda r: 2 * r * r, lambda r: 4 * r, lambda r: torch.full_like(r, 4.0)),  # Pearson
}
FDISTILL_DIVERGENCES = ("rkl", "fkl", "js", "softened_rkl", "hellinger", "jeffreys", "neyman")  # f-distill's table + FastGen
UNI_DIVERGENCES = ("fkl", "rkl", "js", "softened_rkl", "hellinger", "jeffreys", "neyman", "chi2")  # all: the gradient is exact


def expanded_f_loss(x, d_real, d_fake, weights: dict, grad_log_r, alpha) -> torch.Tensor:
    """Per-sample L whose gradient is sigma^4 / (2 alpha^2) grad F_t, F_t = E_{q_t}[h(r) |s_p - s_q|^2] (module doc; Wang et
    al. 2025, the diffusion expansion), means over dimensions. ``weights``: detached h, r h', r^2 h'' [B]; ``grad_log_r``:
    the x_t-gradient of log r per sample (exact scores: alpha (D_real - D_fake) / sigma^2); ``alpha``: alpha(t)
    broadcastable to x; ``d_real``, ``d_fake``: frozen networks at x_t (gradients through x_t)."""
    shape = (-1, *([1] * (x.ndim - 1)))
    h, rh1, r2h2 = (weights[k].reshape(shape).to(x) for k in ("h", "rh1", "r2h2"))
    delta = d_real - d_fake
    a = (delta * (d_real - x)).flatten(1).mean(1).reshape(shape)
    b = delta.pow(2).flatten(1).mean(1).reshape(shape)
    main = h * a - 0.5 * (h + rh1) * b
    with torch.no_grad():  # the x-gradient of h(r(x_t)) times its factors: grad_x h = alpha h'(r) r grad log r
        c = rh1 * a - 0.5 * (2 * rh1 + r2h2) * b
        g = alpha * c * grad_log_r.detach().to(x)
    return main.flatten() + ((x - x.detach()) * g).flatten(1).sum(1)


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
    critic_steps: int = at_least(5, 1)  # 5 critic steps per generator step (DMD2's ratio; FastGen's student_update_freq 5 is 4:1)
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
    # grad log r in the grad-r term: "score" alpha (D_real - D_fake) / sigma^2 (exact for exact networks), or
    # "discriminator": autograd of the head's logit (zero where the logit or r is clipped): the gradient of the r it reads
    ratio_gradient: str = choice("score", ("score", "discriminator"))
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
    def ratio_weights(self, logit: torch.Tensor, t: torch.Tensor):
        """({h: h(r), rh1: r h'(r), r2h2: r^2 h''(r)}, components), each divided by the global batch mean of h; h = 1,
        the others 0 (rkl) and no update of the statistics before ``ratio_start_step``."""
        r = ratio_of_logit(logit, self.o.logit_clip, self.o.ratio_clip)
        terms = {"ratio": r.float()}
        if self._step < self.o.ratio_start_step:
            return {"h": torch.ones_like(r), "rh1": torch.zeros_like(r), "r2h2": torch.zeros_like(r)}, terms
        if self.o.ratio_normalisation:
            self.stats.update(r, t, self.ctx.reduce)
            r = self.stats.normalise(r, t)
        h = self.div.h(r)  # h(r) = f''(r) r^2 weights s_q - s_p in grad D_f(p_t || q_t) (Xu, Nie & Vahdat 2025, Sec. 3)
        scale = self.ctx.reduce(h.mean().reshape(1), "mean")[0].clamp(min=1e-12)  # not + 1e-6: rkl stays exactly 1
        terms["weight_max"] = (h / scale).max().float()
        return {"h": h / scale, "rh1": r * self.div.h1(r) / scale, "r2h2": r * r * self.div.h2(r) / scale}, terms


@register_objective
class FDistill(RatioWeighted):
    """f-distill: the DMD2 generator gradient times h(r) = f''(r) r^2 per sample; rkl is DMD2 exactly."""

    name = "fdistill"
    Options = FDistillOptions
    reference_weight_decay = 0.01  # FastGen's default optimizer: AdamW (0.9, 0.999), weight decay 0.01
    matching_loss = DMD.matching_loss

    def weighted_fake(self, x_t, t, cond, nets):
        d_fake, logit = nets["fake_score"](x_t, t, cond, logits=True)  # one call: D_fake and the head's logit at x_t
        weights, terms = self.ratio_weights(logit, t)
        return d_fake, weights["h"], terms


@register_objective
class UniInstruct(RatioWeighted):
    """Uni-Instruct: the exact gradient of the expanded f-divergence per sample (``expanded_f_loss``), r = exp(logit) of
    the head on the fake-score encoder."""

    name = "uni_instruct"
    Options = UniInstructOptions
    reference_betas = (0.0, 0.999)  # built on SiD's code: the same Adam betas for both networks

    def matching_loss(self, x, x_t, t, cond, nets):
        d_real = self.real(x_t, t, cond)
        d_fake, logit = nets["fake_score"](x_t, t, cond, logits=True)  # gradients through x_t into both networks
        weights, terms = self.ratio_weights(logit, t)
        w = dmd_normaliser(x, d_real)  # SiD's per-sample normaliser sg[mean_d |x - D_real|], as the released code
        a, s = alpha_sigma(self.schedule, t, x)
        grad_log_r = self.grad_log_ratio(x_t, t, cond, nets, logit) if self.o.ratio_gradient == "discriminator" else \
            a * (d_real - d_fake).detach() / s ** 2
        per = expanded_f_loss(x, d_real, d_fake, weights, grad_log_r, a) / w.flatten()  # Wang et al. 2025 (module doc)
        return {"dm": per, "normaliser": w.flatten(), **terms}

    def grad_log_ratio(self, x_t, t, cond, nets, logit):
        """d logit / d x_t of the head (one more fake-score call), zero where the logit or r = exp(logit) is clipped."""
        with torch.enable_grad():
            y = x_t.detach().requires_grad_()
            (grad,) = torch.autograd.grad(nets["fake_score"](y, t, cond, logits=True)[1].sum(), y)
        lo, hi = self.o.ratio_clip
        lg = logit.detach().double()
        inside = (lg.abs() < self.o.logit_clip) & (lg.exp() > lo) & (lg.exp() < hi)
        return grad * inside.reshape(-1, *([1] * (grad.ndim - 1))).to(grad)
