"""Small building blocks shared by the UNet and the Swin layers."""

from __future__ import annotations

import torch
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as upstream (stable under fp16 autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalisation layer: 32 groups."""
    return GroupNorm32(32, channels)


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 convolution (or average pooling)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without a convolution cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour), optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.fast:
            return upsample_conv(x, self.conv)
        x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(nearest_upsample_x2(x))`` for a 3x3, zero-padded ``conv``, in 4/9 of the FLOPs.

    On the nearest-upsampled map every 3x3 window covers only 2x2 distinct source pixels, so each
    of the four output phases is a 2x2 convolution of ``x`` with summed taps. One convolution with
    four times the output channels computes all phases, which are then interleaved. Same result as
    the direct form up to float rounding.
    """
    weight = conv.weight
    # Rows (and columns) of the 3x3 kernel that land on source offsets {-1, 0} for phase 0 and
    # {0, +1} for phase 1.
    w0 = torch.stack([weight[:, :, 0], weight[:, :, 1] + weight[:, :, 2]], dim=2)
    w1 = torch.stack([weight[:, :, 0] + weight[:, :, 1], weight[:, :, 2]], dim=2)
    kernels = []
    for rows in (w0, w1):
        kernels.append(torch.stack([rows[..., 0], rows[..., 1] + rows[..., 2]], dim=-1))
        kernels.append(torch.stack([rows[..., 0] + rows[..., 1], rows[..., 2]], dim=-1))
    cout = weight.shape[0]
    stacked = torch.cat(kernels, dim=0)  # (4 * cout, cin, 2, 2), phases (0,0), (0,1), (1,0), (1,1)
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    y = nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1)), stacked.to(x.dtype), bias, stride=1)
    b, _, h1, w1_ = y.shape
    h, w = h1 - 1, w1_ - 1
    phases = [
        y[:, i * cout : (i + 1) * cout, a : a + h, c : c + w]
        for i, (a, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1)))
    ]
    out = torch.stack(phases, dim=2).view(b, cout, 2, 2, h, w)
    return out.permute(0, 1, 4, 2, 5, 3).reshape(b, cout, 2 * h, 2 * w)
