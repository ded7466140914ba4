"""``compile: true``: ``torch.compile`` (inductor) on every network a run calls, in place.

Compiled are the raw networks inside the run's denoisers: the student's, the teacher's (``teacher.model``), and those
of the objective's other trained networks, helpers and frozen modules (a fake score, an EMA target); a module without a
denoiser inside is compiled whole. A ``NetDenoiser``'s ``net`` is compiled, not the wrapper: its float64 time and
coefficient arithmetic (Python-side caches, ``.cpu()`` calls) stays eager, and a critic's GAN head stays eager.
Copies made during the run (``copy.deepcopy``) are eager: ``nn.Module.__getstate__`` drops the compiled call.

``nn.Module.compile`` compiles a module's ``__call__`` in place, so the module objects, their parameters and their
``state_dict`` keys are those of an eager run: checkpoints, student files and ``networks.safetensors`` are the same
files (no ``_orig_mod.`` prefix), LoRA layers are traced as they are, and DDP / accelerate wrap the same modules.
Compilation is lazy: a network that inductor cannot handle fails at its first call, with one sentence naming it.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.core.denoisers import NetDenoiser
from distill.objectives.base import unwrap

# inductor reorders float32 sums: losses of a compiled run agree with eager ones to 1e-4 relative, not bit for bit
# (measured 8e-7 over 20 cd_ring8 steps, 2.1e-5 over 6 SiD steps on a tiny UNet: tests/test_compile.py)


class CompileError(RuntimeError):
    """``torch.compile`` failed on one network; the message names it and how to run without compiling."""


def compiled_targets(name: str, module: nn.Module) -> dict[str, nn.Module]:
    """The modules whose call is compiled, by dotted name: the raw network of every denoiser inside ``module`` (a
    ``NetDenoiser``'s ``net``, e.g. ``fake_score.score.net`` in a critic), else ``module`` itself (a plain network)."""
    module = unwrap(module)
    found = {".".join(filter(None, (name, path, "net"))): m.net for path, m in module.named_modules()
             if isinstance(m, NetDenoiser) and isinstance(m.net, nn.Module)}
    return found or {name: module}


def compile_module(name: str, module: nn.Module, **options) -> None:
    """``module.compile(**options)``, its first-call failures raised as one ``CompileError`` naming ``name``."""
    module.compile(**options)
    compiled = module._compiled_call_impl  # set by nn.Module.compile

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:
            cause = getattr(e, "inner_exception", None) or e  # a backend's (inductor's) own error
            first = (str(cause).strip().splitlines() or [""])[0]
            raise CompileError(f"compile: true: torch.compile failed on network {name!r} ({type(module).__name__}): "
                               f"{type(cause).__name__}: {first}; set compile: false to run it eagerly") from e

    module._compiled_call_impl = call


def run_networks(run) -> dict[str, nn.Module]:
    """Every network the run calls, by dotted name (``teacher.net`` for the teacher's), each module once."""
    model = getattr(run.ctx.teacher, "model", None)
    found = {**({"teacher": model} if isinstance(model, nn.Module) else {}), **run.nets, **run.objective.helpers(),
             **run.objective.frozen()}
    out, seen = {}, set()
    for name, module in found.items():
        for target_name, target in compiled_targets(name, module).items():
            if id(target) not in seen and any(True for _ in target.parameters()):
                seen.add(id(target))
                out[target_name] = target
    return out


def compile_networks(run, **options) -> list[str]:
    """Compile every network of ``run`` in place (module doc); returns their names."""
    networks = run_networks(run)
    for name, module in networks.items():
        compile_module(name, module, **options)
    return list(networks)
