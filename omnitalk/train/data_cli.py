"""`omnitalk data ...`: build and prepare training manifests.

    omnitalk data librispeech ROOT --out manifest.jsonl          # LibriSpeech / LibriTTS folders -> asr records
    omnitalk data voiceassistant PARQUET... --out DIR/manifest.jsonl   # VoiceAssistant-400K -> qa records
    omnitalk data world --out DIR [--n 2000 --n-eval 200]         # the synthetic small world
    omnitalk data interrupt --out DIR [--n 400]                   # "stop omni" clips with frame labels
    omnitalk data prepare MANIFEST --checkpoint DIR --out OUT     # SNAC codes + cached Whisper/CLIP features

`register(subparsers)` adds the `data` command to an argparse subparsers object; every leaf sets
`run=<function(args) -> exit code>`.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from omnitalk.errors import InputError, OmnitalkError


def _default_checkpoint() -> str:
    return os.environ.get("OMNITALK_CHECKPOINT") or "checkpoint"


def _synth(name: str):
    from omnitalk.train.tts import EspeakSynth, PiperSynth

    return {"espeak": EspeakSynth, "piper": PiperSynth}[name]()


def _load_codec(args):
    """--snac DIR, else the checkpoint's codec (only when a checkpoint is asked for)."""
    from omnitalk.codec import Codec

    if getattr(args, "snac", None):
        return Codec.from_pretrained(args.snac, device=getattr(args, "device", None) or "cpu")
    return None


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="build and prepare training data (manifests, SNAC codes, features)",
                              description="Build training manifests (JSONL, docs/data-format.md) and prepare them.")
    sub = p.add_subparsers(dest="data_command", metavar="COMMAND")
    sub.required = True

    q = sub.add_parser("prepare", help="SNAC codes for answer audio + cached Whisper/CLIP features",
                       description="Reads MANIFEST, encodes answer_audio (and interrupt listen_audio) into SNAC "
                                   "frames, caches the Whisper encoder output of every question_audio and the CLIP "
                                   "output of every question_image, and writes the completed manifest.")
    q.add_argument("manifest", metavar="MANIFEST")
    q.add_argument("--checkpoint", default=_default_checkpoint(), metavar="DIR",
                   help="model whose Whisper/CLIP/SNAC are used (default: $OMNITALK_CHECKPOINT or ./checkpoint)")
    q.add_argument("--out", required=True, metavar="OUT",
                   help="output folder (manifest + features/), or the output manifest path ending in .jsonl")
    q.add_argument("--cache", default=None, metavar="DIR", help="feature cache folder (default: OUT/features)")
    q.add_argument("--snac", default=None, metavar="DIR", help="a SNAC folder to use instead of the checkpoint's")
    q.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    q.add_argument("--no-download", action="store_true", help="never fetch missing checkpoint files")
    q.add_argument("--no-codes", action="store_true", help="skip SNAC encoding of answer audio")
    q.add_argument("--no-features", action="store_true", help="skip the Whisper/CLIP feature cache")
    q.add_argument("--batch-size", type=int, default=8, metavar="N", help="encoder batch size (default: 8)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(run=run_prepare)

    q = sub.add_parser("librispeech", help="LibriSpeech / LibriTTS folder -> asr manifest",
                       description="Walks ROOT (LibriSpeech: */*/*.trans.txt + *.flac; LibriTTS: *.wav + "
                                   "*.normalized.txt) and writes one 'asr' record per utterance.")
    q.add_argument("root", metavar="ROOT")
    q.add_argument("--out", required=True, metavar="MANIFEST")
    q.add_argument("--lowercase", action="store_true", help="lowercase the transcripts")
    q.add_argument("--limit", type=int, default=None, metavar="N")
    q.set_defaults(run=run_librispeech)

    q = sub.add_parser("voiceassistant", help="VoiceAssistant-400K parquet -> qa manifest (needs pyarrow)",
                       description="Reads the parquet files (columns split_name, index, round, question, "
                                   "question_audio, answer, answer_snac), writes the question audio next to the "
                                   "manifest (audio/) and one spoken 'qa' record per row with its SNAC frames.")
    q.add_argument("parquet", nargs="+", metavar="PARQUET", help="parquet files or folders")
    q.add_argument("--out", required=True, metavar="MANIFEST")
    q.add_argument("--limit", type=int, default=None, metavar="N")
    q.set_defaults(run=run_voiceassistant)

    q = sub.add_parser("world", help="generate the synthetic small world (speech, images, manifests, tokenizer)",
                       description="Arithmetic, counting, colours and shapes in Pillow images, and plain sentences, "
                                   "spoken by varied synthetic voices; answers in one fixed voice. Held-out "
                                   "sentences with held-out voices form eval.jsonl.")
    q.add_argument("--out", required=True, metavar="DIR")
    q.add_argument("--n", type=int, default=2000, metavar="N", help="training records (default: 2000)")
    q.add_argument("--n-eval", type=int, default=200, metavar="N", help="held-out records (default: 200)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--synth", choices=("espeak", "piper"), default="espeak", help="question voices (default: espeak)")
    q.add_argument("--answer-synth", choices=("espeak", "piper"), default=None,
                   help="the model's voice (default: the same engine)")
    q.add_argument("--interrupt", type=int, default=0, metavar="N", help="also N interruption clips for training")
    q.add_argument("--interrupt-eval", type=int, default=0, metavar="N", help="and N held-out interruption clips")
    q.add_argument("--image-size", type=int, default=224)
    q.add_argument("--held-out-fraction", type=float, default=0.15)
    q.add_argument("--speak-written", action="store_true",
                   help="also ask every written training question aloud (an a2t record '<id>-sp')")
    q.add_argument("--answer-prefix", default="", metavar="WORDS",
                   help="answer every question with a phrase, e.g. 'the answer is' -> 'the answer is seven'")
    q.add_argument("--image-layout", choices=("free", "grid"), default="free",
                   help="free: shapes anywhere; grid: one shape per cell of the ViT/32 patch grid (the small recipe)")
    q.add_argument("--snac", default=None, metavar="DIR", help="fill answer_snac now with this SNAC codec")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(run=run_world)

    q = sub.add_parser("interrupt", help="'stop omni' clips with per-frame irq labels",
                       description="Streaming user clips (24 kHz) with the command at a random time among other "
                                   "speech and noise (white/pink/babble at random SNRs), negatives without it, "
                                   "per-SNAC-frame labels (docs/data-format.md).")
    q.add_argument("--out", required=True, metavar="DIR")
    q.add_argument("--n", type=int, default=400, metavar="N")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--synth", choices=("espeak", "piper"), default="espeak")
    q.add_argument("--held-out", action="store_true", help="use the held-out voice settings (an eval set)")
    q.add_argument("--phrases", nargs="+", default=["stop omni"], metavar="TEXT", help="command phrases")
    q.add_argument("--sentences", default=None, metavar="FILE", help="other speech, one sentence per line")
    q.add_argument("--positive-fraction", type=float, default=0.5)
    q.add_argument("--snr", nargs=2, type=float, default=(0.0, 20.0), metavar=("LO", "HI"))
    q.add_argument("--tolerance-frames", type=int, default=1)
    q.add_argument("--snac", default=None, metavar="DIR", help="fill listen_frames now with this SNAC codec")
    q.add_argument("--name", default=None, metavar="FILE", help="manifest name (default: interrupt_train.jsonl "
                                                                "or interrupt_eval.jsonl)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(run=run_interrupt)
    return p


# ---------------------------------------------------------------------------------------------

def _wrap_import(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except ImportError as e:  # an optional extra is missing: say which
            raise OmnitalkError(str(e)) from None
    run.__name__ = fn.__name__
    return run


@_wrap_import
def run_prepare(args) -> int:
    from omnitalk.train.data import FeatureCache, encode_answers, read_manifest, write_manifest

    records = read_manifest(args.manifest)
    out = Path(args.out)
    manifest = out if out.suffix == ".jsonl" else out / Path(args.manifest).name
    if manifest.resolve() == Path(args.manifest).resolve():
        raise InputError("--out would overwrite the input manifest; choose another folder or file name")
    cache_dir = Path(args.cache) if args.cache else manifest.parent / "features"
    progress = not args.quiet
    need_model = not args.no_features or (not args.no_codes and not args.snac)
    model = None
    if need_model:
        from omnitalk.engine import OmniModel

        model = OmniModel.from_pretrained(args.checkpoint, device=args.device, download=not args.no_download)
    report: dict = {"manifest": str(manifest), "records": len(records)}
    if not args.no_codes:
        codec = _load_codec(args) or model.codec
        missing = lambda recs: sum((r.get("answer_audio") is not None and r.get("answer_snac") is None) +
                                   (r.get("listen_audio") is not None and r.get("listen_frames") is None) for r in recs)
        before = missing(records)
        records = encode_answers(records, codec, progress=progress)
        report["snac_encoded"] = before - missing(records)
    if not args.no_features:
        cache = FeatureCache(cache_dir, model)
        has_clip = getattr(model, "clip", None) is not None
        report["features"] = cache.prepare(records, progress=progress, batch_size=args.batch_size,
                                           images=has_clip)
        report["cache_dir"] = str(cache_dir)
        report["encoders"] = {"whisper": cache.encoder_id("audio"),
                              "clip": cache.encoder_id("image") if has_clip else None}
    write_manifest(records, manifest)
    (manifest.parent / (manifest.stem + ".prepare.json")).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


@_wrap_import
def run_librispeech(args) -> int:
    from omnitalk.train.data import read_libri, write_manifest

    records = read_libri(args.root, lowercase=args.lowercase, limit=args.limit)
    write_manifest(records, args.out)
    print(f"{len(records)} asr records -> {args.out}")
    return 0


@_wrap_import
def run_voiceassistant(args) -> int:
    from omnitalk.train.data import iter_voiceassistant, write_manifest

    out = Path(args.out)
    records = list(iter_voiceassistant(args.parquet, out.parent, limit=args.limit))
    write_manifest(records, out)
    print(f"{len(records)} qa records -> {out} (question audio in {out.parent / 'audio'})")
    return 0


@_wrap_import
def run_world(args) -> int:
    from omnitalk.train.world import make_world

    synth = _synth(args.synth)
    answer = _synth(args.answer_synth) if args.answer_synth and args.answer_synth != args.synth else None
    info = make_world(args.out, args.n, args.n_eval, synth, args.seed, answer_synth=answer,
                      held_out_fraction=args.held_out_fraction, image_size=args.image_size, codec=_load_codec(args),
                      n_interrupt_train=args.interrupt, n_interrupt_eval=args.interrupt_eval,
                      speak_written=args.speak_written, answer_prefix=args.answer_prefix,
                      image_layout=args.image_layout, progress=not args.quiet)
    print(json.dumps(info.to_dict(), indent=2))
    return 0


@_wrap_import
def run_interrupt(args) -> int:
    from omnitalk.train.data import write_manifest
    from omnitalk.train.interrupt import InterruptConfig, build_interrupt_set
    from omnitalk.train.tts import VoiceSpace

    synth = _synth(args.synth)
    space = VoiceSpace.piper() if args.synth == "piper" else VoiceSpace.espeak()
    train, held = space.split()
    sentences = None
    if args.sentences:
        sentences = [s.strip() for s in Path(args.sentences).read_text(encoding="utf-8").splitlines() if s.strip()]
    cfg = InterruptConfig(phrases=tuple(args.phrases), positive_fraction=args.positive_fraction,
                          snr_db=tuple(args.snr), tolerance_frames=args.tolerance_frames)
    split = "eval" if args.held_out else "train"
    recs = build_interrupt_set(args.out, args.n, synth, held if args.held_out else train, sentences,
                               codec=_load_codec(args), config=cfg, seed=args.seed, prefix=f"irq-{split}",
                               progress=not args.quiet)
    path = write_manifest(recs, Path(args.out) / (args.name or f"interrupt_{split}.jsonl"))
    pos = sum(1 for r in recs if r["command"])
    print(f"{len(recs)} interrupt records ({pos} with the command) -> {path}")
    return 0
