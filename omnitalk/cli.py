"""The `omnitalk` command: parses arguments, calls the engine, prints. No model logic lives here.

    omnitalk chat --audio examples/question.wav --image examples/shapes.png   # speech + text answer
    omnitalk chat --text "What is the capital of France?" --reply text
    omnitalk chat --checkpoint demo --audio omnitalk/demo_model/question.wav --image omnitalk/demo_model/scene.png
    omnitalk transcribe question.wav
    omnitalk download [--checkpoint DIR]
    omnitalk convert SRC DST
    omnitalk info

Adding a subcommand: write `add_<name>(sub)` that calls `sub.add_parser(...)`, sets `run=<function>` with
`set_defaults`, and decorate it with `@subcommand("<name>")`. The run function gets the parsed args and
returns the exit code.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable

from omnitalk.errors import InputError, OmnitalkError

SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def subcommand(name: str):
    """Register an `add_parser` function under `name` (order of registration = order in --help)."""
    def register(add: Callable[[argparse._SubParsersAction], None]):
        SUBCOMMANDS[name] = add
        return add
    return register


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def default_checkpoint() -> str:
    return os.environ.get("OMNITALK_CHECKPOINT") or "checkpoint"


def _add_checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=default_checkpoint(), metavar="DIR_OR_REPO",
                   help="checkpoint directory, hub repo id, or 'demo' for the embedded demo model (default: "
                        "$OMNITALK_CHECKPOINT or ./checkpoint; an empty one that cannot be downloaded falls back "
                        "to the demo model)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_checkpoint_arg(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    p.add_argument("--no-download", action="store_true",
                   help="never fetch missing files; fail with the list of what is missing")
    p.add_argument("--mode", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="fp32: the release's exact outputs (default); bf16 / int8: faster, smaller")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (one CUDA graph per step on a GPU); compiling takes "
                        "a while at start-up. For GPUs: on a CPU omnitalk's own kernels are several times faster")
    add_whisper_window_arg(p)


def add_whisper_window_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--whisper-window", choices=("exact", "trimmed"), default=None,
                   help="exact: Whisper over the padded 30-s window, as the release (parity); trimmed: only the "
                        "frames the audio covers, several times faster for short questions, features differ "
                        "slightly (docs/performance.md). Default: what the encoder was trained with")


def _load_model(args):
    from omnitalk import demo
    from omnitalk.engine import resolve_device

    resolve_device(args.device)  # fail fast on a bad --device, before any loading
    model, args.model_used = demo.load_model(args.checkpoint, device=args.device, mode=args.mode,
                                             download=not args.no_download)
    if getattr(args, "whisper_window", None):
        model.whisper_window = args.whisper_window
    if getattr(args, "compile", False):
        model.compile()
    return model


def _require_file(path: str | None, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")


# ---- chat --------------------------------------------------------------------------------------
@subcommand("chat")
def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="answer speech, an image and/or text, in speech + text or text only",
                       description="Streams the answer's text to stdout and writes its speech to --out.")
    _add_model_args(p)
    p.add_argument("--audio", metavar="WAV", help="spoken question (any format soundfile reads)")
    p.add_argument("--image", metavar="IMG", help="picture to talk about")
    p.add_argument("--text", help="typed question")
    p.add_argument("--reply", choices=("speech", "text"), default="speech", help="answer form (default: speech)")
    p.add_argument("--out", default="answer.wav", metavar="WAV",
                   help="where the spoken answer goes: 24 kHz mono PCM16 WAV (default: answer.wav)")
    p.add_argument("--max-tokens", type=int, default=2048, metavar="N", help="most decoding steps (default: 2048)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, metavar="K")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed")
    p.add_argument("--no-audio-grammar", dest="audio_grammar", action="store_false",
                   help="sample the speech as the release does, without keeping the delay pattern (an audio "
                        "special inside a frame then ends the speech; default: only SNAC codes inside frames)")
    p.add_argument("--strategy", choices=("pair", "single"), default="pair",
                   help="pair: the release's batch-parallel decoding (default); single: one 8-stream sequence")
    p.add_argument("--stream-mode", choices=("context", "reference"), default="context",
                   help="context: seamless audio chunks (default); reference: the release's chunks exactly "
                        "(speech replies only)")
    p.set_defaults(run=run_chat)


def run_chat(args) -> int:
    import numpy as np
    import soundfile as sf

    from omnitalk.generate import Sampling

    if not (args.audio or args.image or args.text):
        raise InputError("nothing to answer: give --audio, --image and/or --text")
    _require_file(args.audio, "audio")
    _require_file(args.image, "image")
    speak = args.reply == "speech"
    out = Path(args.out)
    if speak and not out.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {out.parent}")
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed, args.audio_grammar)

    t0 = time.perf_counter()
    model = _load_model(args)
    t_load = time.perf_counter() - t0
    req = model.request(audio=args.audio, image=args.image, text=args.text, reply=args.reply,
                        strategy=args.strategy)
    # The reference stream mode only shapes audio chunks (and yields nothing for text replies).
    mode = args.stream_mode if speak else "context"
    chunks, first_audio = [], None
    t1 = time.perf_counter()
    for chunk in model.stream(req, max_tokens=args.max_tokens, sampling=sampling, stream_mode=mode):
        if chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        if len(chunk.audio):
            first_audio = first_audio or time.perf_counter() - t1
            chunks.append(chunk.audio)
    sys.stdout.write("\n")
    sys.stdout.flush()
    elapsed = time.perf_counter() - t0

    summary = [f"model {args.model_used} (loaded in {t_load:.1f} s)"]
    if speak:
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        if len(pcm):
            sf.write(out, pcm, 24000, subtype="PCM_16")
            summary.append(f"audio {len(pcm) / 24000:.2f} s -> {out}, first audio after {first_audio:.2f} s")
        else:
            summary.append("no audio produced")
    summary.append(f"elapsed {elapsed:.1f} s")
    print("omnitalk: " + "; ".join(summary), file=sys.stderr)
    return 0


# ---- transcribe --------------------------------------------------------------------------------
@subcommand("transcribe")
def add_transcribe(sub) -> None:
    p = sub.add_parser("transcribe", help="speech -> text (the model's ASR task)")
    p.add_argument("audio", metavar="AUDIO", help="audio file (any format soundfile reads)")
    _add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=2048, metavar="N", help="most decoding steps (default: 2048)")
    p.set_defaults(run=run_transcribe)


def run_transcribe(args) -> int:
    _require_file(args.audio, "audio")
    model = _load_model(args)
    reply = model.generate(model.request(audio=args.audio, task="asr"), max_tokens=args.max_tokens)
    print(reply.text)
    return 0


# ---- download ----------------------------------------------------------------------------------
@subcommand("download")
def add_download(sub) -> None:
    p = sub.add_parser("download", help="fetch the released weights (and SNAC, CLIP) into a directory")
    p.add_argument("--checkpoint", default=default_checkpoint(), metavar="DIR",
                   help="target directory (default: $OMNITALK_CHECKPOINT or ./checkpoint)")
    p.add_argument("--repo", default="gpt-omni/mini-omni2", help="hub repo of the release (default: %(default)s)")
    p.set_defaults(run=run_download)


def run_download(args) -> int:
    from omnitalk import checkpoint as ckpt_io

    path = ckpt_io.download(args.checkpoint, repo_id=args.repo)
    _print_files(path)
    missing = ckpt_io.missing_files(path)
    return 0 if not missing else 1


def _print_files(ckpt: Path) -> None:
    from omnitalk import checkpoint as ckpt_io

    names = (*ckpt_io.OFFICIAL_FILES, *ckpt_io.CLIP_FILES, *ckpt_io.SNAC_FILES, ckpt_io.OURS)
    for name in names:
        f = ckpt / name
        if f.is_file():
            print(f"  present  {name} ({f.stat().st_size / 1e6:.1f} MB)")
    for name in ckpt_io.missing_files(ckpt):
        print(f"  MISSING  {name}")


# ---- convert -----------------------------------------------------------------------------------
@subcommand("convert")
def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="official checkpoint layout -> omnitalk safetensors layout (verified)")
    p.add_argument("src", metavar="SRC", help="directory in the official layout")
    p.add_argument("dst", metavar="DST", help="directory to write (created)")
    p.add_argument("--mode", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="store the LLM and adapters as fp32 (exact, verified), bf16 or int8 (weight-only)")
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from omnitalk import checkpoint as ckpt_io

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source checkpoint directory not found: {src}")
    out = ckpt_io.convert(src, dst, mode=args.mode)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if args.mode == "fp32":
        n = ckpt_io.verify_conversion(src, dst)
        print(f"verified: all {n} tensors equal the source's")
    else:
        ckpt_io.require_files(dst)
        print(f"stored the LLM and adapters as {args.mode}; load with --mode {args.mode}")
    return 0


# ---- info --------------------------------------------------------------------------------------
@subcommand("info")
def add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, and where the weights are")
    _add_checkpoint_arg(p)
    p.set_defaults(run=run_info)


def run_info(args) -> int:
    import torch
    from huggingface_hub.constants import HF_HUB_CACHE

    from omnitalk import checkpoint as ckpt_io
    from omnitalk import kernels

    for dist in ("omnitalk", "torch", "snac", "tokenizers", "numpy"):
        print(f"{dist:<11} {_version(dist)}")
    print(f"threads     {torch.get_num_threads()}")
    print(f"kernels     {kernels.info().split(': ', 1)[1]}")
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"cuda        yes ({gpus})")
    else:
        print(f"cuda        no (torch built with CUDA {torch.version.cuda})" if torch.version.cuda else
              "cuda        no (CPU-only torch build)")
    print(f"mps         {'yes' if torch.backends.mps.is_available() else 'no'}")
    ckpt = Path(args.checkpoint)
    print(f"checkpoint  {ckpt.resolve()}{'' if ckpt.is_dir() else ' (does not exist)'}")
    _print_files(ckpt)
    print(f"hf cache    {HF_HUB_CACHE}")
    print(f"offline     {'yes (HF_HUB_OFFLINE)' if ckpt_io.is_offline() else 'no'}")
    from omnitalk import demo
    print(f"demo model  {demo.demo_description() if demo.available() else 'not in this installation'}")
    return 0


# ---- subcommands that live with their subsystem (imported only when the parser is built) ---------
def _elsewhere(module: str, function: str):
    def add(sub) -> None:
        getattr(importlib.import_module(module), function)(sub)
    return add


for _name, _module, _function in [
    ("serve", "omnitalk.server.cli", "register"),
    ("bench", "omnitalk.bench_cli", "register"),
    ("train", "omnitalk.train.cli", "add_train"),
    ("train-codec", "omnitalk.train.cli", "add_train_codec"),
    ("plot-metrics", "omnitalk.train.cli", "add_plot_metrics"),
    ("export", "omnitalk.train.cli", "add_export"),
    ("data", "omnitalk.train.data_cli", "register"),
    ("eval", "omnitalk.eval.cli", "register"),
]:
    subcommand(_name)(_elsewhere(_module, _function))


# ---- entry point -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnitalk", description="Talk with Mini-Omni2: speech, images and "
                                     "text in, streaming speech and text out.")
    parser.add_argument("--version", action="version", version=f"omnitalk {_version('omnitalk')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (argparse already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (OmnitalkError, FileNotFoundError, ValueError) as e:
        if os.environ.get("OMNITALK_DEBUG") == "1":
            traceback.print_exc()
        msg = e.strerror + f": {e.filename}" if isinstance(e, FileNotFoundError) and e.filename else str(e)
        print(f"omnitalk: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
