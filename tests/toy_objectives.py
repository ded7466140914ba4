"""Toy objectives that exercise the engine's contracts (imported by tests and by tests/distill_with_toys.py).

``test_partial_critic``: a GAN-shaped student + critic whose critic leaves one of its two heads unused on every
other critic step (a GAN head switched off), the case that needs DDP's ``find_unused_parameters``.
``test_vsd``: a toy VSD (Wang et al. 2023, Eq. 9 written for x0: grad = w (D_fake - D_real) through x_t) with a
trainable fake-score copy of the teacher (``ctx.teacher_copy``), a discriminator head on its bottleneck
(``ctx.discriminator_head``) and named loss components, all three networks on their own steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from distill.objectives.base import OBJECTIVES, Network, Objective, register_objective
from distill.objectives.losses import add_noise, denoising_loss


@dataclass
class NoOptions:
    pass


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 1), nn.Linear(2, 1)

    def forward(self, x, both: bool):
        return (self.a(x) + self.b(x) if both else self.a(x)).squeeze(1)


class PartialCritic(Objective):
    name = "test_partial_critic"
    needs = frozenset({"data"})
    Options = NoOptions
    find_unused_parameters = True

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        torch.manual_seed(1)
        self.critic = TwoHeads()
        self.t_max = ctx.teacher.schedule.t_max

    def networks(self):
        return [Network("student", self.ctx.student, every=2, offset=0), Network("critic", self.critic, every=2, offset=1)]

    def _score(self, critic, x, step):
        return critic(x, both=step % 4 != 1)  # head b off on every other critic step

    def loss(self, name, nets, batch):
        fake = nets["student"](batch.randn(batch.x0.shape), torch.full((batch.size,), self.t_max))
        if name == "student":
            return (fake - batch.x0).pow(2).mean(1) - 0.1 * self._score(nets["critic"], fake, batch.step)
        real, fake = self._score(nets["critic"], batch.x0, batch.step), self._score(nets["critic"], fake.detach(), batch.step)
        return F.softplus(-real) + F.softplus(fake)


class Counter(nn.Module):
    """A helper with running statistics (checkpointed by the trainer): samples seen over all processes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))


class ToyVSD(Objective):
    name = "test_vsd"
    needs = frozenset({"teacher", "data"})
    Options = NoOptions
    started: list = []  # (step, seen) at each on_start, for the tests

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.fake = ctx.teacher_copy(trainable=True)
        self.head = ctx.discriminator_head(self.fake, hidden=8)
        self.schedule = ctx.teacher.schedule
        self.counter = Counter()

    def helpers(self):
        return {"counter": self.counter}

    def on_start(self, ctx, step):
        ToyVSD.started.append((step, float(self.counter.seen)))

    def after_update(self, name, nets, step):
        if name == "student":  # all-reduced across processes: every rank holds the global count
            self.counter.seen += self.ctx.reduce(torch.tensor(float(self._last_size), device=self.ctx.device), "sum").cpu()

    def networks(self):
        return [Network("student", self.ctx.student, every=3, offset=0), Network("fake_score", self.fake, every=3, offset=1),
                Network("disc", self.head, every=3, offset=2, lr=1e-3)]

    def _generate(self, nets, batch):
        t = torch.full((batch.size,), float(self.schedule.t_max), dtype=torch.float64)
        return nets["student"](batch.randn(batch.x0.shape), t, batch.cond)

    def _noised(self, x, batch):
        t = self.schedule.t_min + (self.schedule.t_max - self.schedule.t_min) * batch.rand((batch.size,), torch.float64) * 0.9
        return add_noise(self.schedule, x, batch.randn(x.shape), t), t

    def loss(self, name, nets, batch):
        x = self._generate(nets, batch)
        if name == "fake_score":  # the fake score learns the generator's distribution (denoising loss)
            t = self._noised(x, batch)[1]
            return denoising_loss(nets["fake_score"], x.detach(), t, batch.randn(x.shape), batch.cond)
        if name == "disc":  # non-saturating BCE on bottleneck features of noised real and fake samples
            (x_real, t), x_fake = self._noised(batch.x0, batch), self._noised(x.detach(), batch)[0]
            real = nets["disc"](self.fake.features(x_real, t, batch.cond)[1])
            fake = nets["disc"](self.fake.features(x_fake, t, batch.cond)[1])
            return {"loss": F.softplus(-real) + F.softplus(fake), "real_logit": real.mean(), "fake_logit": fake.mean()}
        self._last_size = batch.size
        x_t, t = self._noised(x, batch)
        with torch.no_grad():
            grad = nets["fake_score"](x_t, t, batch.cond) - self.ctx.teacher.denoise(x_t, t, batch.cond)
        dm = 0.5 * (x - (x - grad).detach()).pow(2).flatten(1).sum(1)
        gan = F.softplus(-nets["disc"](nets["fake_score"].features(x_t, t, batch.cond)[1]))
        return {"loss": dm + 0.1 * gan, "dm": dm.mean(), "gan": gan.mean()}


for _cls in (PartialCritic, ToyVSD):
    if _cls.name not in OBJECTIVES:
        register_objective(_cls)
