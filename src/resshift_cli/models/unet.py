"""Upstream's Swin-UNet (UNetModelSwin): the network that predicts x0 from x_t, t and the LQ image.

Built from upstream's hyper-parameter names, so the ``unet_params`` of a published config (or of
``weights.toml``) construct a model whose ``state_dict`` has exactly the published keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

from resshift_cli.models.layers import Downsample, Upsample, normalization
from resshift_cli.models.swin import BasicLayer, WindowAttention

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def zero_module(module: ModuleT) -> ModuleT:
    """``module`` with every parameter set to zero, as upstream initialises the last layer of each
    residual branch and of the network: an untrained block is then its skip connection, and an
    untrained network outputs zero (for ``predict_type`` "residual": the bicubic image)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embeddings of (possibly fractional) timesteps: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding (scale-shift or additive)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose ResBlocks also receive the time embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """ResShift's UNet with Swin window attention, conditioned on the LQ image (and a mask).

    ``forward(x, timesteps, lq=None, mask=None)``: ``x`` is the (normalised) latent, ``lq`` the
    low-quality image; when ``lq_size > image_size`` a strided feature extractor brings ``lq``
    (with the mask for inpainting) down to the latent's size before concatenation.

    ``pixel_unshuffle`` = r > 1 (ours; upstream's models have 1) folds every r x r block of the input
    into channels before the first layer and unfolds the output after the last, so a pixel-space
    model works at 1/r of the image's side, as a latent model does at its autoencoder's factor,
    with no autoencoder to train. ``attention_resolutions`` then count the folded maps' sides.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        swin_depth: int = 2,
        swin_embed_dim: int = 96,
        window_size: int = 8,
        mlp_ratio: float = 2.0,
        patch_norm: bool = False,
        cond_lq: bool = True,
        cond_mask: bool = False,
        lq_size: int = 256,
        pixel_unshuffle: int = 1,
    ) -> None:
        super().__init__()
        if dims != 2:
            raise ValueError(f"only 2-D models are supported, got dims={dims}")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels must be set")
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        if len(num_res_blocks) != len(channel_mult):
            raise ValueError("num_res_blocks must give one count per level of channel_mult")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = list(num_res_blocks)
        self.channel_mult = list(channel_mult)
        self.cond_lq = cond_lq
        self.cond_mask = cond_mask
        self.lq_size = lq_size
        self.use_fp16 = use_fp16
        self.pixel_unshuffle = pixel_unshuffle
        if pixel_unshuffle < 1 or image_size % pixel_unshuffle:
            raise ValueError(f"pixel_unshuffle {pixel_unshuffle} must be a positive divisor of image_size")
        if pixel_unshuffle > 1 and cond_lq and lq_size != image_size:
            raise ValueError("pixel_unshuffle needs lq_size = image_size (the LQ is folded with x)")
        map_size = image_size // pixel_unshuffle
        heads = num_heads if num_head_channels == -1 else swin_embed_dim // num_head_channels

        def swin(ch: int, ds: int) -> BasicLayer:
            return BasicLayer(
                in_chans=ch,
                embed_dim=swin_embed_dim,
                num_heads=heads,
                window_size=window_size,
                depth=swin_depth,
                img_size=map_size // ds,
                mlp_ratio=mlp_ratio,
                patch_norm=patch_norm,
            )

        def attends(ds: int) -> bool:
            return map_size // ds in attention_resolutions

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        cond_channels = 0
        if cond_lq:
            feature_chn = 4 if cond_mask else 3
            if lq_size == image_size:
                self.feature_extractor: nn.Module = nn.Identity()
                cond_channels = feature_chn
            else:
                levels = round(math.log2(lq_size / image_size))
                if lq_size != image_size * 2**levels or levels < 1:
                    raise ValueError(f"lq_size {lq_size} must be image_size {image_size} times a power of 2")
                layers: list[nn.Module] = []
                base = 16
                for _ in range(levels):
                    layers += [nn.Conv2d(feature_chn, base, 3, 1, 1), nn.SiLU()]
                    layers.append(Downsample(base, True, out_channels=base * 2))
                    base *= 2
                    feature_chn = base
                self.feature_extractor = nn.Sequential(*layers)
                cond_channels = base
        self.lq_factor = lq_size // image_size if cond_lq else 1

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(
                    nn.Conv2d((in_channels + cond_channels) * pixel_unshuffle**2, ch, 3, padding=1)
                )
            ]
        )
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for jj in range(self.num_res_blocks[level]):
                blocks: list[nn.Module] = [
                    ResBlock(ch, time_embed_dim, dropout, mult * model_channels, use_scale_shift_norm)
                ]
                ch = mult * model_channels
                if attends(ds) and jj == 0:
                    blocks.append(swin(ch, ds))
                self.input_blocks.append(TimestepEmbedSequential(*blocks))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down: nn.Module = (
                    ResBlock(ch, time_embed_dim, dropout, ch, use_scale_shift_norm, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
            swin(ch, ds),
            ResBlock(ch, time_embed_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                blocks = [
                    ResBlock(ch + ich, time_embed_dim, dropout, model_channels * mult, use_scale_shift_norm)
                ]
                ch = model_channels * mult
                if attends(ds) and i == 0:
                    blocks.append(swin(ch, ds))
                if level and i == self.num_res_blocks[level]:
                    blocks.append(
                        ResBlock(ch, time_embed_dim, dropout, ch, use_scale_shift_norm, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*blocks))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(input_ch, out_channels * pixel_unshuffle**2, 3, padding=1)),
        )
        for module in self.modules():
            if isinstance(module, WindowAttention):
                # Upstream's Swin layers (from SwinIR) draw the relative-position bias this way.
                nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)

    @property
    def size_multiple(self) -> int:
        """Latent sizes must be multiples of this: every level's map divisible by its window."""
        multiple = 1
        for module in self.modules():
            if isinstance(module, BasicLayer):
                ds = self.image_size // module.blocks[0].resolution
                multiple = math.lcm(multiple, module.window * ds)
        return math.lcm(multiple, self.pixel_unshuffle * 2 ** (len(self.channel_mult) - 1))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        lq: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict x0 from the normalised latent ``x`` at ``timesteps`` given ``lq`` (and ``mask``)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if lq is not None:
            if not self.cond_lq:
                raise ValueError("this UNet is not conditioned on an LQ image")
            if mask is not None:
                if not self.cond_mask:
                    raise ValueError("this UNet is not conditioned on a mask")
                lq = torch.cat([lq, mask], dim=1)
            elif self.cond_mask:
                raise ValueError("this UNet needs a mask")
            x = torch.cat([x, self.feature_extractor(lq.type(x.dtype))], dim=1)
        elif self.cond_lq:
            raise ValueError("this UNet needs the LQ image (lq=...)")
        if self.pixel_unshuffle > 1:
            x = nn.functional.pixel_unshuffle(x, self.pixel_unshuffle)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        h = self.out(h)
        return nn.functional.pixel_shuffle(h, self.pixel_unshuffle) if self.pixel_unshuffle > 1 else h
