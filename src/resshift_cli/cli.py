"""The ``resshift`` command line: parsing only. The work lives in restore, batch, hub and pipelines.

torch is imported only by the commands that need it, so ``--help`` and ``--version`` are instant.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from resshift_cli import __version__, interrupts
from resshift_cli.errors import EXIT_SOME_FAILED, ResShiftError, UsageError
from resshift_cli.pipelines.options import SEED, TILE_OVERLAP
from resshift_cli.progress import printable
from resshift_cli.runtime import DEVICE_PATTERN, PRECISIONS

EXIT_CODES = """\b
Exit codes:
  0    every input restored (or skipped because its output exists)
  1    some inputs failed; the others were written
  2    usage error (bad options, no inputs)
  3    the model could not be loaded (weights missing, offline, wrong file, invalid registry,
       device unavailable)
  130  interrupted (Ctrl-C); 143 and 129 for SIGTERM and SIGHUP; finished outputs are kept,
       a re-run does the rest
"""

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_PathArg = click.Path(path_type=Path)


def _registry_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--registry",
        type=click.Path(path_type=Path, dir_okay=False),
        help="A weights registry file of your own, merged over the built-in one (also: RESSHIFT_REGISTRY).",
    )(f)


def _check_device(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """A malformed --device is a usage error (exit 2); an unavailable one fails at load (exit 3)."""
    if not DEVICE_PATTERN.fullmatch(value):
        raise click.BadParameter(f"{value!r}; use auto, cpu, cuda, cuda:N or mps")
    return value


def _check_output(_ctx: click.Context, _param: click.Parameter, value: str) -> Path:
    """An empty -o is a usage error, not the current folder."""
    if not value:
        raise click.BadParameter("must name a file or directory")
    return Path(value)


SEED_RANGE = click.IntRange(0, 2**64 - 1)
"""Seeds torch's generators accept: 0 to 2**64 - 1."""


def _handled(after_interrupt: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a command with every expected failure as one line and its exit code: a usage error as
    click shows one (exit 2), any other :class:`ResShiftError` as ``error: MESSAGE``, and Ctrl-C,
    SIGTERM or SIGHUP as how far the command got (``after_interrupt``), exit 128 + the signal."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with interrupts.termination_as_interrupt():
                try:
                    return f(*args, **kwargs)
                except UsageError as exc:
                    raise click.UsageError(str(exc)) from None
                except ResShiftError as exc:
                    click.echo(f"error: {printable(str(exc))}", err=True)
                    sys.exit(exc.exit_code)
                except KeyboardInterrupt as exc:
                    report = getattr(exc, "message", None)
                    line = report() if callable(report) else f"{interrupts.describe(exc)}; {after_interrupt}"
                    click.echo(line, err=True)
                    sys.exit(interrupts.exit_code(exc))

        return wrapper

    return decorate


def _restore_options(task: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Options every restore command shares, in the order --help shows them."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.option(
                "-o",
                "--output",
                type=click.Path(),
                callback=_check_output,
                required=True,
                help="Output file (one input) or directory.",
            ),
            click.option("--model", help="Registry name of the model (see 'resshift weights list')."),
            click.option(
                "--checkpoint",
                type=click.Path(path_type=Path, dir_okay=False),
                help="Use this model checkpoint file instead of the registry's.",
            ),
            click.option(
                "--autoencoder",
                type=click.Path(path_type=Path, dir_okay=False),
                help="Use this autoencoder checkpoint file instead of the registry's.",
            ),
            _registry_option,
            click.option(
                "--recursive", "-r", is_flag=True, help="Descend into subdirectories of input dirs."
            ),
            click.option(
                "--seed",
                type=SEED_RANGE,
                default=SEED,
                show_default=True,
                help="Random seed (12345 is upstream's).",
            ),
            click.option(
                "--tile",
                type=click.IntRange(min=1),
                help="Tile size in input pixels (for latent models the autoencoder's; their network "
                "is tiled by memory); default: chosen from free memory.",
            ),
            click.option(
                "--tile-overlap",
                type=click.IntRange(min=0),
                default=TILE_OVERLAP[task],
                show_default=True,
                help="Overlap of neighbouring tiles, input pixels.",
            ),
            click.option(
                "--batch-size",
                type=click.IntRange(min=1),
                default=1,
                show_default=True,
                help="Tiles, or images of one size, per forward pass.",
            ),
            click.option(
                "--device",
                default="auto",
                show_default=True,
                callback=_check_device,
                help="auto, cpu, cuda, cuda:N or mps.",
            ),
            click.option(
                "--precision",
                type=click.Choice(PRECISIONS),
                default="auto",
                show_default=True,
                help="auto: fp16 autocast on CUDA (as upstream), fp32 on CPU.",
            ),
            click.option("--fp32", "force_fp32", is_flag=True, help="Same as --precision fp32."),
            click.option("--suffix", default="", help="Added to output file names, e.g. _x4."),
            click.option(
                "--ext",
                type=click.Choice(["auto", "png", "jpg", "webp"]),
                default="auto",
                show_default=True,
                help="Output format; auto keeps the input's.",
            ),
            click.option(
                "--overwrite", is_flag=True, help="Redo inputs whose output exists (default: skip)."
            ),
            click.option(
                "--max-pixels",
                type=click.IntRange(min=1),
                default=None,
                help="Refuse inputs with more pixels than this (default 268 million).",
            ),
            click.option("--quiet", "-q", is_flag=True, help="Print errors only."),
            click.option(
                "--json", "json_records", is_flag=True, help="Print one JSON record per input on stdout."
            ),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


@click.group(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.version_option(__version__, "--version", "-V", prog_name="resshift")
def main() -> None:
    """Restore images with ResShift: super-resolution, inpainting and face restoration.

    \b
    Examples:
      resshift sr photo.png -o photo_x4.png
      resshift sr photos/ -o restored/ --recursive
      resshift inpaint image.png --mask mask.png -o filled.png
      resshift face --batch faces/ -o restored/
    """


def _run_restore(task: str, inputs: tuple[Path, ...], masks: Path | None, kw: dict[str, Any]) -> None:
    from resshift_cli import batch, restore
    from resshift_cli.imagefiles import DEFAULT_MAX_PIXELS
    from resshift_cli.pipelines.options import RunOptions

    plan = batch.plan_jobs(
        list(inputs), kw["output"], recursive=kw["recursive"], suffix=kw["suffix"], ext=kw["ext"], masks=masks
    )
    options = RunOptions(
        seed=kw["seed"],
        tile=kw["tile"],
        overlap=kw["tile_overlap"],
        batch_size=kw["batch_size"],
        tta=kw.get("tta", False),
    )
    settings = restore.RestoreSettings(
        task=task,
        model=kw["model"],
        checkpoint=kw["checkpoint"],
        autoencoder=kw["autoencoder"],
        registry=kw["registry"],
        options=options,
        device=kw["device"],
        precision="fp32" if kw["force_fp32"] else kw["precision"],
        overwrite=kw["overwrite"],
        quiet=kw["quiet"],
        json=kw["json_records"],
        max_pixels=kw["max_pixels"] or DEFAULT_MAX_PIXELS,
    )
    sys.exit(restore.run(plan, settings))


@main.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.argument("inputs", nargs=-1, required=True, type=_PathArg)
@_restore_options("sr")
@click.option(
    "--tta",
    is_flag=True,
    help="Average the restorations of the 8 flips and rotations (8x the time).",
)
@_handled("finished outputs are kept")
def sr(inputs: tuple[Path, ...], **kw: Any) -> None:
    """Super-resolve images x4 (default model realsr-v3, 4 steps).

    INPUTS are image files and/or directories. Large images are restored in overlapping tiles
    blended without seams.
    """
    _run_restore("sr", inputs, None, kw)


@main.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.argument("inputs", nargs=-1, required=True, type=_PathArg)
@click.option(
    "--mask",
    "masks",
    type=_PathArg,
    required=True,
    help="Mask image (white = hole), same size as the image; for several inputs a directory "
    "of masks matched by file stem.",
)
@_restore_options("inpaint")
@_handled("finished outputs are kept")
def inpaint(inputs: tuple[Path, ...], masks: Path, **kw: Any) -> None:
    """Fill the white area of a mask (default model inpaint-imagenet; inpaint-face for faces).

    Outside the hole the output is the input, pixel for pixel.
    """
    _run_restore("inpaint", inputs, masks, kw)


@main.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.argument("inputs", nargs=-1, type=_PathArg)
@click.option(
    "--batch",
    "batch_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="A directory of aligned faces to restore.",
)
@_restore_options("face")
@_handled("finished outputs are kept")
def face(inputs: tuple[Path, ...], batch_dir: Path | None, **kw: Any) -> None:
    """Blind restoration of aligned 512x512 faces (model faceir).

    Other sizes are resized to 512x512 and back, with a notice.
    """
    if batch_dir is not None:
        inputs = (*inputs, batch_dir)
    if not inputs:
        raise UsageError("give face images, or --batch DIR")
    _run_restore("face", inputs, None, kw)


@main.group(context_settings=CONTEXT)
def weights() -> None:
    """List, download, verify, convert and export model weights."""


@weights.command("list", context_settings=CONTEXT)
@_registry_option
@_handled("an unfinished download resumes on the next run")
def weights_list(registry: Path | None) -> None:
    """Show every model and autoencoder, and whether it is on disk."""
    from resshift_cli.hub import cached_path
    from resshift_cli.registry import AutoencoderSpec, ModelSpec, load_registry

    reg = load_registry(registry)
    defaults = {v: k for k, v in reg.defaults.items()}

    def status(entry: ModelSpec | AutoencoderSpec) -> str:
        found = cached_path(entry.name, reg) is not None
        if entry.source.path is not None:  # a file named by the registry, never downloaded
            return "on disk" if found else "file missing"
        return "cached" if found else "not downloaded"

    for spec in reg.models.values():
        default = f" [default for {defaults[spec.name]}]" if spec.name in defaults else ""
        steps = f"{spec.network_calls:2d} {'steps' if spec.network_calls > 1 else 'step '}"
        click.echo(
            f"{spec.name:18} {spec.task:8} x{spec.scale} {steps}  "
            f"{status(spec):14} {spec.description}{default}"
        )
    for ae in reg.autoencoders.values():
        click.echo(f"{ae.name:18} {'vq':8} {'':13} {status(ae):14} {ae.description}")


@weights.command("fetch", context_settings=CONTEXT)
@click.argument("names", nargs=-1, required=True)
@_registry_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_handled("an unfinished download resumes on the next run")
def weights_fetch(names: tuple[str, ...], registry: Path | None, quiet: bool) -> None:
    """Download (and convert to safetensors) the named weights and their autoencoders."""
    from resshift_cli.hub import fetch
    from resshift_cli.registry import load_registry

    reg = load_registry(registry)
    for name in names:
        for entry, path in fetch(name, reg, quiet=quiet).items():
            if not quiet:
                click.echo(f"{entry}: {path}")


@weights.command("verify", context_settings=CONTEXT)
@click.argument("names", nargs=-1)
@_registry_option
@_handled("an unfinished download resumes on the next run")
def weights_verify(names: tuple[str, ...], registry: Path | None) -> None:
    """Check downloaded weights (sha256 where known, else that they load). Default: all on disk."""
    from resshift_cli.hub import cached_path, verify
    from resshift_cli.registry import load_registry

    reg = load_registry(registry)
    chosen = list(names) or [n for n in reg.names() if cached_path(n, reg) is not None]
    if not chosen:
        click.echo("no weights on disk to verify")
        return
    failed = 0
    for name in chosen:
        ok, message = verify(name, reg)
        click.echo(("ok    " if ok else "FAIL  ") + message)
        failed += not ok
    if failed:
        sys.exit(EXIT_SOME_FAILED)


@weights.command("path", context_settings=CONTEXT)
@click.argument("name")
@_registry_option
@_handled("an unfinished download resumes on the next run")
def weights_path(name: str, registry: Path | None) -> None:
    """Print the local file of NAME (exit 1 when it is not on disk)."""
    from resshift_cli.hub import cached_path
    from resshift_cli.registry import load_registry

    path = cached_path(name, load_registry(registry))
    if path is None:
        click.echo(f"error: {name} is not on disk; run 'resshift weights fetch {name}'", err=True)
        sys.exit(EXIT_SOME_FAILED)
    click.echo(str(path))


@weights.command("convert", context_settings=CONTEXT)
@click.argument("src", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.argument("dst", type=click.Path(path_type=Path, dir_okay=False))
@_handled("an unfinished download resumes on the next run")
def weights_convert(src: Path, dst: Path) -> None:
    """Convert a .pth checkpoint into .safetensors (read with weights_only: code is refused)."""
    from resshift_cli.hub import convert

    click.echo(str(convert(src, dst)))


@weights.command("export", context_settings=CONTEXT)
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.argument("names", nargs=-1)
@_registry_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, no list of files.")
@_handled("an unfinished download resumes on the next run")
def weights_export(directory: Path, names: tuple[str, ...], registry: Path | None, quiet: bool) -> None:
    """Write the folder of a Hub repository of your own into DIRECTORY.

    It holds the weights of NAMES (default: all; a model brings its autoencoder) as safetensors,
    SHA256SUMS and a model card (README.md). Upload it, then set RESSHIFT_HUB_REPO=OWNER/NAME to
    download from it (docs/weights.md).
    """
    from resshift_cli.hub import export
    from resshift_cli.registry import load_registry

    files = export(directory, names, load_registry(registry), quiet=quiet)
    if not quiet:
        for file in files:
            click.echo(f"{file.filename}  sha256 {file.sha256}  ({file.entry})")
        click.echo(f"wrote {len(files)} weights files, SHA256SUMS and README.md to {directory}")


@main.command(context_settings=CONTEXT)
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the output folder.")
@click.option("--init", help="Fine-tune: start from a registry model (name) or a weights file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress; errors only.")
@_handled("nothing saved before training started")
def train(config: Path, overrides: tuple[str, ...], resume: bool, init: str | None, quiet: bool) -> None:
    """Train or fine-tune a model on a folder of high-quality images (see configs/lite.toml).

    OVERRIDES are KEY=VALUE pairs that replace any key of CONFIG, e.g. train.steps=1000
    data.train=/data/photos. Low-quality inputs are made on the fly (bicubic or Real-ESRGAN
    degradation). Run under torchrun for several GPUs or machines. Ctrl-C, SIGTERM or SIGHUP
    stops after the current step with a checkpoint there (exit 128+N); --resume continues it.
    """
    import json

    from resshift_cli.training.config import load_train_config
    from resshift_cli.training.trainer import run_training

    if init is not None:
        overrides = (*overrides, f"model.init={json.dumps(init)}")
    result = run_training(load_train_config(config, overrides), resume=resume, quiet=quiet)
    if not quiet:
        click.echo(f"trained {result.step} steps; weights {result.weights}; registry entry {result.registry}")


@main.command("eval", context_settings=CONTEXT)
@click.argument(
    "paths", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False, exists=True)
)
@click.option(
    "--crop-border",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Pixels left out at every side (SR papers use the scale).",
)
@click.option(
    "--modcrop",
    type=click.IntRange(min=0),
    default=0,
    help="Crop the ground truth to a multiple of this first (the scale, for SR benchmarks).",
)
@click.option("--suffix", default="", help="Suffix of the output names to ignore when matching stems.")
@click.option(
    "--make-lr",
    "make_lr",
    type=click.Path(path_type=Path, file_okay=False),
    help="Instead of scoring: write the bicubic LR inputs of the ground truth here.",
)
@click.option(
    "--scale", type=click.IntRange(min=1), default=4, show_default=True, help="Scale for --make-lr."
)
@click.option("--json", "json_out", is_flag=True, help="Print the results as JSON.")
def evaluate(
    paths: tuple[Path, ...],
    crop_border: int,
    modcrop: int,
    suffix: str,
    make_lr: Path | None,
    scale: int,
    json_out: bool,
) -> None:
    """PSNR and SSIM of OUTPUTS against GROUND_TRUTH, on RGB and on the Y channel.

    \b
    resshift eval OUTPUTS GROUND_TRUTH [--crop-border 4 --modcrop 4]
    resshift eval GROUND_TRUTH --make-lr LR_DIR [--scale 4]

    Images are matched by file stem.
    """
    import json

    from resshift_cli.metrics import evaluate_folders, format_table, make_lr_images

    if make_lr is not None:
        if len(paths) != 1:
            raise click.UsageError("--make-lr takes one folder: the ground truth")
        written = make_lr_images(paths[0], make_lr, scale)
        click.echo(f"wrote {len(written)} LR images (x{scale} bicubic) to {make_lr}")
        return
    if len(paths) != 2:
        raise click.UsageError("give two folders: OUTPUTS GROUND_TRUTH")
    results = {
        channel: evaluate_folders(
            paths[0],
            paths[1],
            crop_border=crop_border,
            y_channel=channel == "y",
            suffix=suffix,
            modcrop=modcrop,
        )
        for channel in ("rgb", "y")
    }
    if json_out:
        click.echo(json.dumps({channel: r.to_dict() for channel, r in results.items()}))
    else:
        for channel, result in results.items():
            click.echo(f"{'Y channel' if channel == 'y' else 'RGB'}:")
            click.echo(format_table(result))
    if not results["y"].rows or results["y"].errors:
        sys.exit(EXIT_SOME_FAILED)
