"""The multi-network path of the objective interface: two networks, own optimizers, alternating steps."""

import json
from dataclasses import dataclass

import torch
from distill_helpers import run, same_tensors, tiny_cfg
from torch import nn

from distill.objectives.base import OBJECTIVES, Network, Objective, register_objective, unwrap


@dataclass
class CriticOptions:
    critic_lr: float = 0.01


class StudentAndCritic(Objective):
    """A GAN-shaped toy: the student maps noise to data and is pushed up a critic; the critic (own optimizer,
    own lr) separates data from student samples. The student updates on even steps, the critic on odd ones."""

    name = "test_student_and_critic"
    needs = frozenset({"data"})
    Options = CriticOptions
    instances: list = []  # the test reads the log of the one the trainer built

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        StudentAndCritic.instances.append(self)
        torch.manual_seed(1)
        self.student, self.critic, self.lr, self.log = ctx.student, nn.Linear(2, 1), options.critic_lr, []
        self.t_max = ctx.teacher.schedule.t_max

    def networks(self):
        return [Network("student", self.student, every=2, offset=0), Network("critic", self.critic, every=2, offset=1, lr=self.lr)]

    def _fake(self, nets, batch):
        return nets["student"](batch.randn(batch.x0.shape), torch.full((batch.size,), self.t_max))

    def loss(self, name, nets, batch):
        if name == "student":  # the critic is read frozen here
            fake = self._fake(nets, batch)
            return (fake - batch.x0).pow(2).mean(1) - 0.1 * nets["critic"](fake).squeeze(1)
        fake = self._fake(nets, batch).detach()
        return nn.functional.softplus(-nets["critic"](batch.x0)).squeeze(1) + nn.functional.softplus(nets["critic"](fake)).squeeze(1)

    def after_update(self, name, nets, step):
        vec = {n: torch.cat([p.detach().flatten() for p in unwrap(m).parameters()]).clone() for n, m in nets.items()}
        grads = {n: [p.grad for p in unwrap(m).parameters()] for n, m in nets.items()}
        self.log.append((step, name, vec, grads))


if StudentAndCritic.name not in OBJECTIVES:
    register_objective(StudentAndCritic)


def test_two_networks_train_on_alternating_steps_with_their_own_optimizers(tmp_path):
    run(tiny_cfg(tmp_path / "two", "objective={name: test_student_and_critic, critic_lr: 0.01}", "max_steps=6"))
    log = StudentAndCritic.instances[-1].log
    assert [(s, n) for s, n, _, _ in log] == [(0, "student"), (1, "critic"), (2, "student"), (3, "critic"), (4, "student"), (5, "critic")]
    for (_, _, before, _), (_, name, after, grads) in zip(log, log[1:]):
        other = "critic" if name == "student" else "student"
        assert not torch.equal(before[name], after[name])  # the updated network moved
        assert torch.equal(before[other], after[other])  # the other one did not
        assert all(g is None for g in grads[other])  # and got no gradient while frozen
    ckpt = tmp_path / "two" / "checkpoints" / "step-4"
    assert (ckpt / "optimizer.safetensors").is_file() and (ckpt / "optimizer_1.safetensors").is_file()
    assert (ckpt / "model_1.safetensors").is_file()
    opt = json.loads((ckpt / "optimizer_1.json").read_text())
    assert opt["param_groups"][0]["lr"] == 0.01  # the critic's own learning rate


def test_two_network_run_resumes_bit_identically(tmp_path):
    cfg = "objective={name: test_student_and_critic}"
    run(tiny_cfg(tmp_path / "full", cfg, "max_steps=7"))
    assert run(tiny_cfg(tmp_path / "part", cfg, "max_steps=7"), stop_at=3) is None
    run(tiny_cfg(tmp_path / "part", cfg, "max_steps=7"), resume="latest")
    assert same_tensors(tmp_path / "full" / "student.safetensors", tmp_path / "part" / "student.safetensors")
    a, b = (tmp_path / d / "checkpoints" / "step-7" / "model_1.safetensors" for d in ("full", "part"))
    assert same_tensors(a, b)  # the critic too
