"""AMED-Solver and AMED-Plugin (Zhou, Chen, Wang, Zhang, Yu & Wang, CVPR 2024, "Fast ODE-based Sampling for
Diffusion Models in Around 5 Steps"): a tiny predictor (``predictor.AmedPredictor`` beside this file), fed the teacher's
bottleneck feature at the start of each step, chooses where inside the step a second evaluation goes, per sample.

Per step t -> t_n (2 NFE, the step into the clean point too, as the authors' steps all are):
  lam_m = lam + r (lam_n - lam)   (tau_m = tau_n^r tau^(1-r) in tau = sigma / alpha, Alg. 1; lam(t_min) for lam_n
                                   in the step into the clean point)
  AMED-Solver (``amed``): x_m by an Euler (DDIM) step, then the whole step with the slope at the midpoint (c = the
      predicted direction scale; Eq. 10), written in the exponential-integrator (DDIM) form
      x_n = (sigma_n / sigma) x + c alpha_n (1 - e^{-h}) D(x_m, t_m), h = lam_n - lam, rather than in EDM's chart
      y_n = y + c (tau_n - tau) (y_m - D(x_m)) / tau_m: for VP teachers whose sigma/alpha reaches 10^4 at t_max (the
      mnist16 teacher) the EDM-chart step cancels catastrophically, where the DDIM form does not
  AMED-Plugin (``euler_amed``, ``dpmpp_2m_amed``): the base solver's own update, t -> t_m -> t_n, its history
      holding the intermediate points (Sec. 4.2)
Into the clean point the AMED-Solver returns c D(x_m) and the plugins D(x_m). The AMED-Plugin on iPNDM, the time
scale a_n of the authors' code and AFS are not implemented.
"""

from __future__ import annotations

from distill.solvers.basic import _emit
from distill.solvers.common import ddim_step, exp_step, grid_points, multistep_terms, sample_point, t_batch
from distill.solvers.registry import register

RULES = ("amed", "euler", "dpmpp_2m")


def _nfe_two_per_step(steps: int, clean_final: bool) -> int:
    return 2 * steps  # the analytic first step (AFS) that would save one is not implemented


def _rule_step(x, hist, cur, nxt, rule: str):
    """The base solver's update from ``cur`` to ``nxt``; ``hist`` = [(lam, D), ...] newest first, D at ``cur`` first."""
    if rule == "dpmpp_2m" and len(hist) > 1 and not nxt.clean:  # DPM-Solver++(2M), Lu et al. 2022b, Alg. 2
        terms = multistep_terms([d for _, d in hist[:2]], [lam for lam, _ in hist[:2]], nxt.lam - cur.lam)
        return exp_step(x, cur, nxt, terms, "data", midpoint=True)
    return ddim_step(x, hist[0][1], cur, nxt)  # Euler = DDIM


def amed_step(denoiser, x, d, feat, cur, nxt, hist, *, schedule, cond, amed, rule: str):
    """One step cur -> nxt (into the clean point too) from x with D = d and features ``feat`` at cur: (x_next, history)."""
    lam_end = float(schedule.lam(schedule.t_min)) if nxt.clean else nxt.lam  # into clean: the mid lies above t_min
    r, c = amed(feat, cur.lam, lam_end)
    mid = sample_point(schedule, (cur.lam + r.double() * (lam_end - cur.lam)).cpu(), x)
    hist = [(cur.lam, d), *hist][:2]
    x_mid = _rule_step(x, hist, cur, mid, "euler" if rule == "amed" else rule)
    d_mid = denoiser(x_mid, t_batch(mid, x), cond)
    if rule == "amed":
        c = c.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return ddim_step(x, c * d_mid, cur, nxt) if not nxt.clean else c * d_mid, hist
    hist = [(mid.lam, d_mid), *hist][:2]
    return _rule_step(x_mid, hist, mid, nxt, rule), hist


def _amed_solve(denoiser, x, ts, *, schedule, cond, callback, amed, rule: str, name: str):
    if amed is None:
        raise ValueError(f"solver {name!r} needs amed=<predictor> (scripts/train_amed.py --solver {name} makes one)")
    if amed.solver != name:
        raise ValueError(f"the AMED predictor was trained for solver {amed.solver!r}, not {name!r}")
    pts = grid_points(schedule, ts)
    hist = []
    for i, (cur, nxt) in enumerate(zip(pts[:-1], pts[1:])):
        d, feat = denoiser(x, t_batch(cur, x), cond, return_features=True)
        _emit(callback, i, cur, x, d)
        x, hist = amed_step(denoiser, x, d, feat, cur, nxt, hist, schedule=schedule, cond=cond, amed=amed, rule=rule)
    return x


@register("amed", order=2, nfe=_nfe_two_per_step, needs="amed")
def amed(denoiser, x, ts, *, schedule, cond=None, callback=None, amed=None):
    """AMED-Solver (Zhou et al. 2024, Alg. 1): a midpoint step whose intermediate time and direction scale a trained
    predictor chooses per sample. ``amed``: the predictor (``predictor.AmedPredictor`` beside this file or, through
    ``sample``, its file). Needs a teacher that returns features (``denoise(..., return_features=True)``)."""
    return _amed_solve(denoiser, x, ts, schedule=schedule, cond=cond, callback=callback, amed=amed, rule="amed", name="amed")


@register("euler_amed", order=1, nfe=_nfe_two_per_step, needs="amed")
def euler_amed(denoiser, x, ts, *, schedule, cond=None, callback=None, amed=None):
    """AMED-Plugin on Euler (DDIM): two DDIM steps per grid step through the predicted intermediate time."""
    return _amed_solve(denoiser, x, ts, schedule=schedule, cond=cond, callback=callback, amed=amed, rule="euler",
                       name="euler_amed")


@register("dpmpp_2m_amed", order=2, nfe=_nfe_two_per_step, needs="amed")
def dpmpp_2m_amed(denoiser, x, ts, *, schedule, cond=None, callback=None, amed=None):
    """AMED-Plugin on DPM-Solver++(2M): its multistep update over the grid with the predicted intermediate times
    inserted (their evaluations join the history)."""
    return _amed_solve(denoiser, x, ts, schedule=schedule, cond=cond, callback=callback, amed=amed, rule="dpmpp_2m",
                       name="dpmpp_2m_amed")
