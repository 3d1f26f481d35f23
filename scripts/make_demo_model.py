#!/usr/bin/env python3
"""Build the embedded demo model (`omnitalk/demo_model/`, docs/demo-model.md) from a training-recipe run.

    omnitalk train-codec configs/codec-piper-answers.yaml             # the demo's codec (docs/demo-model.md)
    python scripts/train_small.py --preset demo_piper                 # the small model, speaking with it
    python scripts/make_demo_model.py runs/demo-piper                 # -> omnitalk/demo_model/

What it writes: the recipe's final export in omnitalk's safetensors layout (`omnitalk.safetensors` with
the LLM, its adapters and the CTC head in int8 or fp32, the Whisper and CLIP encoders in fp32 or fp16;
`model_config.yaml`,
`tokenizer.json`), the codec as `snac/config.json` + `snac/model.safetensors` (float16 weights by
default, loaded into float32), the bundled question
(`question.wav`: "what color is the circle", espeak-ng in a voice setting held out of training, 16 kHz)
and picture (`scene.png`, drawn like the world's pictures), and `card.json`: the run's measured numbers
and sizes. It then loads the folder through the engine and answers the bundled question as a check, and
refuses a result over --max-mb (the package's budget, 40 MB).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION_TEXT = "what color is the circle"
SCENE_ITEMS = (("circle", "red"), ("square", "blue"), ("triangle", "green"))
SEED = 6


def make_question(path: Path, seed: int = SEED) -> dict:
    """The bundled question in a held-out voice setting of the world (never heard in training)."""
    import soundfile as sf

    from omnitalk.train.tts import EspeakSynth, VoiceSpace, synth_to

    _, held_out = VoiceSpace.espeak().split()
    voice = held_out.sample(random.Random(seed))
    x = synth_to(EspeakSynth(), QUESTION_TEXT, voice, 16000)
    sf.write(path, x, 16000, subtype="PCM_16")
    return {"text": QUESTION_TEXT, "voice": voice.to_dict(), "seconds": round(len(x) / 16000, 2)}


def make_scene(path: Path, size: int = 224, seed: int = SEED, layout: str = "free") -> dict:
    """The bundled picture, drawn like the run's world draws its pictures (`layout`: its image_layout)."""
    from omnitalk.train.world import Scene, draw_scene, place

    rng = random.Random(seed)
    scene = place(Scene(), list(SCENE_ITEMS), size, rng, layout)
    draw_scene(scene, size, rng).save(path, optimize=True)
    return {"items": [list(i[:2]) for i in scene.items], "size": size, "layout": layout,
            "answer": dict(SCENE_ITEMS)["circle"]}


def copy_codec(src: Path, dst: Path) -> None:
    """config.json + model.safetensors (omnitalk train-codec's files; a .bin is converted)."""
    import torch
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "config.json", dst / "config.json")
    if (src / "model.safetensors").is_file():
        shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
    else:
        sd = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, dst / "model.safetensors")


def halve(path: Path, prefixes: tuple[str, ...] = ("",)) -> None:
    """Rewrite the safetensors file at `path` with its floating tensors whose names start with one of
    `prefixes` in float16 (the rest and the file's metadata as they are)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v.half() if k.startswith(prefixes) and v.is_floating_point() else v
               for k, v in sd.items()}, str(path), metadata=meta)


def halve_codec(folder: Path) -> None:
    """Store the codec's weights in float16 (half the bytes; `Codec.from_pretrained` loads them into the
    float32 model, so it runs in float32 as trained; the rounding moves its decoded audio by ~1e-3 of
    full scale)."""
    halve(folder / "model.safetensors")


def halve_encoders(folder: Path) -> None:
    """Store the Whisper and CLIP encoders of our safetensors file in float16 (the engine loads them into
    float32 and runs them so); the LLM part and the file's metadata stay as they are."""
    from omnitalk.checkpoint import OURS

    halve(folder / OURS, ("whisper.", "clip."))


def check_same_codes(run_codec: Path, codec: Path) -> None:
    """A codec shipped with a model must give every audio the codes the model was trained on: its encoder
    and codebooks must equal the run's (`train_part: decoder` keeps them)."""
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "model.safetensors")) for d in (run_codec, codec))
    keys = [k for k in a if k.startswith(("encoder.", "quantizer."))]
    differ = [k for k in keys if k not in b or not torch.equal(a[k], b[k])]
    if not keys or differ:
        raise SystemExit(f"--codec {codec}: its encoder/codebooks differ from the run's codec {run_codec} "
                         f"({len(differ)} of {len(keys)} tensors, e.g. {differ[:2]}); the model would hear and "
                         "speak other codes. Fine-tune the run's codec with train_part: decoder")


def choose_stop_detector(report: dict, tokenizer_json: Path, command: str = "stop omni") -> str:
    """How `omnitalk serve` listens for the stop command. When the run measured both detectors on its
    held-out clips (train_small.py does when the world taught ASR the command): the one with the higher
    F1, the fewer false interruptions on a tie. Otherwise 'listening' when its numbers are good enough
    to trust or when the model's ASR cannot write the command at all (its words are not in the world's
    vocabulary); else 'asr'."""
    m = report.get("summary") or {}
    f1, false = m.get("interrupt_f1"), m.get("false_interruption_rate")
    if m.get("asr_stop_f1") is not None and f1 is not None:
        asr_key = (m["asr_stop_f1"], -m["asr_stop_false_rate"])
        return "asr" if asr_key > (f1, -(false or 0.0)) else "listening"
    from omnitalk.tokenizer import TextTokenizer

    trusted = f1 is not None and false is not None and f1 >= 0.9 and false <= 0.05
    return "listening" if trusted or not TextTokenizer(tokenizer_json).can_write(command) else "asr"


def n_weights(module) -> int:
    """Numbers in a module's state (int8 weights are buffers, not parameters); tied tables once."""
    seen, n = set(), 0
    for t in module.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel()
    return n


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a train_small.py output folder (report.json, stage3/final)")
    ap.add_argument("--out", type=Path, default=ROOT / "omnitalk" / "demo_model")
    ap.add_argument("--mode", choices=("fp32", "int8"), default="int8",
                    help="how the LLM and adapters are stored")
    ap.add_argument("--encoder-dtype", choices=("fp32", "fp16"), default="fp32",
                    help="how the Whisper and CLIP encoders are stored (fp16: half the bytes; loaded into fp32 "
                         "and run so)")
    ap.add_argument("--codec-dtype", choices=("fp32", "fp16"), default="fp16",
                    help="how the codec's weights are stored (default fp16: it is loaded into fp32 and runs so)")
    ap.add_argument("--max-mb", type=float, default=40.0)
    ap.add_argument("--codec", type=Path, default=None,
                    help="ship this codec folder instead of the run's (e.g. runs/codec-demo-gan/final, the run's "
                         "codec with a fine-tuned decoder); its encoder and codebooks must equal the run's")
    ap.add_argument("--stop-detector", choices=("asr", "listening"), default=None,
                    help="what `omnitalk serve` listens for 'stop omni' with (written to model_config.yaml); "
                         "default: the model's ASR when its vocabulary can write the command and the listening "
                         "item measured below F1 0.9 or above 5 %% false interruptions, else the listening item")
    args = ap.parse_args(argv)

    from omnitalk import checkpoint as ckpt_io
    from omnitalk.engine import OmniModel

    report = json.loads((args.run / "report.json").read_text())
    final = Path(report["final"])
    final = final if final.is_absolute() else ROOT / final
    tmp = args.out.with_name(args.out.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt_io.convert(final, tmp, mode=args.mode)
    if args.encoder_dtype == "fp16":
        halve_encoders(tmp)
    shutil.rmtree(tmp / "snac", ignore_errors=True)
    copy_codec(final / "snac", tmp / "snac")
    if args.codec is not None:
        check_same_codes(tmp / "snac", args.codec)
        copy_codec(args.codec, tmp / "snac")
    if args.codec_dtype == "fp16":
        halve_codec(tmp / "snac")
    detector = args.stop_detector or choose_stop_detector(report, tmp / "tokenizer.json")
    cfg_path = tmp / "model_config.yaml"
    cfg_path.write_text(cfg_path.read_text() + f"stop_detector: {detector}\n")
    question = make_question(tmp / "question.wav")
    scene = make_scene(tmp / "scene.png", layout=report.get("world", {}).get("image_layout", "free"))

    model = OmniModel.from_pretrained(tmp, download=False, mode=args.mode)
    reply = model.generate(audio=str(tmp / "question.wav"), image=str(tmp / "scene.png"), max_tokens=64,
                           snac_seed=0)
    total = size_mb(tmp)
    card = {
        "name": "omnitalk-demo", "source_run": str(args.run), "llm_storage": args.mode,
        "encoder_storage": args.encoder_dtype,
        "size_mb": round(total, 1), "files_mb": {str(f.relative_to(tmp)): round(f.stat().st_size / 1e6, 2)
                                                  for f in sorted(tmp.rglob("*")) if f.is_file()},
        "parameters": {"llm": n_weights(model.lm), "whisper": n_weights(model.whisper),
                       "clip": n_weights(model.clip) if model.clip is not None else 0,
                       "codec": n_weights(model.codec.model)},
        "stop_detector": detector,
        "question": question, "scene": scene, "answer_to_bundled_question": reply.text,
        "measured": {k: report.get(k) for k in ("summary", "met")},
        "timing": {k: report.get("timing", {}).get(k) for k in ("train_wall_s", "total_wall_s")},
    }
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    total = size_mb(tmp)
    print(json.dumps({k: card[k] for k in ("size_mb", "parameters", "answer_to_bundled_question")}, indent=2))
    if total > args.max_mb:
        print(f"make_demo_model: {total:.1f} MB is over the {args.max_mb:.0f} MB budget; use --mode int8 or a "
              f"smaller recipe (left in {tmp})", file=sys.stderr)
        return 1
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"wrote {args.out} ({total:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
