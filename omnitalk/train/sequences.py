"""Training sequences: one manifest record -> 8 input streams, next-step targets and feature slots.

Pure functions (no model, no files): the features are handed in by the caller.

Record (one JSONL line; the data side documents the manifest format):
    id, task ('asr' | 'qa' | 'text' | 'tts' | 'interrupt'), question_text, question_audio, question_image,
    answer_text, answer_snac ([n, 7] SNAC frames), answer_audio, speak (bool), and for 'interrupt':
    listen_frames ([n, 7] SNAC frames of the user's streaming audio) and labels (n ints, 1 = irq from this
    frame on).

Sequence = the prompt (omnitalk.prompts, the layouts the engine feeds at inference) followed by the
answer region, the steps the model must emit in the generation loop (reference §7.3, §8.3):

    position:  0 ........ P-1 | P ......... P+K-2
    ids:       prompt         | answer steps 0..K-2 (each step is fed back as the next input)
    targets:   -100 ...  s0   | s1 ........ s_{K-1}

Position t's target is what the model must emit at t, i.e. the ids of step t-P+1: the prompt's last
column (`_answer_t` / `_asr`) predicts answer step 0. The last step is only a target, never an input.
Targets hold *local* ids: the text row absolute text ids (the text logit slice starts at 0), audio rows
0..audio_vocab_size-1 (the per-layer logit slices). -100 = no loss.

Answer steps (K of them):
    text row   answer text ids, `_eot`, then `_pad_t` to the end
    audio rows speech answers: the delay pattern `codec.frames_to_layers(answer_snac, K)` — layer j holds
               `_pad_a` at steps 0..j, frame f at step f+1+j, `_eoa` at step n+1+j, `_pad_a` after, so
               K = max(len(text)+1, n+8) and layer 6's `_eoa` (the step that ends generation) is the
               last target; text-only answers: `_pad_a` on every step and no audio loss.

Masks per task:
    qa / text  text loss; audio loss when speak (the spoken + written answer of stage 3)
    asr        speech prompt with `_asr`; text loss only (the transcript)
    tts        text prompt asking for speech (T1A2); audio loss only. The text row of the answer region
               still carries the words being spoken (answer_text, or the question text), as input only:
               the audio follows the text one step behind, as in delayed-parallel decoding.
    `text_loss: false` on a spoken qa / text record: audio loss only — the text row is input. With
               `follow_text_copies` (train config `data.follow_text`) the answer region says another
               answer than the question asks for, in words and speech: the speech must follow the words
               fed on the text row, not the question (as pair decoding feeds it the text branch's words).

Interruption ("Stop Omni", reference §12) — omnitalk's concrete layout, since the release has none:

    The model speaks in one batch item (its usual answer sequence) while a second, *listening* item with
    its own KV cache (no sharing with the speaking item; the author's "additional batch item", M2#45)
    consumes the user's audio as SNAC tokens, streamed in the delay pattern, and emits one status token
    per step on the text row: `n_irq` (keep talking; `layout.n_irq`, id 151942 in the released
    vocabulary) or `irq` (stop; `layout.irq`, id 151941), two of the 59 reserved text specials that
    follow `_asr` (omnitalk.tokens.TEXT_SPECIALS). Its sequence for n user frames
    (T = n+7 columns):

        column c:     0            1 .. n+6
        audio row j:  `_input_a`   frame c-1-j of the user's audio (`_pad_a` outside 0..n-1)
        text row:     `n_irq`      `n_irq`
        text target:  `n_irq`      status of frame c-1: `irq` if labels[min(c-1, n-1)] else `n_irq`

    Column c is fed as soon as user frame c-1 exists (its coarse layer-0 code enters at c, the finer
    codes of earlier frames with it), so the status at column c answers "has the command ended by frame
    c-1?" with no built-in delay; the data side places the 1s in `labels` (e.g. from the frame where
    "stop omni" ends) and the eval side measures the reaction from there. The text input is the
    previous status *as it is at inference*: listening stops at the first `irq`, so every status ever
    fed back is `n_irq`, and training feeds `n_irq` everywhere (teacher-forcing `irq` after the
    transition would train on inputs inference never sees and teach a trivial copy). All columns after
    the command carry `irq` targets, so a late first detection is still trained. Audio rows carry no
    loss (the model does not predict the user's audio). `listen_ids` builds the same columns for a
    whole clip, `listen_column` one column at a time for the session at inference, `status_targets`
    the text targets (an `irq` emitted at column c means: detected when user frame c-1 arrived).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch

from omnitalk import prompts as P
from omnitalk.codec import frames_to_layers
from omnitalk.tokens import TokenLayout

IGNORE = -100
TASKS = ("asr", "qa", "text", "tts", "interrupt")


class Slot(NamedTuple):
    """Encoder features that replace the audio-row embeddings at positions pos..pos+len-1."""
    pos: int
    feats: torch.Tensor   # (L, d_whisper) Whisper encoder output or (50, d_clip) CLIP output
    kind: str             # 'audio' (whisper_adapter) or 'image' (vision_adapter)


@dataclass
class TrainSample:
    ids: torch.Tensor        # (n_streams, T) int64, absolute ids
    targets: torch.Tensor    # (n_streams, T) int64, local ids, IGNORE = no loss
    slots: list[Slot] = field(default_factory=list)
    task: str = "qa"
    id: str = ""

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


class RecordError(ValueError):
    """A manifest record that cannot become a training sample (says which record and why)."""


def _err(record: dict, msg: str) -> RecordError:
    return RecordError(f"record {record.get('id', '?')!r} (task {record.get('task')!r}): {msg}")


def _frames(record: dict, key: str) -> np.ndarray:
    fr = np.asarray(record.get(key), dtype=np.int64)
    if fr.ndim != 2 or fr.shape[1] != 7 or fr.shape[0] == 0:
        raise _err(record, f"{key} must be a non-empty list of [n, 7] SNAC frames, got shape {fr.shape}")
    return fr


def _encode(tokenizer, text: str | None, layout: TokenLayout, record: dict) -> list[int]:
    if not text:
        return []
    ids = list(tokenizer.encode(text))
    if ids and (max(ids) >= layout.text_special_base or min(ids) < 0):
        raise _err(record, f"the tokenizer gives id {max(ids)} but the model's text vocabulary has "
                           f"{layout.text_special_base} ordinary ids (text_vocab_size - n_specials)")
    return ids


# ---- answer region -------------------------------------------------------------------------------
def answer_steps(layout: TokenLayout, text_ids: Sequence[int], frames: np.ndarray | None) -> np.ndarray:
    """The K answer steps (n_streams, K) in *local* ids (audio rows 0..audio_vocab_size-1)."""
    n_text = len(text_ids) + 1  # + `_eot`
    K = n_text if frames is None else max(n_text, frames.shape[0] + layout.n_audio_layers + 1)
    out = np.empty((layout.n_streams, K), dtype=np.int64)
    out[layout.text_stream] = layout.pad_t
    out[layout.text_stream, :n_text] = [*text_ids, layout.eot]
    if frames is None:
        out[:layout.n_audio_layers] = layout.pad_a
    else:
        out[:layout.n_audio_layers] = frames_to_layers(frames, length=K, pad=layout.pad_a, eoa=layout.eoa)
    return out


def _to_absolute(layout: TokenLayout, local: np.ndarray) -> np.ndarray:
    ids = local.copy()
    for j in range(layout.n_audio_layers):
        ids[j] = layout.shift(local[j], j)
    return ids


def assemble(layout: TokenLayout, prompt_ids: np.ndarray, steps: np.ndarray, text_loss: bool,
             audio_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt (S, P) absolute + answer steps (S, K) local -> ids (S, P+K-1), targets (S, P+K-1)."""
    Pn, K = prompt_ids.shape[1], steps.shape[1]
    ids = np.concatenate([prompt_ids, _to_absolute(layout, steps[:, :K - 1])], axis=1)
    targets = np.full(ids.shape, IGNORE, dtype=np.int64)
    if text_loss:
        targets[layout.text_stream, Pn - 1:] = steps[layout.text_stream]
    if audio_loss:
        targets[:layout.n_audio_layers, Pn - 1:] = steps[:layout.n_audio_layers]
    return torch.from_numpy(ids), torch.from_numpy(targets)


# ---- interruption (listening item) ---------------------------------------------------------------
def listen_ids(layout: TokenLayout, frames) -> np.ndarray:
    """The listening item's input columns (n_streams, n+7) for user SNAC frames (n, 7): `_input_a` /
    `n_irq` header, then the frames in the delay pattern (no `_eoa`: the stream does not end), text
    row `n_irq` throughout. See the module docstring."""
    fr = np.asarray(frames, dtype=np.int64).reshape(-1, layout.n_audio_layers)
    n = fr.shape[0]
    local = np.empty((layout.n_streams, n + layout.n_audio_layers), dtype=np.int64)
    local[:layout.n_audio_layers] = frames_to_layers(fr, length=n + layout.n_audio_layers,
                                                     pad=layout.pad_a, eoa=layout.pad_a)
    local[:layout.n_audio_layers, 0] = layout.input_a
    local[layout.text_stream] = layout.n_irq
    return _to_absolute(layout, local)


def listen_column(layout: TokenLayout, frames, c: int) -> np.ndarray:
    """Column c (n_streams,) of the listening item, for streaming: needs user frames 0..c-1 only
    (`frames` may hold more; frames not yet heard count as absent). Equals listen_ids(...)[:, c]."""
    fr = np.asarray(frames, dtype=np.int64).reshape(-1, layout.n_audio_layers)
    local = np.full(layout.n_streams, layout.pad_a, dtype=np.int64)
    if c == 0:
        local[:layout.n_audio_layers] = layout.input_a
    else:
        for j in range(layout.n_audio_layers):
            f = c - 1 - j
            if 0 <= f < min(len(fr), c):
                local[j] = fr[f, j]
    local[layout.text_stream] = layout.n_irq
    return _to_absolute(layout, local[:, None])[:, 0]


def status_targets(layout: TokenLayout, labels: Sequence[int], n_columns: int | None = None) -> np.ndarray:
    """Text targets (n_columns,) of the listening item: column c -> status of frame c-1 (n_irq at 0)."""
    lab = np.asarray(labels, dtype=np.int64)
    n = lab.shape[0]
    T = n + 7 if n_columns is None else n_columns
    frame = np.clip(np.arange(T) - 1, 0, n - 1)
    out = np.where(lab[frame] > 0, layout.irq, layout.n_irq)
    out[0] = layout.n_irq
    return out


def frame_statuses(layout: TokenLayout, column_tokens: Sequence[int], n_frames: int) -> list[int]:
    """The listening item's emitted text tokens per column (T,) -> per user frame 0/1 (1 = irq), the
    form omnitalk.eval.metrics.InterruptionMetrics takes: frame f's status is the token of column f+1."""
    toks = list(column_tokens)
    return [int(f + 1 < len(toks) and toks[f + 1] == layout.irq) for f in range(n_frames)]


def _interrupt_sample(record: dict, layout: TokenLayout) -> TrainSample:
    frames = _frames(record, "listen_frames")
    labels = record.get("labels")
    if labels is None or len(labels) != frames.shape[0]:
        raise _err(record, f"labels must have one entry per listen frame ({frames.shape[0]}), got "
                           f"{None if labels is None else len(labels)}")
    ids = listen_ids(layout, frames)
    targets = np.full(ids.shape, IGNORE, dtype=np.int64)
    targets[layout.text_stream] = status_targets(layout, labels, ids.shape[1])
    return TrainSample(torch.from_numpy(ids), torch.from_numpy(targets), [], "interrupt", str(record.get("id", "")))


# ---- the main entry ------------------------------------------------------------------------------
def _as_tensor(x) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.float() if not t.is_floating_point() else t


def build_sample(record: dict, layout: TokenLayout, tokenizer, audio_feats=None, image_feats=None) -> TrainSample:
    """One record -> TrainSample. audio_feats: Whisper encoder output (L, d) for question_audio;
    image_feats: CLIP output (50, d) for question_image (both before the adapters)."""
    task = record.get("task")
    if task not in TASKS:
        raise _err(record, f"unknown task; use one of {TASKS}")
    if task == "interrupt":
        return _interrupt_sample(record, layout)

    has_audio = record.get("question_audio") is not None or audio_feats is not None
    has_image = record.get("question_image") is not None or image_feats is not None
    if has_audio and audio_feats is None:
        raise _err(record, f"question_audio {record.get('question_audio')!r} needs its Whisper features")
    if has_image and image_feats is None:
        raise _err(record, f"question_image {record.get('question_image')!r} needs its CLIP features")
    q_ids = _encode(tokenizer, record.get("question_text"), layout, record)
    a_ids = _encode(tokenizer, record.get("answer_text"), layout, record)
    speak = bool(record.get("speak", False)) or task == "tts"
    if task == "asr" and speak:
        raise _err(record, "ASR answers in text (speak must be false)")
    if speak and record.get("answer_snac") is None:
        raise _err(record, "a spoken answer needs answer_snac (SNAC frames; `omnitalk data` makes them)")
    frames = _frames(record, "answer_snac") if speak else None

    if task == "asr":
        if not has_audio or has_image or q_ids:
            raise _err(record, "ASR takes question audio alone")
        if not a_ids:
            raise _err(record, "ASR needs answer_text (the transcript)")
        prompt = P.speech_prompt(layout, int(audio_feats.shape[0]), speak=False, task="asr")
        text_loss, audio_loss = True, False
    elif task == "tts":
        if has_audio or has_image or not q_ids:
            raise _err(record, "TTS takes question_text alone (the words to speak)")
        prompt = P.text_prompt(layout, q_ids, speak=True)
        a_ids = a_ids or q_ids
        text_loss, audio_loss = False, True
    else:  # qa / text: the question's modalities decide the layout
        if not a_ids:
            raise _err(record, "needs answer_text")
        if has_image and has_audio:
            prompt = P.image_speech_prompt(layout, int(audio_feats.shape[0]), speak,
                                           n_image=int(image_feats.shape[0]), text_ids=q_ids or None)
        elif has_image:
            prompt = P.image_text_prompt(layout, q_ids, speak, n_image=int(image_feats.shape[0]))
        elif has_audio:
            prompt = P.speech_prompt(layout, int(audio_feats.shape[0]), speak, "qa", text_ids=q_ids or None)
        elif q_ids:
            prompt = P.text_prompt(layout, q_ids, speak)
        else:
            raise _err(record, "has no question (text, audio or image)")
        text_loss, audio_loss = True, speak
        if record.get("text_loss") is False:
            if not speak:
                raise _err(record, "text_loss: false leaves nothing to learn without a spoken answer "
                                   "(set speak: true with answer_snac, or drop text_loss)")
            text_loss = False

    steps = answer_steps(layout, a_ids, frames)
    ids, targets = assemble(layout, prompt.ids, steps, text_loss, audio_loss)
    slots = []
    if prompt.image_pos is not None:
        slots.append(Slot(prompt.image_pos, _as_tensor(image_feats), "image"))
    if prompt.audio_pos is not None:
        slots.append(Slot(prompt.audio_pos, _as_tensor(audio_feats), "audio"))
    return TrainSample(ids, targets, slots, task, str(record.get("id", "")))


def follow_text_copies(records: Sequence[dict], share: float, seed: int = 0) -> list[tuple[int, dict]]:
    """Copies of a `share` of the spoken question answers (task qa, speak, answer_snac; chosen by a
    seeded draw per id) that say *another* answer of the set, words and speech together, with
    `text_loss: false` and id '<id>-ft': the speech learns to follow the text row (see the module
    docstring) and the text head is not taught a wrong answer. Returns (index of the original in
    `records`, copy) pairs."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"follow_text share must be in [0, 1], got {share!r}")
    spoken = [(i, r) for i, r in enumerate(records) if r.get("task") == "qa" and r.get("speak")
              and r.get("answer_snac") is not None and r.get("text_loss", True) is not False]
    said: dict = {}
    for _, r in spoken:
        said.setdefault(r["answer_text"], r)
    texts = sorted(said)
    if share == 0.0 or len(texts) < 2:
        return []
    out = []
    for i, r in spoken:
        rng = random.Random(f"follow-text:{seed}:{r.get('id')}")
        if rng.random() >= share:
            continue
        src = said[rng.choice([t for t in texts if t != r["answer_text"]])]
        out.append((i, {**r, "id": f"{r.get('id')}-ft", "answer_text": src["answer_text"],
                        "answer_snac": src["answer_snac"], "answer_audio": src.get("answer_audio"),
                        "text_loss": False}))
    return out


def text_only(record: dict) -> dict | None:
    """The same record answering in text only (stage 1/2 policy); TTS records are dropped (None)."""
    if record.get("task") == "tts":
        return None
    if record.get("speak"):
        return {**record, "speak": False}
    return record


# ---- batching ------------------------------------------------------------------------------------
@dataclass
class Batch:
    ids: torch.Tensor            # (B, S, T) int64
    targets: torch.Tensor        # (B, S, T) int64, IGNORE on padding
    lengths: torch.Tensor        # (B,) int64, unpadded lengths
    audio_feats: torch.Tensor    # (Na, d_whisper) the audio slots of all items, concatenated
    audio_index: torch.Tensor    # (Na, 2) int64: (item, position) of each row of audio_feats
    image_feats: torch.Tensor    # (Ni, d_clip)
    image_index: torch.Tensor    # (Ni, 2)
    tasks: list[str]
    ids_of: list[str] = field(default_factory=list)

    def to(self, device) -> "Batch":
        mv = lambda t: t.to(device, non_blocking=True)
        return Batch(mv(self.ids), mv(self.targets), self.lengths, mv(self.audio_feats), mv(self.audio_index),
                     mv(self.image_feats), mv(self.image_index), self.tasks, self.ids_of)

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])


def _pad_column(layout: TokenLayout) -> torch.Tensor:
    col = torch.tensor([layout.shift(layout.pad_a, j) for j in range(layout.n_audio_layers)] + [layout.pad_t])
    return col  # (S,)


def _cat_slots(samples: Sequence[TrainSample], kind: str, dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    feats, index = [], []
    for b, s in enumerate(samples):
        for slot in s.slots:
            if slot.kind != kind:
                continue
            n = slot.feats.shape[0]
            feats.append(slot.feats.float())
            index.append(torch.stack([torch.full((n,), b), torch.arange(slot.pos, slot.pos + n)], 1))
    if not feats:
        return torch.zeros(0, dim or 0), torch.zeros(0, 2, dtype=torch.int64)
    return torch.cat(feats), torch.cat(index).long()


def collate(samples: Sequence[TrainSample], layout: TokenLayout, pad_to_multiple: int = 8,
            audio_dim: int | None = None, image_dim: int | None = None) -> Batch:
    """Right-pad to a common length (a multiple of `pad_to_multiple`): pad ids `_pad_a`/`_pad_t`, targets
    IGNORE. The causal model never lets padding influence earlier positions. audio_dim / image_dim give the
    empty feature tensors their width when no item has that kind of slot."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    T = max(s.length for s in samples)
    m = max(1, pad_to_multiple)
    T = -(-T // m) * m
    S = layout.n_streams
    ids = _pad_column(layout).view(1, S, 1).repeat(len(samples), 1, T)
    targets = torch.full((len(samples), S, T), IGNORE, dtype=torch.int64)
    for b, s in enumerate(samples):
        ids[b, :, :s.length] = s.ids
        targets[b, :, :s.length] = s.targets
    af, ai = _cat_slots(samples, "audio", audio_dim)
    vf, vi = _cat_slots(samples, "image", image_dim)
    return Batch(ids, targets, torch.tensor([s.length for s in samples]), af, ai, vf, vi,
                 [s.task for s in samples], [s.id for s in samples])


def length_buckets(lengths: Sequence[int], batch_tokens: int, order: Sequence[int] | None = None,
                   pad_to_multiple: int = 8, max_batch: int | None = None) -> list[list[int]]:
    """Group sample indices into batches whose padded size (count x longest, rounded up to
    pad_to_multiple) stays within batch_tokens. Indices are taken in `order` (default 0..n-1), stably
    sorted by length so that similar lengths share a batch; a sample longer than batch_tokens forms a
    batch of its own. The caller shuffles the batch order."""
    order = list(range(len(lengths))) if order is None else list(order)
    m = max(1, pad_to_multiple)
    padded = lambda n: -(-int(n) // m) * m
    order.sort(key=lambda i: lengths[i])  # stable: ties keep the given (shuffled) order
    batches, cur, cur_max = [], [], 0
    for i in order:
        L = padded(lengths[i])
        new_max = max(cur_max, L)
        if cur and (new_max * (len(cur) + 1) > batch_tokens or (max_batch and len(cur) >= max_batch)):
            batches.append(cur)
            cur, new_max = [], L
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches

