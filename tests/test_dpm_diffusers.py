"""The DPM-Solver family and the stochastic references against diffusers' schedulers: the same tiny random UNet,
the same noise (and the same injected noise), the same timesteps, in float64 (``diffusers_float64``)."""

import pytest
import torch
from conftest import diffusers_float64, diffusers_loop

from distill.solvers import sample
from teachers import load_teacher

STEPS = 10
TOL = 1e-6  # float64 round-off of two evaluations of the same formulas is ~1e-14; 1e-6 catches any real difference
MODELS = [(p, b) for p in ("epsilon", "v_prediction") for b in ("linear", "squaredcos_cap_v2")]


def _noise(shape=(2, 1, 8, 8), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _err(ours, ref):
    """Max abs difference, relative to the output scale where that exceeds 1. Only one case needs it: the noise-form
    third order on squaredcos_cap_v2 with v_prediction, whose random-UNet solution grows to ~2.6e5 (alpha(999) ~ 5e-5,
    so the first step multiplies x by alpha_n / alpha ~ 1e3); there both codes agree to 1.6e-10 relative, 4e-5 absolute."""
    return (ours - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def _teacher(folder):
    return load_teacher(folder).to(torch.float64)


def _singlestep_grid(scheduler):
    """Our explicit grid for diffusers' singlestep pairing: diffusers runs groups of steps with orders 1, 2, 3 from its
    ``order_list``; a group starts at the timestep whose order is 1 and its inner timesteps are the intermediate times.
    Returns (group starts, intermediate times per group)."""
    ts, orders = scheduler.timesteps.tolist(), scheduler.order_list
    starts = [i for i, o in enumerate(orders) if o == 1]
    return [ts[i] for i in starts], [ts[a + 1:b] for a, b in zip(starts, [*starts[1:], len(ts)])]


@pytest.mark.parametrize("prediction_type,beta_schedule", MODELS)
@pytest.mark.parametrize("algorithm_type,order,steps", [("dpmsolver++", 2, 10), ("dpmsolver++", 3, 11),
                                                         ("dpmsolver", 2, 10), ("dpmsolver", 3, 11)])
def test_singlestep_equals_dpm_solver_singlestep(make_teacher_folder, prediction_type, beta_schedule, algorithm_type, order,
                                                 steps):
    """dpm_solver_2 / dpm_solver_3 with ``mid_ts`` against DPMSolverSinglestepScheduler.

    Where diffusers differs from the paper (Lu et al. 2022, Alg. 1-2), and what reproduces it here:
      * intermediate times: diffusers takes its own listed timesteps (so r1, r2 are whatever the integer timesteps
        give, not 1/2 or 1/3, 2/3 in lam) and groups them by ``order_list`` (1, 2, 3, 1, 2, 3, ..., with lower-order
        groups at the end); we pass the group starts as the grid and the inner timesteps as ``mid_ts``;
      * the second intermediate state of the third order: diffusers' ``solver_type="midpoint"`` uses its order-2
        update, weight (r2/r1) phi_1(r2 h)/2, where the paper uses (r2/r1) phi_2(r2 h): ``stage2="midpoint"``.
    The same: the first intermediate state (a DDIM step), the second-order update (Alg. 1, phi_1/(2 r1)), the third
    order's final update (weight phi_2(h)/r2 on M(u2) - M), both parameterizations (noise: ``dpmsolver``, data:
    ``dpmsolver++``), and the last step into the clean point (it returns D). diffusers refuses
    final_sigmas_type="zero" for the noise form, so those cases end at sigma_min (t = 0) with final="t_min".
    """
    from diffusers import DPMSolverSinglestepScheduler

    folder, net, sched = make_teacher_folder(prediction_type, beta_schedule)
    final_sigmas_type = "zero" if algorithm_type == "dpmsolver++" else "sigma_min"
    dpm = DPMSolverSinglestepScheduler.from_config(sched.config, algorithm_type=algorithm_type, solver_order=order,
                                                   solver_type="midpoint", final_sigmas_type=final_sigmas_type)
    noise = _noise()
    with diffusers_float64(dpm):
        ref = diffusers_loop(dpm, net, noise, steps)
    starts, mid_ts = _singlestep_grid(dpm)
    assert max(len(m) for m in mid_ts) == order - 1  # the grid really exercises the full order
    if final_sigmas_type == "zero":
        timesteps, final = starts, "clean"
    else:
        timesteps, final = [*starts, 0], "t_min"
    predict = "data" if algorithm_type == "dpmsolver++" else "noise"
    solver, opts = ("dpm_solver_2", {}) if order == 2 else ("dpm_solver_3", {"stage2": "midpoint"})
    teacher = _teacher(folder)
    ours = sample(teacher, noise, solver=solver, timesteps=timesteps, final=final, mid_ts=mid_ts, predict=predict, **opts)
    err = _err(ours, ref)
    assert err < TOL
    if order == 3:  # the paper's second stage is a different (also third-order) method: the option is what matches
        paper = sample(teacher, noise, solver=solver, timesteps=timesteps, final=final, mid_ts=mid_ts, predict=predict)
        assert _err(paper, ref) > 1e4 * max(err, 1e-16)  # measured ratios >= 1e7


@pytest.mark.parametrize("prediction_type,beta_schedule", MODELS[::3])
def test_dpmpp_2s_is_dpm_solver_2_in_data_form(make_teacher_folder, prediction_type, beta_schedule):
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1) equals DPMSolverSinglestepScheduler(dpmsolver++, order 2)."""
    from diffusers import DPMSolverSinglestepScheduler

    folder, net, sched = make_teacher_folder(prediction_type, beta_schedule)
    dpm = DPMSolverSinglestepScheduler.from_config(sched.config, algorithm_type="dpmsolver++", solver_order=2)
    noise = _noise()
    with diffusers_float64(dpm):
        ref = diffusers_loop(dpm, net, noise, STEPS)
    starts, mid_ts = _singlestep_grid(dpm)
    ours = sample(_teacher(folder), noise, solver="dpmpp_2s", timesteps=starts, mid_ts=mid_ts)
    assert _err(ours, ref) < TOL


@pytest.mark.parametrize("prediction_type,beta_schedule", MODELS)
@pytest.mark.parametrize("steps", [10, 16])
def test_dpmpp_3m_equals_dpm_solver_multistep(make_teacher_folder, prediction_type, beta_schedule, steps):
    """dpmpp_3m(halve_d2=True) against DPMSolverMultistepScheduler(dpmsolver++, order 3).

    Same: warm-up (orders 1, 2), the backward differences, lower_order_final (10 steps: the second-to-last step is
    second order; 16 steps: no lowering), the first-order step into the clean point. Different: diffusers weights
    its second difference D2 = h^2 x0''/2 by phi_3 (half the Taylor coefficient), which makes its "third-order" method
    converge with order 2 (see test_dpm_family.py); our default is the Taylor weight, so only halve_d2=True matches.
    """
    from diffusers import DPMSolverMultistepScheduler

    folder, net, sched = make_teacher_folder(prediction_type, beta_schedule)
    dpm = DPMSolverMultistepScheduler.from_config(sched.config, algorithm_type="dpmsolver++", solver_order=3,
                                                  solver_type="midpoint", final_sigmas_type="zero", lower_order_final=True)
    noise, timesteps = _noise(), []
    with diffusers_float64(dpm):
        ref = diffusers_loop(dpm, net, noise, steps, timesteps_out=timesteps)
    teacher = _teacher(folder)
    ours = sample(teacher, noise, solver="dpmpp_3m", timesteps=timesteps, halve_d2=True)
    err = _err(ours, ref)
    assert err < TOL
    taylor = sample(teacher, noise, solver="dpmpp_3m", timesteps=timesteps)
    assert _err(taylor, ref) > 1e4 * max(err, 1e-16)  # measured ratios >= 2e7


def _sde_scheduler(sched):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(sched.config, algorithm_type="sde-dpmsolver++", solver_order=2,
                                                   solver_type="midpoint", final_sigmas_type="zero")


@pytest.mark.parametrize("prediction_type,beta_schedule", MODELS)
def test_dpmpp_2m_sde_equals_diffusers_with_injected_noise(make_teacher_folder, prediction_type, beta_schedule):
    """The same standard-normal tensors go to diffusers' ``step(..., variance_noise=z_i)`` and to ``noises=``."""
    folder, net, sched = make_teacher_folder(prediction_type, beta_schedule)
    dpm = _sde_scheduler(sched)
    noise, zs = _noise(), [_noise(seed=100 + i) for i in range(STEPS)]
    with diffusers_float64(dpm), torch.no_grad():
        dpm.set_timesteps(STEPS)
        ref = noise
        for t, z in zip(dpm.timesteps, zs):
            ref = dpm.step(net(ref, t).sample, t, ref, variance_noise=z).prev_sample
    ours = sample(_teacher(folder), noise, solver="dpmpp_2m_sde", timesteps=dpm.timesteps.tolist(), noises=zs)
    assert _err(ours, ref) < TOL


@pytest.mark.parametrize("prediction_type,beta_schedule", MODELS[::3])
def test_dpmpp_2m_sde_equals_diffusers_with_a_generator(make_teacher_folder, prediction_type, beta_schedule):
    """The same seed gives the same draws: one x-shaped standard normal per step, in step order."""
    folder, net, sched = make_teacher_folder(prediction_type, beta_schedule)
    dpm = _sde_scheduler(sched)
    noise, timesteps = _noise(), []
    with diffusers_float64(dpm):
        ref = diffusers_loop(dpm, net, noise, STEPS, step_kwargs={"generator": torch.Generator().manual_seed(7)},
                             timesteps_out=timesteps)
    ours = sample(_teacher(folder), noise, solver="dpmpp_2m_sde", timesteps=timesteps,
                  generator=torch.Generator().manual_seed(7))
    assert _err(ours, ref) < TOL


@pytest.mark.parametrize("prediction_type,beta_schedule,spacing", [(*m, "leading") for m in MODELS] + [("epsilon", "linear", "trailing")])
def test_ddpm_equals_ddpm_scheduler(make_teacher_folder, prediction_type, beta_schedule, spacing):
    """``ddpm`` against DDPMScheduler (variance_type="fixed_small") with the same generator seed.

    clip_sample=False: we never clip x0. With "trailing" spacing the last listed timestep is 99, and diffusers adds
    sqrt(1e-20) = 1e-10 times a fresh draw on the step into clean data (it clamps the zero posterior variance at
    1e-20), where we return D: a difference of ~1e-10, inside the tolerance."""
    from diffusers import DDPMScheduler

    folder, net, sched = make_teacher_folder(prediction_type, beta_schedule)
    ddpm = DDPMScheduler.from_config(sched.config, clip_sample=False, timestep_spacing=spacing)
    noise, timesteps = _noise(), []
    with diffusers_float64(ddpm):
        ref = diffusers_loop(ddpm, net, noise, STEPS, step_kwargs={"generator": torch.Generator().manual_seed(3)},
                             timesteps_out=timesteps)
    ours = sample(_teacher(folder), noise, solver="ddpm", timesteps=timesteps, generator=torch.Generator().manual_seed(3))
    assert _err(ours, ref) < TOL
