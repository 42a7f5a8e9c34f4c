"""The training configuration: a TOML file plus ``key.sub=value`` overrides, checked into dataclasses.

Layout (every key can be overridden on the command line, values parsed as TOML)::

    name = "lite"                  # name of the trained model (its registry entry)
    output_dir = "runs/lite"       # checkpoints, log, final weights
    seed = 0                       # all randomness derives from it

    [model]                        # init, autoencoder, registry; [model.unet], [model.diffusion]
    [data]                         # train, val, crop, degradation, [data.realesrgan], ...
    [optim]                        # AdamW, warm-up and schedule, gradient clipping, EMA
    [train]                        # steps, batch_size, device, precision, loss, how often to log/save/
                                   # validate, the stored dtype of the final weights

Relative paths in the file are relative to the file; those given as overrides, to the current
directory. ``model.init`` and ``model.autoencoder`` are registry names unless they look like a path
(contain a slash or end in a checkpoint suffix). Unknown keys are errors, so a typo never passes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from resshift_cli.checkpoints import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from resshift_cli.errors import UsageError
from resshift_cli.runtime import DEVICE_PATTERN
from resshift_cli.scheduler import LOSSES
from resshift_cli.training.degradations import DegradationConfig, check_shrink_range

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainConfigError",
    "TrainLoopConfig",
    "config_hash",
    "dump_toml",
    "is_path_like",
    "load_train_config",
    "parse_override",
    "trajectory_dict",
]

DEGRADATIONS = ("bicubic", "realesrgan")
SCHEDULES = ("cosine", "constant")
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")

Key = tuple[str, ...]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

_PATH_KEYS: tuple[Key, ...] = (("output_dir",), ("data", "train"), ("data", "val"), ("model", "registry"))
_WEIGHT_KEYS: tuple[Key, ...] = (("model", "init"), ("model", "autoencoder"))

_BOOKKEEPING: tuple[Key, ...] = (
    ("name",),
    ("output_dir",),
    ("data", "val"),
    ("data", "val_images"),
    ("data", "val_crop"),
    ("data", "workers"),
    ("train", "device"),
    ("train", "log_every"),
    ("train", "checkpoint_every"),
    ("train", "val_every"),
    ("train", "keep_checkpoints"),
    ("train", "weights_dtype"),
)
"""Keys that do not change which weights a run produces; a resumed run may change them."""

_ADDED_LATER: dict[Key, Any] = {
    ("data", "shrink"): [1.0, 1.0],
    ("train", "loss"): "mse",
    ("data", "realesrgan", "jpeg"): "pillow",
    ("data", "realesrgan", "resize_by_factor"): False,
}
"""Keys added after runs had been checkpointed, with the default that matches what those runs did."""


class TrainConfigError(UsageError):
    """The training configuration is unreadable or invalid; the message names the key."""


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _one_of(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """What to train: the UNet and diffusion (upstream's names), its start and its autoencoder.

    ``init`` (a registry model or a checkpoint file) gives the starting weights, loaded strictly;
    for a registry model its ``unet``/``diffusion`` parameters and autoencoder are the defaults, the
    tables here are merged over them. ``autoencoder`` (a registry autoencoder or a file, the latter
    with ``autoencoder_params`` = embed_dim, n_embed, ddconfig) is frozen; none means pixel space.
    ``registry`` is a user registry file merged into the built-in one.
    """

    unet: dict[str, Any] = field(default_factory=dict)
    diffusion: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    autoencoder: str | None = None
    autoencoder_params: dict[str, Any] | None = None
    registry: Path | None = None

    def __post_init__(self) -> None:
        if self.autoencoder_params is not None and not (
            self.autoencoder is not None and is_path_like(self.autoencoder)
        ):
            raise ValueError("autoencoder_params is only used with an autoencoder given as a file")
        if (
            self.autoencoder is not None
            and is_path_like(self.autoencoder)
            and self.autoencoder_params is None
        ):
            raise ValueError("an autoencoder file needs autoencoder_params (embed_dim, n_embed, ddconfig)")


@dataclass(frozen=True)
class DataConfig:
    """Training images and how the LQ inputs are made from them.

    ``train``: folder of HQ images (searched recursively). Each sample is a random ``crop`` x ``crop``
    HQ crop (flipped, and turned with ``rotate``) of the image shrunk by a random factor from
    ``shrink`` (default (1, 1): not shrunk; like Real-ESRGAN's multi-scale copies of its training
    set), degraded by ``degradation``: "bicubic" or "realesrgan" (parameters in ``realesrgan``).
    ``val``: held-out folder; its first ``val_images`` images (sorted by name), centre-cropped to
    ``val_crop`` (default ``crop``), are scored.
    ``workers`` > 0 prepares batches in that many background processes.
    """

    train: Path
    crop: int
    val: Path | None = None
    degradation: str = "bicubic"
    realesrgan: DegradationConfig = field(default_factory=DegradationConfig)
    rotate: bool = False
    workers: int = 0
    val_images: int = 4
    val_crop: int | None = None
    shrink: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        _positive("crop", self.crop)
        check_shrink_range(self.shrink)
        _one_of("degradation", self.degradation, DEGRADATIONS)
        _non_negative("workers", self.workers)
        _positive("val_images", self.val_images)
        if self.val_crop is not None:
            _positive("val_crop", self.val_crop)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, the learning-rate schedule, gradient clipping and the EMA of the weights.

    The rate rises linearly over ``warmup_steps`` to ``lr``, then stays (``constant``) or follows a
    half cosine down to ``min_lr`` at the last step (``cosine``). ``grad_clip`` caps the global
    gradient norm (0: no clipping). The EMA weights are ``ema_decay * ema + (1 - ema_decay) * w``.
    """

    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _non_negative("weight_decay", self.weight_decay)
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        _positive("eps", self.eps)
        _non_negative("warmup_steps", self.warmup_steps)
        _one_of("schedule", self.schedule, SCHEDULES)
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr], got {self.min_lr}")
        _non_negative("grad_clip", self.grad_clip)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class TrainLoopConfig:
    """How long, on what, and how often to log, checkpoint and validate.

    ``batch_size`` is the global batch: with several processes each takes its own equal slice.
    ``precision`` bf16/fp16 (autocast; fp16 with a gradient scaler) needs CUDA. A checkpoint is
    written every ``checkpoint_every`` steps and at the end; only the ``keep_checkpoints`` newest
    are kept (0: all). ``val_every`` 0 validates only at the end (when ``data.val`` is set).
    ``loss`` is "mse" (upstream's, the default) or "l1" (mean absolute error of the same target).
    ``weights_dtype`` (named as ``precision`` is) is the storage type of the final
    ``<name>.safetensors`` (fp16 halves the file; integer buffers are narrowed too; loading casts
    back to the model's dtypes); checkpoints always keep the model's dtypes.
    """

    steps: int
    batch_size: int
    device: str = "auto"
    precision: str = "fp32"
    log_every: int = 10
    checkpoint_every: int = 1000
    val_every: int = 1000
    keep_checkpoints: int = 3
    weights_dtype: str = "fp32"
    loss: str = "mse"

    def __post_init__(self) -> None:
        _positive("steps", self.steps)
        _positive("batch_size", self.batch_size)
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        _one_of("precision", self.precision, TRAIN_PRECISIONS)
        _positive("log_every", self.log_every)
        _positive("checkpoint_every", self.checkpoint_every)
        _non_negative("val_every", self.val_every)
        _non_negative("keep_checkpoints", self.keep_checkpoints)
        _one_of("weights_dtype", self.weights_dtype, TRAIN_PRECISIONS)
        _one_of("loss", self.loss, LOSSES)


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run; see the module docstring for the file layout."""

    output_dir: Path
    model: ModelConfig
    data: DataConfig
    train: TrainLoopConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    name: str = "trained"
    seed: int = 0

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"name must be a plain name (letters, digits, '.', '_', '-'), got {self.name!r}")
        _non_negative("seed", self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain TOML/JSON values (paths as strings, tuples as lists)."""
        return _plain(asdict(self))


# ---------------------------------------------------------------------------------------------------
# Loading.


def load_train_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read the TOML file ``path``, apply ``key.sub=value`` overrides and check the result.

    Override values are parsed as TOML (``train.lr=1e-4``, ``optim.betas=[0.9, 0.99]``); a value
    that is not valid TOML is taken as a string (``data.train=/data/hq``).
    """
    file = Path(path).expanduser()
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainConfigError(f"{path}: cannot read config file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrainConfigError(f"{path}: invalid TOML: {exc}") from None
    _resolve_paths(raw, file.resolve().parent)
    extra: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        _set(extra, key, value)
    _resolve_paths(extra, Path.cwd())
    _merge(raw, extra)
    return build_train_config(raw, label=str(path))


def build_train_config(raw: Mapping[str, Any], label: str = "config") -> TrainConfig:
    """Check a configuration given as nested tables (paths already absolute) and build it."""
    try:
        return _build(TrainConfig, raw, ())
    except TrainConfigError as exc:
        raise TrainConfigError(f"{label}: {exc}") from None


def parse_override(text: str) -> tuple[Key, Any]:
    """``"train.lr=1e-4"`` -> ``(("train", "lr"), 0.0001)``; the value is TOML, else a plain string."""
    name, sep, value = text.partition("=")
    key = tuple(part.strip() for part in name.split("."))
    if not sep or not all(key):
        raise TrainConfigError(f"override {text!r}: expected key.sub=value")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def is_path_like(value: str) -> bool:
    """Whether a ``model.init``/``model.autoencoder`` value names a file rather than a registry entry."""
    return "/" in value or os.sep in value or value.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the path keys of ``raw`` absolute against ``base`` (weights only when path-like)."""
    for key in _PATH_KEYS + _WEIGHT_KEYS:
        table = _get(raw, key[:-1])
        if not isinstance(table, dict) or not isinstance(table.get(key[-1]), str):
            continue
        value = table[key[-1]]
        if not value or (key in _WEIGHT_KEYS and not is_path_like(value)):
            continue  # "" stays "" and is refused as a value, not taken as the base folder
        table[key[-1]] = str((base / Path(value).expanduser()).resolve())


def _get(raw: Mapping[str, Any], key: Key) -> Any:
    node: Any = raw
    for part in key:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(raw: dict[str, Any], key: Key, value: Any) -> None:
    node = raw
    for part in key[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TrainConfigError(f"override {'.'.join(key)}: {part} is not a table")
    node[key[-1]] = value


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for name, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(name), dict):
            _merge(into[name], value)
        else:
            into[name] = value


def _dotted(key: Key) -> str:
    return ".".join(key) or "(top level)"


def _build(cls: type, raw: Any, key: Key) -> Any:
    """Instantiate dataclass ``cls`` from table ``raw``, checking names and types of every key."""
    if not isinstance(raw, Mapping):
        raise TrainConfigError(f"{_dotted(key)}: expected a table, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for name in raw:
        if name not in known:
            raise TrainConfigError(
                f"{_dotted((*key, name))}: unknown key; expected one of {', '.join(known)}"
            )
    kwargs = {}
    for name, f in known.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], (*key, name))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise TrainConfigError(f"{_dotted(key)}: missing key {name!r}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise TrainConfigError(f"{_dotted(key)}: {exc}") from None


def _coerce(tp: Any, value: Any, key: Key) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = (a for a in args if a is not type(None))
        return _coerce(inner, value, key)
    if is_dataclass(tp):
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise TrainConfigError(f"{_dotted(key)}: expected a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(value) != len(args):
            raise TrainConfigError(f"{_dotted(key)}: expected {len(args)} values, got {_show(value)}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"{_dotted(key)}: expected a table, got {_show(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(f"{_dotted(key)}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TrainConfigError(f"{_dotted(key)}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise TrainConfigError(f"{_dotted(key)}: expected a number, got {_show(value)}")
        return float(value)
    if tp in (str, Path):
        if not isinstance(value, str) or not value:
            raise TrainConfigError(f"{_dotted(key)}: expected a non-empty string, got {_show(value)}")
        return tp(value)
    raise TypeError(f"no rule for {tp!r}")  # pragma: no cover - a field type the schema does not use


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    return json.dumps(_plain(value))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------------
# Identity of a run, and writing TOML.


def trajectory_dict(config: TrainConfig) -> dict[str, Any]:
    """The part of the configuration that decides the weights a run produces.

    Bookkeeping (where and how often to log, save and validate, the device) is left out, and so is
    ``train.steps`` under a constant schedule, so a run can be resumed with those changed. Keys
    added to the configuration later are left out at their default (what runs before them did), so
    those runs' checkpoints still resume.
    """
    data = config.to_dict()
    for key in _BOOKKEEPING:
        _get(data, key[:-1]).pop(key[-1], None)
    if config.optim.schedule == "constant":
        data["train"].pop("steps", None)
    for key, default in _ADDED_LATER.items():
        parent = _get(data, key[:-1])
        if parent.get(key[-1]) == default:
            del parent[key[-1]]
    return data


def config_hash(config: TrainConfig) -> str:
    """sha256 of :func:`trajectory_dict`, canonical JSON."""
    text = json.dumps(trajectory_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dump_toml(data: Mapping[str, Any]) -> str:
    """Nested tables of strings, numbers, booleans and lists as TOML text (None values left out)."""
    return "\n".join(_toml_table(data, ())).strip() + "\n"


def _toml_table(data: Mapping[str, Any], key: Key) -> list[str]:
    plain = {k: v for k, v in data.items() if v is not None and not isinstance(v, Mapping)}
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    lines = [f"[{'.'.join(_toml_key(k) for k in key)}]"] if key and (plain or not tables) else []
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain.items()]
    for name, table in tables.items():
        lines += ["", *_toml_table(table, (*key, name))]
    return lines


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")
