"""Can a linear probe on the fake score's bottleneck features (at its start: the mnist16 teacher's network) tell real
training digits from the progressive 1-step student's samples at a given noise level? The discriminator head of
fdistill_mnist16.yaml reads these features (conv, global average pool, linear); this measures the ceiling of that
view on 2,048 samples (1,536 to fit, 512 to test), pooled as the head pools, and flattened.

    OMP_NUM_THREADS=1 python results/mnist16_fdistill30/probe.py > results/mnist16_fdistill30/probe.txt
"""

import torch

from distill.data import load_dataset
from distill.objectives.losses import add_noise
from distill.objectives.noise_levels import time_of_sigma_tilde
from students import load_student
from teachers import load_teacher

torch.manual_seed(0)
teacher = load_teacher("mnist16")
student = load_student("results/mnist16/students/progressive_mnist16_1.safetensors")
data = load_dataset("mnist16", split="train")
n, g = 1024, torch.Generator().manual_seed(1)
x_real, labels = data.x[:n].float(), data.labels[:n]
with torch.no_grad():
    x_fake = student.sample(torch.randn(n, *teacher.data_shape, generator=g), 1, cond=labels).float()


def features(x, sigma):
    t = time_of_sigma_tilde(teacher.schedule, torch.full((len(x),), sigma, dtype=torch.float64))
    with torch.no_grad():
        return teacher.model.features(add_noise(teacher.schedule, x, torch.randn(x.shape, generator=g), t), t, labels)[1]


def probe(x, y, decay):
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    idx = torch.randperm(len(x), generator=g)
    fit, test = idx[:1536], idx[1536:]
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(500):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[fit] @ w + b, y[fit]) + decay * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((x[test] @ w + b > 0).float() == y[test]).float().mean())


y = torch.cat([torch.ones(n), torch.zeros(n)])
print("| sigma/alpha | pooled (as the head) | flattened |\n|---|---|---|")
for sigma in (0.05, 0.2, 1.0, 5.0):
    f_real, f_fake = features(x_real, sigma), features(x_fake, sigma)
    pooled = probe(torch.cat([f_real.mean((2, 3)), f_fake.mean((2, 3))]), y, 1e-3)
    flat = probe(torch.cat([f_real.flatten(1), f_fake.flatten(1)]), y, 1e-2)
    print(f"| {sigma:g} | {pooled:.3f} | {flat:.3f} |")
