"""Distribution matching: VSD / Diff-Instruct, DMD, DMD2 and SiD (one family, several objectives).

Networks: a one- (or few-) step generator G (the student), fed unit-variance noise at t_max (or at an
intermediate time, ``start_sigma``); a fake score D_fake that learns the generator's distribution online with
the denoising loss (a trainable copy of a network teacher, or a fresh ``TimeMLP`` on the teacher's schedule
for analytic teachers); for DMD2 / SiDA a discriminator head on bottleneck features (of the fake score, or of
the frozen teacher). With x = G(z), x_t = alpha_t x + sigma_t eps and D_real the (optionally guided) teacher:

  vsd  (Wang et al. 2023, Eq. 9; Luo et al. 2023, Diff-Instruct, Eq. 3.5): grad_x = c(t) (D_fake - D_real)(x_t),
       c(t) = 1 (x0 space, Diff-Instruct's code), alpha^2/sigma^2 (score space: the gradient of KL(q_t || p_t)),
       or alpha/sigma (epsilon space, ProlificDreamer);
  dmd  (Yin et al. 2024, Eq. 7-8): grad_x = (D_fake - D_real) / mean_d |x - D_real| plus a regression loss
       on (noise, teacher ODE sample) pairs of a trajectory cache (Eq. 9; l2 here, LPIPS in the paper);
  dmd2 (Yin et al. 2024b, Sec. 4): the DMD gradient without regression, k fake-score steps per generator step
       (TTUR, Sec. 4.2) and a non-saturating GAN on noised real / fake samples (Sec. 4.3, Eq. 4);
  sid  (Zhou et al. 2024, Eq. 23 / Algorithm 1): L = [(1 - a) ||D_real - D_fake||^2 + (D_real - D_fake).(D_fake - x)]
       / mean_d |x - D_real|, gradients through x_t into both frozen networks; optionally a GAN term (SiDA).

Every generator loss is written as per-sample values whose gradient in x is the method's; ``0.5 (x - sg[x - g])^2``
(mean over dimensions) for the gradient-form methods, so its value is 0.5 mean g^2.
Notes and pitfalls of the public code: ``../shared/ALGORITHMS.md`` sections 3-5.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from distill.core.conditioning import cat_cond, takes_prompts
from distill.core.denoisers import NetDenoiser, classifier_free_guidance
from distill.engine.config import ConfigError
from distill.objectives.base import Batch, Network, Objective, register_objective, unwrap
from distill.objectives.critic import ChannelMeanHead, Critic, discriminator_bce, mlp_fake_score, per_sample
from distill.objectives.distribution_matching_options import DMD2Options, DMDOptions, DMOptions, SiDOptions, VSDOptions
from distill.objectives.losses import add_noise, alpha_sigma, denoising_loss
from distill.objectives.noise_levels import by_band, sample_u, time_of_sigma_tilde, times_of_u  # noqa: F401 (re-exported)


# -- the family ----------------------------------------------------------------------------------------------
class DistributionMatching(Objective):
    """Shared machinery: generator sampling, the fake score and its loss, the GAN, the update schedule."""

    needs = frozenset({"teacher"})
    Options = DMOptions
    has_gan = False
    find_unused_parameters = True  # the head is unused before gan_start_step (and with GAN weights 0)
    supports_accumulation = True
    cache_keys = ("noise", "sample", "label")

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.teacher, self.student, self.schedule = ctx.teacher, ctx.student, ctx.teacher.schedule
        self.num_classes = int(getattr(ctx.student, "info", {}).get("num_classes", 0) or 0)
        self.real = self._real_denoiser(options)
        score = self._fake_score(options)
        self.fake = Critic(score, *self._head(options, score))
        self.needs = frozenset({"teacher"} | self._data_needs())
        self.ts = self._generator_times(options)
        ctx.student.info["sampling_timesteps"] = {str(k): self.ts[:k].tolist() for k in range(1, len(self.ts) + 1)}

    # -- construction ------------------------------------------------------------------------------------
    def _real_denoiser(self, o):
        if o.guidance_scale is None:
            return self.teacher.denoise
        prompts = takes_prompts(self.teacher)  # text-to-image: prompts from `dataset`
        if not prompts and not (self.teacher.num_classes and self.teacher.has_uncond and self.num_classes):
            raise ConfigError(f"config key 'objective.guidance_scale' needs a class-conditional teacher with an unconditional "
                              f"mode and student.class_conditional: true; {self.teacher.name!r} has {self.teacher.num_classes} "
                              f"classes (set it to null)")
        return classifier_free_guidance(self.teacher.denoise, o.guidance_scale)

    def _fake_score(self, o) -> NetDenoiser:
        network_teacher = getattr(self.teacher, "model", None) is not None
        kind = ("teacher_copy" if network_teacher else "mlp") if o.fake_score == "auto" else o.fake_score
        if kind == "teacher_copy":
            return self.ctx.teacher_copy(trainable=True)  # raises for an analytic teacher, naming the problem
        return mlp_fake_score(self.teacher, o.fake_hidden, o.fake_layers, self.num_classes)

    def _head(self, o, score) -> tuple:
        """(head,) on the fake score's bottleneck, (head, teacher network) on the frozen teacher's, () without a GAN."""
        if not self.has_gan:
            return ()
        if getattr(o, "gan_head", "mlp") == "channel_mean":  # SiDA's parameter-free output (fake-score features only)
            return (ChannelMeanHead(),)
        if o.gan_features == "fake_score":
            return (self.ctx.discriminator_head(score, hidden=o.head_hidden),)
        net = getattr(self.teacher, "model", None)
        if net is None:
            raise ConfigError(f"config key 'objective.gan_features' is 'teacher' but {self.teacher.name!r} is analytic (no "
                              f"network); allowed here: fake_score")
        return self.ctx.discriminator_head(net, hidden=o.head_hidden), net

    def _data_needs(self) -> set:
        wants_real = (self.has_gan and (self.o.gan_g_weight > 0 or self.o.gan_d_weight > 0)) or \
            (self.o.generator_steps > 1 and self.o.multistep_input == "data")
        return {"data"} if wants_real and not hasattr(self.teacher, "sample_data") else set()

    def _generator_times(self, o) -> torch.Tensor:
        """t_1 = t_max (or the time of ``start_sigma``) > t_2 > ... of a k-step generator: the student's sampling times."""
        ts = self.student.sampling_timesteps(o.generator_steps).clone().double()
        if o.start_sigma is not None:
            ts[0] = float(time_of_sigma_tilde(self.schedule, torch.tensor([float(o.start_sigma)], dtype=torch.float64))[0])
            if len(ts) > 1 and not ts[0] > ts[1]:
                raise ConfigError(f"config key 'objective.start_sigma' ({o.start_sigma}) puts the first generator time "
                                  f"{float(ts[0]):g} at or below the second {float(ts[1]):g}; allowed: a larger start_sigma")
        return ts

    # -- the engine interface ------------------------------------------------------------------------------
    reference_betas: tuple[float, float] | None = None  # AdamW betas of the method's released code, for both networks
    reference_weight_decay: float | None = None  # and its weight decay

    def networks(self) -> list[Network]:
        k, ref = self.o.critic_steps, {"betas": self.reference_betas, "weight_decay": self.reference_weight_decay}
        return [Network("student", self.student, every=k, offset=k - 1, **ref), Network("fake_score", self.fake, **ref)]

    def updates(self, step: int) -> list[str]:
        names = super().updates(step)
        return [n for n in names if n != "student" or step >= self.o.generator_start_step]

    def gan_on(self, step: int, weight: float, start: int | None = None) -> bool:
        return self.has_gan and weight > 0 and step >= (self.o.gan_start_step if start is None else start)

    def loss(self, name, nets, batch):
        return self.generator_loss(nets, batch) if name == "student" else self.critic_loss(nets, batch)

    # -- shared pieces --------------------------------------------------------------------------------------
    def labels(self, batch: Batch) -> torch.Tensor | None:
        if batch.cond is not None or not self.num_classes:
            return batch.cond
        return torch.randint(0, self.num_classes, (batch.size,), generator=batch.g).to(batch.device)

    def real_samples(self, batch: Batch, cond) -> torch.Tensor:
        if batch.x0 is not None:
            return batch.x0
        return self.teacher.sample_data(batch.size, generator=batch.g, cond=None if cond is None else cond.cpu()) \
            .float().to(batch.device)

    def times(self, batch: Batch, lo_hi, kind: str | None = None) -> torch.Tensor:
        """Times of the batch from u ~ U[lo, hi] by ``kind`` (default ``time_sampling``: ``noise_levels.times_of_u``)."""
        o = self.o
        u = sample_u(batch.size, batch.g, lo_hi)
        return times_of_u(self.schedule, u, kind or o.time_sampling, o.rho, (o.lognormal_mean, o.lognormal_std)).to(batch.device)

    def generator_inputs(self, nets, batch: Batch, cond):
        """(x_in, t_in): noise at t_1, or for a k-step generator the input of a random step j (the same for the batch):
        j - 1 generator steps from noise without gradients, re-noised in between (DMD2's backward simulation), or
        real data noised at t_j (FastGen's multi-step input)."""
        ts = self.ts.to(batch.device)
        x = batch.randn((batch.size, *self.teacher.data_shape)) * float(self.schedule.init_noise_scale(self.ts[0]))
        j = int(torch.randint(0, len(ts), (1,), generator=batch.g)) if len(ts) > 1 else 0
        if j and self.o.multistep_input == "data":
            x = add_noise(self.schedule, self.real_samples(batch, cond), batch.randn(x.shape), ts[j].expand(batch.size))
        elif j:
            g = unwrap(nets["student"])
            with torch.no_grad():
                for i in range(j):
                    x = g(x, ts[i].expand(batch.size), cond)
                    x = add_noise(self.schedule, x, batch.randn(x.shape), ts[i + 1].expand(batch.size))
        return x, ts[j].expand(batch.size)

    def generate(self, nets, batch: Batch, cond, extra=None):
        """x = G(x_in, t_in) [with gradients], and G on ``extra`` (x, t) rows in the same call (one DDP forward)."""
        x_in, t_in = self.generator_inputs(nets, batch, cond)
        if extra is None:
            return nets["student"](x_in, t_in, cond), None
        x2, t2, c2 = extra[:3]
        cc = None if cond is None else cat_cond([cond, c2])
        out = nets["student"](torch.cat([x_in, x2]), torch.cat([t_in, t2]), cc)
        return out[:batch.size], out[batch.size:]

    def weighted_fake(self, x_t, t, cond, nets):
        """(D_fake(x_t), per-sample weight of the DMD gradient or None, components to log) without gradients."""
        return nets["fake_score"](x_t, t, cond), None, {}

    def noised(self, x, batch: Batch, lo_hi, kind: str | None = None):
        t = self.times(batch, lo_hi, kind)
        return add_noise(self.schedule, x, batch.randn(x.shape), t), t

    # -- the fake score (and discriminator) step ------------------------------------------------------------
    def critic_loss(self, nets, batch: Batch):
        """Denoising loss of D_fake on sg[G(z)] (DMD, Eq. 6) [+ w_D (softplus(-l_real) + softplus(l_fake)), DMD2 Eq. 4]."""
        cond = self.labels(batch)
        with torch.no_grad():
            x = self.generate(nets, batch, cond)[0]
        t = self.times(batch, self.o.fake_t_range, self.o.fake_time_sampling)
        eps = batch.randn(x.shape)
        if not self.gan_on(batch.step, getattr(self.o, "gan_d_weight", 0.0), getattr(self.o, "gan_d_start_step", None)):
            fake = self.fake_weight(t, x) * denoising_loss(nets["fake_score"], x, t, eps, cond, space=self.o.fake_loss_space)
            return {"loss": fake, "fake_score": fake.mean()}
        if getattr(self.o, "gan_form", "dmd2") == "sida":
            return self._critic_sida(nets, batch, x, t, eps, cond)
        return self._critic_with_gan(nets, batch, x, t, eps, cond)

    def fake_weight(self, t, x) -> torch.Tensor:
        """Per-sample weight of the fake score's loss: 1, or EDM's lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2
        (Karras et al. 2022, Table 1; SiD's ``training/sid_loss.py`` ``SID_EDMLoss.__call__``), sigma = sigma/alpha."""
        if self.o.fake_loss_weighting == "none":
            return torch.ones(len(x), dtype=x.dtype, device=x.device)
        a, s = alpha_sigma(self.schedule, t, x)
        sig, sd = (s / a).flatten(), self.o.sigma_data
        return (sig ** 2 + sd ** 2) / (sig * sd) ** 2

    def _critic_with_gan(self, nets, batch, x, t, eps, cond):
        """One fake-score call on [x_t for the denoising loss; noised real; noised fake] (one DDP forward); the GAN's
        noise levels follow ``gan_time_sampling`` (the method's reference distribution), and its BCE is logged per
        band of sigma/alpha (``gan_d@<band>``, 2 log 2 = 1.386 where the head cannot separate)."""
        kind = self.o.gan_time_sampling
        real_t, t_r = self.noised(self.real_samples(batch, cond), batch, self.o.gan_t_range, kind)
        fake_t, t_f = self.noised(x, batch, self.o.gan_t_range, kind)
        x_t = add_noise(self.schedule, x, eps, t)
        cc = None if cond is None else cat_cond([cond, cond, cond])
        d, logit = nets["fake_score"](torch.cat([x_t, real_t, fake_t]), torch.cat([t, t_r, t_f]), cc, logits=True)
        fake = self.fake_weight(t, x) * self._denoising_error(d[:batch.size], x, x_t, t, eps)
        l_real, l_fake = logit[batch.size:2 * batch.size], logit[2 * batch.size:]
        gan_d = discriminator_bce(l_real, l_fake)
        return {"loss": fake + self.o.gan_d_weight * gan_d, **self._critic_terms(fake, gan_d, l_real, l_fake, t_r, t_f)}

    def _critic_sida(self, nets, batch, x, t, eps, cond):
        """SiDA's critic (official ``sida_loss.py``, ``fakescore_discriminator_share_encoder_loss``): real samples noised
        with the denoising row's own time and noise, one call on [x_t; real_t]; with lambda(sigma) the fake score's weight
        and n the dimensions per sample (the reference sums the denoising loss over them, the BCE per sample):
        L = lambda(sigma) mean_d |D_fake(x_t) - x|^2 + w_D mean_B[lambda] (softplus(-l_real) + softplus(l_fake)) / (2 n),
        the BCE weighted by the batch's mean lambda as the reference's (its BCEWithLogitsLoss averages over the batch
        before lambda multiplies it)."""
        x_t, real_t = add_noise(self.schedule, x, eps, t), add_noise(self.schedule, self.real_samples(batch, cond), eps, t)
        cc = None if cond is None else cat_cond([cond, cond])
        d, logit = nets["fake_score"](torch.cat([x_t, real_t]), torch.cat([t, t]), cc, logits=True)
        lam = self.fake_weight(t, x)
        fake = lam * self._denoising_error(d[:batch.size], x, x_t, t, eps)
        l_fake, l_real = logit[:batch.size], logit[batch.size:]
        gan_d = discriminator_bce(l_real, l_fake)
        loss = fake + self.o.gan_d_weight * lam.mean() * gan_d / (2 * x[0].numel())
        return {"loss": loss, **self._critic_terms(fake, gan_d, l_real, l_fake, t, t)}

    def _critic_terms(self, fake, gan_d, l_real, l_fake, t_r, t_f) -> dict:
        """What a GAN critic logs: the BCE per band of sigma/alpha (``gan_d@<band>``, 2 log 2 = 1.386 where the head
        cannot separate), each side's share times 2."""
        per_side = 2 * torch.cat([per_sample(F.softplus(-l_real)), per_sample(F.softplus(l_fake))])
        return {"fake_score": fake.mean(), "gan_d": gan_d.mean(), "real_logit": l_real.mean(), "fake_logit": l_fake.mean(),
                **by_band(self.schedule, torch.cat([t_r, t_f]), per_side, "gan_d")}

    def _denoising_error(self, d, x, x_t, t, eps):
        """The denoising loss of ``distill.objectives.losses.denoising_loss`` from a data prediction ``d`` already computed."""
        if self.o.fake_loss_space == "x0":
            return (d - x).pow(2).flatten(1).mean(1)
        from distill.core.param import from_x0

        a, s = alpha_sigma(self.schedule, t, x)
        pt = self.fake.prediction_type
        return (from_x0(d, pt, x_t, a, s) - from_x0(x, pt, x_t, a, s)).pow(2).flatten(1).mean(1)

    # -- the generator step ------------------------------------------------------------------------------------
    def generator_loss(self, nets, batch: Batch):
        cond = self.labels(batch)
        extra = self.regression_rows(batch)
        x, x_reg = self.generate(nets, batch, cond, extra)
        x_t, t = self.noised(x, batch, self.o.t_range)
        terms = self.matching_loss(x, x_t, t, cond, nets)  # {"dm": [B], ...}
        total = terms["dm"]
        if x_reg is not None:
            reg = (x_reg - extra[3]).pow(2).flatten(1).mean(1)
            total, terms["regression"] = total + self.o.regression_weight * reg, reg
        shared = terms.pop("shared_gan_g", None)  # SiDA: L_G from the matching loss's own fake-score call
        if self.gan_on(batch.step, getattr(self.o, "gan_g_weight", 0.0)):
            if shared is None:
                fake_t, t_f = self.noised(x, batch, self.o.gan_t_range, self.o.gan_time_sampling)
                shared = per_sample(F.softplus(-nets["fake_score"](fake_t, t_f, cond, logits=True)[1]))  # DMD2, Eq. 5
            total, terms["gan_g"] = total + self.o.gan_g_weight * shared, shared
        return {"loss": total, **{k: v.detach().mean() for k, v in terms.items()}}

    def regression_rows(self, batch: Batch):
        return None

    def matching_loss(self, x, x_t, t, cond, nets) -> dict:
        raise NotImplementedError


def gradient_form(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 mean_d (x - sg[x - g])^2: its gradient in x is g / d (the DMD loss form, Yin et al. 2024)."""
    return 0.5 * (x - (x - g).detach()).pow(2).flatten(1).mean(1)


def dmd_normaliser(x: torch.Tensor, d_real: torch.Tensor) -> torch.Tensor:
    """sg[mean_d |x - D_real(x_t)|] per sample, shaped for broadcasting (DMD, Yin et al. 2024, Eq. 8)."""
    w = (x - d_real).detach().abs().flatten(1).mean(1).clamp(min=1e-5)
    return w.reshape(-1, *([1] * (x.ndim - 1)))


@register_objective
class VSD(DistributionMatching):
    """VSD / Diff-Instruct: grad_x = c(t) (D_fake - D_real)(x_t), one fake-score step per generator step."""

    name = "vsd"
    Options = VSDOptions
    reference_betas = (0.0, 0.999)  # Diff-Instruct's di_train.py: Adam betas [0.0, 0.999] for both networks

    def weight(self, t, x):
        a, s = alpha_sigma(self.schedule, t, x)
        return {"uniform": torch.ones_like(a), "snr": (a / s) ** 2, "eps": a / s}[self.o.weighting]

    def matching_loss(self, x, x_t, t, cond, nets):
        with torch.no_grad():
            g = self.weight(t, x) * (nets["fake_score"](x_t, t, cond) - self.real(x_t, t, cond))
        return {"dm": gradient_form(x, g)}


@register_objective
class DMD(DistributionMatching):
    """DMD: normalised distribution-matching gradient + regression on a trajectory cache's (noise, sample) pairs."""

    name = "dmd"
    Options = DMDOptions

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        if options.regression_weight > 0:
            if ctx.cache is None:
                raise ConfigError("objective.regression_weight > 0 needs (noise, teacher sample) pairs: set config key "
                                  "'trajectories' (scripts/make_trajectories.py), or regression_weight: 0")
            self.needs = self.needs | {"trajectories"}

    def matching_loss(self, x, x_t, t, cond, nets):
        with torch.no_grad():
            d_real = self.real(x_t, t, cond)
            d_fake, h, terms = self.weighted_fake(x_t, t, cond, nets)
            w = dmd_normaliser(x, d_real)
            g = (d_fake - d_real) / w
            g = g if h is None else h.reshape(w.shape).to(g) * g  # f-distill's per-sample weight h(r) (fdistill)
        return {"dm": gradient_form(x, g), "normaliser": w.flatten(), **terms}

    def regression_rows(self, batch: Batch):
        """(x_T, t_T, labels, teacher sample) of the cache rows (DMD, Eq. 9), or None without regression."""
        if self.o.regression_weight == 0 or batch.traj is None:
            return None
        noise = batch.traj["noise"].to(batch.device)
        t = torch.full((len(noise),), float(self.ctx.cache.ts[0]), dtype=torch.float64, device=batch.device)
        label = batch.traj["label"].to(batch.device) if self.num_classes else None
        x_t = noise * float(self.schedule.init_noise_scale(self.ctx.cache.ts[0]))
        return x_t, t, label, batch.traj["sample"].to(batch.device)


@register_objective
class DMD2(DistributionMatching):
    """DMD2: DMD without regression, TTUR (critic_steps fake-score steps per generator step) and a GAN."""

    name = "dmd2"
    Options = DMD2Options
    has_gan = True
    reference_weight_decay = 0.01  # AdamW (0.9, 0.999), weight decay 0.01 (tianweiy/DMD2 main/edm/train_edm.py)
    matching_loss = DMD.matching_loss


@register_objective
class SiD(DistributionMatching):
    """SiD: score identity distillation's generator loss with its alpha, optionally with a GAN term: DMD2's form, or
    SiDA's (Zhou et al. 2024b, ``gan_form: sida``) on the fake score's encoder at the generator loss's own x_t."""

    name = "sid"
    Options = SiDOptions
    has_gan = True
    reference_betas = (0.0, 0.999)  # Adam betas of both optimizers in the released sid_train.py (g_beta1 default 0)

    def matching_loss(self, x, x_t, t, cond, nets):
        sida = self.o.gan_form == "sida" and self.o.gan_g_weight > 0
        d_real = self.real(x_t, t, cond)
        called = nets["fake_score"](x_t, t, cond, logits=sida)  # gradients through x_t
        d_fake, logit = called if sida else (called, None)
        per, w = sid_loss(x, d_real, d_fake, self.o.alpha)
        out = {"dm": per, "normaliser": w.flatten()}
        if sida:  # SiDA (official sida_loss.py, generator_share_encoder_loss): the head at the same x_t, times the
            # batch's mean 1/w (the reference's BCE averages over the batch before dividing by each sample's w)
            out["shared_gan_g"] = per_sample(F.softplus(-logit.clamp(-10.0, 10.0))) * (1.0 / w.flatten()).mean()
        return out


def sid_loss(x, d_real, d_fake, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample SiD loss mean_d [(1 - a)|delta|^2 + delta.(D_fake - x)] / w with delta = D_real - D_fake, w) (Zhou et al.
    2024, Eq. 23); alpha = 1 is the SIM branch of Uni-Instruct."""
    w = dmd_normaliser(x, d_real)
    delta = d_real - d_fake
    per = ((1 - alpha) * delta.pow(2) + delta * (d_fake - x)) / w
    return per.flatten(1).mean(1), w
