"""A UNet student as a diffusers pipeline folder: ``save_diffusers`` writes ``unet/`` (LoRA merged), ``scheduler/``,
``model_index.json`` and ``student.json``; a prompt-conditioned student also gets the vae, text encoder and tokenizer of
its teacher's folder. ``check_diffusers_exportable`` says before any write why a student cannot be saved this way.

The scheduler is diffusers' ``DDIMScheduler`` where it takes exactly the student's steps (``stock_scheduler``: an ode
student whose every recorded grid is DDIM's "trailing" grid), and the project's ``FewStepScheduler`` otherwise, written
with its own source file (``scheduler/fewstep_scheduler.py``, which imports only torch and diffusers) so that
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it where this project is not installed.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from distill.core.atomic import write_folder
from distill.core.grids import explicit_grid
from distill.engine.export import FORMAT
from distill.engine.lora import has_lora, merged_copy
from distill.solvers.common import ddim_coefficients, grid_points
from students.diffusers_scheduler import FewStepScheduler
from students.student import f_coefficients
from teachers.sd_pipeline import pipeline_hash

SCHEDULER_MODULE = "fewstep_scheduler"  # FewStepScheduler's source in an exported folder: scheduler/fewstep_scheduler.py


def scheduler_steps(student, steps: int) -> list[list[float]]:
    """The rows of ``FewStepScheduler``'s table for a ``steps``-step sample (its module doc, ``STEP_ROW``), computed with
    the calls ``Student.sample`` makes: time seen by the network, x0 conversion, parameterization, next-step coefficients."""
    schedule, ts = student.schedule, student.sampling_timesteps(steps)
    net_times = (ts * student.time_scale).float().tolist()  # what the network sees: t * time_scale in float32
    points = grid_points(schedule, explicit_grid(schedule, ts, final="clean"))  # the ode sampler's grid
    rows = []
    for i, t in enumerate(ts):
        t1 = t.reshape(1)
        c_x, c_p = (v.item() for v in student.x0_coefficients(t1, 1)) if student.prediction_type != "sample" else (0.0, 1.0)
        a, r = (0.0, 1.0) if student.sampler == "ode" else (v.item() for v in f_coefficients(
            student.parameterization, schedule, student.sigma_data, t1))  # ode: DDIM steps on D itself
        p, q, s = 0.0, 1.0, 0.0  # the last step returns f
        if i + 1 < steps and student.sampler == "ode":
            p, q = ddim_coefficients(points[i], points[i + 1])
        elif i + 1 < steps:
            p, q, s = 0.0, float(schedule.alpha(ts[i + 1])), float(schedule.sigma(ts[i + 1]))
        rows.append([net_times[i], c_x, c_p, a, r, p, q, s])
    return rows


def stock_scheduler(student):
    """diffusers' ``DDIMScheduler`` when ``pipe(num_inference_steps=k)`` takes exactly the student's steps for every
    recorded k, else None: an ode student with euler (DDIM) steps on the discrete VP schedule of a diffusers teacher
    (alphas_cumprod bit for bit, ``DiscreteVP``), network time = t, whose k-step grid is DDIM's "trailing" one,
    N - 1 - i N / k (N divisible by k, so that DDIM's next time t - N // k is the grid's and the last step lands on
    alpha = 1). Not for a LatentConsistencyModelPipeline, which passes LCM's ``original_inference_steps``."""
    schedule = student.schedule
    if not (student.sampler == "ode" and student.sampler_solver == "euler" and schedule.kind == "discrete_vp"
            and student.time_scale == 1.0 and student.prediction_type in ("epsilon", "v_prediction", "sample")
            and not _takes_w(student)):
        return None
    n = schedule.num_train_timesteps
    for k in student.sampling_steps:
        if n % k or student.sampling_timesteps(k).tolist() != [float(n - 1 - i * (n // k)) for i in range(k)]:
            return None
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=n, beta_schedule=schedule.beta_schedule, beta_start=schedule.beta_start,
                         beta_end=schedule.beta_end, trained_betas=schedule.trained_betas,
                         prediction_type=student.prediction_type, clip_sample=False, set_alpha_to_one=True,
                         timestep_spacing="trailing", steps_offset=1)


def diffusers_scheduler(student):
    """The scheduler that samples ``student`` in a diffusers pipeline: ``stock_scheduler``'s DDIM, else a
    ``FewStepScheduler`` holding the student's recorded steps."""
    stock = stock_scheduler(student)
    if stock is not None:
        return stock
    return FewStepScheduler(steps={str(k): scheduler_steps(student, k) for k in student.sampling_steps},
                            init_noise_sigmas={str(k): float(student.schedule.init_noise_scale(student.sampling_timesteps(k)[0]))
                                               for k in student.sampling_steps},
                            sampler=student.sampler)


def save_scheduler(scheduler, folder: Path) -> list[str]:
    """Write ``scheduler`` to ``folder`` (with FewStepScheduler's source file) and return its model_index.json entry."""
    scheduler.save_pretrained(folder)
    if not isinstance(scheduler, FewStepScheduler):
        return ["diffusers", type(scheduler).__name__]
    shutil.copyfile(Path(__file__).with_name("diffusers_scheduler.py"), folder / f"{SCHEDULER_MODULE}.py")
    return [SCHEDULER_MODULE, "FewStepScheduler"]


PROMPT_COMPONENTS = ("vae", "text_encoder", "tokenizer")  # what a prompt student's pipeline folder takes from its teacher


def _takes_w(student) -> bool:
    """Whether the student takes the guidance scale through its UNet's ``timestep_cond`` input (LCM's w)."""
    from distill.core.denoisers import TimestepCondition

    return any(isinstance(c, TimestepCondition) for c in student.conditions.values())


def teacher_folder_of(student, teacher_folder: str | Path | None = None) -> Path:
    """The text-to-image teacher folder whose vae, text encoder and tokenizer a prompt student's pipeline folder copies:
    ``teacher_folder``, else the one the student file names; checked against the student's ``teacher_hash``."""
    root = Path(teacher_folder or student.info.get("teacher", ""))
    if not (root / "model_index.json").is_file() or not all((root / name).is_dir() for name in PROMPT_COMPONENTS):
        raise FileNotFoundError(f"a prompt-conditioned student's pipeline folder takes {', '.join(PROMPT_COMPONENTS)} from "
                                f"its teacher, but {str(root)!r} is not a pipeline folder with them: pass the teacher's "
                                f"folder (scripts/export.py --teacher DIR)")
    expected = student.info.get("teacher_hash")
    if expected and pipeline_hash(root) != expected:
        raise ValueError(f"{str(root)!r} is not the teacher this student was distilled from (its content hash differs); "
                         f"pass that teacher's folder (scripts/export.py --teacher DIR)")
    return root


def check_diffusers_exportable(student, teacher_folder: str | Path | None = None) -> None:
    """Raise ValueError / FileNotFoundError (one sentence) unless ``save_diffusers`` can save ``student``: call it before
    writing anything."""
    if not hasattr(student.net, "save_pretrained"):
        raise ValueError(f"only diffusers networks can be saved as a diffusers folder (--diffusers), not "
                         f"{type(student.net).__name__}")
    prompts = student.info.get("conditioning") == "prompts"
    foldable = set(_foldable_conditions(student)) if _bias_site(student.net) is not None else set()
    extra = [name for name in student.conditions
             if not (prompts and _takes_w(student) and name == "w") and name not in foldable]
    if extra:
        raise ValueError(f"a student with extra inputs ({', '.join(extra)}) that have no sampling default cannot be "
                         f"sampled by a stock diffusers pipeline, whose UNet call passes none; use students.load_student instead")
    if student.prediction_type == "both":
        raise ValueError("a student with two outputs (prediction_type 'both') cannot be sampled by a diffusers "
                         "scheduler, which takes one; use students.load_student instead")
    if student.sampler == "ode" and student.sampler_solver != "euler":
        raise ValueError(f"the exported scheduler samples an ode student with DDIM (euler) steps, not "
                         f"{student.sampler_solver!r}; use students.load_student instead")
    if prompts:
        teacher_folder_of(student, teacher_folder)


def _foldable_conditions(student) -> dict:
    """Extra scalar inputs added to the time embedding that have a sampling default (SLAM's gamma = 1)."""
    from distill.core.denoisers import ScalarEmbedding

    return {name: emb for name, emb in student.conditions.items()
            if isinstance(emb, ScalarEmbedding) and emb.config.get("default") is not None}


def _bias_site(net):
    """The last bias of a diffusers UNet's time embedding when nothing follows it (no ``post_act``), else None."""
    site = getattr(net, "time_embedding", None)
    linear = getattr(site, "linear_2", None)
    return linear.bias if linear is not None and linear.bias is not None and site.post_act is None else None


def fold_default_conditions(student, net):
    """``net``, or a copy whose time-embedding output bias holds each foldable input's embedding at its default: the
    embedding is a constant added to that output (``NetDenoiser.add_condition``), so a stock pipeline, which passes no
    such input, computes what ``Student.sample`` computes at the default (up to float32 rounding of the sum)."""
    folded = _foldable_conditions(student)
    if not folded:
        return net
    net = copy.deepcopy(net)
    bias = _bias_site(net)
    with torch.no_grad():
        for emb in folded.values():
            bias += emb(torch.tensor([float(emb.config["default"])], device=bias.device))[0].to(bias.dtype)
    return net


def _prompt_pipeline_index(student, teacher_root: Path, net_class: str, scheduler: list[str]) -> dict:
    """model_index.json of a prompt student: LatentConsistencyModelPipeline when it takes w through ``timestep_cond``
    (the pipeline embeds guidance_scale - 1, as the student does), else StableDiffusionPipeline (call it with
    guidance_scale=1: the student is sampled without CFG)."""
    import diffusers

    teacher_index = json.loads((teacher_root / "model_index.json").read_text())
    pipeline = "LatentConsistencyModelPipeline" if _takes_w(student) else "StableDiffusionPipeline"
    return {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
            **{name: teacher_index[name] for name in PROMPT_COMPONENTS}, "unet": ["diffusers", net_class],
            "scheduler": scheduler, "safety_checker": [None, None],
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}


def save_diffusers(student, folder: str | Path, teacher_folder: str | Path | None = None) -> Path:
    """Save a UNet student as a pipeline folder diffusers loads without this project: ``unet/`` (LoRA merged),
    ``scheduler/`` (``diffusers_scheduler``: DDIM where it is exact, else ``FewStepScheduler`` with its source file,
    loaded with ``trust_remote_code=True``; either samples as ``Student.sample``), ``model_index.json`` and
    ``student.json`` (the student file's metadata). A pixel student is a ``ConsistencyModelPipeline``; a
    prompt-conditioned one a ``LatentConsistencyModelPipeline`` (w through ``timestep_cond``) or a
    ``StableDiffusionPipeline``, with ``vae/``, ``text_encoder/`` and ``tokenizer/`` copied from its teacher's folder
    (``teacher_folder_of``). Extra inputs with a sampling default (SLAM's gamma) are folded into the UNet
    (``fold_default_conditions``)."""
    check_diffusers_exportable(student, teacher_folder)
    teacher_root = teacher_folder_of(student, teacher_folder) if student.info.get("conditioning") == "prompts" else None
    net = fold_default_conditions(student, merged_copy(student.net) if has_lora(student.net) else student.net)

    def fill(tmp: Path) -> None:
        net.save_pretrained(tmp / "unet")
        meta = {**student.metadata(), "format": FORMAT, "network_class": type(net).__name__, "lora": "null"}
        (tmp / "student.json").write_text(json.dumps(meta, indent=1, sort_keys=True))  # safetensors metadata comes in any order
        scheduler = save_scheduler(diffusers_scheduler(student), tmp / "scheduler")
        if teacher_root is None:
            index = {"_class_name": "ConsistencyModelPipeline", "unet": ["diffusers", type(net).__name__],
                     "scheduler": scheduler}
        else:
            index = _prompt_pipeline_index(student, teacher_root, type(net).__name__, scheduler)
            for name in PROMPT_COMPONENTS:
                shutil.copytree(teacher_root / name, tmp / name)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=1))

    return write_folder(folder, fill)  # a failed write leaves the old folder and no .tmp (distill.core.atomic)
