"""Model behaviour beyond the fixtures: other input sizes, shifted-window masks, conditioning errors."""

from __future__ import annotations

import pytest
import torch
from reference import case, reference_path

from resshift_cli import UNet, VQAutoencoder
from resshift_cli.checkpoints import load_into, read_state_dict
from resshift_cli.models import swin
from resshift_cli.models.swin import SwinTransformerBlock, shifted_window_mask

pytestmark = pytest.mark.shared  # needs ../shared


def _sr_unet() -> UNet:
    unet = UNet(**case("sr-tiny")["unet_params"]).eval()
    load_into(unet, read_state_dict(reference_path("parity", "sr-tiny", "unet.safetensors")), "unet")
    return unet


def test_computed_masks_equal_upstream_buffers() -> None:
    """The masks upstream stored in its checkpoint are the ones we compute for that size."""
    state = read_state_dict(reference_path("parity", "sr-tiny", "unet.safetensors"))
    unet = UNet(**case("sr-tiny")["unet_params"])
    checked = 0
    for name, module in unet.named_modules():
        if isinstance(module, SwinTransformerBlock) and module.shift:
            stored = state[f"{name}.attn_mask"]
            ours = shifted_window_mask(module.resolution, module.resolution, module.window, module.shift)
            assert torch.equal(stored, ours), name
            checked += 1
    assert checked > 0


def _brute_force_block(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """Shifted-window attention computed token by token, independently of the partition code."""
    b, c, h, w = x.shape
    win, shift, attn = block.window, block.shift, block.attn
    heads = attn.num_heads
    y = block.norm1(x).permute(0, 2, 3, 1)
    y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    qkv = attn.qkv(y).reshape(b, h, w, 3, heads, c // heads)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

    def label(i: int, j: int) -> int:
        # Upstream's rule (see shifted_window_mask): a row region read at (i // win) * win + j % win.
        if not shift:
            return 0
        r = i // win * win + j % win
        return 0 if r < h - win else (1 if r < h - shift else 2)

    out = torch.zeros(b, h, w, heads, c // heads)
    for i in range(h):
        for j in range(w):
            wi, wj = i // win, j // win
            rows, cols = range(wi * win, wi * win + win), range(wj * win, wj * win + win)
            keys = [(a, bb) for a in rows for bb in cols]
            logits = []
            for a, bb in keys:
                rel = (i - a + win - 1) * (2 * win - 1) + (j - bb + win - 1)
                bias = attn.relative_position_bias_table[rel]
                same = label(i, j) == label(a, bb)
                logits.append((q[:, i, j] * k[:, a, bb]).sum(-1) * attn.scale + bias + (0 if same else -100))
            weights = torch.softmax(torch.stack(logits, -1), -1)
            values = torch.stack([v[:, a, bb] for a, bb in keys], -2)
            out[:, i, j] = (weights.unsqueeze(-1) * values).sum(-2)
    y = attn.proj(out.reshape(b, h, w, c))
    y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    x = x + y.permute(0, 3, 1, 2)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("size", [(8, 8), (8, 12), (16, 4)])
@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("chunk_bytes", [None, 1, 3 * 8192])
def test_window_attention_matches_brute_force_at_any_size(
    size: tuple[int, int], shift: int, chunk_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also in chunks (as large maps run): one window / row at a time, and 3 windows / 6 rows,
    which splits the maps of a batch of two unevenly."""
    if chunk_bytes is not None:
        monkeypatch.setattr(swin, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=32, resolution=8, num_heads=2, window=4, shift=shift, mlp_ratio=2).eval()
    torch.nn.init.normal_(block.attn.relative_position_bias_table, std=0.5)
    x = torch.randn(2, 32, *size)
    with torch.no_grad():
        assert torch.allclose(block(x), _brute_force_block(block, x), atol=1e-5)


def test_masks_for_new_sizes_are_computed_once_and_cached() -> None:
    unet = _sr_unet()
    x = torch.randn(1, 3, 24, 40)
    lq = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        unet(x, torch.tensor([3]), lq=lq)
    shifted = [m for m in unet.modules() if isinstance(m, SwinTransformerBlock) and m.shift]
    assert shifted and all(len(m._masks) == 1 for m in shifted)
    cached = {id(m): next(iter(m._masks.values())) for m in shifted}
    with torch.no_grad():
        unet(x, torch.tensor([2]), lq=lq)
    assert all(next(iter(m._masks.values())) is cached[id(m)] for m in shifted)


def test_batch_items_are_independent_at_other_sizes() -> None:
    unet = _sr_unet()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 32)
    lq = torch.randn(2, 3, 16, 32)
    t = torch.tensor([1, 1])
    with torch.no_grad():
        both = unet(x, t, lq=lq)
        first = unet(x[:1], t[:1], lq=lq[:1])
    assert torch.allclose(both[:1], first, atol=1e-5)


def test_size_multiple_and_clear_error_for_other_sizes() -> None:
    unet = _sr_unet()
    assert unet.size_multiple == 8
    with pytest.raises(ValueError, match="not divisible by the attention window"):
        unet(torch.randn(1, 3, 12, 16), torch.tensor([0]), lq=torch.randn(1, 3, 12, 16))


def _pixel_unet_params(**changes: object) -> dict[str, object]:
    params: dict[str, object] = dict(
        image_size=32, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2],
        num_res_blocks=1, attention_resolutions=[4], num_head_channels=16, use_scale_shift_norm=True,
        swin_embed_dim=32, window_size=4, mlp_ratio=2, cond_lq=True, lq_size=32, pixel_unshuffle=4,
    )  # fmt: skip
    return {**params, **changes}


def test_pixel_unshuffle_runs_the_network_on_folded_blocks() -> None:
    """r = 4 is the same network as r = 1 fed the 4x4-folded x and LQ and unfolded afterwards."""
    torch.manual_seed(0)
    folded = UNet(**_pixel_unet_params()).eval()
    torch.nn.init.normal_(folded.out[-1].weight, std=0.05)  # a fresh network's output is zero
    plain = UNet(
        **_pixel_unet_params(
            image_size=8, in_channels=6 * 16, out_channels=3 * 16, cond_lq=False, pixel_unshuffle=1
        )
    ).eval()
    plain.load_state_dict(folded.state_dict())
    x, lq = torch.randn(2, 3, 32, 64), torch.randn(2, 3, 32, 64)
    t = torch.tensor([0, 3])
    with torch.no_grad():
        ours = folded(x, t, lq=lq)
        expected = torch.nn.functional.pixel_shuffle(
            plain(torch.nn.functional.pixel_unshuffle(torch.cat([x, lq], 1), 4), t), 4
        )
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, expected)


def test_pixel_unshuffle_sets_the_size_multiple_and_is_checked() -> None:
    folded = UNet(**_pixel_unet_params())
    assert folded.size_multiple == 32  # window 4 on the second level of 4x4 blocks: 4 * 2 * 4
    assert UNet(**_pixel_unet_params(window_size=2)).size_multiple == 16
    with pytest.raises(ValueError, match="not divisible by the attention window"):
        folded(torch.randn(1, 3, 16, 32), torch.tensor([0]), lq=torch.randn(1, 3, 16, 32))
    with pytest.raises(ValueError, match="positive divisor of image_size"):
        UNet(**_pixel_unet_params(pixel_unshuffle=3))
    with pytest.raises(ValueError, match="lq_size = image_size"):
        UNet(**_pixel_unet_params(lq_size=64))


def test_conditioning_is_checked() -> None:
    unet = _sr_unet()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="needs the LQ image"):
        unet(x, torch.tensor([0]))
    with pytest.raises(ValueError, match="not conditioned on a mask"):
        unet(x, torch.tensor([0]), lq=x, mask=x[:, :1])
    inpaint = UNet(**case("inpaint-tiny")["unet_params"])
    with pytest.raises(ValueError, match="needs a mask"):
        inpaint(x, torch.tensor([0]), lq=torch.randn(1, 3, 64, 64))


def test_autoencoder_scales_any_multiple_of_its_factor() -> None:
    autoencoder = VQAutoencoder(**case("face-tiny")["autoencoder_params"]).eval()
    assert autoencoder.downsample_factor == 8
    with torch.no_grad():
        z = autoencoder.encode(torch.randn(1, 3, 24, 40))
        assert z.shape == (1, 8, 3, 5)
        assert autoencoder.decode(z).shape == (1, 3, 24, 40)


def test_decode_snaps_to_the_codebook() -> None:
    autoencoder = VQAutoencoder(**case("sr-tiny")["autoencoder_params"]).eval()
    codebook = autoencoder.quantize.embedding.weight.detach()
    z = torch.randn(1, 3, 4, 4)
    q = autoencoder.quantize(z)
    flat = q.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = codebook[torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 3), codebook).argmin(1)]
    assert torch.equal(flat, nearest)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("cin", "cout", "h", "w"), [(3, 5, 1, 1), (4, 4, 7, 10), (32, 16, 16, 9)])
def test_folded_upsampling_convolution_equals_the_direct_form(
    cin: int, cout: int, h: int, w: int, channels_last: bool
) -> None:
    from resshift_cli.models.layers import upsample_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
    x = torch.randn(2, cin, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    direct = conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    assert torch.allclose(upsample_conv(x, conv), direct, atol=1e-5)
