"""``FewStepScheduler``: a diffusers scheduler that samples an exported student exactly as ``Student.sample`` does,
so a student folder written by ``scripts/export.py --diffusers`` runs in stock diffusers:

    from diffusers import ConsistencyModelPipeline
    pipe = ConsistencyModelPipeline.from_pretrained("student_dir")   # unet + this scheduler (needs fewstep-distill)
    images = pipe(num_inference_steps=2, class_labels=[3, 7], generator=torch.Generator().manual_seed(0),
                  output_type="pt").images

A prompt-conditioned (UNet2DConditionModel) student's folder also holds its teacher's vae, text_encoder and tokenizer
and loads as a ``LatentConsistencyModelPipeline`` when the student takes the guidance scale w (LCM-style, through the
UNet's ``timestep_cond``), else as a ``StableDiffusionPipeline`` (call it with ``guidance_scale=1``: no CFG on top):

    pipe = LatentConsistencyModelPipeline.from_pretrained("student_dir")
    latents = pipe(["a red fox"], num_inference_steps=2, guidance_scale=7.5, output_type="latent").images

Its config holds what the student file holds: the noise schedule, the network's prediction type and time scale,
the parameterization (consistency boundary condition or plain denoiser), sigma_data, the sampler (``consistency``:
re-noise between steps; ``ode``: DDIM steps) and the sampling times of every recorded step count. ``step`` turns
the UNet output into the student's sample with the project's own functions (``distill.core.param``,
``students.student.parameterize``, ``distill.solvers.common.ddim_step``): the same arithmetic, so the same
numbers. LCM's scheduler cannot stand in: its boundary coefficients use t * timestep_scaling where ours use the
EDM-chart sigma~(t) - sigma~(t_min), and it has no deterministic sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from distill.core.param import combine_x0, x0_coefficients
from distill.core.schedules import schedule_from_config
from distill.solvers.common import ddim_step, grid_points


@dataclass
class FewStepSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    denoised: torch.Tensor


class FewStepScheduler(SchedulerMixin, ConfigMixin):
    order = 1

    @register_to_config
    def __init__(self, schedule: dict | None = None, prediction_type: str = "epsilon", time_scale: float = 1.0,
                 parameterization: str = "consistency", sigma_data: float = 0.5, sampler: str = "consistency",
                 sampling_timesteps: dict | None = None):
        self.schedule = schedule_from_config(schedule or {"kind": "vp_linear"})
        self.init_noise_sigma = 1.0
        self.timesteps = torch.empty(0)
        self._ts: list[float] = []
        self._step = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None,
                      original_inference_steps: int | None = None):
        """The student's recorded times for ``num_inference_steps``, or explicit native ``timesteps`` (network units).
        ``original_inference_steps`` (LCMScheduler's, which LatentConsistencyModelPipeline always passes) is ignored."""
        if timesteps is not None:
            ts = [float(t) / self.config.time_scale for t in timesteps]
        else:
            stored = self.config.sampling_timesteps or {}
            if str(num_inference_steps) not in stored:
                raise ValueError(f"this student records sampling times for {', '.join(sorted(stored, key=int))} steps, not "
                                 f"{num_inference_steps}; pass timesteps= to choose others")
            ts = list(stored[str(num_inference_steps)])
        self._ts, self._step = ts, 0
        self.init_noise_sigma = float(self.schedule.init_noise_scale(torch.tensor(ts[0], dtype=torch.float64)))
        # what the network sees: t * time_scale in float32, as Student.raw passes it
        self.timesteps = (torch.tensor(ts, dtype=torch.float64) * self.config.time_scale).float().to(device or "cpu")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _denoised(self, model_output, sample, t: float) -> torch.Tensor:
        from students.student import parameterize

        t64 = torch.tensor([t], dtype=torch.float64)
        log_a, log_s = self.schedule.log_alpha_sigma(t64)
        out = model_output.to(sample.dtype)
        d = out if self.config.prediction_type == "sample" else combine_x0(
            out, sample, *x0_coefficients(self.config.prediction_type, log_a.exp(), log_s.exp(), sample.ndim))
        return parameterize(self.config.parameterization, self.schedule, self.config.sigma_data, sample,
                            t64.expand(sample.shape[0]), d)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True):
        t = self._ts[self._step]
        last = self._step == len(self._ts) - 1
        x0 = self._denoised(model_output, sample, t)
        if self.config.sampler == "ode":  # one DDIM step to the next time (the clean point after the last)
            nxt = self._ts[self._step + 1] if not last else self.schedule.t_clean
            cur_p, nxt_p = grid_points(self.schedule, torch.tensor([t, nxt], dtype=torch.float64))
            prev = ddim_step(sample, x0, cur_p, nxt_p)
        elif last:
            prev = x0
        else:  # re-noise to the next time (multistep consistency sampling, Song et al. 2023, Algorithm 1)
            nxt = torch.tensor(self._ts[self._step + 1], dtype=torch.float64)
            z = torch.randn(sample.shape, generator=generator, dtype=sample.dtype).to(sample.device)
            prev = float(self.schedule.alpha(nxt)) * x0 + float(self.schedule.sigma(nxt)) * z
        self._step += 1
        return FewStepSchedulerOutput(prev, x0) if return_dict else (prev, x0)

    def __len__(self) -> int:
        return len(self._ts)
