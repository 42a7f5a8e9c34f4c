"""The training engine: config, schedule, EMA, data order, checkpoints, exact resume, latent space, DDP.

Runs train tiny models for a few steps on small generated images, one CPU thread each.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from launch import torchrun
from PIL import Image
from reference import case, reference_path
from safetensors.torch import load_file
from trainconfigs import TINY_UNET, config_file, training_images

from resshift_cli.checkpoints import compact_state_dict, load_into, read_state_dict, save_safetensors
from resshift_cli.models.unet import UNet
from resshift_cli.pipelines.options import RunOptions
from resshift_cli.registry import load_registry
from resshift_cli.runtime import dtype_of
from resshift_cli.training.config import (
    OptimConfig,
    TrainConfigError,
    config_hash,
    dump_toml,
    load_train_config,
    parse_override,
    trajectory_dict,
)
from resshift_cli.training.data import PairMaker, StepBatches
from resshift_cli.training.degradations import DegradationConfig, bicubic_degrade
from resshift_cli.training.trainer import (
    load_optimizer_state,
    lr_at,
    optimizer_state,
    run_training,
    update_ema,
)

ROOT = Path(__file__).resolve().parents[1]


def _losses(log: Path) -> list[float]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ---------------------------------------------------------------------------------------------------
# Configuration.


def test_overrides_parse_as_toml_values() -> None:
    assert parse_override("train.lr=1e-4") == (("train", "lr"), 1e-4)
    assert parse_override("optim.betas = [0.9, 0.99]") == (("optim", "betas"), [0.9, 0.99])
    assert parse_override("data.rotate=true") == (("data", "rotate"), True)
    assert parse_override("seed=7") == (("seed",), 7)
    assert parse_override('name="2024"') == (("name",), "2024")
    assert parse_override("model.diffusion.schedule_kwargs={power = 0.5}") == (
        ("model", "diffusion", "schedule_kwargs"),
        {"power": 0.5},
    )
    # Not TOML: a plain string (paths, names).
    assert parse_override("data.train=/data/hq images") == (("data", "train"), "/data/hq images")
    for bad in ("train.lr", "=3", "train..lr=3"):
        with pytest.raises(TrainConfigError, match=r"key\.sub=value"):
            parse_override(bad)


def test_load_config_applies_overrides_and_resolves_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_file(tmp_path, data={"train": "hq"})
    monkeypatch.chdir(ROOT)
    config = load_train_config(
        path,
        [
            "train.steps=100",
            "optim.schedule=constant",
            "data.degradation=realesrgan",
            "data.realesrgan.noise_range=[1, 10]",
            "data.val=elsewhere",
            "model.unet.model_channels=64",
            "model.init=weights/start.safetensors",
            "model.autoencoder=vq-f4",
        ],
    )
    assert config.train.steps == 100
    assert config.optim.schedule == "constant"
    assert config.data.realesrgan == DegradationConfig(noise_range=(1.0, 10.0))
    assert config.model.unet["model_channels"] == 64 and config.model.unet["lq_size"] == 32
    # Paths in the file are relative to the file, paths on the command line to the current folder;
    # a registry name stays a name.
    assert config.data.train == tmp_path / "hq"
    assert config.output_dir == tmp_path / "out"
    assert config.data.val == ROOT / "elsewhere"
    assert config.model.init == str(ROOT / "weights" / "start.safetensors")
    assert config.model.autoencoder == "vq-f4"
    assert config.optim.betas == (0.9, 0.999)

    # Bookkeeping keys do not change the run's identity; what decides the weights does.
    base = config_hash(load_train_config(path))
    assert config_hash(load_train_config(path, ["train.checkpoint_every=7", "data.workers=2"])) == base
    assert config_hash(load_train_config(path, ["optim.lr=1e-3"])) != base
    # Keys added later are left out at their defaults (runs from before them resume), not otherwise.
    plain = trajectory_dict(load_train_config(path))
    assert "shrink" not in plain["data"] and "loss" not in plain["train"]
    assert not {"jpeg", "resize_by_factor"} & set(plain["data"]["realesrgan"])
    assert plain["optim"]["lr"] == config.optim.lr
    assert config_hash(load_train_config(path, ["train.loss=l1"])) != base
    assert config_hash(load_train_config(path, ["data.shrink=[0.5, 1.0]"])) != base
    assert config_hash(load_train_config(path, ["data.realesrgan.jpeg=torch"])) != base
    assert config_hash(load_train_config(path, ["data.realesrgan.resize_by_factor=true"])) != base


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=3", r"train\.stepz: unknown key"),
        ("optim.lr=fast", r"optim\.lr: expected a number"),
        ("train.batch_size=2.5", r"train\.batch_size: expected an integer"),
        ("optim.betas=[0.9]", r"optim\.betas: expected 2 values"),
        ("optim.schedule=linear", r"optim: schedule must be one of cosine, constant"),
        ("data.degradation=jpeg", r"data: degradation must be one of"),
        ("data.shrink=[0.5, 1.5]", r"data: shrink must be \[lo, hi\] with 0 < lo <= hi <= 1"),
        ("data.realesrgan.jpeg_range=[50, 10]", r"data\.realesrgan: jpeg_range"),
        ("model.autoencoder=ae.safetensors", r"model: an autoencoder file needs autoencoder_params"),
        ("train.precision=fp8", r"train: precision must be one of"),
        ("train.weights_dtype=float16", r"train: weights_dtype must be one of fp32, bf16, fp16"),
        ("train.loss=huber", r"train: loss must be one of mse, l1, got 'huber'"),
        ("name=a/b", r"name must be a plain name"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, override: str, message: str) -> None:
    path = config_file(tmp_path)
    with pytest.raises(TrainConfigError, match=message):
        load_train_config(path, [override])


def test_missing_required_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('output_dir = "o"\n[model]\n[data]\ntrain = "x"\n[train]\nsteps = 1\nbatch_size = 1\n')
    with pytest.raises(TrainConfigError, match="data: missing key 'crop'"):
        load_train_config(path)


def test_lite_config_builds_a_pixel_model_under_20_mb(tmp_path: Path) -> None:
    config = load_train_config(ROOT / "configs" / "lite.toml")
    assert config.model.autoencoder is None and config.model.diffusion["latent_flag"] is False
    unet = UNet(**config.model.unet)
    assert unet.lq_size == unet.image_size  # conditioned on the upsampled LQ, at the output size
    assert config.data.crop % unet.size_multiple == 0
    weights = tmp_path / "lite.safetensors"
    stored = compact_state_dict(unet.state_dict(), dtype_of(config.train.weights_dtype))
    save_safetensors(stored, weights)
    assert weights.stat().st_size < 20_000_000  # 20 MB, as stored by the run
    # It runs at the crop size, conditioned on the upsampled LQ.
    x = torch.zeros(1, 3, config.data.crop, config.data.crop)
    assert unet(x, torch.tensor([1]), lq=x).shape == x.shape


def test_a_fresh_network_starts_as_upstream_with_zeroed_residual_outputs() -> None:
    """Upstream's zero_module: the last convolution of every ResBlock and the network's output
    convolution start at zero; everything else, the Swin layers included, starts random."""
    from resshift_cli.models.swin import WindowAttention
    from resshift_cli.models.unet import ResBlock

    torch.manual_seed(0)
    unet = UNet(**load_train_config(ROOT / "configs" / "lite.toml").model.unet)
    zeroed = {id(p) for p in unet.out[-1].parameters()}
    blocks = [m for m in unet.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 15  # 5 down, 2 in the middle, 8 up
    for block in blocks:
        zeroed |= {id(p) for p in block.out_layers[-1].parameters()}
    assert len(zeroed) == 2 * (len(blocks) + 1)
    for name, parameter in unet.named_parameters():
        if id(parameter) in zeroed:
            assert not parameter.any(), name
        elif name.endswith(".weight") and parameter.dim() > 1:
            assert parameter.std() > 1e-3, name  # random, not zero
    tables = [m.relative_position_bias_table for m in unet.modules() if isinstance(m, WindowAttention)]
    assert tables and all(0.01 < float(t.detach().std()) < 0.03 for t in tables)  # trunc_normal_(std=0.02)


def test_an_untrained_lite_network_gives_exactly_the_bicubic_image() -> None:
    """predict_type "residual" with a zero output: the sampler returns y0, the bicubic upsampling."""
    from resshift_cli import ResShiftScheduler, Restorer
    from resshift_cli.pipelines.latent import LatentSpace

    config = load_train_config(ROOT / "configs" / "lite.toml")
    torch.manual_seed(1)
    unet = UNet(**config.model.unet)
    params = config.model.diffusion
    latent = LatentSpace.from_params(None, params)
    restorer = Restorer(unet, ResShiftScheduler(**params), latent, torch.device("cpu"), optimize=False)
    lq = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = restorer.sample(lq, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, latent.upsample(lq).clamp(-1, 1))


# ---------------------------------------------------------------------------------------------------
# Schedule, EMA, optimizer state, data order.


def test_warmup_then_cosine_or_constant() -> None:
    cosine = OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr=1e-4)
    assert lr_at(1, cosine, 110) == pytest.approx(1e-4)
    assert lr_at(5, cosine, 110) == pytest.approx(5e-4)
    assert lr_at(10, cosine, 110) == pytest.approx(1e-3)
    assert lr_at(60, cosine, 110) == pytest.approx(0.55e-3)  # half-way down the cosine
    assert lr_at(110, cosine, 110) == pytest.approx(1e-4)
    assert lr_at(200, cosine, 110) == pytest.approx(1e-4)
    constant = OptimConfig(lr=2e-4, warmup_steps=4, schedule="constant")
    assert [lr_at(s, constant, 100) for s in (1, 2, 4, 5, 100)] == pytest.approx(
        [5e-5, 1e-4, 2e-4, 2e-4, 2e-4]
    )
    assert lr_at(1, OptimConfig(lr=3e-4, warmup_steps=0, schedule="constant"), 10) == 3e-4


def test_ema_update_math() -> None:
    model = torch.nn.BatchNorm1d(3)
    ema = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(3.0)
        model.running_mean.fill_(5.0)
    update_ema(ema, model, 0.75)
    assert torch.allclose(ema.weight, torch.full((3,), 0.75 * 1.0 + 0.25 * 3.0))
    assert torch.equal(ema.running_mean, model.running_mean)  # buffers are copied
    update_ema(ema, model, 0.75)
    assert torch.allclose(ema.weight, torch.full((3,), 0.75 * 1.5 + 0.25 * 3.0))


def test_optimizer_state_round_trips_through_tensors_and_json() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(3):
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = optimizer_state(opt, model)
    assert set(tensors) >= {"0.weight.exp_avg", "1.bias.exp_avg_sq", "0.weight.step"}
    meta = json.loads(json.dumps(meta))  # what state.json holds
    fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
    load_optimizer_state(fresh, model, tensors, meta)
    want, got = opt.state_dict(), fresh.state_dict()
    assert want["param_groups"] == got["param_groups"]
    for index, state in want["state"].items():
        for key, value in state.items():
            assert torch.equal(value, got["state"][index][key])


def test_sample_order_and_sharding_are_deterministic(tmp_path: Path) -> None:
    paths = [training_images(tmp_path / "hq", 5, 16, 1) / f"img{i}.png" for i in range(5)]
    maker = PairMaker(paths, 8, 4, "bicubic", DegradationConfig(), False, seed=11)
    epochs = [[maker.order.image_index(k) for k in range(e * 5, e * 5 + 5)] for e in range(3)]
    assert all(sorted(e) == list(range(5)) for e in epochs)  # each epoch visits every image once
    assert len({tuple(e) for e in epochs}) > 1  # in a fresh order
    # Two processes with half the batch each see exactly the single process's batch.
    whole = StepBatches(maker, 1, 4, 4, rank=0, world_size=1)
    halves = [StepBatches(maker, 1, 4, 4, rank=r, world_size=2) for r in (0, 1)]
    for i in range(len(whole)):
        batch = whole[i]
        assert batch.hq is not None and batch.lq is not None and batch.unreadable == []
        assert batch.hq.shape == (4, 3, 8, 8) and batch.lq.shape == (4, 3, 2, 2)
        assert torch.equal(batch.hq, torch.cat([halves[0][i].hq, halves[1][i].hq]))
        assert torch.equal(batch.lq, torch.cat([halves[0][i].lq, halves[1][i].lq]))
    # A run resumed at step 3 gets step 3's batch.
    assert torch.equal(StepBatches(maker, 3, 4, 4, 0, 1)[0].hq, whole[2].hq)


def test_pairs_are_cropped_from_the_shrunk_image(tmp_path: Path) -> None:
    paths = [training_images(tmp_path / "hq", 2, 16, 1) / f"img{i}.png" for i in range(2)]
    plain = PairMaker(paths, 8, 4, "bicubic", DegradationConfig(), False, seed=11)
    halved = PairMaker(paths, 8, 4, "bicubic", DegradationConfig(), False, seed=11, shrink=(0.5, 0.5))
    for k in range(6):
        hq, lq = halved.pair(k)
        # Shrunk to 8x8, the 8x8 crop is the whole image (flipped half the time), not a crop of it.
        pixels = np.asarray(Image.open(paths[halved.order.image_index(k)]).convert("RGB"), np.float32) / 255
        whole = bicubic_degrade(torch.from_numpy(pixels).permute(2, 0, 1), 2, quantise=False)
        assert torch.allclose(hq, whole, atol=1e-5) or torch.allclose(hq, whole.flip(-1), atol=1e-5)
        assert lq.shape == (3, 2, 2)
        assert not torch.equal(hq, plain.pair(k)[0])


# ---------------------------------------------------------------------------------------------------
# Runs.


def test_l1_loss_is_what_the_run_minimises(tmp_path: Path) -> None:
    """Same seed, same first batch and network: the L1 run logs the mean absolute error of the error
    whose mean square the MSE run logs, so it lies between that and its square root (errors < 1)."""
    first = {}
    for loss in ("mse", "l1"):
        path = config_file(tmp_path / loss, train={"steps": 1, "loss": loss})
        first[loss] = _losses(run_training(load_train_config(path), resume=False, quiet=True).log)[0]
    assert first["mse"] < first["l1"] <= math.sqrt(first["mse"])


@pytest.mark.slow
def test_smoke_run_loss_goes_down_and_writes_checkpoints(tmp_path: Path) -> None:
    val = training_images(tmp_path / "val", 2, 48, 5)
    path = config_file(
        tmp_path,
        data={"val": str(val), "val_images": 2},
        optim={"warmup_steps": 5},
        train={"steps": 40, "checkpoint_every": 20, "val_every": 20, "keep_checkpoints": 1},
    )
    config = load_train_config(path)
    result = run_training(config, resume=False, quiet=True)

    losses = _losses(result.log)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])
    assert result.step == 40 and result.loss == losses[-1]
    records = [json.loads(line) for line in result.log.read_text().splitlines()]
    vals = [r for r in records if "val_psnr" in r]
    assert [r["step"] for r in vals] == [20, 40]
    assert all(r["val_psnr"] > 15 and 0 < r["val_ssim"] <= 1 for r in vals)
    assert result.validation == {k: vals[-1][k] for k in ("val_psnr", "val_ssim")}

    # Only the newest checkpoint is kept: weights, EMA, optimizer as safetensors, state as JSON.
    checkpoints = sorted(p.name for p in (config.output_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-0000040"] and result.checkpoint.name == "step-0000040"
    names = sorted(p.name for p in result.checkpoint.iterdir())
    assert names == ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["step"] == 40 and state["samples_seen"] == 160
    assert (state["epoch"], state["epoch_position"]) == (80, 0)
    assert state["config_hash"] == config_hash(config)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0)
    unet = UNet(**TINY_UNET)
    load_into(unet, read_state_dict(result.checkpoint / "model.safetensors"))
    _assert_same_weights(result.weights, result.checkpoint / "ema.safetensors")
    assert not any(p.name.endswith((".pt", ".pth", ".pkl")) for p in config.output_dir.rglob("*"))
    assert load_train_config(config.output_dir / "config.toml") == config  # the resolved config

    # The registry entry restores images with the ordinary sampler (pixel space: the network is
    # conditioned on the upsampled LQ there too).
    from resshift_cli.pipelines.loading import load_restorer

    registry = load_registry(result.registry)
    restorer = load_restorer("tiny", registry=registry, device="cpu")
    out = restorer.restore(torch.rand(1, 3, 8, 8))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path: Path) -> None:
    straight = load_train_config(config_file(tmp_path))
    run_training(straight, resume=False, quiet=True)
    expected = _losses(straight.output_dir / "log.jsonl")
    assert len(expected) == 6

    # A run that died while logging step 5, its last checkpoint at step 3: resume drops the log
    # records after the checkpoint and repeats steps 4..6 exactly (with data workers this time).
    crashed = tmp_path / "crashed"
    shutil.copytree(straight.output_dir, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-0000006")
    (crashed / "tiny.safetensors").unlink()
    lines = (crashed / "log.jsonl").read_text().splitlines()
    (crashed / "log.jsonl").write_text("\n".join(lines[:4]) + '\n{"step": 5, "lo')
    config = load_train_config(config_file(tmp_path), [f"output_dir={crashed}", "data.workers=2"])
    result = run_training(config, resume=True, quiet=True)
    assert _losses(result.log) == expected
    _assert_same_weights(result.weights, straight.output_dir / "tiny.safetensors")
    for name in ("model", "optimizer"):
        _assert_same_weights(
            result.checkpoint / f"{name}.safetensors",
            straight.output_dir / "checkpoints" / "step-0000006" / f"{name}.safetensors",
        )

    # Three steps, then three more: the same as six (constant schedule, so the length may grow).
    both = ["optim.schedule=constant"]
    six = load_train_config(config_file(tmp_path), [*both, f"output_dir={tmp_path / 'six'}"])
    run_training(six, resume=False, quiet=True)
    halves = [f"output_dir={tmp_path / 'halves'}", *both]
    run_training(
        load_train_config(config_file(tmp_path), [*halves, "train.steps=3"]), resume=False, quiet=True
    )
    resumed = run_training(load_train_config(config_file(tmp_path), halves), resume=True, quiet=True)
    assert _losses(resumed.log) == _losses(six.output_dir / "log.jsonl")
    _assert_same_weights(resumed.weights, six.output_dir / "tiny.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_saves_the_current_step_and_resume_repeats_the_run_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """A signal during step 3 (no checkpoint due there; the loss is logged every 2 steps) saves a
    checkpoint at step 3; the resumed run ends with the uninterrupted run's weights, optimizer state
    and loss curve, bit for bit."""
    from resshift_cli.training import trainer

    extra = ["train.log_every=2", "train.checkpoint_every=4", "data.workers=1"]
    straight = load_train_config(config_file(tmp_path), [*extra, f"output_dir={tmp_path / 'straight'}"])
    run_training(straight, resume=False, quiet=True)

    config = load_train_config(config_file(tmp_path), [*extra, f"output_dir={tmp_path / 'stopped'}"])
    real_lr_at = trainer.lr_at

    def signal_at_step_3(step: int, *args: Any) -> float:
        if step == 3:
            os.kill(os.getpid(), signum)  # arrives during the step; the step still finishes
        return real_lr_at(step, *args)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(trainer, "lr_at", signal_at_step_3)
    with pytest.raises(trainer.TrainingInterrupted) as stopped:
        run_training(config, resume=False, quiet=True)
    monkeypatch.setattr(trainer, "lr_at", real_lr_at)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # restored
    assert stopped.value.exit_code == 128 + signum and stopped.value.saved and stopped.value.step == 3
    checkpoint = config.output_dir / "checkpoints" / "step-0000003"
    assert stopped.value.checkpoint == checkpoint
    assert str(stopped.value) == (
        f"interrupted by {signal.Signals(signum).name} at step 3: saved {checkpoint}; continue with --resume"
    )
    assert not (config.output_dir / "tiny.safetensors").exists()  # no final weights: not finished

    resumed = run_training(config, resume=True, quiet=True)
    assert _losses(resumed.log) == _losses(straight.output_dir / "log.jsonl")
    _assert_same_weights(resumed.weights, straight.output_dir / "tiny.safetensors")
    for name in ("model", "ema", "optimizer"):
        _assert_same_weights(
            resumed.checkpoint / f"{name}.safetensors",
            straight.output_dir / "checkpoints" / "step-0000006" / f"{name}.safetensors",
        )


def test_a_signal_during_setup_stops_at_once_and_names_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resshift_cli.training import trainer

    config = load_train_config(config_file(tmp_path), ["train.steps=3", "optim.schedule=constant"])
    run_training(config, resume=False, quiet=True)
    real_build = trainer._build_models

    def signalled_while_building(*args: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return real_build(*args)

    monkeypatch.setattr(trainer, "_build_models", signalled_while_building)
    more = load_train_config(config_file(tmp_path), ["train.steps=6", "optim.schedule=constant"])
    with pytest.raises(trainer.TrainingInterrupted) as stopped:
        run_training(more, resume=True, quiet=True)
    last = config.output_dir / "checkpoints" / "step-0000003"
    assert not stopped.value.saved and stopped.value.checkpoint == last
    expected = f"interrupted by SIGTERM: nothing saved after {last}; continue from it with --resume"
    assert str(stopped.value) == expected
    assert sorted(p.name for p in (config.output_dir / "checkpoints").iterdir()) == ["step-0000003"]


def test_resume_refuses_a_changed_run_and_fresh_runs_refuse_old_checkpoints(tmp_path: Path) -> None:
    path = config_file(tmp_path, train={"steps": 1})
    run_training(load_train_config(path), resume=False, quiet=True)
    with pytest.raises(TrainConfigError, match="already holds checkpoints"):
        run_training(load_train_config(path), resume=False, quiet=True)
    with pytest.raises(TrainConfigError, match=r"configuration changed .*optim\.lr"):
        run_training(load_train_config(path, ["optim.lr=1e-4", "train.steps=2"]), resume=True, quiet=True)
    with pytest.raises(TrainConfigError, match="no checkpoint to resume from"):
        run_training(load_train_config(path, [f"output_dir={tmp_path / 'new'}"]), resume=True, quiet=True)


def test_final_weights_can_be_stored_in_fp16(tmp_path: Path) -> None:
    from resshift_cli.pipelines.loading import load_restorer

    def restore(registry_file: Path) -> torch.Tensor:
        registry = load_registry(registry_file)
        restorer = load_restorer("tiny", registry=registry, device="cpu")
        assert next(restorer.unet.parameters()).dtype == torch.float32  # loading casts back
        image = torch.linspace(0, 1, 3 * 8 * 8).reshape(1, 3, 8, 8)
        return restorer.restore(image, options=RunOptions(seed=0))

    path = config_file(tmp_path, train={"steps": 2})
    full = run_training(load_train_config(path), resume=False, quiet=True)
    ema = _weights(full.checkpoint / "ema.safetensors")
    assert {v.dtype for v in _weights(full.weights).values() if v.is_floating_point()} == {torch.float32}
    expected_output = restore(full.registry)

    # The storage dtype is bookkeeping: a finished run resumed with it re-exports the same EMA
    # weights, halved (and integer buffers narrowed), and the checkpoints stay float32.
    half = run_training(load_train_config(path, ["train.weights_dtype=fp16"]), resume=True, quiet=True)
    stored = _weights(half.weights)
    assert stored.keys() == ema.keys()
    for key, value in ema.items():
        if value.is_floating_point():
            assert stored[key].dtype == torch.float16 and torch.equal(stored[key], value.half()), key
        else:  # index buffers: narrowed to int16, values kept
            assert stored[key].dtype == torch.int16 and torch.equal(stored[key].long(), value), key
    assert _weights(half.checkpoint / "ema.safetensors")["out.2.weight"].dtype == torch.float32
    assert half.weights.stat().st_size < 0.6 * (full.checkpoint / "ema.safetensors").stat().st_size

    output = restore(half.registry)
    assert not torch.equal(output, expected_output)
    torch.testing.assert_close(output, expected_output, atol=5e-3, rtol=0)


def _tiny_latent_registry(tmp: Path) -> Path:
    """A user registry with the upstream-structured tiny x4 model and its f4 autoencoder."""
    c = case("sr-tiny")
    ae = c["autoencoder_params"]
    diffusion = {k: v for k, v in c["diffusion_params"].items() if v is not None}
    entries = {
        "models": {
            "tiny-sr": {
                "task": "sr",
                "scale": diffusion["sf"],
                "steps": diffusion["steps"],
                "autoencoder": "tiny-sr-vq",
                "path": str(reference_path("parity", "sr-tiny", "unet.safetensors")),
                "unet": c["unet_params"],
                "diffusion": diffusion,
            }
        },
        "autoencoders": {
            "tiny-sr-vq": {
                "embed_dim": ae["embed_dim"],
                "n_embed": ae["n_embed"],
                "path": str(reference_path("parity", "sr-tiny", "autoencoder.safetensors")),
                "ddconfig": ae["ddconfig"],
            }
        },
    }
    path = tmp / "tiny-registry.toml"
    path.write_text(dump_toml(entries), encoding="utf-8")
    return path


@pytest.mark.parametrize("source", ["registry", "files"])
def test_latent_space_fine_tuning_with_a_frozen_autoencoder(tmp_path: Path, source: str) -> None:
    c = case("sr-tiny")
    unet_file = reference_path("parity", "sr-tiny", "unet.safetensors")
    ae_file = reference_path("parity", "sr-tiny", "autoencoder.safetensors")
    if source == "registry":
        model = {"init": "tiny-sr", "registry": str(_tiny_latent_registry(tmp_path))}
    else:
        model = {
            "init": str(unet_file),
            "autoencoder": str(ae_file),
            "autoencoder_params": c["autoencoder_params"],
            "unet": c["unet_params"],
            "diffusion": {k: v for k, v in c["diffusion_params"].items() if v is not None},
        }
    path = config_file(tmp_path, extra={"model": model})
    val = training_images(tmp_path / "val", 1, 64, 9)
    overrides = [
        f"data.train={training_images(tmp_path / 'hq64', 2, 64, 4)}",
        "data.crop=64",
        "data.degradation=realesrgan",
        f"data.val={val}",
        "data.val_images=1",
        "train.steps=2",
        "train.batch_size=2",
        "optim.lr=1e-5",
        "optim.warmup_steps=0",
    ]
    result = run_training(load_train_config(path, overrides), resume=False, quiet=True)
    losses = _losses(result.log)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result.validation["val_psnr"])

    # Started from the reference weights (strict load): two small AdamW steps move them very little.
    start = read_state_dict(unet_file)
    trained = read_state_dict(result.checkpoint / "model.safetensors")
    assert trained.keys() == start.keys()
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) < 1e-4
    assert any(not torch.equal(trained[k], start[k]) for k in start)

    # The registry entry written for the result names the autoencoder it was trained with.
    registry = load_registry(result.registry)
    spec = registry.model("tiny")
    assert spec.autoencoder == "tiny-autoencoder" and spec.unet == c["unet_params"]
    assert registry.autoencoder("tiny-autoencoder").source.path.resolve() == ae_file.resolve()


def test_pixel_model_must_condition_at_full_size(tmp_path: Path) -> None:
    path = config_file(tmp_path, model={"unet": {**TINY_UNET, "lq_size": 64}})
    with pytest.raises(TrainConfigError, match="lq_size must equal image_size"):
        run_training(load_train_config(path), resume=False, quiet=True)
    with pytest.raises(TrainConfigError, match="latent_flag must be false"):
        run_training(
            load_train_config(config_file(tmp_path), ["model.diffusion.latent_flag=true"]),
            resume=False,
            quiet=True,
        )
    big = training_images(tmp_path / "big", 2, 48, 0)  # the images are checked first: they must hold the crop
    with pytest.raises(TrainConfigError, match=r"data\.crop = 36 must be a multiple of 8"):
        run_training(
            load_train_config(config_file(tmp_path), ["data.crop=36", f"data.train={big}"]),
            resume=False,
            quiet=True,
        )


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (Gloo): same losses as one process, one log, one checkpoint."""
    path = config_file(tmp_path, train={"steps": 3, "checkpoint_every": 2})
    single = load_train_config(path, [f"output_dir={tmp_path / 'single'}"])
    run_training(single, resume=False, quiet=True)

    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from resshift_cli.training.config import load_train_config\n"
        "from resshift_cli.training.trainer import run_training\n"
        "run_training(load_train_config(sys.argv[1], sys.argv[2:]), resume=False, quiet=True)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = torchrun(str(script), str(path), f"output_dir={tmp_path / 'ddp'}")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]

    ddp = tmp_path / "ddp"
    losses = _losses(ddp / "log.jsonl")
    assert len(losses) == 3  # written by rank 0 alone
    assert losses == pytest.approx(_losses(single.output_dir / "log.jsonl"), rel=1e-4)
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    assert json.loads((ddp / "checkpoints" / "step-0000003" / "state.json").read_text())["world_size"] == 2
    assert (ddp / "tiny.safetensors").is_file()
