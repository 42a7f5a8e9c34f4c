"""Swin-transformer window attention over (B, C, H, W) feature maps, as used inside upstream's UNet.

Upstream's variant keeps feature maps 4-D: group-normalised, a 1x1-convolution MLP, and window
attention on the partitioned map. Shifted-window masks are computed for the actual input size
(and cached), so any size divisible by the window works, not only the configured one.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from resshift_cli.models.layers import normalization

CHUNK_BYTES = 16 * 2**20
"""Target size of one chunk's largest temporary on the chunked inference paths: small enough for
the allocator to reuse freed blocks (glibc maps anything above 32 MB afresh, page by page) and
to bound the memory of the full-resolution blocks, large enough for efficient matrix products."""


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/window * W/window, window * window, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window * window, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


@functools.lru_cache(maxsize=64)
def _shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    return shifted_window_mask(h, w, window, shift)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """Additive attention mask (nW, N, N) for shifted windows, exactly as upstream builds it.

    Upstream's mask is not the Swin paper's: in the published checkpoints' buffers only the
    last row of windows is split, into in-window columns left and right of ``window - shift``,
    and no other window is masked. That is what a region label taken from the row index
    ``(i // window) * window + j % window`` gives; it reproduces upstream's stored buffers
    exactly (see the tests). For maps of other shapes the same rule is applied.
    """
    # Index arithmetic on the CPU, also while a model is built on the meta device.
    rows = torch.arange(h, device="cpu") // window * window
    coord = rows[:, None] + (torch.arange(w, device="cpu") % window)[None, :]
    label = (coord >= h - window).long() + (coord >= h - shift).long()
    windows = window_partition(label[None, :, :, None].float(), window).squeeze(-1)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def relative_position_index(window: int) -> torch.Tensor:
    """Index into the relative-position bias table for every pair of positions in a window."""
    axis = torch.arange(window, device="cpu")
    coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fast = True
        self._bias_cache: dict[tuple, torch.Tensor] = {}

    def position_bias(self) -> torch.Tensor:
        """The relative-position bias gathered for one window: (heads, N, N)."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def attention_bias(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Position bias plus mask: (1 or nW, heads, N, N).

        Without autograd the sum is cached per mask and dtype (and dropped when the bias table
        changes), so the gather and the addition happen once per size, not at every step.
        """
        table = self.relative_position_bias_table
        cacheable = self.fast and not (torch.is_grad_enabled() and table.requires_grad)
        key = (id(mask), dtype, table.device, table.data_ptr(), table._version)
        if cacheable and key in self._bias_cache:
            return self._bias_cache[key]
        bias = self.position_bias().to(dtype).unsqueeze(0)
        if mask is not None:
            bias = bias + mask.to(dtype).unsqueeze(1)
        if cacheable:
            self._bias_cache = {k: v for k, v in self._bias_cache.items() if k[3:] == key[3:]}
            self._bias_cache[key] = bias
        return bias

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * nW, N, C); mask: (nW, N, N) additive, or None.

        On the fast path without autograd, many windows are processed a chunk at a time (the
        windows are independent, so the result is the same): the q/k/v temporaries of a large map
        stay small enough to be reused from the heap instead of costing gigabytes.
        """
        bw, n, c = x.shape
        bias = self.attention_bias(mask, x.dtype)
        chunk = max(1, CHUNK_BYTES // (4 * n * c * 4))
        if not (self.fast and bw > chunk and not torch.is_grad_enabled()):
            return self._attend(x, bias)
        nw = mask.shape[0] if mask is not None else bw
        out = torch.empty_like(x)
        for image_start in range(0, bw, nw):
            for start in range(0, nw, chunk):
                stop = min(start + chunk, nw)
                rows = slice(image_start + start, image_start + stop)
                out[rows] = self._attend(x[rows], bias[start:stop] if mask is not None else bias)
        return out

    def _attend(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Attention over the windows ``x`` (W, N, C) with a bias shared by all of them (1, heads,
        N, N), one per window (W, ...), or one per window of an image that ``x`` repeats (nW, ...)."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        nw = bias.shape[0]
        if nw not in (1, bw):
            bias = bias.unsqueeze(0).expand(bw // nw, -1, -1, -1, -1).reshape(bw, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    """Two 1x1 convolutions with GELU between: the transformer's feed-forward on 4-D maps."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """One (shifted) window-attention block with its MLP, on (B, C, H, W) maps."""

    def __init__(
        self, dim: int, resolution: int, num_heads: int, window: int, shift: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        if resolution <= window:
            # Upstream: a window as large as the map; no shifting.
            window, shift = resolution, 0
        self.window = window
        self.shift = shift
        self.resolution = resolution
        self.norm1 = normalization(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = normalization(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift > 0:
            # The same mask serves every block of a size: computed once, each block its own copy.
            self.register_buffer(
                "attn_mask", _shifted_window_mask(resolution, resolution, window, shift).clone()
            )
        else:
            self.attn_mask = None
        self._masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def mask_for(self, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        """The shifted-window mask for an (h, w) map: the stored one at the configured size."""
        if self.shift == 0:
            return None
        if (h, w) == (self.resolution, self.resolution) and self.attn_mask is not None:
            return self.attn_mask
        key = (h, w, device)
        if key not in self._masks:
            self._masks[key] = shifted_window_mask(h, w, self.window, self.shift).to(device)
        return self._masks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.window or w % self.window:
            raise ValueError(
                f"feature map {h}x{w} is not divisible by the attention window {self.window}; "
                "pad the input to the model's size multiple"
            )
        shortcut = x
        y = self.norm1(x).permute(0, 2, 3, 1)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(y, self.window), mask=self.mask_for(h, w, x.device))
        y = window_reverse(windows, self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + y.permute(0, 3, 1, 2)
        hidden = self.mlp.fc1.out_channels
        rows = max(1, CHUNK_BYTES // (4 * hidden * w * x.shape[0]))
        if not (self.attn.fast and h > rows and not torch.is_grad_enabled()):
            return x + self.mlp(self.norm2(x))
        # The MLP is pixel-wise: run it a band of rows at a time (exact; see WindowAttention.forward).
        normed = self.norm2(x)
        for top in range(0, h, rows):
            x[:, :, top : top + rows] += self.mlp(normed[:, :, top : top + rows])
        return x


class PatchEmbed(nn.Module):
    """Project the UNet's channels to the transformer width (1x1 patches)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 1, patch_norm: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = normalization(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x) if self.norm is not None else x


class PatchUnEmbed(nn.Module):
    """Project the transformer width back to the UNet's channels."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(embed_dim, in_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class BasicLayer(nn.Module):
    """A stack of Swin blocks, alternating plain and shifted windows, between embed and unembed."""

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        num_heads: int,
        window_size: int,
        depth: int,
        img_size: int,
        mlp_ratio: float = 4.0,
        patch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_norm=patch_norm)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                embed_dim,
                img_size,
                num_heads,
                window_size,
                shift=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
            )
            for i in range(depth)
        )
        self.patch_unembed = PatchUnEmbed(in_chans, embed_dim)

    @property
    def window(self) -> int:
        """The effective attention window (the map size where it is smaller than the configured one)."""
        return max(block.window for block in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.patch_unembed(x)
