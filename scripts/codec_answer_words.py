#!/usr/bin/env python3
"""Can a listener hear the demo's spoken answers through a codec? The answers are single words or
short phrases ("five", "purple"); this speaks each distinct spoken answer of a world manifest in the
model's voice, passes it through the codec (encode, decode with noise off) and transcribes original and
decoded audio with the independent recogniser (Whisper tiny.en, the `eval` extra).

    python scripts/codec_answer_words.py omnitalk/demo_model/snac runs/demo-world/eval.jsonl
    python scripts/codec_answer_words.py runs/codec-piper/final runs/demo-world/eval.jsonl --synth piper

The demo model reproduces its target codes frame for frame when its text answer is right
(`omnitalk eval qa --speech`: every audio layer matches as often as the first), so the share of
decoded answers heard right here bounds the share of its spoken answers a listener hears right.
Prints a table and writes --out JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("codec", type=Path, help="a codec folder (config.json + model.safetensors)")
    ap.add_argument("manifest", type=Path, help="a world manifest (eval.jsonl): its spoken answers are used")
    ap.add_argument("--synth", choices=("espeak", "piper"), default="espeak", help="the model's voice")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from omnitalk.codec import Codec
    from omnitalk.eval.metrics import IndependentRecognizer
    from omnitalk.eval.normalize import EnglishTextNormalizer
    from omnitalk.train.data import read_manifest
    from omnitalk.train.tts import MODEL_VOICE_ESPEAK, MODEL_VOICE_PIPER, EspeakSynth, PiperSynth, synth_to

    answers = sorted({r["answer_text"] for r in read_manifest(args.manifest)
                      if r.get("speak") and r["task"] in ("qa", "text")})
    if not answers:
        raise SystemExit(f"{args.manifest} has no spoken qa answers (records with speak: true)")
    synth, voice = (PiperSynth(), MODEL_VOICE_PIPER) if args.synth == "piper" else (EspeakSynth(), MODEL_VOICE_ESPEAK)
    codec, asr, norm = Codec.from_pretrained(args.codec), IndependentRecognizer(), EnglishTextNormalizer()
    rows = []
    for text in answers:
        wav = synth_to(synth, text, voice, codec.sample_rate)
        decoded = codec.decode(codec.encode(wav), noise=False).numpy()
        heard = {k: asr.transcribe(x, sr=codec.sample_rate) for k, x in (("original", wav), ("decoded", decoded))}
        rows.append({"answer": text, **heard, **{f"{k}_right": norm(v) == norm(text) for k, v in heard.items()}})
    report = {"codec": str(args.codec), "synth": args.synth, "answers": len(rows),
              "original_right": sum(r["original_right"] for r in rows) / len(rows),
              "decoded_right": sum(r["decoded_right"] for r in rows) / len(rows), "items": rows}
    w = max(len(r["answer"]) for r in rows)
    for r in rows:
        print(f"{r['answer']:<{w}}  original {'ok ' if r['original_right'] else 'no '}{r['original']!r:<28} "
              f"decoded {'ok ' if r['decoded_right'] else 'no '}{r['decoded']!r}")
    print(f"heard right: original {report['original_right']:.1%}, decoded {report['decoded_right']:.1%} "
          f"of {len(rows)} answers ({args.synth} voice, {args.codec})")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
