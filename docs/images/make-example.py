"""Make docs/images/lite-example.png: a crop of a real LQ photo upscaled x4 three ways.

Runs the shipped command on a RealSet65 photo from ../shared/testdata, then puts side by side the
same 64x64 crop of the input upscaled by pixel repetition, by bicubic interpolation, and by `lite`.

    python docs/images/make-example.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[2] / "shared" / "testdata" / "sr" / "realset65" / "0014.jpg"
CROP = (96, 64, 160, 128)  # left, top, right, bottom in input pixels


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "0014_lite.png"
        command = [
            sys.executable,
            "-m",
            "resshift_cli",
            "sr",
            str(SOURCE),
            "-o",
            str(out),
            "--model",
            "lite",
            "-q",
        ]
        subprocess.run(command, check=True)
        restored = Image.open(out).convert("RGB")
    lq = Image.open(SOURCE).convert("RGB").crop(CROP)
    size = (lq.width * 4, lq.height * 4)
    panels = [
        lq.resize(size, Image.Resampling.NEAREST),
        lq.resize(size, Image.Resampling.BICUBIC),
        restored.crop(tuple(4 * c for c in CROP)),
    ]
    gap = 8
    figure = Image.new("RGB", (3 * size[0] + 2 * gap, size[1]), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (i * (size[0] + gap), 0))
    figure.save(HERE / "lite-example.png", optimize=True)


if __name__ == "__main__":
    main()
