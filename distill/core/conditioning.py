"""What ``cond`` may hold besides class labels: prompt conditioning for text-to-image teachers.

The denoiser contract's ``cond`` is None, a LongTensor [B] of class labels (``-1``: unconditional), or a
``PromptCond``: the text encoder's output for each sample's prompt, computed once per prompt batch (by the
teacher's ``encode_prompts``) and then carried unchanged through solvers, students and objectives, so no NFE
ever calls the text encoder. A ``PromptCond`` also carries the unconditional branch of classifier-free guidance
(the empty prompt's, or a negative prompt's, embeddings), which is what ``unconditional()`` returns.

Solvers and objectives only index it (``cond[mask]``), move it (``.to(device)``) and concatenate it
(``cat_cond``), the same operations they apply to a label tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNCOND = -1  # class label that asks a conditional teacher for its unconditional prediction


def takes_prompts(teacher) -> bool:
    """Whether ``teacher``'s cond is a ``PromptCond`` (a text-to-image teacher, ``conditioning = "prompts"``), not labels."""
    return getattr(teacher, "conditioning", "labels") == "prompts"


@dataclass
class PromptCond:
    """Per-sample prompt embeddings for a cross-attention network (diffusers' ``encoder_hidden_states``).

    ``mask`` [B, L] is passed to the network as ``encoder_attention_mask`` when set; Stable Diffusion's
    pipeline does not mask the UNet's cross-attention, so its adapter leaves it None (the text encoder's own
    mask, where the encoder config asks for one, is applied while encoding)."""

    embeds: torch.Tensor  # [B, L, D] the conditional branch
    null_embeds: torch.Tensor  # [B, L, D] the unconditional branch of CFG (empty or negative prompt)
    mask: torch.Tensor | None = None  # [B, L] cross-attention mask of ``embeds``, or None
    null_mask: torch.Tensor | None = None  # [B, L] mask of ``null_embeds``, or None

    def __post_init__(self):
        if self.embeds.ndim != 3 or self.null_embeds.shape != self.embeds.shape:
            raise ValueError(f"prompt embeddings must be [B, L, D] with null embeddings of the same shape; got "
                             f"{list(self.embeds.shape)} and {list(self.null_embeds.shape)}")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, idx) -> "PromptCond":
        pick = lambda t: None if t is None else t[idx.to(t.device) if isinstance(idx, torch.Tensor) else idx]  # noqa: E731
        return PromptCond(pick(self.embeds), pick(self.null_embeds), pick(self.mask), pick(self.null_mask))

    def to(self, *args, **kwargs) -> "PromptCond":
        move = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        mask_move = lambda t: None if t is None else t.to(device=self.embeds.to(*args, **kwargs).device)  # noqa: E731
        return PromptCond(move(self.embeds), move(self.null_embeds), mask_move(self.mask), mask_move(self.null_mask))

    def unconditional(self) -> "PromptCond":
        """The unconditional branch as its own condition (its null branch is itself)."""
        return PromptCond(self.null_embeds, self.null_embeds, self.null_mask, self.null_mask)

    def dropped(self, drop: torch.Tensor) -> "PromptCond":
        """The condition with the samples where ``drop`` [B] is True replaced by their null branch (label dropout)."""
        drop = drop.to(self.embeds.device)
        swap = lambda a, b: a if a is None or b is None else torch.where(drop.reshape(-1, *[1] * (a.ndim - 1)), b, a)  # noqa: E731
        return PromptCond(swap(self.embeds, self.null_embeds), self.null_embeds, swap(self.mask, self.null_mask),
                          self.null_mask)

    def network_kwargs(self, dtype: torch.dtype) -> dict:
        """Keyword inputs of a diffusers ``UNet2DConditionModel`` call."""
        kwargs = {"encoder_hidden_states": self.embeds.to(dtype)}
        if self.mask is not None:
            kwargs["encoder_attention_mask"] = self.mask
        return kwargs


def unconditional(cond):
    """The unconditional counterpart of ``cond``: labels -> all ``-1``; prompts -> their null branch."""
    if isinstance(cond, PromptCond):
        return cond.unconditional()
    return torch.full_like(cond, UNCOND)


def cat_cond(conds: list):
    """Concatenate conditions along the batch (labels or prompts, not mixed)."""
    if all(isinstance(c, PromptCond) for c in conds):
        masks = [c.mask for c in conds]
        null_masks = [c.null_mask for c in conds]
        return PromptCond(torch.cat([c.embeds for c in conds]), torch.cat([c.null_embeds for c in conds]),
                          None if any(m is None for m in masks) else torch.cat(masks),
                          None if any(m is None for m in null_masks) else torch.cat(null_masks))
    if any(isinstance(c, PromptCond) for c in conds):
        raise TypeError("cannot concatenate prompt conditions with class labels")
    return torch.cat(conds)


def cond_to(cond, device):
    """``cond`` on ``device`` (None stays None)."""
    return None if cond is None else cond.to(device)
