"""A user registry of the tiny random-weight reference models, for fast end-to-end tests.

The models are upstream-structured networks with random weights from ../shared/reference/parity:
``tiny-sr`` (x4 super-resolution), ``tiny-inpaint`` and ``tiny-face``, each with its own
autoencoder (``tiny-sr-vq``, ...). Their weights are local files (``path``), so nothing is
downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from reference import case, reference_path

from resshift_cli import ResShiftScheduler, Restorer, UNet, VQAutoencoder
from resshift_cli.checkpoints import load_into, read_state_dict
from resshift_cli.pipelines.latent import LatentSpace

TINY_MODELS = {
    "tiny-sr": ("sr-tiny", "sr"),
    "tiny-inpaint": ("inpaint-tiny", "inpaint"),
    "tiny-face": ("face-tiny", "face"),
}
"""Registry name: (reference case, task)."""


def _value(value: Any) -> str:
    """A TOML value (no tables): strings, booleans, numbers and lists of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _table(name: str, data: Mapping[str, Any]) -> list[str]:
    """``[name]`` with its plain keys (None values left out), then its sub-tables."""
    lines = [f"[{name}]"]
    lines += [f"{key} = {_value(v)}" for key, v in data.items() if v is not None and not isinstance(v, dict)]
    for key, v in data.items():
        if isinstance(v, dict):
            lines += ["", *_table(f"{name}.{key}", v)]
    return lines


def registry_entries() -> dict[str, dict[str, Any]]:
    """``{"models": {...}, "autoencoders": {...}}`` for the three tiny models."""
    models: dict[str, Any] = {}
    autoencoders: dict[str, Any] = {}
    for name, (case_name, task) in TINY_MODELS.items():
        c = case(case_name)
        ae = dict(c["autoencoder_params"])
        autoencoders[f"{name}-vq"] = {
            "description": f"autoencoder of {name}",
            "embed_dim": ae["embed_dim"],
            "n_embed": ae["n_embed"],
            "path": str(reference_path("parity", case_name, "autoencoder.safetensors")),
            "ddconfig": ae["ddconfig"],
        }
        diffusion = c["diffusion_params"]
        models[name] = {
            "description": f"random-weight {task} model ({case_name})",
            "task": task,
            "scale": diffusion["sf"],
            "steps": diffusion["steps"],
            "autoencoder": f"{name}-vq",
            "path": str(reference_path("parity", case_name, "unet.safetensors")),
            "unet": c["unet_params"],
            "diffusion": diffusion,
        }
    return {"models": models, "autoencoders": autoencoders}


def write_registry(directory: Path, defaults: bool = False) -> Path:
    """Write ``tiny.toml`` into ``directory`` and return its path.

    With ``defaults`` the tiny models also become the default model of their task.
    """
    entries = registry_entries()
    lines: list[str] = ["# Tiny random-weight models for tests."]
    if defaults:
        lines += ["", *_table("defaults", {task: name for name, (_, task) in TINY_MODELS.items()})]
    for section in ("models", "autoencoders"):
        for name, data in entries[section].items():
            lines += ["", *_table(f"{section}.{name}", data)]
    path = directory / "tiny.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_restorer(case_name: str, optimize: bool = False, **overrides: Any) -> Restorer:
    """A CPU restorer of the random-weight reference model ``case_name`` (fresh networks each
    time, so a test may change them), built as upstream's config says. ``optimize`` False is
    the plain computation upstream does; ``overrides`` replace diffusion parameters."""
    c = case(case_name)
    unet = UNet(**c["unet_params"])
    autoencoder = VQAutoencoder(**c["autoencoder_params"])
    load_into(unet, read_state_dict(reference_path("parity", case_name, "unet.safetensors")), "unet")
    load_into(
        autoencoder,
        read_state_dict(reference_path("parity", case_name, "autoencoder.safetensors")),
        "autoencoder",
    )
    params = {**c["diffusion_params"], **overrides}
    latent = LatentSpace.from_params(autoencoder, params)
    return Restorer(unet, ResShiftScheduler(**params), latent, torch.device("cpu"), optimize=optimize)
