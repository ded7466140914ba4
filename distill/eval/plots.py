"""Pictures of samples: an image grid for images, a scatter over the true density for 2-D data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from distill.core.atomic import write_with  # noqa: E402


def save_figure(fig, path: str | Path, **options) -> None:
    """``fig.savefig(path, **options)`` atomically (``distill.core.atomic``), in the format ``path``'s suffix names."""
    kind = Path(path).suffix.lstrip(".") or "png"
    write_with(path, lambda tmp: fig.savefig(tmp, format=kind, **options))


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
    save_figure(fig, path, dpi=150, bbox_inches="tight")
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
    save_figure(fig, path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def fid_vs_n_plot(rows: list[dict], path: str | Path, top: int = 8) -> None:
    """FID against 1/N for the paired bench's ``top`` ranked entries (``distill.eval.paired_bench``): the points
    (FID at each N, mean over subsets) and the line whose intercept at 1/N = 0 is FID-infinity (Chong & Forsyth 2020)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows[:top]:
        points = sorted((int(k[4:]), float(v)) for k, v in r.items() if k.startswith("fid_") and k[4:].isdigit() and v != "")
        x = [1.0 / k for k, _ in points]
        (line,) = ax.plot(x, [v for _, v in points], "o", ms=4)
        if r.get("fid_inf", "") != "" and points:
            slope = float(r.get("fid_inf_slope") or 0.0)
            ax.plot([0.0, max(x)], [float(r["fid_inf"]), float(r["fid_inf"]) + slope * max(x)], "-", lw=1, color=line.get_color(),
                    label=f"{r['entry']}: FID-inf {float(r['fid_inf']):.2f}")
    ax.set_xlabel("1 / N (generated samples)")
    ax.set_ylabel("FID against the data reference")
    ax.set_xlim(left=0.0)
    ax.set_title("FID depends on N: the line's intercept is FID-infinity")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
