"""The teacher contract: a denoiser, its schedule and its metadata (DESIGN.md, contract 3)."""

from __future__ import annotations

import torch

from distill.core.conditioning import UNCOND, PromptCond
from distill.core.schedules import Schedule


class Teacher:
    """Base class. Subclasses set the attributes below and implement ``_denoise``.

    Attributes:
        schedule: the noise process the model was trained on.
        data_shape: shape of one sample, without the batch dimension.
        num_classes: number of class labels (0 for an unconditional model).
        has_uncond: whether ``cond`` may hold ``-1`` (unconditional) for a class-conditional model.
        hash: content hash naming the teacher in caches and results.
        name: human-readable name (the spec it was loaded from).
    """

    schedule: Schedule
    data_shape: tuple[int, ...]
    num_classes: int = 0
    has_uncond: bool = True
    conditioning: str = "labels"  # what cond holds: class labels, or "prompts" (a PromptCond) for text-to-image teachers
    hash: str
    name: str

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _denoise_features(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None):
        """(x0_hat, features [B, ...]) from one evaluation. Teachers with a network bottleneck return it (diffusers
        UNets: the mid block's output); the default, for teachers without one (analytic mixtures), is x0_hat itself."""
        d = self._denoise(x, t, cond)
        return d, d

    def denoise(self, x: torch.Tensor, t, cond: torch.Tensor | None = None, *, return_features: bool = False):
        """x0_hat = E[x0 | x_t = x] at process time ``t`` (float, or a tensor of shape [] or [B]).

        ``return_features=True`` (optional part of the contract, used by AMED) returns ``(x0_hat, features)`` from the
        same evaluation: the model's bottleneck features (see ``_denoise_features``)."""
        if tuple(x.shape[1:]) != tuple(self.data_shape):
            raise ValueError(
                f"teacher {self.name!r} expects x of shape [B, {', '.join(map(str, self.data_shape))}], got {list(x.shape)}"
            )
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape [{x.shape[0]}], got {list(t.shape)}")
        cond = self._check_cond(cond, x.shape[0])
        return self._denoise_features(x, t, cond) if return_features else self._denoise(x, t, cond)

    def _check_cond(self, cond, batch: int):
        if cond is None:
            if self.num_classes and not self.has_uncond:
                raise ValueError(f"teacher {self.name!r} is class-conditional without an unconditional mode: pass cond")
            return None
        if isinstance(cond, PromptCond):
            raise ValueError(f"teacher {self.name!r} takes class labels (or None), not prompt embeddings")
        cond = torch.as_tensor(cond).long()
        if cond.shape != (batch,):
            raise ValueError(f"cond must have shape [{batch}], got {list(cond.shape)}")
        if self.num_classes == 0:
            if bool((cond != UNCOND).any()):
                raise ValueError(f"teacher {self.name!r} is unconditional; cond must be None or -1")
            return None
        low = UNCOND if self.has_uncond else 0
        if bool(((cond < low) | (cond >= self.num_classes)).any()):
            raise ValueError(
                f"class labels for teacher {self.name!r} must lie in [{low}, {self.num_classes - 1}], got {cond.tolist()}"
            )
        return cond

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, data_shape={self.data_shape}, num_classes={self.num_classes}, "
            f"schedule={self.schedule!r}, hash={self.hash[:12]})"
        )
