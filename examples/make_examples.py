"""Regenerate the bundled sample inputs: `question.wav` (spoken question) and `shapes.png` (the picture).

    python examples/make_examples.py

`question.wav` needs the `espeak-ng` program (Debian/Ubuntu: `apt-get install espeak-ng`); the committed
file was made with espeak-ng 1.51, voice en-us, speed 150, then resampled to 16 kHz mono PCM16.
`shapes.png` needs only Pillow. Nothing in omnitalk needs espeak-ng at run time.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
QUESTION = "What color is the big circle in this picture?"


def make_image(path: Path) -> None:
    """320x240 on white: a big red circle, a small blue square, a green triangle."""
    img = Image.new("RGB", (320, 240), "white")
    d = ImageDraw.Draw(img)
    d.ellipse((30, 40, 190, 200), fill=(220, 30, 30))            # big red circle, r = 80
    d.rectangle((225, 40, 275, 90), fill=(30, 60, 220))           # small blue square
    d.polygon([(210, 210), (300, 210), (255, 125)], fill=(30, 170, 60))  # green triangle
    img.save(path, optimize=True)


def make_question(path: Path, text: str = QUESTION) -> None:
    """espeak-ng (en-us, 150 wpm) -> 16 kHz mono PCM16 WAV."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        sys.exit("make_examples: espeak-ng not found; install it (apt-get install espeak-ng) to regenerate "
                 f"{path.name}")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
        x, sr = sf.read(raw, dtype="float32", always_2d=True)
    x = soxr.resample(x.mean(axis=1), sr, 16000, quality="HQ")
    x = 0.9 * x / max(float(np.abs(x).max()), 1e-9)  # peak-normalise
    sf.write(path, x, 16000, subtype="PCM_16")


if __name__ == "__main__":
    make_image(HERE / "shapes.png")
    make_question(HERE / "question.wav")
    for f in ("shapes.png", "question.wav"):
        print(f"wrote {HERE / f} ({(HERE / f).stat().st_size} bytes)")
