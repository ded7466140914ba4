"""The two parts of the exact Uni-Instruct generator gradient (``expanded_f_loss``) at a checkpoint of the mnist16
rerun, per sigma/alpha band: the x-gradient of the main term h A - (h + r h') B / 2 and that of the grad-r term
(alpha^2 / sigma^2) c (D_r - D_f), both divided by SiD's normaliser as in training (the grad-r term with grad log r
from the score identity, as the run used, and from the head's own logit, ``ratio_gradient: discriminator``); RMS over
the band's samples.

    OMP_NUM_THREADS=1 python results/mnist16_fdistill30/uni_terms.py RUN_FOLDER > results/mnist16_fdistill30/uni_terms.md
"""

import sys
from pathlib import Path

import torch

import distill.engine.train as train  # noqa: E402
from distill.core.schedules import sigma_tilde
from distill.engine.run_config import load_run_config
from distill.objectives.base import Batch, unwrap
from distill.objectives.distribution_matching import dmd_normaliser
from distill.objectives.losses import alpha_sigma
from students import build_student
from teachers import load_teacher

folder = Path(sys.argv[1])
cfg = load_run_config(folder / "config.yaml")
cfg.output_dir = str(folder)
train.check_resume_config = lambda cfg, ckpt: None  # the run predates objective.ratio_gradient (its behaviour: "score")
run, step = train.start(cfg, load_teacher, build_student, "latest", lambda m: None)
obj = run.objective
obj._step = step  # the ratio weights on, as at this step
nets = {n: unwrap(m) for n, m in run.nets.items()}
rows = []
for k in range(4):
    batch = Batch(step, torch.Generator().manual_seed(10_000 + k), torch.device("cpu"), 64)
    cond = obj.labels(batch)
    with torch.no_grad():
        x = obj.generate(nets, batch, cond)[0]
    x_t, t = obj.noised(x, batch, obj.o.t_range)
    x = x.detach().requires_grad_()
    x_tt = x_t.detach() + 0 * x  # gradients through x_t, as in training
    d_real = obj.real(x_tt, t, cond)
    d_fake, logit = nets["fake_score"](x_tt, t, cond, logits=True)
    weights, _ = obj.ratio_weights(logit, t)
    w = dmd_normaliser(x, d_real)
    a, s = alpha_sigma(obj.schedule, t, x)
    shape = (-1, 1, 1, 1)
    h, rh1, r2h2 = (weights[n].reshape(shape).to(x) for n in ("h", "rh1", "r2h2"))
    delta = d_real - d_fake
    A = (delta * (d_real - x)).flatten(1).mean(1).reshape(shape)
    B = delta.pow(2).flatten(1).mean(1).reshape(shape)
    main = ((h * A - 0.5 * (h + rh1) * B) / w).sum()
    (g_main,) = torch.autograd.grad(main, x)
    with torch.no_grad():
        c = rh1 * A - 0.5 * (2 * rh1 + r2h2) * B
        g_lin = (a / s) ** 2 * c * delta / w
    g_disc = a * c * obj.grad_log_ratio(x_t, t, cond, nets, logit) / w  # ratio_gradient: discriminator
    rows.append((sigma_tilde(obj.schedule, t.cpu()), *(g.flatten(1).norm(dim=1) for g in (g_main, g_lin, g_disc))))
sig, gm, gl, gd = (torch.cat(v) for v in zip(*rows))
print(f"step {step} of {folder.name}, {len(sig)} generator samples; RMS per-sample x-gradient norm of each term")
print("\n| sigma/alpha | samples | main term | grad-r term (score) | ratio | grad-r term (discriminator) | ratio |")
print("|---|---|---|---|---|---|---|")
for lo, hi in [(0, 0.05), (0.05, 0.2), (0.2, 1), (1, 5), (5, 1e9)]:
    m = (sig >= lo) & (sig < hi)
    if m.any():
        rm, rl, rd = (v[m].pow(2).mean().sqrt() for v in (gm, gl, gd))
        print(f"| {lo:g}-{hi:g} | {int(m.sum())} | {float(rm):.3g} | {float(rl):.3g} | {float(rl / rm):.3g} | {float(rd):.3g} | "
              f"{float(rd / rm):.3g} |")
