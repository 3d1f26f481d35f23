"""Prompt builders against the official input ids (pure: no model)."""
from pathlib import Path

import numpy as np
import pytest

from omnitalk import prompts as P
from omnitalk.config import preset
from omnitalk.tokens import TokenLayout

FIX = Path(__file__).resolve().parent / "fixtures" / "parity" / "expected"
L = TokenLayout.from_config(preset("mini-omni2"))
PROMPT_IDS = [880, 761, 259, 925, 399, 922, 31]  # prompt.txt with the fixture tokenizer
N_FRAMES = 149


def ids(prompts):
    return np.stack([p.ids for p in prompts])


@pytest.mark.parametrize("task, build", [
    ("T1T2", lambda: [P.text_prompt(L, PROMPT_IDS, speak=False)]),
    ("T1A2", lambda: [P.text_prompt(L, PROMPT_IDS, speak=True)]),
    ("A1T2", lambda: [P.speech_prompt(L, N_FRAMES, speak=False)]),
    ("ASR", lambda: [P.speech_prompt(L, N_FRAMES, speak=False, task="asr")]),
    ("A1A2", lambda: [P.speech_prompt(L, N_FRAMES, speak=True)]),
    ("AA_AT_batch", lambda: P.batch_pair(L, P.speech_prompt, N_FRAMES)),
    ("ImageQA_batch", lambda: P.batch_pair(L, P.image_speech_prompt, N_FRAMES)),
])
def test_official_layouts(task, build):
    assert np.array_equal(ids(build()), np.load(FIX / task / "input_ids.npy"))


def test_feature_slots():
    p = P.speech_prompt(L, 10, speak=True)
    assert (p.audio_pos, p.audio_len, p.image_pos, p.length, p.speaks) == (1, 10, None, 13, True)
    q = P.image_speech_prompt(L, 10, speak=False)
    # quirk Q2: the audio frames start on the `_input_a` slot (52), not after it
    assert (q.image_pos, q.image_len, q.audio_pos, q.audio_len) == (1, 50, 52, 10)
    assert q.ids[0, 52] == L.shift(L.input_a, 0) and q.ids[0, 51] == L.shift(L.eoimage, 0)


def test_image_text_and_caption_layouts():
    p = P.image_text_prompt(L, [5, 6], speak=False)
    audio, text = p.ids[0] - L.audio_offset(0), p.ids[7]
    assert list(audio) == [L.image] + [L.pad_a] * 50 + [L.eoimage] + [L.pad_a] * 5
    assert list(text) == [L.pad_t] * 52 + [L.input_t, 5, 6, L.eot, L.answer_t]
    cap = P.image_text_prompt(L, [], speak=True)
    assert list(cap.ids[7, 52:]) == [L.input_t, L.eot, L.answer_t]
    assert cap.ids[6, -1] == L.shift(L.answer_a, 6)


def test_image_speech_text_layout():
    p = P.image_speech_prompt(L, 3, speak=True, text_ids=[9])
    text = list(p.ids[7])
    assert text[-4:] == [L.input_t, 9, L.eot, L.answer_t]
    assert p.length == 52 + 3 + 2 + 3 + 1 and p.audio_pos == 52


def test_every_audio_row_is_the_same_local_sequence():
    p = P.image_speech_prompt(L, 4, speak=True, text_ids=[1, 2])
    local = p.ids[:7] - np.array([L.audio_offset(j) for j in range(7)])[:, None]
    assert (local == local[0]).all()


def test_asr_cannot_speak():
    with pytest.raises(ValueError, match="ASR"):
        P.speech_prompt(L, 4, speak=True, task="asr")
    with pytest.raises(ValueError, match="unknown speech task"):
        P.speech_prompt(L, 4, speak=False, task="translate")
