"""Resolving weights: local files, the Hugging Face cache, hub and URL downloads, conversion.

Everything runs against ``hubserver.HubServer`` on 127.0.0.1. huggingface_hub reads its settings
(HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_HUB_OFFLINE) into ``huggingface_hub.constants`` at import
time, so in-process tests patch those constants as well as the environment; the subprocess tests
set only the environment, the way the CLI runs.
"""

from __future__ import annotations

import builtins
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hubfiles import (
    REPO,
    assert_tensors,
    go_offline,
    make_registry,
    pickle_bytes,
    publish,
    refuse_unpickling,
    registry_for,
    resolve,
    safetensors_bytes,
    set_endpoint,
    sha256,
    state_dict,
)
from hubserver import COMMIT, HubServer
from huggingface_hub import constants
from reference import reference_path
from safetensors.torch import load_file
from tinymodels import write_registry

from resshift_cli import hub
from resshift_cli.cli import main
from resshift_cli.hub import (
    HUB_REPO_ENV,
    ChecksumError,
    DownloadError,
    WeightsError,
    WeightsNotCachedError,
    cached_path,
    convert,
    fetch,
    resolve_model,
    verify,
)
from resshift_cli.registry import load_registry


def test_explicit_files_win_and_touch_no_network(tmp_path: Path, server: HubServer, hf_home: Path) -> None:
    registry = registry_for(tmp_path, server.url)
    unet = tmp_path / "mine.safetensors"
    unet.write_bytes(safetensors_bytes(tmp_path, 5))
    ae = tmp_path / "ae.safetensors"
    ae.write_bytes(safetensors_bytes(tmp_path, 6))
    assert resolve(registry, checkpoint=unet, autoencoder=ae) == hub.ResolvedWeights(unet, ae)
    assert server.requests == []
    with pytest.raises(WeightsError) as exc:
        resolve(registry, checkpoint=tmp_path / "missing.safetensors", autoencoder=ae)
    assert str(exc.value) == f"model file not found: {tmp_path / 'missing.safetensors'}"


def test_registry_path_is_used_as_is(tmp_path: Path, server: HubServer, hf_home: Path) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "unet.safetensors").write_bytes(safetensors_bytes(tmp_path, 1))
    (tmp_path / "w" / "ae.safetensors").write_bytes(safetensors_bytes(tmp_path, 2))
    registry = registry_for(
        tmp_path, server.url, model='path = "w/unet.safetensors"', autoencoder='path = "w/ae.safetensors"'
    )
    resolved = resolve(registry)
    assert resolved == hub.ResolvedWeights(
        tmp_path / "w" / "unet.safetensors", tmp_path / "w" / "ae.safetensors"
    )
    assert server.requests == []
    assert cached_path("tiny", registry) == tmp_path / "w" / "unet.safetensors"


def test_hub_download_then_offline_from_the_cache(
    tmp_path: Path, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet, ae = publish(server, tmp_path, url=False)
    registry = registry_for(tmp_path, server.url)
    resolved = resolve(registry)
    assert resolved.unet_path.is_relative_to(hf_home / "hub" / "models--test-org--weights" / "snapshots")
    assert resolved.unet_path.read_bytes() == unet
    assert_tensors(resolved.unet_path, 1)
    # The pickle was converted; the converted file holds the unwrapped tensors.
    assert (
        resolved.autoencoder_path
        == hf_home / "resshift" / "converted" / f"tiny-ae-{sha256(ae)[:16]}.safetensors"
    )
    assert_tensors(resolved.autoencoder_path, 2)
    paths = {r.path for r in server.requests}
    assert f"/{REPO}/resolve/main/unet.safetensors" in paths and server.cdn_path(unet) in paths

    server.requests.clear()
    go_offline(monkeypatch)
    set_endpoint(monkeypatch, "http://127.0.0.1:9")  # nothing listens there
    assert resolve(registry) == resolved
    assert server.requests == []


def test_offline_set_after_import_is_obeyed(
    tmp_path: Path, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Library use: HF_HUB_OFFLINE set after huggingface_hub read its constants still means no
    network, though the hub and the URL both hold the files."""
    publish(server, tmp_path)
    registry = registry_for(tmp_path, server.url)
    assert constants.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotCachedError, match=r"\(offline: HF_HUB_OFFLINE is set\)"):
        resolve(registry)
    assert server.requests == []


def test_a_changed_hub_blob_is_refused_when_used(tmp_path: Path, server: HubServer, hf_home: Path) -> None:
    """A hub-cache file is named by its LFS sha256, a hash known without the registry: it is
    checked on use, and a changed copy is deleted so that the next run downloads it again."""
    unet, _ = publish(server, tmp_path, url=False)
    registry = registry_for(tmp_path, server.url)
    blob = resolve(registry).unet_path.resolve()
    assert blob.name == sha256(unet)
    blob.write_bytes(unet[:-1] + bytes([unet[-1] ^ 1]))
    with pytest.raises(ChecksumError, match="deleted the cached copy"):
        resolve(registry)
    assert not blob.exists()
    assert resolve(registry).unet_path.read_bytes() == unet


MIRROR = "team/resshift-weights"


def publish_mirror(
    server: HubServer, tmp_path: Path, files: tuple[str, ...] = ("unet", "ae")
) -> dict[str, bytes]:
    """Put export-style copies of tiny and tiny-ae in MIRROR: safetensors under the upstream names."""
    server.add_repo(MIRROR)
    copies = {"unet": safetensors_bytes(tmp_path, 11), "ae": safetensors_bytes(tmp_path, 12)}
    for name in files:
        server.add_hub_file(MIRROR, f"{name}.safetensors", copies[name])
    return copies


def test_hub_repository_named_by_the_environment(
    tmp_path: Path, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RESSHIFT_HUB_REPO names a team's copy: tried before the upstream URL, kept in the hub's
    cache, used offline; the registry's sha256 names the upstream file, not the copy."""
    unet, _ = publish(server, tmp_path, hub=False)
    copies = publish_mirror(server, tmp_path)
    registry = registry_for(tmp_path, server.url, model=f'sha256 = "{sha256(unet)}"', hub=False)
    monkeypatch.setenv(HUB_REPO_ENV, MIRROR)
    resolved = resolve(registry)
    snapshots = hf_home / "hub" / "models--team--resshift-weights" / "snapshots"
    assert resolved.unet_path.is_relative_to(snapshots) and resolved.unet_path.name == "unet.safetensors"
    assert resolved.unet_path.read_bytes() == copies["unet"]
    assert resolved.autoencoder_path.read_bytes() == copies["ae"]  # type: ignore[union-attr]
    assert not [r for r in server.requests if r.path.startswith("/releases/")]
    assert cached_path("tiny", registry) == resolved.unet_path
    assert verify("tiny", registry) == (True, f"tiny: sha256 ok, as the hub says ({resolved.unet_path})")

    server.requests.clear()
    go_offline(monkeypatch)
    set_endpoint(monkeypatch, "http://127.0.0.1:9")
    assert resolve(registry) == resolved and server.requests == []
    monkeypatch.delenv(HUB_REPO_ENV)
    with pytest.raises(WeightsNotCachedError):  # without the variable the copy is not the entry's
        resolve(registry)


def prefill_hub_cache(home: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay ``files`` out in the Hugging Face cache as huggingface_hub does (blobs named by their
    sha256, a snapshot of links, refs/main), as a cache copied from another machine would be."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    for name, content in files.items():
        (repo / "blobs" / sha256(content)).write_bytes(content)
        (repo / "snapshots" / COMMIT / name).symlink_to(Path("../../blobs") / sha256(content))


def test_hub_repository_from_a_prefilled_cache_offline(
    tmp_path: Path, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server at all: the copies come from a cache filled elsewhere, and are checked against
    the LFS sha256 they are stored under (a changed blob is refused and deleted)."""
    copies = {
        "unet.safetensors": safetensors_bytes(tmp_path, 11),
        "ae.safetensors": safetensors_bytes(tmp_path, 12),
    }
    prefill_hub_cache(hf_home, MIRROR, copies)
    registry = registry_for(tmp_path, "http://127.0.0.1:9", hub=False)  # nothing listens there
    go_offline(monkeypatch)
    monkeypatch.setenv(HUB_REPO_ENV, MIRROR)
    resolved = resolve(registry)
    assert resolved.unet_path.read_bytes() == copies["unet.safetensors"]
    assert resolved.autoencoder_path.read_bytes() == copies["ae.safetensors"]  # type: ignore[union-attr]

    blob = resolved.unet_path.resolve()
    blob.write_bytes(safetensors_bytes(tmp_path, 13))
    with pytest.raises(ChecksumError, match="deleted the cached copy"):
        resolve(registry)
    assert not blob.exists()
    with pytest.raises(WeightsNotCachedError, match="offline"):
        resolve(registry)


def test_hub_repository_lacking_a_file_falls_back_to_the_url(
    tmp_path: Path, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(server, tmp_path, hub=False)
    copies = publish_mirror(server, tmp_path, files=("unet",))
    registry = registry_for(tmp_path, server.url, hub=False)
    monkeypatch.setenv(HUB_REPO_ENV, MIRROR)
    resolved = resolve(registry)
    assert resolved.unet_path.read_bytes() == copies["unet"]
    assert_tensors(resolved.autoencoder_path, 2)  # type: ignore[arg-type]
    assert [r.path for r in server.requests if r.path.startswith("/releases/")] == ["/releases/ae.pth"]


def test_hub_repository_revision_and_bad_names(
    tmp_path: Path, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(server, tmp_path, hub=False)
    publish_mirror(server, tmp_path)
    registry = registry_for(tmp_path, server.url, hub=False)
    monkeypatch.setenv(HUB_REPO_ENV, f"{MIRROR}@{COMMIT}")
    resolve(registry)
    assert f"/{MIRROR}/resolve/{COMMIT}/unet.safetensors" in {r.path for r in server.requests}
    for bad in ("no-owner", f"{MIRROR}@", "a/b/c"):
        monkeypatch.setenv(HUB_REPO_ENV, bad)
        with pytest.raises(WeightsError) as exc:
            fetch("tiny", registry, quiet=True)
        assert str(exc.value) == f"{HUB_REPO_ENV}={bad!r}: expected OWNER/NAME or OWNER/NAME@REVISION"


def test_url_fallback_with_progress_and_sha256(tmp_path: Path, server: HubServer, hf_home: Path) -> None:
    unet, ae = publish(server, tmp_path, hub=False)
    registry = registry_for(
        tmp_path, server.url, model=f'sha256 = "{sha256(unet)}"', autoencoder=f'sha256 = "{sha256(ae)}"'
    )
    calls: list[tuple[str, int, int | None]] = []
    resolved = resolve_model(registry.model("tiny"), registry, progress=lambda *a: calls.append(a))
    expected = hub._download_path(f"{server.url}/releases/unet.safetensors")
    assert resolved.unet_path == expected and expected.read_bytes() == unet
    assert not expected.with_name("unet.safetensors.part").exists()
    assert_tensors(resolved.autoencoder_path, 2)  # type: ignore[arg-type]
    # The hub was asked first and answered 404, then the URL was used.
    assert [r.path for r in server.requests[:1]] == [f"/{REPO}/resolve/main/unet.safetensors"]
    assert calls[-1][0] == "tiny-ae" and calls[-1][1] == calls[-1][2] == len(ae)
    unet_calls = [c for c in calls if c[0] == "tiny"]
    assert unet_calls[-1][1:] == (len(unet), len(unet))
    assert all(b[1] >= a[1] for a, b in itertools.pairwise(unet_calls))


def test_hub_download_reports_progress(tmp_path: Path, server: HubServer, hf_home: Path) -> None:
    unet, ae = publish(server, tmp_path, url=False)
    registry = registry_for(tmp_path, server.url)
    calls: list[tuple[str, int, int | None]] = []
    fetch("tiny", registry, progress=lambda *a: calls.append(a))
    assert ("tiny", len(unet), len(unet)) in calls and ("tiny-ae", len(ae), len(ae)) in calls


def test_token_goes_to_the_hub_only(
    tmp_path: Path, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_TOKEN is read by huggingface_hub at call time and never sent to the upstream URL."""
    publish(server, tmp_path)
    server.repos[REPO].pop("ae.pth")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    fetch("tiny", registry_for(tmp_path, server.url), quiet=True)
    hub_requests = [r for r in server.requests if "/resolve/" in r.path]
    url_requests = [r for r in server.requests if r.path.startswith("/releases/")]
    assert hub_requests and all(r.authorization == "Bearer hf_secret" for r in hub_requests)
    assert [r.path for r in url_requests] == ["/releases/ae.pth"] and url_requests[0].authorization is None


def test_default_progress_bar_and_quiet(
    tmp_path: Path, server: HubServer, hf_home: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    publish(server, tmp_path, hub=False)
    registry = registry_for(tmp_path, server.url)
    fetch("tiny-ae", registry, quiet=True)
    assert capfd.readouterr().err == ""
    fetch("tiny", registry)
    assert "tiny" in capfd.readouterr().err  # the tqdm bar, on stderr


def test_interrupted_download_leaves_no_complete_file_and_resumes(
    tmp_path: Path, server: HubServer, hf_home: Path
) -> None:
    unet, _ = publish(server, tmp_path, hub=False)
    registry = registry_for(tmp_path, server.url, model=f'sha256 = "{sha256(unet)}"')
    server.cut.add("/releases/unet.safetensors")
    with pytest.raises(DownloadError) as exc:
        fetch("tiny", registry, quiet=True)
    assert "cut off" in str(exc.value) and "run again to resume" in str(exc.value)
    final = hub._download_path(f"{server.url}/releases/unet.safetensors")
    part = final.with_name(final.name + ".part")
    assert not final.exists() and cached_path("tiny", registry) is None
    assert 0 < part.stat().st_size < len(unet)
    half = part.stat().st_size

    server.cut.clear()
    server.requests.clear()
    assert fetch("tiny", registry, quiet=True)["tiny"] == final
    assert final.read_bytes() == unet and not part.exists()
    assert [r.range for r in server.requests if r.path == "/releases/unet.safetensors"] == [f"bytes={half}-"]


def test_complete_part_file_is_finished_without_download(
    tmp_path: Path, server: HubServer, hf_home: Path
) -> None:
    unet, _ = publish(server, tmp_path, hub=False)
    registry = registry_for(tmp_path, server.url)
    final = hub._download_path(f"{server.url}/releases/unet.safetensors")
    final.parent.mkdir(parents=True)
    final.with_name(final.name + ".part").write_bytes(unet)
    assert fetch("tiny", registry, quiet=True)["tiny"] == final
    assert final.read_bytes() == unet


def test_sha256_mismatch_of_a_download_is_refused_and_removed(
    tmp_path: Path, server: HubServer, hf_home: Path
) -> None:
    publish(server, tmp_path, hub=False)
    registry = registry_for(tmp_path, server.url, model=f'sha256 = "{"0" * 64}"')
    with pytest.raises(ChecksumError) as exc:
        fetch("tiny", registry, quiet=True)
    message = str(exc.value)
    assert "\n" not in message and "deleted" in message and "0" * 64 in message
    final = hub._download_path(f"{server.url}/releases/unet.safetensors")
    assert not final.exists() and not final.with_name(final.name + ".part").exists()


def test_sha256_mismatch_of_a_hub_file_is_refused_and_removed(
    tmp_path: Path, server: HubServer, hf_home: Path
) -> None:
    publish(server, tmp_path, url=False)
    registry = registry_for(tmp_path, server.url, model=f'sha256 = "{"0" * 64}"')
    with pytest.raises(ChecksumError, match="deleted the cached copy"):
        fetch("tiny", registry, quiet=True)
    repo = hf_home / "hub" / "models--test-org--weights"
    assert not list((repo / "snapshots").rglob("unet.safetensors"))
    assert sorted(p.name for p in (repo / "blobs").iterdir()) == []  # ae.pth comes after the model
    assert cached_path("tiny", registry) is None


def test_corrupted_cached_file_is_refused_and_removed(
    tmp_path: Path, server: HubServer, hf_home: Path
) -> None:
    unet, _ = publish(server, tmp_path, hub=False)
    registry = registry_for(tmp_path, server.url, model=f'sha256 = "{sha256(unet)}"')
    path = fetch("tiny", registry, quiet=True)["tiny"]
    path.write_bytes(unet[:-1] + b"x")
    with pytest.raises(ChecksumError, match="deleted the cached copy"):
        resolve(registry)
    assert not path.exists()
    assert resolve(registry).unet_path.read_bytes() == unet  # downloaded again


def test_offline_and_not_cached_is_one_line(
    tmp_path: Path, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(server, tmp_path)
    registry = registry_for(tmp_path, server.url)
    go_offline(monkeypatch)
    with pytest.raises(WeightsNotCachedError) as exc:
        resolve(registry)
    assert str(exc.value) == (
        "model 'tiny' is not in the cache and cannot be downloaded (offline: HF_HUB_OFFLINE is set); "
        "run 'resshift weights fetch tiny' with network access, or pass --checkpoint PATH, "
        "or use the bundled model that needs no download: --model lite"
    )
    unet = tmp_path / "u.safetensors"
    unet.write_bytes(safetensors_bytes(tmp_path, 1))
    with pytest.raises(
        WeightsNotCachedError, match=r"^autoencoder 'tiny-ae' is not in the cache .* --autoencoder PATH$"
    ):
        resolve(registry, checkpoint=unet)
    assert server.requests == []


def test_unreachable_network_is_one_line(
    tmp_path: Path, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    set_endpoint(monkeypatch, dead)
    registry = registry_for(tmp_path, dead)
    with pytest.raises(WeightsNotCachedError) as exc:
        fetch("tiny", registry, quiet=True)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("model 'tiny' is not in the cache and cannot be downloaded (hub: ")
    assert message.endswith(
        "run 'resshift weights fetch tiny' with network access, or pass --checkpoint PATH, "
        "or use the bundled model that needs no download: --model lite"
    )


def test_missing_everywhere_names_each_source(tmp_path: Path, server: HubServer, hf_home: Path) -> None:
    registry = registry_for(tmp_path, server.url)
    with pytest.raises(DownloadError) as exc:
        fetch("tiny", registry, quiet=True)
    assert str(exc.value) == (
        f"model 'tiny' could not be downloaded (hub {REPO}/unet.safetensors: repository not found "
        f"(or private: set HF_TOKEN); {server.url}/releases/unet.safetensors: HTTP 404 Not Found); "
        "pass --checkpoint PATH"
    )


def test_pickle_is_converted_once(
    tmp_path: Path, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(server, tmp_path, url=False)
    registry = registry_for(tmp_path, server.url)
    local = tmp_path / "local.pth"
    local.write_bytes(pickle_bytes(tmp_path, 7))
    first = resolve(registry)
    first_local = resolve(registry, checkpoint=local)
    assert first_local.unet_path.parent == hf_home / "resshift" / "converted"
    assert_tensors(first_local.unet_path, 7)
    refuse_unpickling(monkeypatch)
    server.requests.clear()
    assert resolve(registry) == first
    assert resolve(registry, checkpoint=local) == first_local
    assert cached_path("tiny-ae", registry) == first.autoencoder_path
    assert server.requests == []


class _Payload:
    """Unpickling this opens (so creates) ``marker``: code a checkpoint must never get to run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return builtins.open, (self.marker, "w")


def test_pickle_with_code_is_refused(tmp_path: Path, server: HubServer, hf_home: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": state_dict(1), "payload": _Payload(marker)}, str(evil))
    registry = registry_for(tmp_path, server.url)
    with pytest.raises(WeightsError, match="weights_only"):
        resolve(registry, checkpoint=evil, autoencoder=tmp_path / "x.safetensors")
    with pytest.raises(WeightsError, match="weights_only"):
        convert(evil, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
    assert not (hf_home / "resshift" / "converted").exists() or not any(
        (hf_home / "resshift" / "converted").iterdir()
    )
    torch.load(str(evil), weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_convert(tmp_path: Path) -> None:
    src = tmp_path / "in.pth"
    src.write_bytes(pickle_bytes(tmp_path, 3))
    assert convert(src, tmp_path / "out.safetensors") == tmp_path / "out.safetensors"
    assert_tensors(tmp_path / "out.safetensors", 3)
    with pytest.raises(WeightsError, match=r"must end in \.safetensors"):
        convert(src, tmp_path / "out.pth")


def test_verify(tmp_path: Path, server: HubServer, hf_home: Path) -> None:
    unet, _ = publish(server, tmp_path, hub=False)
    registry = registry_for(tmp_path, server.url, model=f'sha256 = "{sha256(unet)}"')
    assert verify("tiny", registry) == (False, "tiny: not downloaded; run 'resshift weights fetch tiny'")
    paths = fetch("tiny", registry, quiet=True)
    assert verify("tiny", registry) == (True, f"tiny: sha256 ok, as the registry says ({paths['tiny']})")
    ok, message = verify("tiny-ae", registry)
    assert (
        ok and message.startswith("tiny-ae: loads, 2 tensors; no sha256") and str(paths["tiny-ae"]) in message
    )

    # verify re-hashes (no remembered hash): same size and mtime, one byte changed
    stat = paths["tiny"].stat()
    paths["tiny"].write_bytes(unet[:-1] + bytes([unet[-1] ^ 1]))
    os.utime(paths["tiny"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    ok, message = verify("tiny", registry)
    assert not ok and "deleted" in message and not paths["tiny"].exists()

    paths["tiny-ae"].write_bytes(b"not a safetensors file")
    ok, message = verify("tiny-ae", registry)
    assert not ok and message.startswith("tiny-ae: ")


def test_verify_checks_hub_files_against_their_lfs_hash(
    tmp_path: Path, server: HubServer, hf_home: Path
) -> None:
    unet, _ = publish(server, tmp_path, url=False)
    registry = registry_for(tmp_path, server.url)
    path = fetch("tiny", registry, quiet=True)["tiny"]
    assert path.resolve().name == sha256(unet)
    assert verify("tiny", registry) == (True, f"tiny: sha256 ok, as the hub says ({path})")
    blob = path.resolve()
    stat = blob.stat()
    blob.write_bytes(unet[:-1] + bytes([unet[-1] ^ 1]))
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    ok, message = verify("tiny", registry)
    assert not ok and "deleted the cached copy" in message
    assert not blob.exists() and not path.is_symlink() and cached_path("tiny", registry) is None


def test_hashes_are_remembered_until_the_file_changes_in_place(
    tmp_path: Path, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memo answers while the file is unchanged; bytes changed in place with the mtime set back
    by os.utime (same inode, size and mtime) are hashed again, since the memo is keyed by ctime too."""
    monkeypatch.setattr(hub, "_RACY_NS", 50_000_000)  # trust a file 50 ms after its change, not 2 s
    data = safetensors_bytes(tmp_path, 1)
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    time.sleep(0.1)
    assert hub._sha256_file(path) == sha256(data)
    memo = hub._memo_path(path)
    saved = json.loads(memo.read_text())
    saved["facts"]["sha256"] = "f" * 64  # prove that the memo, not the file, answers next
    memo.write_text(json.dumps(saved))
    assert hub._sha256_file(path) == "f" * 64

    before = path.stat()
    changed = data[:-1] + bytes([data[-1] ^ 1])
    with open(path, "r+b") as f:
        f.write(changed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    same = (after.st_ino, after.st_size, after.st_mtime_ns)
    assert same == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert hub._sha256_file(path) == sha256(changed)


def test_a_file_changed_just_now_is_not_remembered(tmp_path: Path, hf_home: Path) -> None:
    """File times tick coarsely: a change within the same tick as the hashing would leave the key
    as it was, so a file whose ctime is that recent is hashed again next time."""
    path = tmp_path / "f.safetensors"
    path.write_bytes(safetensors_bytes(tmp_path, 1))
    hub._sha256_file(path)
    assert not hub._memo_path(path).exists()


def test_registry_path_changed_in_place_is_refused(
    tmp_path: Path, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry ``path`` with a ``sha256`` (the bundled lite is one) is checked on every run
    through the memo: its file changed in place with the mtime set back is refused."""
    monkeypatch.setattr(hub, "_RACY_NS", 50_000_000)
    unet, ae = safetensors_bytes(tmp_path, 1), safetensors_bytes(tmp_path, 2)
    (tmp_path / "unet.safetensors").write_bytes(unet)
    (tmp_path / "ae.safetensors").write_bytes(ae)
    registry = registry_for(
        tmp_path,
        server.url,
        model=f'path = "unet.safetensors"\nsha256 = "{sha256(unet)}"',
        autoencoder='path = "ae.safetensors"',
    )
    time.sleep(0.1)
    assert resolve(registry).unet_path == tmp_path / "unet.safetensors"
    assert resolve(registry).unet_path == tmp_path / "unet.safetensors"  # from the memo now
    path = tmp_path / "unet.safetensors"
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(len(unet) - 1)
        f.write(bytes([unet[-1] ^ 1]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ChecksumError) as exc:
        resolve(registry)
    assert str(exc.value).endswith(f"expected {sha256(unet)}; refusing to use it") and path.exists()


SCRIPT = """
import sys
from resshift_cli.hub import WeightsError, resolve_model
from resshift_cli.registry import load_registry
registry = load_registry()
try:
    resolved = resolve_model(registry.model("tiny"), registry, quiet=True)
except WeightsError as exc:
    print(exc)
    sys.exit(3)
print(resolved.unet_path)
print(resolved.autoencoder_path)
"""


def run_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )


def test_subprocess_reads_the_environment(tmp_path: Path, server: HubServer) -> None:
    """As the CLI runs: HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE and RESSHIFT_REGISTRY from the environment."""
    unet = safetensors_bytes(tmp_path, 1)
    ae = safetensors_bytes(tmp_path, 2)
    server.add_hub_file(REPO, "unet.safetensors", unet)
    server.add_hub_file(REPO, "ae.safetensors", ae)
    registry = make_registry(tmp_path, server.url).read_text().replace('"ae.pth"', '"ae.safetensors"')
    (tmp_path / "registry.toml").write_text(registry)
    home = tmp_path / "sub-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_HOME=str(home),
        HF_ENDPOINT=server.url,
        RESSHIFT_REGISTRY=str(tmp_path / "registry.toml"),
        NO_PROXY="127.0.0.1,localhost",
    )
    online = run_script(env)
    assert online.returncode == 0, online.stdout + online.stderr
    unet_path, ae_path = online.stdout.split()
    assert Path(unet_path).is_relative_to(home / "hub") and Path(unet_path).read_bytes() == unet
    assert Path(ae_path).read_bytes() == ae

    server.requests.clear()
    offline = run_script({**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert offline.stdout.split() == [unet_path, ae_path]
    assert server.requests == []

    empty = run_script({**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-home")})
    assert empty.returncode == 3
    assert empty.stdout == (
        "model 'tiny' is not in the cache and cannot be downloaded (offline: HF_HUB_OFFLINE is set); "
        "run 'resshift weights fetch tiny' with network access, or pass --checkpoint PATH, "
        "or use the bundled model that needs no download: --model lite\n"
    )
    assert server.requests == []


# Exporting the folder of a team's own hub repository ----------------------------------------------

S_LAB = 'license = "S-Lab License 1.0 (non-commercial use only)"'


def sha256sums(directory: Path) -> dict[str, str]:
    lines = (directory / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ") for line in lines)}


def test_export_then_use_as_the_hub_repository(
    tmp_path: Path, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round trip a team makes: export (downloading from the upstream URLs), upload the folder
    as a hub repository, name it in RESSHIFT_HUB_REPO; a fresh cache then gets the same tensors
    from it, each file matching the digest SHA256SUMS gives for it."""
    publish(server, tmp_path, hub=False)
    registry = registry_for(tmp_path, server.url, model=S_LAB, hub=False)
    out = tmp_path / "export"
    files = hub.export(out, ["tiny"], registry, quiet=True)
    assert [(f.entry, f.filename) for f in files] == [
        ("tiny", "unet.safetensors"),
        ("tiny-ae", "ae.safetensors"),
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "SHA256SUMS",
        "ae.safetensors",
        "unet.safetensors",
    ]
    sums = sha256sums(out)
    assert sums == {f.filename: sha256((out / f.filename).read_bytes()) for f in files}
    assert_tensors(out / "unet.safetensors", 1)
    assert_tensors(out / "ae.safetensors", 2)  # the pickle's tensors, unwrapped

    server.add_repo(MIRROR)
    for name in sums:
        server.add_hub_file(MIRROR, name, (out / name).read_bytes())
    shutil.rmtree(hf_home / "resshift")  # no URL download and no conversion left in the cache
    server.requests.clear()
    monkeypatch.setenv(HUB_REPO_ENV, MIRROR)
    resolved = resolve(registry)
    assert resolved.unet_path.resolve().name == sums["unet.safetensors"]
    assert resolved.autoencoder_path.resolve().name == sums["ae.safetensors"]  # type: ignore[union-attr]
    assert_tensors(resolved.autoencoder_path, 2)  # type: ignore[arg-type]
    assert not [r for r in server.requests if r.path.startswith("/releases/")]


def test_export_model_card(tmp_path: Path, server: HubServer, hf_home: Path) -> None:
    publish(server, tmp_path, hub=False)
    registry = registry_for(tmp_path, server.url, model=S_LAB, autoencoder=S_LAB, hub=False)
    out = tmp_path / "export"
    hub.export(out, ["tiny"], registry, quiet=True)
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "license: other\nlicense_name: s-lab-license-1.0\n" in front
    assert "**non-commercial use only**" in card
    sums = sha256sums(out)
    for name, digest in sums.items():
        assert f"| {name} | " in card and f"`{digest}`" in card
    assert "export RESSHIFT_HUB_REPO=OWNER/NAME" in card and "resshift weights fetch tiny" in card
    pinned = ["[models.tiny]", 'repo_id = "OWNER/NAME"', 'filename = "unet.safetensors"']
    assert "\n".join([*pinned, f'sha256 = "{sums["unet.safetensors"]}"']) in card
    assert "@inproceedings{yue2023resshift," in card

    # One file with no licence in the registry: the card says so instead of claiming one.
    registry = registry_for(tmp_path, server.url, model=S_LAB, hub=False)
    hub.export(out, ["tiny"], registry, quiet=True)
    card = (out / "README.md").read_text()
    assert "license_name: per-file" in card and "| not stated in the registry |" in card


def test_export_writes_nothing_when_a_file_cannot_be_had(
    tmp_path: Path, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(server, tmp_path, hub=False)
    registry = registry_for(tmp_path, server.url, hub=False)
    fetch("tiny", registry, quiet=True)
    server.files.pop("/releases/ae.pth")
    shutil.rmtree(
        hf_home / "resshift" / "downloads" / hub._download_path(f"{server.url}/releases/ae.pth").parent.name
    )
    shutil.rmtree(hf_home / "resshift" / "converted")
    with pytest.raises(DownloadError, match=r"^autoencoder 'tiny-ae' could not be downloaded"):
        hub.export(tmp_path / "export", ["tiny"], registry, quiet=True)
    assert not (tmp_path / "export").exists()


def test_export_refuses_two_entries_under_one_file_name(
    tmp_path: Path, server: HubServer, hf_home: Path
) -> None:
    base = make_registry(tmp_path, server.url, hub=False)
    override = tmp_path / "override.toml"
    override.write_text(f'[autoencoders.tiny-ae]\nurl = "{server.url}/elsewhere/unet.pth"\n')
    registry = load_registry(override, env={"RESSHIFT_REGISTRY": str(base)})
    with pytest.raises(WeightsError) as exc:
        hub.export(tmp_path / "export", ["tiny"], registry, quiet=True)
    assert str(exc.value) == (
        "'tiny' and 'tiny-ae' would both be written as unet.safetensors; export them one at a time"
    )
    assert not (tmp_path / "export").exists() and server.requests == []


def test_weights_export_command_with_the_tiny_models(tmp_path: Path, hf_home: Path) -> None:
    """Offline, with the tiny random-weight models of ../shared (registry ``path`` entries)."""
    registry = write_registry(tmp_path)
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["weights", "export", str(out), "tiny-sr", "--registry", str(registry)])
    assert result.exit_code == 0, result.output
    sums = sha256sums(out)
    assert result.output.splitlines() == [
        f"tiny-sr.safetensors  sha256 {sums['tiny-sr.safetensors']}  (tiny-sr)",
        f"tiny-sr-vq.safetensors  sha256 {sums['tiny-sr-vq.safetensors']}  (tiny-sr-vq)",
        f"wrote 2 weights files, SHA256SUMS and README.md to {out}",
    ]
    for name, original in (("tiny-sr", "unet"), ("tiny-sr-vq", "autoencoder")):
        exported = load_file(str(out / f"{name}.safetensors"))
        reference = load_file(str(reference_path("parity", "sr-tiny", f"{original}.safetensors")))
        assert exported.keys() == reference.keys()
        assert all(torch.equal(exported[k], reference[k]) for k in reference)

    missing = CliRunner().invoke(main, ["weights", "export", str(out), "nope", "--registry", str(registry)])
    assert missing.exit_code == 3 and missing.output.startswith("error: unknown weights 'nope'; known: ")
