"""Prompt builders: one pure function per task, returning the 8 token streams and the feature slots.

No model, no I/O: a builder takes token ids / lengths and returns a `Prompt`. Layouts 1-7 reproduce the
official builders id for id (reference doc §4.1); the image+text, captioning and image+speech+text layouts
were never released and follow the paper's input-id figure (see `image_text`).

Rows 0..6 are audio layers (absolute ids, `layout.shift(local, layer)`), row 7 is text.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omnitalk.tokens import TokenLayout

N_IMAGE_TOKENS = 50  # CLIP ViT-B/32: class token + 7x7 patches


@dataclass(frozen=True)
class Prompt:
    ids: np.ndarray            # (n_streams, T) int64, absolute ids
    audio_pos: int | None = None  # first position whose audio rows take Whisper frames
    audio_len: int = 0
    image_pos: int | None = None  # first position whose audio rows take CLIP tokens
    image_len: int = 0
    speaks: bool = False       # the last column asks for a spoken answer (`_answer_a`)

    @property
    def length(self) -> int:
        return self.ids.shape[1]


def _columns(layout: TokenLayout, audio_local: list[int], text: list[int]) -> np.ndarray:
    """Stack per-position audio (local ids, same on every layer) and text ids into (n_streams, T)."""
    assert len(audio_local) == len(text)
    local = np.asarray(audio_local, dtype=np.int64)
    rows = [local + layout.audio_offset(j) for j in range(layout.n_audio_layers)]
    rows.append(np.asarray(text, dtype=np.int64))
    return np.stack(rows)


def _answer(L: TokenLayout, speak: bool, task: str) -> tuple[int, int]:
    """The last column: (audio local id, text id)."""
    return (L.answer_a if speak else L.pad_a), (L.asr if task == "asr" else L.answer_t)


# ---- text in ------------------------------------------------------------------------------
def text_prompt(L: TokenLayout, text_ids: list[int], speak: bool) -> Prompt:
    """T1A2 (speak=True) / T1T2 (speak=False): `_input_t`, text, `_eot`, `_answer_t`; audio rows pads."""
    n = len(text_ids)
    a_last, t_last = _answer(L, speak, "qa")
    audio = [L.pad_a] * (n + 2) + [a_last]
    text = [L.input_t, *text_ids, L.eot, t_last]
    return Prompt(_columns(L, audio, text), speaks=speak)


# ---- speech in ----------------------------------------------------------------------------
def speech_prompt(L: TokenLayout, n_frames: int, speak: bool, task: str = "qa",
                  text_ids: list[int] | None = None) -> Prompt:
    """A1A2 (speak) / A1T2 / ASR (task='asr'): audio rows `_input_a`, n_frames feature slots, `_eoa`.

    With `text_ids` (our extension, speech + typed text) a text segment `_input_t`, ids, `_eot` with
    `_pad_a` on the audio rows follows the speech, before the answer column.
    """
    if task not in ("qa", "asr"):
        raise ValueError(f"unknown speech task {task!r}: use 'qa' or 'asr'")
    if task == "asr" and (speak or text_ids):
        raise ValueError("the ASR task takes speech alone and answers in text (speak=False)")
    a_last, t_last = _answer(L, speak, task)
    audio = [L.input_a] + [L.pad_a] * n_frames + [L.eoa]
    text = [L.input_t] + [L.pad_t] * n_frames + [L.eot]
    if text_ids:
        audio += [L.pad_a] * (len(text_ids) + 2)
        text += [L.input_t, *text_ids, L.eot]
    audio.append(a_last)
    text.append(t_last)
    return Prompt(_columns(L, audio, text), audio_pos=1, audio_len=n_frames, speaks=speak)


# ---- image in -----------------------------------------------------------------------------
def _image_block(L: TokenLayout, n_image: int) -> tuple[list[int], list[int]]:
    return [L.image] + [L.pad_a] * n_image + [L.eoimage], [L.pad_t] * (n_image + 2)


def image_speech_prompt(L: TokenLayout, n_frames: int, speak: bool, n_image: int = N_IMAGE_TOKENS,
                        text_ids: list[int] | None = None) -> Prompt:
    """ImageQA_A (speak) / ImageQA_AT: `_image`, 50 CLIP slots, `_eoimage`, `_input_a`, frames, `_eoa`.

    The text row holds only `_pad_t` up to the answer column (as released). Quirk Q2 of the release: the
    Whisper frames go to positions 52..51+L, i.e. frame 0 overwrites the `_input_a` slot and the last
    `_pad_a` slot keeps its embedding; we keep that offset because the released weights were run with it.
    With `text_ids`, a typed question follows the spoken one (image+speech+text, our extension): a
    text segment `_input_t`, ids, `_eot` with `_pad_a` on the audio rows, before the answer column.
    """
    audio, text = _image_block(L, n_image)
    audio += [L.input_a] + [L.pad_a] * n_frames + [L.eoa]
    text += [L.pad_t] * (n_frames + 2)
    if text_ids:
        audio += [L.pad_a] * (len(text_ids) + 2)
        text += [L.input_t, *text_ids, L.eot]
    a_last, t_last = _answer(L, speak, "qa")
    audio.append(a_last)
    text.append(t_last)
    return Prompt(_columns(L, audio, text), audio_pos=n_image + 2, audio_len=n_frames,
                  image_pos=1, image_len=n_image, speaks=speak)


def image_text_prompt(L: TokenLayout, text_ids: list[int], speak: bool = False,
                      n_image: int = N_IMAGE_TOKENS) -> Prompt:
    """Image + typed question (ImageQA_T) and, with no question, image captioning (ImageCAP).

    Not in the release; our layout follows the paper's figure (b) "Visual-QA[Text]": the image block on
    the audio rows (`_image`, 50 CLIP slots, `_eoimage`, text row `_pad_t`), then the question as an
    ordinary text segment (`_input_t`, ids, `_eot`, audio rows `_pad_a`), then the answer column.
    Captioning is the same layout with an empty question.
    """
    audio, text = _image_block(L, n_image)
    audio += [L.pad_a] * (len(text_ids) + 2)
    text += [L.input_t, *text_ids, L.eot]
    a_last, t_last = _answer(L, speak, "qa")
    audio.append(a_last)
    text.append(t_last)
    return Prompt(_columns(L, audio, text), image_pos=1, image_len=n_image, speaks=speak)


def batch_pair(L: TokenLayout, build, *args, **kwargs) -> list[Prompt]:
    """The release's batch-parallel pair: item 0 asks for speech, item 1 for text only (same input)."""
    return [build(L, *args, speak=True, **kwargs), build(L, *args, speak=False, **kwargs)]
