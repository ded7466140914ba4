"""The denoiser contract and the wrappers that act on it.

A denoiser is any callable ``D(x, t, cond) -> x0_hat``: ``x`` of shape [B, ...], ``t`` a float tensor
of shape [B] in the teacher's process time, ``cond`` None or a LongTensor [B] of class labels in
which ``-1`` asks for the unconditional prediction. It returns the data prediction E[x0 | x_t].
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
UNCOND = -1  # class label that asks a conditional teacher for its unconditional prediction


class CountingDenoiser:
    """Counts network function evaluations (NFE): one per call, whatever the batch size."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x, t, cond=None, **kwargs):
        self.nfe += 1
        return self.denoiser(x, t, cond, **kwargs)  # kwargs: optional parts of the contract (return_features)


def classifier_free_guidance(denoiser: Denoiser, guidance_scale: float) -> Denoiser:
    """A new denoiser D_w = D(x, t, none) + w (D(x, t, c) - D(x, t, none)) (Ho & Salimans 2022, Eq. 6,
    written for x0; it is the same combination as for eps at fixed x and t).

    ``w = 1`` is the plain conditional model, ``w = 0`` the unconditional one (diffusers' convention
    for ``guidance_scale``). The conditional and unconditional halves go through the network as one
    batch, so one guided call is one NFE.
    """
    w = float(guidance_scale)

    def guided(x, t, cond=None):
        if cond is None:
            raise ValueError("classifier-free guidance needs class labels (cond); got cond=None")
        x2, t2 = torch.cat([x, x]), torch.cat([t, t])
        c2 = torch.cat([cond, torch.full_like(cond, UNCOND)])
        d_cond, d_uncond = denoiser(x2, t2, c2).chunk(2)
        return d_uncond + w * (d_cond - d_uncond)

    return guided
