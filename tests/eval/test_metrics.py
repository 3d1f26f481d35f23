"""WER, exact match, speech-token agreement, spoken-vs-text agreement."""
import numpy as np
import pytest

from omnitalk.eval.metrics import agreement, codebook_match, corpus_wer, edit_ops, exact_match, first_irq, wer


def test_wer_known_examples():
    assert wer("the cat sat", "the cat sat down") == pytest.approx(1 / 3)
    assert wer("the cat sat", "the cat sat") == 0.0
    assert wer("the cat sat", "a cat") == pytest.approx(2 / 3)   # 1 substitution + 1 deletion
    assert wer("the cat sat", "") == 1.0
    assert wer("", "") == 0.0 and wer("", "noise") == float("inf")
    assert wer("Seven.", "7") == 0.0                               # normalised by default
    assert wer("Seven.", "7", normalizer=None) == 1.0


def test_edit_ops_counts():
    assert edit_ops("a b c d".split(), "a x c d e".split()) == (3, 1, 0, 1)
    assert edit_ops("a b c".split(), "c".split()) == (1, 0, 2, 0)
    assert edit_ops([], ["a", "b"]) == (0, 0, 0, 2)
    h, s, d, i = edit_ops("the quick brown fox".split(), "quick brown the fox".split())
    assert s + d + i == 2 and h == 3


def test_corpus_wer_is_total_errors_over_total_words():
    r = corpus_wer(["the cat sat", "hello world", "a b c d e f"], ["the cat sat down", "hello", "a b c d e f"])
    assert (r.errors, r.ref_words, r.insertions, r.deletions, r.n) == (2, 11, 1, 1, 3)
    assert r.wer == pytest.approx(2 / 11)  # not the mean of 1/3, 1/2, 0
    with pytest.raises(ValueError):
        corpus_wer(["a"], [])


def test_exact_match_and_agreement():
    assert exact_match(["seven", "Red.", "circle"], ["7", "red", "square"]) == pytest.approx(2 / 3)
    assert exact_match([], []) == 1.0
    res = agreement(["three plus four is seven"], ["three plus four is 7"])
    assert res.wer == 0.0
    assert agreement(["the red sky"], ["the red star"]).wer == pytest.approx(1 / 3)


def test_codebook_match():
    t = np.arange(35).reshape(5, 7)
    p = t.copy()
    p[1, 0] = 99
    assert codebook_match(p, t) == (4, 5)
    assert codebook_match(p[:3], t) == (2, 5)            # missing frames count as misses
    assert codebook_match(np.vstack([t, t]), t) == (5, 10)  # so do extra ones
    assert codebook_match([], t) == (0, 5)
    p[2, 3] = 0
    assert codebook_match(p, t, layer=3) == (4, 5)


def test_first_irq():
    assert first_irq([0, 0, 1, 0]) == 2 and first_irq([0, 0]) is None and first_irq([False, True]) == 1
    assert first_irq([7, 7, 9], irq=9) == 2
