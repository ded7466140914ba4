"""Pictures of samples: an image grid for images, a scatter over the true density for 2-D data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def image_grid(x: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """[B, C, H, W] in [-1, 1] -> one [H', W', C] float image in [0, 1] with a 1-pixel white border
    (torchvision's ``make_grid``), ``nrow`` images per row (default: a square)."""
    from torchvision.utils import make_grid

    imgs = (x.detach().float().cpu().clamp(-1, 1) + 1) / 2
    grid = make_grid(imgs, nrow=nrow or math.ceil(math.sqrt(len(imgs))), padding=1, pad_value=1.0)
    return (grid[:1] if x.shape[1] == 1 else grid).permute(1, 2, 0)  # make_grid repeats grey to 3 channels


def save_image_grid(x: torch.Tensor, path: str | Path, title: str | None = None, nrow: int | None = None) -> None:
    """An image grid of ``x`` ([B, C, H, W] in [-1, 1]), ``nrow`` images per row (default: a square)."""
    grid = image_grid(x, nrow)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1]))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def save_scatter_2d(x: torch.Tensor, path: str | Path, *, log_density: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    title: str | None = None) -> None:
    """Scatter 2-D samples, over the exact density's contours when ``log_density`` is given."""
    pts = x.detach().double().cpu()
    lim = float(pts.abs().quantile(0.995)) * 1.15 + 0.5
    fig, ax = plt.subplots(figsize=(5, 5))
    if log_density is not None:
        g = torch.linspace(-lim, lim, 200, dtype=torch.float64)
        xx, yy = torch.meshgrid(g, g, indexing="xy")
        dens = log_density(torch.stack([xx.flatten(), yy.flatten()], 1)).exp().reshape(200, 200)
        ax.contourf(xx, yy, dens, levels=20, cmap="Blues")
    ax.scatter(pts[:, 0], pts[:, 1], s=3, c="tab:red", alpha=0.6)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
