"""The latent plane of a model with two latent dimensions, drawn as one figure.

Left, the aggregate posterior q(z) = E_x q(z|x), one sample per test image, over the contours of the prior
N(0, I); right, the decoder's mean images on a grid of the same square. Where q(z) leaves holes in the prior's
mass, spreads past it or collapses onto a curve, the right panel shows what prior samples from there decode
to. The Gaussianity battery and the sample metrics put numbers on this; the picture says where.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmark.latents import reparametrize
from benchmark.metrics.likelihood import index_noise

N_CODES = 5000  # the first test images: the same images, hence the same points, in every run of a dataset
EXTENT = 4.0    # the square [-4, 4]^2 holds 99.99% of the prior's mass
GRID = 15       # decoded images per side
SIGMAS = (1, 2, 3)
CODES_GID = "posterior samples"  # the scatter's gid, by which a reader of the figure finds it


@torch.no_grad()
def posterior_samples(model, x: Tensor, seed: int) -> Tensor:
    """One z ~ q(z|x) per image (N, D) on the CPU. Image i's noise is the evaluation's for test index i
    (``index_noise``), so for the test split these are the codes the Gaussianity battery measured; a
    deterministic encoder's (``Delta``) sample is its code."""
    z = []
    for index in torch.arange(len(x)).split(1000):
        qz_x = model.posterior(x[index.to(x.device)].to(model.device))
        eps = index_noise(index, (model.hparams.latent_dim,), seed).to(model.device)  # (B, D)
        z.append(reparametrize(qz_x, eps).cpu())
    return torch.cat(z)


def grid_codes(extent: float, n: int) -> Tensor:
    """The centres of an n x n grid of cells on [-extent, extent]^2 (n * n, 2), in reading order: the first
    row is the top one (z2 largest), each row from left to right, as ``make_grid`` tiles images."""
    centres = -extent + (torch.arange(n) + 0.5) * (2 * extent / n)  # (n,)
    z2, z1 = torch.meshgrid(centres.flip(0), centres, indexing="ij")
    return torch.stack([z1, z2], dim=-1).reshape(-1, 2)


@torch.no_grad()
def decoder_tiles(model, extent: float, n: int) -> Tensor:
    """The decoder's mean images at ``grid_codes``, tiled without gaps into one image (C, n H, n W), so that
    drawn on [-extent, extent]^2 each tile sits on its own code."""
    from torchvision.utils import make_grid

    images = model.decode(grid_codes(extent, n).to(model.device)).mean.clamp(0, 1).cpu()
    return make_grid(images, nrow=n, padding=0)


def latent_map_figure(model, x: Tensor, y: Tensor, seed: int = 0, n_codes: int = N_CODES,
                      extent: float = EXTENT, grid: int = GRID):
    """The two panels for the first ``n_codes`` images x (N, C, H, W), as the model sees them (binarised
    for binary data), and their labels y (N,). The model has ``latent_dim`` 2 and is in eval mode."""
    from matplotlib.figure import Figure

    if model.hparams.latent_dim != 2:
        raise ValueError(f"a latent map needs latent_dim 2, got {model.hparams.latent_dim}")
    z = posterior_samples(model, x[:n_codes], seed).numpy()  # (N, 2)
    labels = y[:n_codes].cpu().numpy()
    outside = int((np.abs(z) > extent).any(axis=1).sum())
    fig = Figure(figsize=(11.5, 5.2), constrained_layout=True)
    left, right = fig.subplots(1, 2)
    _prior_contours(left, extent)
    points = left.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=4, alpha=0.45,
                          linewidths=0, rasterized=True, zorder=2)
    points.set_gid(CODES_GID)
    handles, names = points.legend_elements(num=None)
    for h in handles:
        h.set_alpha(1.0)
    left.legend(handles, names, title="label", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
                title_fontsize=8, frameon=False, handletextpad=0.2, markerscale=1.3)
    left.set_title(f"aggregate posterior: one z ~ q(z|x) per test image\n"
                   f"{outside} of {len(z)} outside the square; rings: the prior N(0, I) at 1, 2, 3 σ", fontsize=10)
    tiles = decoder_tiles(model, extent, grid).permute(1, 2, 0).numpy()  # (n H, n W, C)
    right.imshow(tiles, extent=(-extent, extent, -extent, extent), cmap="gray", vmin=0, vmax=1,
                 interpolation="nearest")
    _rings(right, color="tab:orange", alpha=0.8)
    right.set_title(f"decoder mean E[x | z] on a {grid} x {grid} grid of the same square", fontsize=10)
    for ax in (left, right):
        ax.set(xlim=(-extent, extent), ylim=(-extent, extent), xlabel="$z_1$", ylabel="$z_2$", aspect="equal")
    return fig


def _prior_contours(ax, extent: float):
    """The prior's density in light greys, banded by the 1, 2 and 3 sigma circles (drawn over the points, so
    that dense codes do not hide them); each ring labelled with the prior's mass inside it, 1 - exp(-r^2 / 2)."""
    t = np.linspace(-extent, extent, 201)
    density = np.exp(-(t[None, :] ** 2 + t[:, None] ** 2) / 2) / (2 * math.pi)  # (201, 201)
    levels = [math.exp(-r * r / 2) / (2 * math.pi) for r in reversed(SIGMAS)] + [density.max()]
    ax.contourf(t, t, density, levels=levels, colors=["0.96", "0.91", "0.85"], zorder=0)
    _rings(ax, color="0.3", alpha=0.8)
    angle = math.radians(50)
    for r in SIGMAS:
        ax.text(r * math.cos(angle), r * math.sin(angle), f"{1 - math.exp(-r * r / 2):.0%}", fontsize=7,
                color="0.2", ha="left", va="bottom", zorder=4,
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})


def _rings(ax, color, alpha: float):
    from matplotlib.patches import Circle

    for r in SIGMAS:
        ax.add_patch(Circle((0, 0), r, fill=False, ls="--", lw=0.9, color=color, alpha=alpha, zorder=3))


def save_latent_map(model, x: Tensor, y: Tensor, path: str | Path, seed: int = 0) -> Path:
    """``latent_map_figure`` written to ``path`` (PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    latent_map_figure(model, x, y, seed).savefig(path, dpi=100)
    return path
