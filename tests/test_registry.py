"""The weights registry: the published entries, user overrides, and one-line validation errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from resshift_cli.registry import BUNDLED_SR_MODEL, ENV_VAR, RegistryError, load_registry

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = Path(os.environ.get("RESSHIFT_REFERENCE", "/work/shared/reference")) / "manifests"
RELEASE = "https://github.com/zsyOAOA/ResShift/releases/download/v2.0/"
S_LAB = "S-Lab License 1.0 (non-commercial use only)"

# name: (manifest, task, scale, steps, autoencoder, upstream file name)
MODELS = {
    "realsr-v1": ("realsr-v1", "sr", 4, 15, "vq-f4", "resshift_realsrx4_s15_v1.pth"),
    "realsr-v2": ("realsr-v1", "sr", 4, 15, "vq-f4", "resshift_realsrx4_s15_v2.pth"),
    "realsr-v3": ("realsr-v3", "sr", 4, 4, "vq-f4", "resshift_realsrx4_s4_v3.pth"),
    "bicsr": ("bicsr", "sr", 4, 4, "vq-f4", "resshift_bicsrx4_s4.pth"),
    "inpaint-imagenet": ("inpaint-imagenet", "inpaint", 1, 4, "vq-f4", "resshift_inpainting_imagenet_s4.pth"),
    "inpaint-face": ("inpaint-face", "inpaint", 1, 4, "vq-f4-face", "resshift_inpainting_face_s4.pth"),
    "faceir": ("faceir", "face", 1, 4, "vq-f8-face", "resshift_faceir_s4.pth"),
}
AUTOENCODERS = {
    "vq-f4": ("realsr-v3", "autoencoder_vq_f4.pth"),
    "vq-f4-face": ("inpaint-face", "celeba256_vq_f4_dim3_face.pth"),
    "vq-f8-face": ("faceir", "ffhq512_vq_f8_dim8_face.pth"),
}

NEW_MODEL = """
[models.my-sr]
task = "sr"
scale = 2
steps = 4
autoencoder = "vq-f4"
url = "https://example.org/my-sr.pth"

[models.my-sr.unet]
model_channels = 32

[models.my-sr.diffusion]
sf = 2
steps = 4
"""


def manifest(family: str) -> dict:
    path = MANIFESTS / f"{family}.json"
    if not path.is_file():
        pytest.skip(f"reference manifests not found at {MANIFESTS} (set RESSHIFT_REFERENCE)")
    return json.loads(path.read_text())


def without_none(value: object) -> object:
    """Upstream parameters as TOML can hold them: None values (TOML has no null) left out."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    return value


def assert_same(actual: object, expected: object, where: str = "") -> None:
    """Equal values of equal types all the way down (0 is not 0.0, 1 is not True)."""
    assert type(actual) is type(expected), f"{where}: {actual!r} vs {expected!r}"
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), where  # type: ignore[arg-type]
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")  # type: ignore[index]
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where  # type: ignore[arg-type]
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):  # type: ignore[call-overload]
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_all_published_entries_are_present() -> None:
    """Each upstream entry names the authors' release file, the only place they publish it, and
    no hub repository (none official exists: RESSHIFT_HUB_REPO names a team's own copy)."""
    registry = load_registry(env={})
    # lite is ours, not upstream's; SinSR's entries are checked in test_sinsr.py
    assert sorted(registry.models) == sorted([*MODELS, BUNDLED_SR_MODEL, "sinsr", "sinsr-v2"])
    assert sorted(registry.autoencoders) == sorted(AUTOENCODERS)
    for name, (_, task, scale, steps, autoencoder, filename) in MODELS.items():
        spec = registry.model(name)
        assert (spec.task, spec.scale, spec.steps, spec.autoencoder) == (task, scale, steps, autoencoder)
        assert spec.description and spec.license == S_LAB
        source = spec.source
        assert (source.name, source.repo_id, source.filename) == (name, None, None)
        assert source.url == RELEASE + filename
        assert source.sha256 is None and source.path is None
    for name, (_, filename) in AUTOENCODERS.items():
        ae = registry.autoencoder(name)
        assert (ae.source.repo_id, ae.source.filename) == (None, None) and ae.license == S_LAB
        assert ae.source.url == RELEASE + filename


def test_no_builtin_entry_names_a_hub_repository() -> None:
    text = (ROOT / "weights.toml").read_text()
    assert "repo_id =" not in text.split("[defaults]", 1)[1]


def test_defaults() -> None:
    registry = load_registry(env={})
    assert registry.default_model("sr").name == "realsr-v3"
    assert registry.default_model("inpaint").name == "inpaint-imagenet"
    assert registry.default_model("face").name == "faceir"
    with pytest.raises(RegistryError, match="unknown task 'deblur'"):
        registry.default_model("deblur")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_params_equal_the_manifests(name: str) -> None:
    data = manifest(MODELS[name][0])
    spec = load_registry(env={}).model(name)
    assert_same(spec.unet, without_none(data["unet_params"]), f"{name}.unet")
    assert_same(spec.diffusion, without_none(data["diffusion_params"]), f"{name}.diffusion")
    # The only upstream value TOML cannot hold; the model code must read its absence as None.
    assert data["diffusion_params"]["timestep_respacing"] is None
    assert "timestep_respacing" not in spec.diffusion


@pytest.mark.parametrize("name", sorted(AUTOENCODERS))
def test_autoencoder_params_equal_the_manifests(name: str) -> None:
    expected = manifest(AUTOENCODERS[name][0])["autoencoder_params"]
    spec = load_registry(env={}).autoencoder(name)
    assert_same(spec.embed_dim, expected["embed_dim"], name)
    assert_same(spec.n_embed, expected["n_embed"], name)
    assert_same(spec.ddconfig, without_none(expected["ddconfig"]), f"{name}.ddconfig")
    for family, _, _, _, autoencoder, _ in MODELS.values():
        if autoencoder == name:  # every model's own manifest names the same autoencoder
            assert_same(spec.ddconfig, manifest(family)["autoencoder_params"]["ddconfig"], family)


def test_packaged_file_is_the_repository_file() -> None:
    packaged = resources.files("resshift_cli") / "weights.toml"
    assert packaged.read_text() == (ROOT / "weights.toml").read_text()
    link = ROOT / "src" / "resshift_cli" / "weights.toml"
    assert link.is_symlink() and os.readlink(link) == "../../weights.toml"


def test_registry_and_hub_import_without_torch() -> None:
    code = "import sys, resshift_cli.registry, resshift_cli.hub; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_names_list_the_known_ones() -> None:
    registry = load_registry(env={})
    with pytest.raises(RegistryError) as exc:
        registry.model("realsr-v9")
    assert str(exc.value) == f"unknown model 'realsr-v9'; known: {', '.join(registry.models)}"
    with pytest.raises(
        RegistryError, match="unknown autoencoder 'vq-f16'; known: vq-f4, vq-f4-face, vq-f8-face"
    ):
        registry.autoencoder("vq-f16")


def test_user_file_deep_merges_into_an_entry(tmp_path: Path) -> None:
    user = write(
        tmp_path / "conf" / "my.toml",
        """
[models.realsr-v3]
description = "mine"
path = "weights/v3.pth"
sha256 = "ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789"

[models.realsr-v3.diffusion]
kappa = 1.5
""",
    )
    builtin = load_registry(env={}).model("realsr-v3")
    spec = load_registry(user, env={}).model("realsr-v3")
    assert spec.description == "mine"
    assert spec.source.path == tmp_path / "conf" / "weights" / "v3.pth"
    assert spec.source.sha256 == "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
    assert spec.source.url == builtin.source.url and spec.license == builtin.license == S_LAB
    assert spec.diffusion == {**builtin.diffusion, "kappa": 1.5}
    assert spec.unet == builtin.unet


def test_other_weights_do_not_inherit_the_builtin_hash(tmp_path: Path) -> None:
    """Your own run named like a built-in model (``resshift train`` writes such a file) points at
    another file; the built-in sha256 belongs to the built-in file and must not be checked."""
    assert load_registry(env={}).model("lite").source.sha256 is not None
    user = write(tmp_path / "registry.toml", '[models.lite]\npath = "lite.safetensors"\n')
    spec = load_registry(user, env={}).model("lite")
    assert spec.source.path == tmp_path / "lite.safetensors" and spec.source.sha256 is None
    # A layer that changes something else keeps the hash.
    user = write(tmp_path / "described.toml", '[models.lite]\ndescription = "x"\n')
    assert load_registry(user, env={}).model("lite").source.sha256 is not None


def test_user_file_adds_an_entry(tmp_path: Path) -> None:
    user = write(
        tmp_path / "my.toml",
        NEW_MODEL + '\n[models.pixel]\ntask = "face"\nscale = 1\nsteps = 3\n'
        'path = "/abs/pixel.safetensors"\nunet = {}\ndiffusion = {}\n',
    )
    registry = load_registry(user, env={})
    spec = registry.model("my-sr")
    assert (spec.task, spec.scale, spec.steps, spec.autoencoder) == ("sr", 2, 4, "vq-f4")
    assert spec.source.url == "https://example.org/my-sr.pth" and spec.source.repo_id is None
    assert spec.unet == {"model_channels": 32}
    assert registry.model("pixel").autoencoder is None
    assert registry.model("pixel").source.path == Path("/abs/pixel.safetensors")
    assert "realsr-v3" in registry.models and registry.files == ("resshift_cli/weights.toml", str(user))


def test_environment_file_then_option_file(tmp_path: Path) -> None:
    env_file = write(
        tmp_path / "env" / "reg.toml", '[models.realsr-v3]\npath = "a.pth"\ndescription = "env"\n'
    )
    opt_file = write(tmp_path / "opt.toml", '[models.realsr-v3]\ndescription = "option"\n')
    from_env = load_registry(env={ENV_VAR: str(env_file)}).model("realsr-v3")
    assert from_env.description == "env"
    assert from_env.source.path == tmp_path / "env" / "a.pth"
    both = load_registry(opt_file, env={ENV_VAR: str(env_file)}).model("realsr-v3")
    assert both.description == "option"  # the option wins over the environment
    assert both.source.path == tmp_path / "env" / "a.pth"  # what it does not set stays


def test_environment_is_read_from_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = write(tmp_path / "reg.toml", '[models.realsr-v3]\ndescription = "from os.environ"\n')
    monkeypatch.setenv(ENV_VAR, str(env_file))
    assert load_registry().model("realsr-v3").description == "from os.environ"


def test_missing_environment_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(RegistryError) as exc:
        load_registry(env={ENV_VAR: str(missing)})
    assert str(exc.value) == f"{ENV_VAR}={missing}: registry file not found"


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    user = write(tmp_path / "my.toml", '[models.realsr-v3]\ndescription = "ok"\nscale = = 4\n')
    with pytest.raises(RegistryError) as exc:
        load_registry(user, env={})
    message = str(exc.value)
    assert message.startswith(f"{user}: invalid TOML: ") and "line 3" in message and "\n" not in message


VALIDATION_CASES = {
    "wrong type": (
        '[models.realsr-v3]\nscale = "four"\n',
        'models.realsr-v3.scale: expected an integer, got "four"',
    ),
    "bool is no integer": (
        "[models.realsr-v3]\nsteps = true\n",
        "models.realsr-v3.steps: expected an integer, got true",
    ),
    "not positive": (
        "[models.realsr-v3]\nsteps = 0\n",
        "models.realsr-v3.steps: expected a positive integer, got 0",
    ),
    "unknown key": (
        "[models.realsr-v3]\nstep = 4\n",
        "models.realsr-v3.step: unknown key; expected one of description, task, scale, steps, "
        "sample_steps, autoencoder, license, unet, diffusion, repo_id, filename, revision, url, sha256, "
        "path",
    ),
    "unknown autoencoder key": (
        "[autoencoders.vq-f4]\nembed = 3\n",
        "autoencoders.vq-f4.embed: unknown key; expected one of description, embed_dim, n_embed, "
        "ddconfig, license, repo_id, filename, revision, url, sha256, path",
    ),
    "missing autoencoder": (
        NEW_MODEL.replace('autoencoder = "vq-f4"', 'autoencoder = "vq-f16"'),
        'models.my-sr.autoencoder: no autoencoder entry "vq-f16"; known: vq-f4, vq-f4-face, vq-f8-face',
    ),
    "unknown task": (
        NEW_MODEL.replace('task = "sr"', 'task = "deblur"'),
        'models.my-sr.task: unknown task "deblur"; expected one of sr, inpaint, face',
    ),
    "bad sha256": (
        '[models.realsr-v3]\nsha256 = "abc123"\n',
        'models.realsr-v3.sha256: expected 64 hexadecimal digits, got "abc123"',
    ),
    "sha256 not hex": (
        f'[autoencoders.vq-f4]\nsha256 = "{"g" * 64}"\n',
        f'autoencoders.vq-f4.sha256: expected 64 hexadecimal digits, got "{"g" * 64}"',
    ),
    "missing key": (NEW_MODEL.replace('task = "sr"\n', ""), "models.my-sr: missing key 'task'"),
    "no source": (
        NEW_MODEL.replace('url = "https://example.org/my-sr.pth"\n', ""),
        "models.my-sr: no weights source; set path, url, or repo_id and filename",
    ),
    "repo without file": (
        NEW_MODEL.replace("url =", 'repo_id = "me/weights"\nurl ='),
        "models.my-sr: missing key 'filename' (needed with repo_id)",
    ),
    "bad repo id": (
        '[models.realsr-v3]\nrepo_id = "no-owner"\n',
        "models.realsr-v3.repo_id: expected 'owner/name', got \"no-owner\"",
    ),
    "bad url": (
        '[models.realsr-v3]\nurl = "ftp://example.org/x.pth"\n',
        'models.realsr-v3.url: expected an http(s) URL, got "ftp://example.org/x.pth"',
    ),
    "empty path": ('[models.realsr-v3]\npath = ""\n', "models.realsr-v3.path: must not be empty"),
    "not a table": ("[models.realsr-v3]\nunet = 3\n", "models.realsr-v3.unet: expected a table, got 3"),
    "float embed_dim": (
        "[autoencoders.vq-f4]\nembed_dim = 3.5\n",
        "autoencoders.vq-f4.embed_dim: expected an integer, got 3.5",
    ),
    "scale disagrees": (
        "[models.realsr-v3]\nscale = 2\n",
        "models.realsr-v3.scale: 2 disagrees with diffusion.sf = 4",
    ),
    "steps disagree": (
        "[models.realsr-v3.diffusion]\nsteps = 15\n",
        "models.realsr-v3.diffusion.steps: 15 disagrees with steps = 4",
    ),
    "unknown table": (
        "[model.realsr-v3]\nscale = 4\n",
        "model: unknown table; expected models, autoencoders or defaults",
    ),
    "bad default": ('[defaults]\nsr = "faceir"\n', 'defaults.sr: model "faceir" is for task "face"'),
    "default of unknown task": (
        '[defaults]\ndeblur = "faceir"\n',
        "defaults.deblur: unknown task; expected one of sr, inpaint, face",
    ),
    "name clash": (
        NEW_MODEL.replace("my-sr", "vq-f4"),
        "models.vq-f4: name already used by an autoencoder entry",
    ),
    "bad name": (
        '[models."my sr"]\ntask = "sr"\n',
        "models.my sr: invalid name; use letters, digits, '.', '_' and '-'",
    ),
}


@pytest.mark.parametrize("case", sorted(VALIDATION_CASES))
def test_validation_error_names_file_entry_and_key(tmp_path: Path, case: str) -> None:
    text, expected = VALIDATION_CASES[case]
    user = write(tmp_path / "my.toml", text)
    with pytest.raises(RegistryError) as exc:
        load_registry(user, env={})
    assert str(exc.value) == f"{user}: {expected}"


def test_error_names_the_file_that_set_the_key(tmp_path: Path) -> None:
    """A bad key is blamed on the file that set it, even when another file set the entry."""
    env_file = write(tmp_path / "env.toml", '[models.realsr-v3]\nscale = "four"\n')
    opt_file = write(tmp_path / "opt.toml", '[models.realsr-v3]\ndescription = "fine"\n')
    with pytest.raises(RegistryError) as exc:
        load_registry(opt_file, env={ENV_VAR: str(env_file)})
    assert str(exc.value) == f'{env_file}: models.realsr-v3.scale: expected an integer, got "four"'
    new_entry = write(tmp_path / "new.toml", NEW_MODEL)
    broken = write(tmp_path / "broken.toml", '[models.my-sr]\nsteps = "x"\n')
    with pytest.raises(RegistryError) as exc:
        load_registry(broken, env={ENV_VAR: str(new_entry)})
    assert str(exc.value) == f'{broken}: models.my-sr.steps: expected an integer, got "x"'
