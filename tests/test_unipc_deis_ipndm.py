"""UniPC, DEIS and iPNDM: convergence order on analytic teachers, agreement with diffusers in float64 (tiny
random UNet), and with a transcription of k-diffusion's iPNDM."""

import math

import pytest
import torch
from conftest import diffusers_float64, diffusers_loop

from distill.core.grids import make_grid
from distill.eval.exact import ode_reference, rmse
from distill.solvers import SOLVERS, sample
from teachers import load_teacher

STEPS = 10


def _noise(shape=(2, 1, 8, 8)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _teacher(folder):
    return load_teacher(folder).to(torch.float64)


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------
# Convergence order
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def problems():
    """preset -> (teacher, x_T, x at t_min): gauss2d by its closed form, aniso2d by the RK4 reference (300 steps:
    its error, 2e-8 against 800 steps, is under 1% of the smallest solver error used below)."""
    out = {}
    for preset in ("gauss2d", "aniso2d"):
        teacher = load_teacher(f"gmm:{preset}")
        s = teacher.schedule
        x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(s.init_noise_scale(s.t_max))
        if preset == "gauss2d":
            ref = teacher.exact_ode_solution(x, s.t_max, s.t_min)
        else:
            ref = ode_reference(teacher.denoise, x, s.t_max, s.t_min, s, steps=300)
        out[preset] = teacher, x, ref
    return out


def _slope(problem, solver, n, options):
    teacher, x, ref = problem
    s = teacher.schedule
    errors = [rmse(SOLVERS[solver].fn(teacher.denoise, x.clone(), make_grid(s, m, "logsnr", final="t_min"), schedule=s, **options), ref)
              for m in (n, 2 * n)]
    return math.log2(errors[0] / errors[1])


# (solver, options, expected order, N): the slope log2(e_N / e_2N) on the logsnr grid, final="t_min".
# lower_order_final=False: with final="t_min" a first-order last step would add an O(h^2) error and cap every
# method at order 2 (near t_min D hardly changes, so it only shows at large N; it is checked against diffusers).
# Measured slopes (gauss2d / aniso2d), N -> 2N:
#   unipc p=1: 1.99 / 1.96   p=2: 2.99 / 2.94   p=3: 3.68 / 3.92 (3.87 / 3.71 at 128 -> 256: it oscillates
#   about 4)   UniP-3 alone: 4.05 / 3.09   p=2 bh1: 3.05 / 2.98
#   deis 2: 1.97 / 1.92   deis 3: 3.90 / 2.85
#   ipndm 2, 3, 4 (fixed weights): 1.99, 1.97, 2.02 / 1.91, 1.97, 1.99
#   ipndm variable_step 3: 2.81 / 2.76   4 (N = 128): 3.83 / 3.80
# UniPC: UniC-p raises UniP-p's order p to p + 1 (Zhao et al. 2023, Theorem 3.1 and Corollary 3.2), which
# is what we see, the corrector costing no NFE. iPNDM: its fixed equal-step weights are only second-order
# consistent on a grid whose tau-steps change from step to step (logsnr: by e^-h), so orders 3 and 4 measure 2;
# the exact weights of the actual grid (variable_step) give the full order.
# Tolerance 0.35: the slope at finite N is k + O(1/N); the largest pre-asymptotic deviation above is 0.32
# (unipc p=3 on gauss2d), and 0.35 < 0.5 still tells order k from k +- 1. On a single Gaussian the third-order
# multistep methods converge faster than their order (UniP-3 4.05, DEIS-3 3.90; the leading error term nearly
# vanishes for this problem), so gauss2d gets only the lower bound; aniso2d, a 3-mode mixture, gets both.
ORDER_CASES = [
    ("unipc", {"order": 1}, 2, 64),
    ("unipc", {"order": 2}, 3, 64),
    ("unipc", {"order": 3}, 4, 64),
    ("unipc", {"order": 3, "use_corrector": False}, 3, 64),
    ("unipc", {"order": 2, "variant": "bh1"}, 3, 64),
    ("deis", {"order": 2}, 2, 64),
    ("deis", {"order": 3}, 3, 64),
    ("ipndm", {"order": 2}, 2, 64),
    ("ipndm", {"order": 3}, 2, 64),
    ("ipndm", {"order": 4}, 2, 64),
    ("ipndm", {"order": 3, "variable_step": True}, 3, 64),
    ("ipndm", {"order": 4, "variable_step": True}, 4, 128),
]
TOL = 0.35


@pytest.mark.parametrize("solver,options,expected,n", ORDER_CASES, ids=[f"{c[0]}-{c[1]}" for c in ORDER_CASES])
def test_convergence_order(problems, solver, options, expected, n):
    if solver != "ipndm":
        options = {**options, "lower_order_final": False}
    exact = _slope(problems["gauss2d"], solver, n, options)
    mixture = _slope(problems["aniso2d"], solver, n, options)
    assert exact > expected - TOL, f"gauss2d slope {exact:.2f}, expected at least {expected - TOL}"
    assert abs(mixture - expected) < TOL, f"aniso2d slope {mixture:.2f}, expected {expected} +- {TOL}"


# ------------------------------------------------------------------------------------------------
# Identities
# ------------------------------------------------------------------------------------------------
def test_unip2_without_corrector_is_dpmpp_2m():
    """UniP-2 with B(h) = e^h - 1 and its weight 1/2 is DPM-Solver++(2M) term for term."""
    teacher = load_teacher("gmm:aniso2d")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = sample(teacher, noise, solver="unipc", nfe=12, order=2, use_corrector=False, lower_order_final=False)
    assert _max_diff(ours, sample(teacher, noise, solver="dpmpp_2m", nfe=12)) < 1e-12
    corrected = sample(teacher, noise, solver="unipc", nfe=12, order=2, lower_order_final=False)
    assert _max_diff(ours, corrected) > 1e-4  # the corrector does act


def _kdiffusion_ipndm(model, x, sigmas, max_order):
    """k-diffusion's ``sample_ipndm``, transcribed: Euler / Adams-Bashforth 2-4 with equal-step weights on
    dx/dsigma = (x - D) / sigma."""
    buffer = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, i)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if order == 1:
            x = x + (t_next - t_cur) * d_cur
        elif order == 2:
            x = x + (t_next - t_cur) * (3 * d_cur - buffer[-1]) / 2
        elif order == 3:
            x = x + (t_next - t_cur) * (23 * d_cur - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        else:
            x = x + (t_next - t_cur) * (55 * d_cur - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
        buffer = (buffer + [d_cur])[-3:]
    return x


@pytest.mark.parametrize("schedule", ["vp_linear", "edm"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_equals_kdiffusion_transcription(schedule, order):
    """In sigma~ = sigma / alpha and x~ = x / alpha (k-diffusion's units) our iPNDM is k-diffusion's."""
    teacher = load_teacher(f"gmm:aniso2d@{schedule}")
    s = teacher.schedule
    ts = make_grid(s, 12, "karras", final="t_min")
    alpha, sigma = s.alpha(ts), s.sigma(ts)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * float(s.init_noise_scale(ts[0]))

    def model(x_tilde, i):
        return teacher.denoise(alpha[i] * x_tilde, ts[i].expand(len(x_tilde)))

    ref = alpha[-1] * _kdiffusion_ipndm(model, x / alpha[0], (sigma / alpha).tolist(), order)
    ours = SOLVERS["ipndm"].fn(teacher.denoise, x, ts, schedule=s, order=order)
    assert _max_diff(ours, ref) < 1e-10


@pytest.mark.parametrize("solver,options", [("unipc", {}), ("unipc", {"order": 3, "variant": "bh1"}), ("deis", {"order": 3}),
                                            ("ipndm", {}), ("ipndm", {"variable_step": True})])
@pytest.mark.parametrize("schedule", ["rectified_flow", "edm"])
def test_one_nfe_per_step_and_convergent_on_other_schedules(solver, options, schedule):
    """sample() checks the NFE against the registry; rectified flow starts at t = 1 where lam = -inf. Doubling
    the NFE must at least halve the error against a 199-NFE Heun solve (first order at worst)."""
    teacher = load_teacher(f"gmm:aniso2d@{schedule}")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = sample(teacher, noise, solver="heun", nfe=199)
    errors = []
    for nfe in (16, 32):
        out, info = sample(teacher, noise, solver=solver, nfe=nfe, return_info=True, **options)
        assert info["nfe"] == nfe and torch.isfinite(out).all()
        errors.append(rmse(out, ref))
    assert errors[1] < errors[0] / 2, errors


@pytest.mark.parametrize("solver,options,word", [
    ("unipc", {"order": 4}, "order"), ("unipc", {"variant": "bh3"}, "variant"), ("unipc", {"predict": "v"}, "predict"),
    ("deis", {"order": 0}, "order"), ("ipndm", {"order": 5}, "order"),
])
def test_bad_options_are_refused(solver, options, word):
    with pytest.raises(ValueError, match=word):
        sample(load_teacher("gmm:gauss2d"), torch.zeros(2, 2, dtype=torch.float64), solver=solver, nfe=4, **options)


def test_unipc_noise_prediction_refuses_alpha_zero():
    with pytest.raises(ValueError, match="alpha > 0"):
        sample(load_teacher("gmm:gauss2d@rectified_flow"), torch.zeros(2, 2, dtype=torch.float64), solver="unipc", nfe=4,
               predict="noise")


# ------------------------------------------------------------------------------------------------
# Agreement with diffusers (float64, same noise, same timesteps)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_equals_diffusers_unipc(make_teacher_folder, prediction_type, beta_schedule, variant, order):
    """UniPCMultistepScheduler(predict_x0=True, final_sigmas_type="zero", lower_order_final=True).

    diffusers' last step (into sigma = 0) returns NaN for bh1: B(h) = h is infinite there (a known diffusers
    issue, see FACTS.md). So beside the output (where finite) we compare the state before the last step: the
    scheduler's corrected sample at the last timestep (``last_sample``) with our callback's state there, and
    its data prediction there (``model_outputs[-1]``) with our output, which is that data prediction.
    """
    from diffusers import UniPCMultistepScheduler

    folder, net, sched = make_teacher_folder(prediction_type, beta_schedule)
    uni = UniPCMultistepScheduler.from_config(sched.config, solver_order=order, solver_type=variant, predict_x0=True,
                                              final_sigmas_type="zero", lower_order_final=True)
    noise, timesteps, states = _noise(), [], []
    with diffusers_float64(uni):
        ref = diffusers_loop(uni, net, noise, STEPS, timesteps_out=timesteps)
    ours = sample(_teacher(folder), noise, solver="unipc", timesteps=timesteps, order=order, variant=variant,
                  callback=states.append)
    assert len(states) == STEPS
    assert _max_diff(states[-1]["x"], uni.last_sample) < 1e-6
    assert _max_diff(ours, uni.model_outputs[-1]) < 1e-6
    if variant == "bh2" or torch.isfinite(ref).all():
        assert _max_diff(ours, ref) < 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_noise_prediction_equals_diffusers(make_teacher_folder, prediction_type, variant):
    """predict_x0=False: diffusers' last step is NaN for both variants (sigma_t * (e^h - 1) with h = inf), so we
    compare the corrected state at the last timestep."""
    from diffusers import UniPCMultistepScheduler

    folder, net, sched = make_teacher_folder(prediction_type, "linear")
    uni = UniPCMultistepScheduler.from_config(sched.config, solver_order=3, solver_type=variant, predict_x0=False,
                                              final_sigmas_type="zero", lower_order_final=True)
    noise, timesteps, states = _noise(), [], []
    with diffusers_float64(uni):
        diffusers_loop(uni, net, noise, STEPS, timesteps_out=timesteps)
    sample(_teacher(folder), noise, solver="unipc", timesteps=timesteps, order=3, variant=variant, predict="noise",
           callback=states.append)
    assert _max_diff(states[-1]["x"], uni.last_sample) < 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("order", [2, 3])
def test_deis_equals_diffusers_deis(make_teacher_folder, prediction_type, beta_schedule, order):
    """DEISMultistepScheduler ("logrho"). diffusers' DEIS has no final_sigmas_type: its last step ends on
    t = 0 (sigma(0) > 0), not on clean data, so our grid is its timesteps plus t = 0 with final="t_min"."""
    from diffusers import DEISMultistepScheduler

    folder, net, sched = make_teacher_folder(prediction_type, beta_schedule)
    deis = DEISMultistepScheduler.from_config(sched.config, solver_order=order, lower_order_final=True)
    noise, timesteps = _noise(), []
    with diffusers_float64(deis):
        ref = diffusers_loop(deis, net, noise, STEPS, timesteps_out=timesteps)
    ours = sample(_teacher(folder), noise, solver="deis", timesteps=timesteps + [0], final="t_min", order=order)
    assert _max_diff(ours, ref) < 1e-6


def test_deis_long_solves_match_diffusers_without_lower_order_final(make_teacher_folder):
    """diffusers' DEIS lowers the final orders only for solves of fewer than 15 steps; at 16 steps it matches
    our ``lower_order_final=False`` and not our default."""
    from diffusers import DEISMultistepScheduler

    folder, net, sched = make_teacher_folder("epsilon", "linear")
    deis = DEISMultistepScheduler.from_config(sched.config, solver_order=3, lower_order_final=True)
    noise, timesteps = _noise(), []
    with diffusers_float64(deis):
        ref = diffusers_loop(deis, net, noise, 16, timesteps_out=timesteps)
    teacher = _teacher(folder)
    ours = sample(teacher, noise, solver="deis", timesteps=timesteps + [0], final="t_min", order=3, lower_order_final=False)
    lowered = sample(teacher, noise, solver="deis", timesteps=timesteps + [0], final="t_min", order=3)
    assert _max_diff(ours, ref) < 1e-6
    assert _max_diff(lowered, ref) > 1e-6
