"""The embedded demo model (docs/demo-model.md): the training recipe's small model of the small world
(arithmetic, counting, colours and shapes in pictures) with its own speech codec, shipped inside the
package so that omnitalk answers — in text and in speech — on an offline machine with nothing downloaded.

    omnitalk chat --checkpoint demo --audio omnitalk/demo_model/question.wav --image omnitalk/demo_model/scene.png

`load_model` is how the command line loads a model: `--checkpoint demo` is the demo model; a checkpoint
directory that holds no files at all (the default `./checkpoint` before `omnitalk download`) is
downloaded, and when that is impossible (offline, `--no-download`, the hub unreachable) the demo model
answers instead and the reason is printed. A directory that holds some files is never replaced by the
demo model: a missing or corrupt file there is an error that names it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from omnitalk import checkpoint as ckpt_io
from omnitalk.errors import CheckpointError

NAME = "demo"
DIR = Path(__file__).resolve().parent / "demo_model"
QUESTION = DIR / "question.wav"   # a spoken question about SCENE, in a voice the model never heard
SCENE = DIR / "scene.png"


def available() -> bool:
    """True when the package carries the demo model's files."""
    return not ckpt_io.missing_files(DIR)


def _nothing_here(spec: str) -> bool:
    """A local checkpoint path that does not exist or is an empty directory (no released weights)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return False
    if not p.exists():
        # a hub repo id ("org/name") is a request for those weights, not an empty local folder
        return "/" not in spec or spec.startswith((".", "/", "~"))
    return p.is_dir() and not any(p.iterdir())


def load_model(checkpoint: str, *, device=None, mode: str = "fp32", download: bool = True,
               say: Callable[[str], None] | None = None):
    """(model, description): the checkpoint, or the demo model where the checkpoint has no weights and
    none can be fetched (see the module docstring). `say` gets one line when the demo model stands in."""
    from omnitalk.engine import OmniModel

    say = say or (lambda line: print(line, file=sys.stderr))
    if checkpoint == NAME:
        return _load_demo(device, mode), demo_description()
    if not _nothing_here(checkpoint) or not available():
        return OmniModel.from_pretrained(checkpoint, device=device, mode=mode, download=download), checkpoint
    if not download:
        reason = "--no-download"
    elif ckpt_io.is_offline():
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            return OmniModel.from_pretrained(checkpoint, device=device, mode=mode, download=True), checkpoint
        except CheckpointError as e:
            reason = f"the download failed: {str(e).split(' failed (', 1)[-1].split(')', 1)[0]}"
    say(f"omnitalk: no released weights in {checkpoint} ({reason}); answering with the embedded demo model "
        f"(small world only, docs/demo-model.md). For Mini-Omni2 itself: omnitalk download --checkpoint {checkpoint}")
    return _load_demo(device, mode), demo_description()


def demo_description() -> str:
    return f"the embedded demo model ({DIR}, LLM in {stored_mode() if available() else '?'})"


def _load_demo(device, mode: str):
    from omnitalk.engine import OmniModel

    if not available():
        raise CheckpointError(f"this omnitalk installation has no demo model: {DIR} lacks "
                              f"{', '.join(ckpt_io.missing_files(DIR))}; reinstall omnitalk, or rebuild it with "
                              "scripts/make_demo_model.py (docs/demo-model.md)")
    # the demo's LLM is stored in int8 (the package's size budget): it loads as int8 whatever was asked
    return OmniModel.from_pretrained(DIR, device=device, mode=ckpt_io.loadable_mode(DIR, mode), download=False)


def stored_mode() -> str:
    """How the demo's LLM weights are stored: 'fp32', 'bf16' or 'int8' (omnitalk.safetensors metadata)."""
    return ckpt_io.stored_llm_mode(DIR) or "fp32"
