"""The weights registry: which checkpoints exist, what they are, and where to get them.

Models and autoencoders are built by name from specs read from ``weights.toml`` (shipped with the
package), merged key by key with the user's own registry files: the one named by the environment
variable ``RESSHIFT_REGISTRY``, then the one given explicitly (the CLI's ``--registry FILE``). The
merged result is validated as a whole, and every error is one line naming the file, the entry and
the key, so that a typo in a user file is found without reading code. No torch import here: the
CLI reads the registry for ``--help`` and ``weights list``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from resshift_cli.errors import ModelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ENV_VAR = "RESSHIFT_REGISTRY"
TASKS = ("sr", "inpaint", "face")
DEFAULT_REVISION = "main"
BUILTIN_LABEL = "resshift_cli/weights.toml"
BUNDLED_SR_MODEL = "lite"
"""The small x4 SR model shipped inside the package (configs/lite.toml): works with no download."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")

Key = tuple[str, ...]


class RegistryError(ModelError):
    """The registry files are unreadable or invalid, or a name is not in the registry."""


@dataclass(frozen=True)
class WeightSource:
    """Where the weights of one registry entry come from.

    ``path`` (a local file) wins over the hub file ``repo_id/filename@revision``, which wins over
    ``url``; ``sha256`` (lower-case hex) is checked against downloaded and cached copies.
    """

    name: str
    repo_id: str | None = None
    filename: str | None = None
    revision: str = DEFAULT_REVISION
    url: str | None = None
    sha256: str | None = None
    path: Path | None = None


@dataclass(frozen=True)
class AutoencoderSpec:
    """A VQ autoencoder: upstream's ``embed_dim``, ``n_embed`` and ``ddconfig``, its weights and their
    licence."""

    name: str
    embed_dim: int
    n_embed: int
    ddconfig: dict[str, Any]
    source: WeightSource
    description: str = ""
    license: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """A diffusion model: task, UNet and diffusion hyper-parameters (upstream names), weights and
    their licence.

    ``autoencoder`` names an :class:`AutoencoderSpec`, or is None for a pixel-space model.
    """

    name: str
    task: str
    scale: int
    steps: int
    description: str
    unet: dict[str, Any]
    diffusion: dict[str, Any]
    autoencoder: str | None
    source: WeightSource
    license: str = ""
    sample_steps: int | None = None
    """Network calls when sampling, where they differ from ``steps`` (the schedule it was trained
    with): 1 for a model distilled into one step. None: every step of the schedule."""

    @property
    def network_calls(self) -> int:
        """How many times sampling calls the network."""
        return self.sample_steps or self.steps


@dataclass(frozen=True)
class Registry:
    """All known models and autoencoders, after user overrides; look entries up by name."""

    models: dict[str, ModelSpec]
    autoencoders: dict[str, AutoencoderSpec]
    defaults: dict[str, str]
    files: tuple[str, ...] = ()

    def model(self, name: str) -> ModelSpec:
        """The model called ``name``; the error lists the known models."""
        try:
            return self.models[name]
        except KeyError:
            raise RegistryError(f"unknown model {name!r}; known: {', '.join(self.models)}") from None

    def autoencoder(self, name: str) -> AutoencoderSpec:
        """The autoencoder called ``name``; the error lists the known autoencoders."""
        try:
            return self.autoencoders[name]
        except KeyError:
            raise RegistryError(
                f"unknown autoencoder {name!r}; known: {', '.join(self.autoencoders)}"
            ) from None

    def entry(self, name: str) -> ModelSpec | AutoencoderSpec:
        """The model or autoencoder called ``name`` (the two share one namespace)."""
        if name in self.models:
            return self.models[name]
        if name in self.autoencoders:
            return self.autoencoders[name]
        raise RegistryError(f"unknown weights {name!r}; known: {', '.join(self.names())}")

    def names(self) -> list[str]:
        """Every entry name, models first, in file order."""
        return [*self.models, *self.autoencoders]

    def default_model(self, task: str) -> ModelSpec:
        """The model a task uses when none is named (the ``[defaults]`` table)."""
        if task not in TASKS:
            raise RegistryError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        if task not in self.defaults:
            choices = [m.name for m in self.models.values() if m.task == task]
            raise RegistryError(
                f"no default model for task {task!r}; name one of: {', '.join(choices) or '(none)'}"
            )
        return self.models[self.defaults[task]]


def builtin_registry_text() -> str:
    """The text of the ``weights.toml`` shipped with the package."""
    return (resources.files("resshift_cli") / "weights.toml").read_text(encoding="utf-8")


def package_dir() -> Path:
    """The installed package's directory: the base of the built-in registry's relative paths
    (the bundled ``lite`` model lives there)."""
    return Path(str(resources.files("resshift_cli")))


def load_registry(
    user_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Registry:
    """Read the built-in registry, merge the ``RESSHIFT_REGISTRY`` file then ``user_file`` into it,
    and validate the result.

    ``env`` defaults to ``os.environ``; relative ``path`` keys are resolved against the directory
    of the file that sets them (the package directory for the built-in file).
    """
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any], Path]] = [
        (BUILTIN_LABEL, _parse(builtin_registry_text(), BUILTIN_LABEL), package_dir())
    ]
    env_file = env.get(ENV_VAR)
    if env_file:
        layers.append(_read_user_file(env_file, f"{ENV_VAR}={env_file}"))
    if user_file is not None:
        layers.append(_read_user_file(user_file, str(user_file)))

    merged: dict[str, Any] = {}
    origin: dict[Key, int] = {}
    for index, (_, data, base) in enumerate(layers):
        _resolve_paths(data, base)
        _forget_stale_hashes(merged, data)
        _merge(merged, data, (), index, origin)
    return _Validator(merged, origin, tuple(label for label, _, _ in layers)).registry()


def _read_user_file(path: str | os.PathLike[str], what: str) -> tuple[str, dict[str, Any], Path]:
    file = Path(path).expanduser()
    label = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"{what}: registry file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{what}: cannot read registry file ({exc})") from None
    return label, _parse(text, label), file.resolve().parent


def _parse(text: str, label: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message ends with "(at line L, column C)".
        raise RegistryError(f"{label}: invalid TOML: {exc}") from None


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make each entry's ``path`` absolute, relative to the file that sets it."""
    for section in ("models", "autoencoders"):
        entries = data.get(section)
        if not isinstance(entries, dict):
            continue
        for entry in entries.values():
            if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]:
                path = Path(entry["path"]).expanduser()
                if not path.is_absolute():
                    path = base / path
                entry["path"] = str(path)


def _forget_stale_hashes(merged: dict[str, Any], new: Mapping[str, Any]) -> None:
    """Drop an entry's ``sha256`` when a later layer points it at other weights without giving
    one: the hash belongs to the file, and the file changed (e.g. your own run named ``lite``).
    Its ``license`` stays: a local copy of published weights is under their licence still."""
    for section, entries in new.items():
        if not isinstance(entries, dict) or not isinstance(merged.get(section), dict):
            continue
        for name, entry in entries.items():
            old = merged[section].get(name)
            moved = isinstance(entry, dict) and any(k in entry for k in _SOURCE_KEYS if k != "sha256")
            if moved and "sha256" not in entry and isinstance(old, dict):
                old.pop("sha256", None)


def _merge(
    into: dict[str, Any], new: Mapping[str, Any], key: Key, layer: int, origin: dict[Key, int]
) -> None:
    """Deep-merge ``new`` into ``into``, remembering which layer set each key (tables: the first)."""
    for name, value in new.items():
        sub = (*key, name)
        if isinstance(value, dict) and isinstance(into.get(name), dict):
            _merge(into[name], value, sub, layer, origin)
            continue
        if isinstance(value, dict):
            into[name] = {}
            origin[sub] = layer
            _merge(into[name], value, sub, layer, origin)
            continue
        into[name] = value
        origin[sub] = layer


def _show(value: object) -> str:
    """A value as it would look in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


_SOURCE_KEYS = ("repo_id", "filename", "revision", "url", "sha256", "path")
_MODEL_KEYS = (
    "description",
    "task",
    "scale",
    "steps",
    "sample_steps",
    "autoencoder",
    "license",
    "unet",
    "diffusion",
    *_SOURCE_KEYS,
)
_AUTOENCODER_KEYS = ("description", "embed_dim", "n_embed", "ddconfig", "license", *_SOURCE_KEYS)


class _Validator:
    """Checks the merged registry and builds the specs; raises on the first problem."""

    def __init__(self, data: dict[str, Any], origin: dict[Key, int], files: tuple[str, ...]) -> None:
        self.data = data
        self.origin = origin
        self.files = files

    def layer(self, key: Key) -> int:
        """The layer that set ``key``, or its closest enclosing table."""
        return next((self.origin[key[:n]] for n in range(len(key), 0, -1) if key[:n] in self.origin), 0)

    def fail(self, key: Key, message: str) -> RegistryError:
        return RegistryError(f"{self.files[self.layer(key)]}: {'.'.join(key)}: {message}")

    def registry(self) -> Registry:
        for name in self.data:
            if name not in ("models", "autoencoders", "defaults"):
                raise self.fail((name,), "unknown table; expected models, autoencoders or defaults")
        models_raw = self.table(("models",), self.data.get("models", {}))
        autoencoders_raw = self.table(("autoencoders",), self.data.get("autoencoders", {}))
        autoencoders = {
            name: self.autoencoder(name, self.table(("autoencoders", name), raw))
            for name, raw in autoencoders_raw.items()
        }
        models = {}
        for name, raw in models_raw.items():
            if name in autoencoders:
                raise self.fail(("models", name), "name already used by an autoencoder entry")
            models[name] = self.model(name, self.table(("models", name), raw), autoencoders)
        defaults = self.defaults(models)
        return Registry(models=models, autoencoders=autoencoders, defaults=defaults, files=self.files)

    def table(self, key: Key, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table, got {_show(value)}")
        if key in (("models",), ("autoencoders",)):
            for name in value:
                if not _NAME.fullmatch(name):
                    raise self.fail((*key, name), "invalid name; use letters, digits, '.', '_' and '-'")
        return value

    def check_keys(
        self, key: Key, raw: dict[str, Any], allowed: tuple[str, ...], required: tuple[str, ...]
    ) -> None:
        for name in raw:
            if name not in allowed:
                raise self.fail((*key, name), f"unknown key; expected one of {', '.join(allowed)}")
        for name in required:
            if name not in raw:
                raise self.fail(key, f"missing key {name!r}")

    def string(self, key: Key, value: object, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_show(value)}")
        if not value:
            raise self.fail(key, "must not be empty")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(key, f"expected {what}, got {_show(value)}")
        return value

    def optional_string(self, key: Key, raw: dict[str, Any], name: str) -> str:
        return self.string((*key, name), raw[name]) if name in raw else ""

    def positive_int(self, key: Key, value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"expected an integer, got {_show(value)}")
        if value < 1:
            raise self.fail(key, f"expected a positive integer, got {_show(value)}")
        return value

    def source(self, key: Key, name: str, raw: dict[str, Any]) -> WeightSource:
        get = {k: raw[k] for k in _SOURCE_KEYS if k in raw}
        repo_id = (
            self.string((*key, "repo_id"), get["repo_id"], REPO_ID, "'owner/name'")
            if "repo_id" in get
            else None
        )
        filename = self.string((*key, "filename"), get["filename"]) if "filename" in get else None
        revision = self.string((*key, "revision"), get.get("revision", DEFAULT_REVISION))
        url = None
        if "url" in get:
            url = self.string((*key, "url"), get["url"])
            if not url.startswith(("https://", "http://")):
                raise self.fail((*key, "url"), f"expected an http(s) URL, got {_show(url)}")
        sha256 = None
        if "sha256" in get:
            sha256 = self.string((*key, "sha256"), get["sha256"], _SHA256, "64 hexadecimal digits").lower()
        path = Path(self.string((*key, "path"), get["path"])) if "path" in get else None
        if repo_id is not None and filename is None:
            raise self.fail(key, "missing key 'filename' (needed with repo_id)")
        if filename is not None and repo_id is None:
            raise self.fail(key, "missing key 'repo_id' (needed with filename)")
        if repo_id is None and url is None and path is None:
            raise self.fail(key, "no weights source; set path, url, or repo_id and filename")
        return WeightSource(
            name=name,
            repo_id=repo_id,
            filename=filename,
            revision=revision,
            url=url,
            sha256=sha256,
            path=path,
        )

    def autoencoder(self, name: str, raw: dict[str, Any]) -> AutoencoderSpec:
        key = ("autoencoders", name)
        self.check_keys(key, raw, _AUTOENCODER_KEYS, ("embed_dim", "n_embed", "ddconfig"))
        return AutoencoderSpec(
            name=name,
            embed_dim=self.positive_int((*key, "embed_dim"), raw["embed_dim"]),
            n_embed=self.positive_int((*key, "n_embed"), raw["n_embed"]),
            ddconfig=self.table((*key, "ddconfig"), raw["ddconfig"]),
            source=self.source(key, name, raw),
            description=self.string((*key, "description"), raw["description"])
            if "description" in raw
            else "",
            license=self.optional_string(key, raw, "license"),
        )

    def model(self, name: str, raw: dict[str, Any], autoencoders: Mapping[str, AutoencoderSpec]) -> ModelSpec:
        key = ("models", name)
        self.check_keys(key, raw, _MODEL_KEYS, ("task", "scale", "steps", "unet", "diffusion"))
        task = self.string((*key, "task"), raw["task"])
        if task not in TASKS:
            raise self.fail((*key, "task"), f"unknown task {_show(task)}; expected one of {', '.join(TASKS)}")
        scale = self.positive_int((*key, "scale"), raw["scale"])
        steps = self.positive_int((*key, "steps"), raw["steps"])
        sample_steps = None
        if "sample_steps" in raw:
            sample_steps = self.positive_int((*key, "sample_steps"), raw["sample_steps"])
            if sample_steps not in (1, steps):
                raise self.fail(
                    (*key, "sample_steps"),
                    f"expected 1 (a model distilled into one step) or steps = {steps}, got {sample_steps}",
                )
        unet = self.table((*key, "unet"), raw["unet"])
        diffusion = self.table((*key, "diffusion"), raw["diffusion"])
        for field, value, upstream in (("scale", scale, "sf"), ("steps", steps, "steps")):
            if upstream in diffusion and diffusion[upstream] != value:
                # Blame whichever of the two keys was set last.
                theirs = (*key, "diffusion", upstream)
                if self.layer(theirs) > self.layer((*key, field)):
                    raise self.fail(theirs, f"{_show(diffusion[upstream])} disagrees with {field} = {value}")
                raise self.fail(
                    (*key, field),
                    f"{value} disagrees with diffusion.{upstream} = {_show(diffusion[upstream])}",
                )
        autoencoder = None
        if "autoencoder" in raw:
            autoencoder = self.string((*key, "autoencoder"), raw["autoencoder"])
            if autoencoder not in autoencoders:
                known = ", ".join(autoencoders) or "(none)"
                raise self.fail(
                    (*key, "autoencoder"), f"no autoencoder entry {_show(autoencoder)}; known: {known}"
                )
        return ModelSpec(
            name=name,
            task=task,
            scale=scale,
            steps=steps,
            sample_steps=None if sample_steps == steps else sample_steps,
            description=self.string((*key, "description"), raw["description"])
            if "description" in raw
            else "",
            unet=unet,
            diffusion=diffusion,
            autoencoder=autoencoder,
            source=self.source(key, name, raw),
            license=self.optional_string(key, raw, "license"),
        )

    def defaults(self, models: Mapping[str, ModelSpec]) -> dict[str, str]:
        raw = self.table(("defaults",), self.data.get("defaults", {}))
        out = {}
        for task, name in raw.items():
            key = ("defaults", task)
            if task not in TASKS:
                raise self.fail(key, f"unknown task; expected one of {', '.join(TASKS)}")
            name = self.string(key, name)
            if name not in models:
                raise self.fail(key, f"no model entry {_show(name)}")
            if models[name].task != task:
                raise self.fail(key, f"model {_show(name)} is for task {_show(models[name].task)}")
            out[task] = name
        return out
