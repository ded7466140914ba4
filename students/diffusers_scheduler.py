"""``FewStepScheduler``: a diffusers scheduler that samples an exported student exactly as ``Student.sample`` does.

This file imports only torch and diffusers: ``students.diffusers_export.save_diffusers`` copies it into the exported
folder as ``scheduler/fewstep_scheduler.py`` and names it in ``model_index.json`` as ``["fewstep_scheduler",
"FewStepScheduler"]``, diffusers' custom-component layout, so the folder loads in a Python where this project is not
installed, with one argument:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("student_dir", trust_remote_code=True)   # runs scheduler/fewstep_scheduler.py
    images = pipe(num_inference_steps=2, class_labels=[3, 7], generator=torch.Generator().manual_seed(0),
                  output_type="pt").images

(``ConsistencyModelPipeline.from_pretrained(..., trust_remote_code=True)`` loads the same folder.) An ode student whose
every recorded grid is DDIM's own gets diffusers' ``DDIMScheduler`` instead and needs no argument
(``students.diffusers_export.stock_scheduler``).

Its config holds no schedule and no parameterization, only numbers: for each recorded step count, one row per step
(``STEP_ROW``) with the time the network sees and the coefficients of that step, computed at export time by the
project's own functions (``students.diffusers_export.scheduler_steps``). With x the state and u the network output,

    d = c_x x + c_p u                    the data prediction (``distill.core.param.x0_coefficients``)
    f = a x + r d                        the student's output (``students.student.f_coefficients``; ode: f = d)
    next = f                             after the last step of either sampler (the clean point)
    next = p x + q f                     ode: one DDIM step (``distill.solvers.common.ddim_coefficients``)
    next = q f + s z,  z ~ N(0, I)       consistency: re-noise to the next time (Song et al. 2023, Algorithm 1)

the same float32 operations in the same order as ``Student.sample``, so the same numbers (the re-noising draws come
from the pipeline's generator, after the initial noise, as in ``Student.sample(noise, k, generator=...)``).
Why LCM's and CM's schedulers cannot stand in: ``docs/ecosystem.md`` ("diffusers").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

STEP_ROW = ("timestep", "c_x", "c_p", "a", "r", "p", "q", "s")  # one step's numbers, in this order (module doc)


@dataclass
class FewStepSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    denoised: torch.Tensor


class FewStepScheduler(SchedulerMixin, ConfigMixin):
    order = 1

    @register_to_config
    def __init__(self, steps: dict | None = None, init_noise_sigmas: dict | None = None, sampler: str = "consistency"):
        # steps: {"k": [row, ...]} (STEP_ROW per row); init_noise_sigmas: {"k": scale of the initial noise}
        self.init_noise_sigma = 1.0
        self.timesteps = torch.empty(0)
        self._rows: list[dict] = []
        self._step = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None,
                      original_inference_steps: int | None = None):
        """The recorded steps of ``num_inference_steps``. ``original_inference_steps`` (LCMScheduler's, which
        LatentConsistencyModelPipeline always passes) is ignored; explicit ``timesteps`` are refused."""
        recorded = sorted(self.config.steps or {}, key=int)
        if timesteps is not None:
            raise ValueError(f"this exported scheduler samples the recorded step counts ({', '.join(recorded)}), not "
                             f"explicit timesteps; students.load_student(...).sample(noise, timesteps=...) samples any times")
        if str(num_inference_steps) not in recorded:
            raise ValueError(f"this student records sampling times for {', '.join(recorded)} steps, not "
                             f"{num_inference_steps}")
        self._rows = [dict(zip(STEP_ROW, row)) for row in self.config.steps[str(num_inference_steps)]]
        self._step = 0
        self.init_noise_sigma = float(self.config.init_noise_sigmas[str(num_inference_steps)])
        self.timesteps = torch.tensor([row["timestep"] for row in self._rows], dtype=torch.float32, device=device or "cpu")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True):
        row, last = self._rows[self._step], self._step == len(self._rows) - 1
        d = torch.addcmul(sample * row["c_x"], model_output.to(sample.dtype), torch.tensor(row["c_p"], dtype=sample.dtype,
                                                                                             device=sample.device))
        f = sample * row["a"] + d * row["r"]
        if last:
            prev = f
        elif self.config.sampler == "ode":
            prev = torch.add(sample * row["p"], f, alpha=row["q"])
        else:
            z = torch.randn(sample.shape, generator=generator, dtype=sample.dtype).to(sample.device)
            prev = row["q"] * f + row["s"] * z
        self._step += 1
        return FewStepSchedulerOutput(prev, f) if return_dict else (prev, f)

    def __len__(self) -> int:
        return len(self._rows)
