"""Upstream's VQ autoencoders (f4 with 3 latent channels, f8 with 8 for faces).

``encode`` returns the latent before quantisation (what the diffusion runs on); ``decode``
snaps each latent vector to its nearest codebook entry, then decodes, as upstream does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resshift_cli.models.layers import upsample_conv


def _normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv3(cin: int, cout: int, padding_mode: str) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1, padding_mode=padding_mode)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without a time embedding."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, padding_mode: str) -> None:
        super().__init__()
        self.norm1 = _normalize(in_channels)
        self.conv1 = _conv3(in_channels, out_channels, padding_mode)
        self.norm2 = _normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3(out_channels, out_channels, padding_mode)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on the fresh normalised tensors saves memory traffic; only without autograd.
        inplace = self.fast and not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (layer(h).reshape(b, 1, c, hh * ww).transpose(-1, -2) for layer in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    """Halve the resolution: pad right and bottom by one, then a strided 3x3 convolution."""

    def __init__(self, channels: int, padding_mode: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)
        self.pad_mode = "constant" if padding_mode == "zeros" else padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode=self.pad_mode))


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then a 3x3 convolution."""

    def __init__(self, channels: int, padding_mode: str) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels, padding_mode)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and self.conv.padding_mode == "zeros":
            return upsample_conv(x, self.conv)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _per_level(num_res_blocks: int | Sequence[int], levels: int) -> list[int]:
    if isinstance(num_res_blocks, int):
        return [num_res_blocks] * levels
    if len(num_res_blocks) != levels:
        raise ValueError("num_res_blocks must give one count per level of ch_mult")
    return list(num_res_blocks)


class Encoder(nn.Module):
    """Image -> latent (before quantisation), downsampling by 2 per level after the first."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int | Sequence[int],
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = False,
        dropout: float = 0.0,
        padding_mode: str = "zeros",
        **_: Any,
    ) -> None:
        super().__init__()
        blocks_per_level = _per_level(num_res_blocks, len(ch_mult))
        self.conv_in = _conv3(in_channels, ch, padding_mode)
        in_ch_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            for _i in range(blocks_per_level[level]):
                down.block.append(ResnetBlock(block_in, block_out, dropout, padding_mode))
                block_in = block_out
                if curr_res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in, padding_mode)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, padding_mode)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, padding_mode)
        self.norm_out = _normalize(block_in)
        self.conv_out = _conv3(block_in, 2 * z_channels if double_z else z_channels, padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image, upsampling by 2 per level; one more ResnetBlock per level than the encoder."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int | Sequence[int],
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        padding_mode: str = "zeros",
        **_: Any,
    ) -> None:
        super().__init__()
        levels = len(ch_mult)
        blocks_per_level = _per_level(num_res_blocks, levels)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (levels - 1)
        self.conv_in = _conv3(z_channels, block_in, padding_mode)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, padding_mode)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, padding_mode)
        ups: list[nn.Module] = []
        for level in reversed(range(levels)):
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _i in range(blocks_per_level[level] + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout, padding_mode))
                block_in = block_out
                if curr_res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in, padding_mode)
                curr_res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = _normalize(block_in)
        self.conv_out = _conv3(block_in, out_ch, padding_mode)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation of latent vectors."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        # Upstream's initial codebook (uniform in +-1/n_embed); handing it over skips Embedding's own
        # normal initialisation, which on the meta device would import torch's compiler stack.
        codebook = torch.empty(n_embed, embed_dim).uniform_(-1.0 / n_embed, 1.0 / n_embed)
        self.embedding = nn.Embedding(n_embed, embed_dim, _weight=codebook)

    def forward(self, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Replace each latent vector by its nearest codebook entry.

        Distances are computed ``chunk`` vectors at a time: the full (vectors x codebook) matrix
        of a 256x256 latent against 8192 entries would take 2 GB per temporary.
        """
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        weight = self.embedding.weight.to(flat.dtype)
        weight_sq = weight.pow(2).sum(1)
        indices = torch.cat(
            [
                (part.pow(2).sum(1, keepdim=True) + weight_sq - 2 * part @ weight.t()).argmin(dim=1)
                for part in flat.split(chunk)
            ]
        )
        quantised = self.embedding(indices).to(z.dtype).view(b, h, w, c)
        return quantised.permute(0, 3, 1, 2).contiguous()


class VQAutoencoder(nn.Module):
    """Upstream's VQModelTorch: ``encode`` to the pre-quantisation latent, ``decode`` with quantisation."""

    def __init__(self, embed_dim: int, n_embed: int, ddconfig: dict[str, Any]) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.ddconfig = dict(ddconfig)
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent position along each axis (4 or 8)."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> latent, before quantisation."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> image: quantise to the codebook, then decode (not clamped)."""
        return self.decoder(self.post_quant_conv(self.quantize(z)))
