"""Plain encoders and decoders, shared by every variant; only the width of the encoder's output
differs between variants (it is whatever the posterior head needs). No Lightning here."""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between them (none after the last)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mlp_encoder(shape, out_features: int, hidden: Sequence[int]) -> nn.Module:
    return nn.Sequential(nn.Flatten(), mlp([math.prod(shape), *hidden, out_features]))


def mlp_decoder(latent_dim: int, shape, hidden: Sequence[int]) -> nn.Module:
    return nn.Sequential(mlp([latent_dim, *reversed(hidden), math.prod(shape)]), nn.Unflatten(1, shape))


def _down(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


def _up(c_in, c_out):
    return [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


def conv_encoder(shape, out_features: int, hidden: Sequence[int]) -> nn.Module:
    """The RAE / pythae convolutional stack: 4x4 stride-2 convolutions (e.g. 128-256-512-1024), BatchNorm,
    ReLU, then a linear head (Ghosh et al. 2020, Appendix). A layer that would shrink the image below
    1x1 is dropped, so the same ``hidden`` serves 8x8 digits and 28x28 MNIST."""
    c, h, w = shape
    layers, c_in = [], c
    for c_out in hidden:
        if min(h, w) < 2:
            break
        layers += _down(c_in, c_out)
        c_in, h, w = c_out, h // 2, w // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * h * w, out_features))


class _CenterCrop(nn.Module):
    def __init__(self, h: int, w: int):
        super().__init__()
        self.h, self.w = h, w

    def forward(self, x):
        top, left = (x.shape[-2] - self.h) // 2, (x.shape[-1] - self.w) // 2
        return x[..., top: top + self.h, left: left + self.w]


def conv_decoder(latent_dim: int, shape, hidden: Sequence[int]) -> nn.Module:
    """Mirror of ``conv_encoder``: linear to a (hidden[-1], s, s) map, transposed 4x4 stride-2
    convolutions back up, a last 1x1... 5x5 convolution to the image channels, cropped to the image size."""
    c, h, w = shape
    n_up = min(len(hidden) - 1, max(int(math.log2(min(h, w))) - 1, 1))
    chans = list(reversed(hidden))[: n_up + 1]  # e.g. 1024-512-256-128
    s = math.ceil(max(h, w) / 2 ** n_up)
    layers = [nn.Linear(latent_dim, chans[0] * s * s), nn.Unflatten(1, (chans[0], s, s))]
    for a, b in zip(chans[:-1], chans[1:]):
        layers += _up(a, b)
    layers += [nn.Conv2d(chans[-1], c, 5, padding=2), _CenterCrop(h, w)]
    return nn.Sequential(*layers)


NETWORKS = {"mlp": (mlp_encoder, mlp_decoder), "conv": (conv_encoder, conv_decoder)}
