"""Evaluation: text normalisation, WER and other metrics, and the `omnitalk eval` commands.

    from omnitalk.eval.metrics import wer, corpus_wer, exact_match, InterruptionMetrics
    from omnitalk.eval.normalize import EnglishTextNormalizer

Importing this package is cheap; the independent recogniser (faster-whisper) loads only when used.
"""
from omnitalk.eval.metrics import (InterruptionMetrics, WERResult, agreement, codebook_match, corpus_wer,
                                   exact_match, wer)
from omnitalk.eval.normalize import EnglishTextNormalizer, normalize

__all__ = ["EnglishTextNormalizer", "normalize", "wer", "corpus_wer", "WERResult", "exact_match", "codebook_match",
           "agreement", "InterruptionMetrics"]
