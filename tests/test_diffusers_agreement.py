"""Our solvers against diffusers' schedulers: same tiny random UNet, same noise, same timesteps, float64."""

import pytest
import torch
from conftest import diffusers_float64, diffusers_loop, save_teacher_folder, tiny_unet

from distill.solvers import sample
from teachers import load_teacher

STEPS = 10


def _noise(shape=(2, 1, 8, 8)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _teacher(folder):
    return load_teacher(folder).to(torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_equals_ddim(make_teacher_folder, prediction_type, beta_schedule, spacing):
    from diffusers import DDIMScheduler

    folder, net, sched = make_teacher_folder(prediction_type, beta_schedule)
    # clip_sample=False: we never clip; set_alpha_to_one=True: the last step lands on clean data.
    # (With "linspace" spacing DDIM steps to t - N // steps, which is not the next listed timestep.)
    ddim = DDIMScheduler.from_config(sched.config, clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
    noise, timesteps = _noise(), []
    with diffusers_float64(ddim):
        ref = diffusers_loop(ddim, net, noise, STEPS, timesteps_out=timesteps)
    ours = sample(_teacher(folder), noise, solver="euler", timesteps=timesteps)
    assert (ours - ref).abs().max().item() < 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_dpmpp_2m_equals_dpm_solver_multistep(make_teacher_folder, prediction_type, beta_schedule):
    from diffusers import DPMSolverMultistepScheduler

    folder, net, sched = make_teacher_folder(prediction_type, beta_schedule)
    dpm = DPMSolverMultistepScheduler.from_config(
        sched.config, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
        lower_order_final=True,
    )
    noise, timesteps = _noise(), []
    with diffusers_float64(dpm):
        ref = diffusers_loop(dpm, net, noise, STEPS, timesteps_out=timesteps)
    ours = sample(_teacher(folder), noise, solver="dpmpp_2m", timesteps=timesteps)
    assert (ours - ref).abs().max().item() < 1e-6


def test_dpmpp_2m_equals_unpatched_diffusers_to_float32_precision(make_teacher_folder):
    """Without the float64 shim diffusers rounds to float32 inside step(): agreement to float32 precision."""
    from diffusers import DPMSolverMultistepScheduler

    folder, net, sched = make_teacher_folder("v_prediction", "linear")
    dpm = DPMSolverMultistepScheduler.from_config(sched.config, algorithm_type="dpmsolver++", solver_order=2)
    noise, timesteps = _noise(), []
    ref = diffusers_loop(dpm, net, noise, STEPS, timesteps_out=timesteps)
    ours = sample(_teacher(folder), noise, solver="dpmpp_2m", timesteps=timesteps)
    assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


def test_euler_equals_flow_match_euler(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    folder = save_teacher_folder(tmp_path / "flow", tiny_unet(), sched)
    net = UNet2DModel.from_pretrained(folder / "unet").double().eval()
    teacher = _teacher(folder)
    assert teacher.schedule.kind == "rectified_flow" and teacher.prediction_type == "flow"
    noise = _noise()
    with diffusers_float64(sched):
        ref = diffusers_loop(sched, net, noise, STEPS)
        sigmas = sched.sigmas
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0  # starts from pure noise, ends on clean data
    ours = sample(teacher, noise, solver="euler", timesteps=sigmas[:-1])
    assert (ours - ref).abs().max().item() < 1e-6
