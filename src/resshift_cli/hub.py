"""Resolving registry entries to local weight files: local file, cache, Hugging Face Hub, URL.

Order, first match wins: an explicit file (``--checkpoint`` / ``--autoencoder``), the entry's
``path``, a cached copy (the Hugging Face cache, then this project's download cache; no network,
so it works with ``HF_HUB_OFFLINE=1``), a hub download with ``huggingface_hub.hf_hub_download``
(which reads ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN`` and
``HF_HUB_DISABLE_PROGRESS_BARS`` itself), then the entry's upstream ``url``. A pickle checkpoint
is converted once into safetensors, so later runs memory-map it and never unpickle anything.

The hub file of an entry is its own ``repo_id``/``filename``, or else, for an entry with a ``url``,
``hub_filename(entry)`` in the repository named by ``RESSHIFT_HUB_REPO``: a copy a team made with
:func:`export` and uploaded. A file is checked against the sha256 known for it: the registry's
(which names the files of the entry's own sources, not such a copy) or the hub's LFS hash.

Cache layout, under ``HF_HOME`` (read from ``huggingface_hub.constants`` at call time)::

    hub/models--OWNER--REPO/...                    huggingface_hub's own cache (HF_HUB_CACHE)
    resshift/downloads/<url-key>/<file>            upstream-URL downloads, <url-key> = sha256(url)[:16]
    resshift/downloads/<url-key>/<file>.part       an unfinished download; the next run resumes it
    resshift/converted/<name>-<sha16>.safetensors  a pickle converted once, <sha16> = sha256(file)[:16]
    resshift/hashes/<path-key>.json                facts about a file (sha256, ...), see file_fact

A URL download is written to ``<file>.part`` and renamed only once its size (and sha256, when the
registry knows it) is right, so a cut-off download never looks complete. The next run continues
the ``.part`` file with an HTTP Range request (or starts over when the server ignores the Range).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants

from resshift_cli import __version__
from resshift_cli.atomic import write_atomically
from resshift_cli.errors import ModelError, first_line
from resshift_cli.registry import (
    BUNDLED_SR_MODEL,
    DEFAULT_REVISION,
    REPO_ID,
    AutoencoderSpec,
    ModelSpec,
    Registry,
    load_registry,
)

ProgressCallback = Callable[[str, int, int | None], None]
"""Called as ``progress(name, bytes_done, bytes_total_or_None)`` while a file downloads."""

_CHUNK = 1 << 20
_TIMEOUT = 30
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RACY_NS = 2_000_000_000
"""A file changed less than this long ago may change again within the same tick of its ctime."""


class WeightsError(ModelError):
    """Weights could not be found, downloaded, verified or converted (one-line message)."""


class WeightsNotCachedError(WeightsError):
    """The weights are not cached and the network is off or unreachable."""


class ChecksumError(WeightsError):
    """A file does not match its known sha256 (from the registry, or the hub's LFS hash)."""


class DownloadError(WeightsError):
    """A download failed for a reason other than the network being unreachable."""


HUB_REPO_ENV = "RESSHIFT_HUB_REPO"
"""``OWNER/NAME`` or ``OWNER/NAME@REVISION``: a hub repository holding the files :func:`export`
writes, tried for every entry that has a ``url`` and no hub file of its own."""


@dataclass(frozen=True)
class _HubFile:
    repo_id: str
    filename: str
    revision: str
    mirror: bool
    """Named by RESSHIFT_HUB_REPO rather than by the registry entry."""


@dataclass(frozen=True)
class _Found:
    """A local file of an entry; ``mirror``: a copy from the RESSHIFT_HUB_REPO repository."""

    path: Path
    mirror: bool = False


@dataclass(frozen=True)
class ResolvedWeights:
    """Local files for one model: the UNet checkpoint and its autoencoder (None: pixel-space)."""

    unet_path: Path
    autoencoder_path: Path | None


def cache_root() -> Path:
    """``<HF_HOME>/resshift``: this project's downloads, conversions and hash memos."""
    return Path(constants.HF_HOME) / "resshift"


def resolve_model(
    spec: ModelSpec,
    registry: Registry,
    checkpoint: str | os.PathLike[str] | None = None,
    autoencoder: str | os.PathLike[str] | None = None,
    *,
    quiet: bool = False,
    progress: ProgressCallback | None = None,
) -> ResolvedWeights:
    """Local safetensors files for ``spec`` and its autoencoder, downloading what is missing.

    ``checkpoint`` and ``autoencoder`` are explicit files that win over the registry.
    """
    unet = _local_file(checkpoint, spec.name, "model") if checkpoint is not None else None
    unet = unet or _resolve(spec, quiet=quiet, progress=progress)
    ae_spec = registry.autoencoder(spec.autoencoder) if spec.autoencoder is not None else None
    if autoencoder is not None:
        ae: Path | None = _local_file(
            autoencoder, ae_spec.name if ae_spec else f"{spec.name}-autoencoder", "autoencoder"
        )
    elif ae_spec is not None:
        ae = _resolve(ae_spec, quiet=quiet, progress=progress)
    else:
        ae = None
    return ResolvedWeights(unet_path=unet, autoencoder_path=ae)


def fetch(
    name: str,
    registry: Registry | None = None,
    *,
    quiet: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Path]:
    """Download (and convert) entry ``name``, and a model's autoencoder too; ``{entry: local path}``."""
    registry = load_registry() if registry is None else registry
    entry = registry.entry(name)
    entries: list[ModelSpec | AutoencoderSpec] = [entry]
    if isinstance(entry, ModelSpec) and entry.autoencoder is not None:
        entries.append(registry.autoencoder(entry.autoencoder))
    return {e.name: _resolve(e, quiet=quiet, progress=progress) for e in entries}


def cached_path(name: str, registry: Registry | None = None) -> Path | None:
    """The file entry ``name`` resolves to without network (converted copy preferred), or None."""
    registry = load_registry() if registry is None else registry
    entry = registry.entry(name)
    found = _find_local(entry)
    if found is None:
        return None
    converted = _converted_path(found.path, entry.name)
    return converted if converted is not None and converted.is_file() else found.path


def verify(name: str, registry: Registry | None = None) -> tuple[bool, str]:
    """Check the local file of entry ``name``: its sha256 when known (from the registry, or the hub's
    LFS hash that names a hub-cache blob), else that it loads.

    A cached download that fails the hash is deleted (the next fetch downloads it again); a file the
    user named with ``path`` is only reported. Returns ``(ok, one-line message)``.
    """
    registry = load_registry() if registry is None else registry
    entry = registry.entry(name)
    source = entry.source
    found = _find_local(entry)
    if found is None and source.path is not None:
        return False, f"{name}: file not found: {source.path} (its registry path)"
    if found is None:
        return False, f"{name}: not downloaded; run 'resshift weights fetch {name}'"
    path = found.path
    expected, known_from = _expected_sha256(entry, found)
    if expected is not None:
        try:
            _check_sha256(path, entry, expected, fresh=True)
        except ChecksumError as exc:
            return False, str(exc)
        return True, f"{name}: sha256 ok, as {known_from} says ({path})"
    converted = _converted_path(path, name)
    target = converted if converted is not None and converted.is_file() else path
    try:
        count = _count_tensors(target)
    except WeightsError as exc:
        return False, f"{name}: {exc}"
    return True, f"{name}: loads, {count} tensors; no sha256 in the registry to check against ({target})"


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Convert a pickle checkpoint into a safetensors file (plain tensors only, wrappers removed).

    The pickle is read with ``torch.load(weights_only=True)``, so a file carrying code is refused
    without running it; ``dst`` is written atomically.
    """
    from resshift_cli.checkpoints import CheckpointError, read_state_dict, save_safetensors

    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise WeightsError(f"{dst}: the output file must end in .safetensors")
    try:
        state_dict = read_state_dict(src)
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    try:
        save_safetensors(state_dict, dst)
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"{dst}: cannot write safetensors ({first_line(exc)})") from None
    return dst


@dataclass(frozen=True)
class ExportedFile:
    """One weights file written by :func:`export`."""

    entry: str
    filename: str
    sha256: str
    size: int
    license: str


def export(
    directory: str | os.PathLike[str],
    names: Sequence[str] = (),
    registry: Registry | None = None,
    *,
    quiet: bool = False,
    progress: ProgressCallback | None = None,
) -> list[ExportedFile]:
    """Write the folder a team uploads as its own hub repository (see RESSHIFT_HUB_REPO).

    Each entry in ``names`` (default: every entry; a model brings its autoencoder) is resolved as a
    run resolves it (downloaded if needed, checked, converted), then written as
    :func:`hub_filename`: a sealed safetensors file with the same tensors. ``SHA256SUMS`` lists the
    files' sha256, and ``README.md`` is a model card with the licence of each file from the registry.
    """
    from resshift_cli.checkpoints import CheckpointError, read_state_dict, save_safetensors

    registry = load_registry() if registry is None else registry
    entries = _export_entries(registry, names)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise WeightsError(f"{directory}: not a folder")
    taken: dict[str, str] = {}
    for entry in entries:
        filename = hub_filename(entry)
        if filename in taken:
            raise WeightsError(
                f"{taken[filename]!r} and {entry.name!r} would both be written as {filename}; "
                "export them one at a time"
            )
        taken[filename] = entry.name
    # Everything is found (or downloaded) first, so that a missing file leaves no half-made folder.
    sources = [_resolve(entry, quiet=quiet, progress=progress) for entry in entries]
    written = []
    for entry, source in zip(entries, sources, strict=True):
        dst = directory / hub_filename(entry)
        try:
            save_safetensors(read_state_dict(source), dst)
        except CheckpointError as exc:
            raise WeightsError(str(exc)) from None
        except OSError as exc:
            raise WeightsError(f"cannot write {dst}: {exc.strerror or exc}") from None
        size = dst.stat().st_size
        written.append(ExportedFile(entry.name, dst.name, _sha256_file(dst), size, entry.license))
    _write_text(directory / "SHA256SUMS", "".join(f"{f.sha256}  {f.filename}\n" for f in written))
    _write_text(directory / "README.md", model_card(written, registry))
    return written


def _export_entries(registry: Registry, names: Sequence[str]) -> list[ModelSpec | AutoencoderSpec]:
    """The entries named (all by default), each model followed by its autoencoder, each once."""
    entries: dict[str, ModelSpec | AutoencoderSpec] = {}
    for name in names or registry.names():
        entry = registry.entry(name)
        entries.setdefault(entry.name, entry)
        if isinstance(entry, ModelSpec) and entry.autoencoder is not None:
            entries.setdefault(entry.autoencoder, registry.autoencoder(entry.autoencoder))
    return list(entries.values())


S_LAB_LICENSE = "S-Lab License 1.0"
"""The licence of ResShift's published weights (non-commercial use), as the registry names it."""

_CITATION = """@inproceedings{yue2023resshift,
  title={ResShift: Efficient Diffusion Model for Image Super-resolution by Residual Shifting},
  author={Yue, Zongsheng and Wang, Jianyi and Loy, Chen Change},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  volume={36},
  year={2023}
}"""


def model_card(files: Sequence[ExportedFile], registry: Registry) -> str:
    """The README.md of an exported repository: Hub metadata, use, files with sha256 and licence."""
    s_lab = all(S_LAB_LICENSE in f.license for f in files)
    front = ["---", "license: other"]
    if s_lab:
        front += ["license_name: s-lab-license-1.0", "license_link: https://github.com/zsyOAOA/ResShift"]
    else:
        front += ["license_name: per-file"]
    front += [
        "library_name: resshift-cli",
        "pipeline_tag: image-to-image",
        "tags:",
        *(f"- {tag}" for tag in ("resshift", "image-restoration", "super-resolution", "diffusion")),
        "---",
    ]
    rows = [
        f"| {f.filename} | {f.entry} | {_description(registry, f.entry)} | {f.size:,} | `{f.sha256}` "
        f"| {f.license or 'not stated in the registry'} |"
        for f in files
    ]
    mirrored = next((f for f in files if registry.entry(f.entry).source.url is not None), None)
    pinned = files[0]
    table = "models" if pinned.entry in registry.models else "autoencoders"
    licence = (
        f"Every file here is under the {S_LAB_LICENSE} of ResShift's authors (NTU S-Lab): "
        "**non-commercial use only**; read it in github.com/zsyOAOA/ResShift before any other use."
        if s_lab
        else "Each file is under the licence its row names; a file whose licence the registry does "
        "not state is under whatever terms its source gave. The ResShift weights published by "
        f"their authors are under the {S_LAB_LICENSE}: non-commercial use only."
    )
    body = [
        "# ResShift weights for resshift-cli",
        "",
        f"Safetensors copies of image-restoration weights, written by `resshift weights export` "
        f"(resshift-cli {__version__}). Each file holds the same tensors as the file the resshift-cli "
        "registry names for it, and carries a sha256 of itself: resshift-cli refuses a copy whose "
        "bytes changed.",
        "",
        "## Use",
        "",
        *(
            [
                "```bash",
                "export RESSHIFT_HUB_REPO=OWNER/NAME   # this repository",
                f"resshift weights fetch {mirrored.entry}",
                "```",
                "",
                "resshift-cli then looks here first for every registry entry with an upstream URL, "
                "under the upstream file name with the suffix `.safetensors`, through the Hugging Face "
                "cache (`HF_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN` for a private repository), and falls "
                "back to the URL for a file this repository lacks.",
                "",
            ]
            if mirrored is not None
            else []
        ),
        f"{'Or name' if mirrored is not None else 'Name'} a file in a registry file of your own "
        "(`--registry FILE`, or `RESSHIFT_REGISTRY`), which pins its sha256 too:",
        "",
        "```toml",
        f"[{table}.{pinned.entry}]",
        'repo_id = "OWNER/NAME"',
        f'filename = "{pinned.filename}"',
        f'sha256 = "{pinned.sha256}"',
        "```",
        "",
        "## Files",
        "",
        "| file | registry entry | what | bytes | sha256 | licence |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "`SHA256SUMS` lists the same digests: `sha256sum -c SHA256SUMS`.",
        "",
        "## Licence",
        "",
        licence,
        "",
        "## Citation",
        "",
        "```bibtex",
        _CITATION,
        "```",
    ]
    return "\n".join([*front, "", *body]) + "\n"


def _description(registry: Registry, name: str) -> str:
    return registry.entry(name).description.replace("|", "/") or "-"


def _write_text(path: Path, text: str) -> None:
    try:
        write_atomically(path, lambda temp: temp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise WeightsError(f"cannot write {path}: {exc.strerror or exc}") from None


def _local_file(path: str | os.PathLike[str], name: str, role: str) -> Path:
    """An explicit file standing in for an entry, as safetensors (converted once if a pickle)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(f"{role} file not found: {file}")
    return _as_safetensors(file, name)


def _resolve(
    entry: ModelSpec | AutoencoderSpec, *, quiet: bool = False, progress: ProgressCallback | None = None
) -> Path:
    """A registry entry as a local safetensors file: its path, a cached copy, or a download; checked
    against its sha256 where one is known."""
    source = entry.source
    if source.path is not None and not source.path.is_file():
        raise WeightsError(
            f"{_role(entry)} {entry.name!r}: file not found: {source.path} (its registry path)"
        )
    found = _find_local(entry) or _download(entry, quiet=quiet, progress=progress)
    expected, _ = _expected_sha256(entry, found)
    if expected is not None:
        _check_sha256(found.path, entry, expected)
    return _as_safetensors(found.path, entry.name)


def _role(entry: ModelSpec | AutoencoderSpec) -> str:
    return "model" if isinstance(entry, ModelSpec) else "autoencoder"


def hub_filename(entry: ModelSpec | AutoencoderSpec) -> str:
    """The name of ``entry``'s file in a repository made by :func:`export`: the upstream file name
    of its ``url`` (else of its hub ``filename``, else the entry's name) with the suffix
    ``.safetensors``; RESSHIFT_HUB_REPO lookups use the same name."""
    source = entry.source
    if source.url is not None:
        stem = Path(source.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]).stem
    elif source.filename is not None:
        stem = Path(source.filename).stem
    else:
        stem = ""
    return f"{stem or entry.name}.safetensors"


def _hub_file(entry: ModelSpec | AutoencoderSpec) -> _HubFile | None:
    """The entry's own hub file, else its copy in the RESSHIFT_HUB_REPO repository, else None."""
    source = entry.source
    if source.repo_id is not None and source.filename is not None:
        return _HubFile(source.repo_id, source.filename, source.revision, mirror=False)
    named = os.environ.get(HUB_REPO_ENV, "").strip()
    if not named or source.url is None:
        return None
    repo_id, at, revision = named.partition("@")
    if not REPO_ID.fullmatch(repo_id) or (at and not revision):
        raise WeightsError(f"{HUB_REPO_ENV}={named!r}: expected OWNER/NAME or OWNER/NAME@REVISION")
    return _HubFile(repo_id, hub_filename(entry), revision or DEFAULT_REVISION, mirror=True)


def _find_local(entry: ModelSpec | AutoencoderSpec) -> _Found | None:
    """The entry's ``path``, or its copy in the hub cache or the download cache; no network."""
    source = entry.source
    if source.path is not None:
        return _Found(source.path) if source.path.is_file() else None
    hub_file = _hub_file(entry)
    if hub_file is not None:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(hub_file.repo_id, hub_file.filename, revision=hub_file.revision)
        if isinstance(hit, str):
            return _Found(Path(hit), hub_file.mirror)
    if source.url is not None:
        path = _download_path(source.url)
        if path.is_file():
            return _Found(path)
    return None


def _expected_sha256(entry: ModelSpec | AutoencoderSpec, found: _Found) -> tuple[str | None, str]:
    """The sha256 the file must have and who says so: the registry for the files of the entry's own
    sources, the hub for a hub-cache blob stored under its LFS hash; (None, "") when unknown."""
    if entry.source.sha256 is not None and not found.mirror:
        return entry.source.sha256, "the registry"
    if _is_hub_lfs_blob(found.path):
        return found.path.resolve().name, "the hub"
    return None, ""


def _offline() -> bool:
    if constants.HF_HUB_OFFLINE:
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def _download(
    entry: ModelSpec | AutoencoderSpec, *, quiet: bool, progress: ProgressCallback | None
) -> _Found:
    """Fetch an entry that is not cached: the hub first, then the upstream URL."""
    role, name, source = _role(entry), entry.name, entry.source
    flag = "--checkpoint" if role == "model" else "--autoencoder"
    if _offline():
        raise WeightsNotCachedError(_not_cached_message(entry, flag, "offline: HF_HUB_OFFLINE is set"))
    failures: list[str] = []
    unreachable: list[str] = []
    hub_file = _hub_file(entry)
    if hub_file is not None:
        try:
            return _Found(_hub_download(hub_file, name, quiet=quiet, progress=progress), hub_file.mirror)
        except _Unreachable as exc:
            unreachable.append(f"hub: {exc}")
        except DownloadError as exc:
            failures.append(f"hub {hub_file.repo_id}/{hub_file.filename}: {exc}")
    if source.url is not None:
        try:
            return _Found(_url_download(entry, quiet=quiet, progress=progress))
        except _Unreachable as exc:
            unreachable.append(f"{source.url}: {exc}")
        except DownloadError as exc:
            failures.append(f"{source.url}: {exc}")
    if unreachable and not failures:
        raise WeightsNotCachedError(_not_cached_message(entry, flag, "; ".join(unreachable)))
    raise DownloadError(
        f"{role} {name!r} could not be downloaded ({'; '.join(failures + unreachable)}); pass {flag} PATH"
    )


def _not_cached_message(entry: ModelSpec | AutoencoderSpec, flag: str, why: str) -> str:
    message = (
        f"{_role(entry)} {entry.name!r} is not in the cache and cannot be downloaded ({why}); "
        f"run 'resshift weights fetch {entry.name}' with network access, or pass {flag} PATH"
    )
    if isinstance(entry, ModelSpec) and entry.task == "sr":
        message += f", or use the bundled model that needs no download: --model {BUNDLED_SR_MODEL}"
    return message


class _Unreachable(Exception):
    """The server could not be reached at all (as opposed to answering with an error)."""


def _is_network_error(exc: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, (ConnectionError, TimeoutError, LocalEntryNotFoundError)):
        return True
    # httpx (huggingface_hub >= 1.0) and requests (older) do not derive from the builtin errors.
    return any(cls.__name__ in ("TransportError", "ConnectionError", "Timeout") for cls in type(exc).__mro__)


def _hub_download(hub_file: _HubFile, name: str, *, quiet: bool, progress: ProgressCallback | None) -> Path:
    """Download through huggingface_hub into its cache; a HEAD request first, so that an unreachable
    hub fails at once instead of after huggingface_hub's retries."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(hub_file.repo_id, hub_file.filename, revision=hub_file.revision))
        path = hf_hub_download(
            hub_file.repo_id,
            hub_file.filename,
            revision=hub_file.revision,
            library_name="resshift-cli",
            library_version=__version__,
            tqdm_class=_hub_progress_class(name, quiet, progress),
        )
    except Exception as exc:  # huggingface_hub raises many unrelated types; sorted out here
        if _is_network_error(exc):
            raise _Unreachable(first_line(exc)) from None
        raise DownloadError(_hub_failure(exc, hub_file)) from None
    return Path(path)


def _hub_failure(exc: Exception, hub_file: _HubFile) -> str:
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RepositoryNotFoundError):
        return "repository not found (or private: set HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {hub_file.revision!r} not found"
    if isinstance(exc, EntryNotFoundError):
        return "file not found"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if status else first_line(exc)


def _hub_progress_class(name: str, quiet: bool, progress: ProgressCallback | None) -> Any:
    """A tqdm class for ``hf_hub_download``: None keeps huggingface_hub's bars; else a silent bar
    that reports to ``progress``."""
    if progress is None and not quiet:
        return None
    from tqdm.auto import tqdm

    class _CallbackBar(tqdm):  # type: ignore[misc, type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.done = int(kwargs.get("initial") or 0)
            self.size = kwargs.get("total")

        def update(self, n: float | None = 1) -> bool | None:
            self.done += int(n or 0)
            if progress is not None:
                progress(name, self.done, self.size)
            return super().update(n)

    return _CallbackBar


def _download_path(url: str) -> Path:
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    filename = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "download"
    return cache_root() / "downloads" / key / filename


def _url_download(
    entry: ModelSpec | AutoencoderSpec, *, quiet: bool, progress: ProgressCallback | None
) -> Path:
    """Download the entry's URL into the download cache, resuming a ``.part`` file left by a cut-off run."""
    from filelock import FileLock

    source, name = entry.source, entry.name
    assert source.url is not None
    dest = _download_path(source.url)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.with_name(dest.name + ".lock"))):
        if dest.is_file():  # another process finished it while this one waited
            return dest
        _http_get(source.url, part, name, quiet=quiet, progress=progress)
        if source.sha256 is not None:
            actual = _sha256_file(part)
            if actual != source.sha256:
                part.unlink()
                raise ChecksumError(
                    f"{_role(entry)} {name!r}: the download from {source.url} has sha256 {actual}, "
                    f"the registry says {source.sha256}; deleted it"
                )
        os.replace(part, dest)
    return dest


def _http_get(url: str, part: Path, name: str, *, quiet: bool, progress: ProgressCallback | None) -> None:
    """Fetch ``url`` into ``part``, continuing after the bytes already there; raise unless complete."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"resshift-cli/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            if exc.headers.get("Content-Range") == f"bytes */{offset}":  # the .part file is complete
                return
            part.unlink()  # the .part file is longer than this file: start over
            _http_get(url, part, name, quiet=quiet, progress=progress)
            return
        raise DownloadError(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _Unreachable(first_line(getattr(exc, "reason", exc))) from None
    with response:
        total = _total_size(response, offset)
        if offset and total is None:  # the server ignored the Range request
            offset = 0
            total = _int_or_none(response.headers.get("Content-Length"))
        try:
            with (
                open(part, "ab" if offset else "wb") as out,
                _progress(name, total, offset, quiet, progress) as bar,
            ):
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar(len(chunk))
        except OSError as exc:  # reset connection, timeout, http.client.IncompleteRead
            raise DownloadError(f"download cut off ({first_line(exc)}); run again to resume") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"download cut off at {size} of {total} bytes; run again to resume")


def _total_size(response: Any, offset: int) -> int | None:
    """The full file size for a response to a request from ``offset``; None if a Range was ignored."""
    if not offset:
        return _int_or_none(response.headers.get("Content-Length"))
    content_range = response.headers.get("Content-Range", "")
    if response.status != 206 or not content_range.startswith(f"bytes {offset}-"):
        return None
    return _int_or_none(content_range.rsplit("/", 1)[-1])


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@contextlib.contextmanager
def _progress(
    name: str, total: int | None, done: int, quiet: bool, callback: ProgressCallback | None
) -> Iterator[Callable[[int], None]]:
    """An ``advance(nbytes)`` function: reports to ``callback``, or draws a tqdm bar unless quiet."""
    if callback is not None:
        state = [done]

        def advance(n: int) -> None:
            state[0] += n
            callback(name, state[0], total)

        yield advance
    elif quiet:
        yield lambda n: None
    else:
        from tqdm.auto import tqdm

        with tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=name, file=sys.stderr) as bar:
            yield bar.update


def _is_hub_lfs_blob(path: Path) -> bool:
    """Whether ``path`` is in the hub cache as a blob named by its sha256 (as LFS files are)."""
    blob = path.resolve()
    hub_cache = Path(constants.HF_HUB_CACHE).resolve()
    return (
        blob.parent.name == "blobs"
        and blob.is_relative_to(hub_cache)
        and _SHA256.fullmatch(blob.name) is not None
    )


def _check_sha256(
    path: Path, entry: ModelSpec | AutoencoderSpec, expected: str, *, fresh: bool = False
) -> None:
    """Refuse ``path`` unless its sha256 is ``expected``; delete it if it is a cached copy."""
    actual = _sha256_file(path, fresh=fresh)
    if actual == expected:
        return
    if entry.source.path is not None:
        action = "refusing to use it"
    else:
        _delete_cached(path)
        action = f"deleted the cached copy; run 'resshift weights fetch {entry.name}' to download it again"
    raise ChecksumError(
        f"{_role(entry)} {entry.name!r}: {path} has sha256 {actual}, expected {expected}; {action}"
    )


def _delete_cached(path: Path) -> None:
    """Remove a cached file; for a hub-cache snapshot link also the blob it points to."""
    target = path.resolve()
    _memo_path(target).unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    target.unlink(missing_ok=True)


def _memo_path(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "hashes" / f"{key}.json"


def _identity(path: Path) -> dict[str, Any]:
    """What changes whenever the file's bytes can have changed: writing in place moves ``ctime``
    (which ``os.utime`` cannot set back, unlike ``mtime``), and a file put in its place by a rename
    has another inode."""
    st = path.stat()
    return {
        "path": str(path.resolve()),
        "device": st.st_dev,
        "inode": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def file_fact(path: Path, fact: str, compute: Callable[[], str], *, fresh: bool = False) -> str:
    """``compute()``, a fact about the bytes of ``path`` (its sha256, ...), remembered while the file
    is unchanged, so that a big file is read once and not on every run.

    The memo, under ``<cache>/hashes``, is keyed by the file's path, device, inode, size, mtime and
    ctime; ``fresh`` computes again whatever is remembered. Nothing is remembered about a file that
    changed while ``compute`` read it, or whose ctime is too recent to tell a later change apart (file
    times tick coarsely): such a file is read again next time.
    """
    before = _identity(path)
    if not fresh:
        saved = _read_memo(path)
        value = saved["facts"].get(fact) if saved.get("file") == before else None
        if isinstance(value, str):
            return value
    value = compute()
    if _identity(path) == before and time.time_ns() - before["ctime_ns"] > _RACY_NS:
        _remember(path, before, fact, value)
    return value


def _read_memo(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(_memo_path(path).read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) and isinstance(saved.get("facts"), dict) else {}


def _remember(path: Path, identity: dict[str, Any], fact: str, value: str) -> None:
    saved = _read_memo(path)
    facts = saved["facts"] if saved.get("file") == identity else {}
    memo = _memo_path(path)
    record = json.dumps({"file": identity, "facts": {**facts, fact: value}})
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(memo, lambda temp: temp.write_text(record), fsync=False)
    except OSError:  # a read-only cache only costs reading the file again
        pass


def _sha256_file(path: Path, *, fresh: bool = False) -> str:
    """The sha256 of a file, remembered (:func:`file_fact`) so a big file is hashed once."""

    def digest() -> str:
        hasher = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
        return hasher.hexdigest()

    return file_fact(path, "sha256", digest, fresh=fresh)


def _converted_path(source: Path, name: str) -> Path | None:
    """Where the safetensors copy of a pickle checkpoint lives; None for a safetensors file."""
    if source.suffix.lower() == ".safetensors":
        return None
    return cache_root() / "converted" / f"{name}-{_sha256_file(source)[:16]}.safetensors"


def _as_safetensors(path: Path, name: str) -> Path:
    """``path`` itself if safetensors, else its converted copy (made on first use)."""
    converted = _converted_path(path, name)
    if converted is None:
        return path
    if not converted.is_file():
        convert(path, converted)
    return converted


def _count_tensors(path: Path) -> int:
    from resshift_cli.checkpoints import CheckpointError, read_state_dict

    try:
        return len(read_state_dict(path))
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None


