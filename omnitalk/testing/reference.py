"""An official-style Mini-Omni2 inference stack, written independently of omnitalk's engine.

Two uses:

* the oracle that writes the `expected/` files of generated parity fixtures (make_fixture.py), so that
  the checker compares our engine against something that is *not* our engine;
* the naive baseline of the benchmark: it does the work the way the release does it.

What is deliberately naive / release-like here:

* float32 everywhere; a `block_size`-slot (2048) key/value cache per layer written with `index_copy_`;
  keys and values expanded to every query head *before* they are cached (as the release does whenever
  n_query_groups is neither n_head nor 1; with a single group it caches that one head and lets attention
  broadcast it, as the release does);
* attention always spans all cache slots with a boolean mask whose rows are picked from a
  block_size x block_size lower-triangular matrix;
* the output head is applied to every position of every batch item, and all 8 slices are formed;
* sampling is the release's (top-k, temperature, optional top-p, softmax, multinomial; with top_k=1 the
  multinomial still runs, on a one-hot distribution);
* feature substitution is driven by task labels, as the release's concatenation does it;
* the loops (text-only, single 8-stream, batch pair with streaming) follow the release step by step.

Only the LLM, the prompt builders, the loops and the streaming are re-implemented here. The Whisper
encoder, the CLIP vision tower, the audio/image preprocessing and SNAC are reused (omnitalk.model.whisper,
omnitalk.model.clip, omnitalk.audio, omnitalk.vision and the `snac` package): they have fixture tests of
their own. Nothing here imports omnitalk.prompts, omnitalk.generate, omnitalk.model.llm or the engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import yaml

# ---------------------------------------------------------------------------------------------
# Vocabulary (the release hard-codes these numbers)
# ---------------------------------------------------------------------------------------------
TEXT_VOCAB = 151936          # ordinary text ids 0..151935
TEXT_PADDED = TEXT_VOCAB + 64  # 152000: text ids + 64 text specials
AUDIO_VOCAB = 4096           # SNAC codes 0..4095
AUDIO_PADDED = AUDIO_VOCAB + 64  # 4160 ids per audio layer
N_AUDIO = 7

EOT, PAD_T, INPUT_T, ANSWER_T, ASR = (TEXT_VOCAB + i for i in range(5))
EOA, PAD_A, INPUT_A, ANSWER_A, SPLIT, IMAGE, EOIMAGE = (AUDIO_VOCAB + i for i in range(7))

N_IMAGE_TOKENS = 50  # the release's builders and concatenation assume 50 CLIP tokens


def layershift(local_id, layer: int):
    """Local audio id of `layer` -> absolute id in the shared vocabulary."""
    return local_id + TEXT_PADDED + layer * AUDIO_PADDED


# ---------------------------------------------------------------------------------------------
# The language model (functional, over the release's state-dict names)
# ---------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    orig = x.dtype
    x32 = x.float()
    scaled = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + eps)
    return scaled.to(orig) * weight


def gated_mlp(x: torch.Tensor, w: dict, prefix: str) -> torch.Tensor:
    gate = F.linear(x, w[prefix + "fc_1.weight"])
    up = F.linear(x, w[prefix + "fc_2.weight"])
    return F.linear(F.silu(gate) * up, w[prefix + "proj.weight"])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + turned * sin).to(x.dtype)


class ReferenceLLM:
    """The release's GPT forward pass with its inference-time cache, as plain tensor code."""

    def __init__(self, cfg: dict, weights: dict[str, torch.Tensor], device="cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.w = {k: v.to(self.device, torch.float32) for k, v in weights.items()}
        if cfg.get("tie_word_embeddings"):
            # The release ties lm_head to wte; loading the file then leaves wte's values in the shared tensor.
            self.w["lm_head.weight"] = self.w["transformer.wte.weight"]
        self.n_layer = int(cfg["n_layer"])
        self.n_head = int(cfg["n_head"])
        self.n_groups = int(cfg["n_query_groups"])
        self.head_size = int(cfg["head_size"])
        self.eps = float(cfg["norm_eps"])
        self.block_size = int(cfg["block_size"])
        self.text_vocab_size = int(cfg["text_vocab_size"])
        self.audio_vocab_size = int(cfg["audio_vocab_size"])
        self.rope_n_elem = int(float(cfg.get("rotary_percentage", 1.0)) * self.head_size)
        base = cfg["rope_base"]
        condense = cfg.get("rope_condense_ratio", 1)
        theta = 1.0 / (base ** (torch.arange(0, self.rope_n_elem, 2, device=self.device).float() / self.rope_n_elem))
        positions = torch.arange(self.block_size, device=self.device) / condense
        angles = torch.outer(positions, theta).repeat(1, 2)
        self.cos, self.sin = torch.cos(angles), torch.sin(angles)
        self.causal = torch.tril(torch.ones(self.block_size, self.block_size, dtype=torch.bool,
                                            device=self.device)).unsqueeze(0).unsqueeze(0)
        self.cache_k: list[torch.Tensor] | None = None
        self.cache_v: list[torch.Tensor] | None = None

    # ---- cache ----------------------------------------------------------------------------
    def set_kv_cache(self, batch_size: int) -> None:
        heads = 1 if self.n_groups == 1 else self.n_head
        shape = (batch_size, heads, self.block_size, self.head_size)
        self.cache_k = [torch.zeros(shape, device=self.device) for _ in range(self.n_layer)]
        self.cache_v = [torch.zeros(shape, device=self.device) for _ in range(self.n_layer)]

    def clear_kv_cache(self) -> None:
        self.cache_k = self.cache_v = None

    # ---- pieces ---------------------------------------------------------------------------
    def attention(self, layer: int, x: torch.Tensor, cos, sin, mask, input_pos) -> torch.Tensor:
        B, T, _ = x.shape
        p = f"transformer.h.{layer}.attn."
        per_group = self.n_head // self.n_groups
        qkv = F.linear(x, self.w[p + "attn.weight"], self.w.get(p + "attn.bias"))
        # per group: its query heads, then one key head, then one value head
        qkv = qkv.view(B, T, self.n_groups, per_group + 2, self.head_size).permute(0, 2, 3, 1, 4)
        q, k, v = qkv.split((per_group, 1, 1), dim=2)
        if self.n_groups != self.n_head and self.n_groups != 1:
            k = k.expand(B, self.n_groups, per_group, T, self.head_size)
            v = v.expand(B, self.n_groups, per_group, T, self.head_size)
        q = q.reshape(B, -1, T, self.head_size)
        k = k.reshape(B, -1, T, self.head_size)
        v = v.reshape(B, -1, T, self.head_size)
        n = self.rope_n_elem
        q = torch.cat((rotate(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((rotate(k[..., :n], cos, sin), k[..., n:]), dim=-1)
        keys = self.cache_k[layer].index_copy_(2, input_pos, k)
        values = self.cache_v[layer].index_copy_(2, input_pos, v)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0,
                                           scale=1.0 / math.sqrt(self.head_size))
        y = y.transpose(1, 2).reshape(B, T, self.head_size * self.n_head)
        return F.linear(y, self.w[p + "proj.weight"])

    def block(self, layer: int, x, cos, sin, mask, input_pos) -> torch.Tensor:
        p = f"transformer.h.{layer}."
        h = rms_norm(x, self.w[p + "norm_1.weight"], self.eps)
        x = self.attention(layer, h, cos, sin, mask, input_pos) + x
        return gated_mlp(rms_norm(x, self.w[p + "norm_2.weight"], self.eps), self.w, p + "mlp.") + x

    def concat_features(self, rows: list[torch.Tensor], audio, image, lens, tasks) -> list[torch.Tensor]:
        """Replace the 7 audio rows' embeddings at the feature positions, item by item, by task label."""
        for j in range(len(lens)):
            label = tasks[j]
            if label in ("ImageQA_A", "ImageQA_AT"):
                for i in range(N_AUDIO):
                    rows[i][j, 1:1 + N_IMAGE_TOKENS, :] = image[j].clone()
                    # the release puts the first Whisper frame on the `_input_a` slot (52), not after it
                    rows[i][j, 52:52 + lens[j], :] = audio[j][:lens[j]].clone()
            elif label in ("ImageQA_T", "ImageCAP"):
                for i in range(N_AUDIO):
                    rows[i][j, 1:1 + N_IMAGE_TOKENS, :] = image[j].clone()
            elif label not in ("T1T2", "T1A2"):
                for i in range(N_AUDIO):
                    rows[i][j, 1:lens[j] + 1, :] = audio[j][:lens[j]].clone()
        return rows

    # ---- forward --------------------------------------------------------------------------
    def forward(self, input_ids: list[torch.Tensor], input_pos: torch.Tensor, audio_features=None,
                clip_features=None, whisper_lens=None, task=None):
        """input_ids: 8 tensors (B, T) of absolute ids (7 audio rows, then text); input_pos: (T,) positions.

        Returns ([7 audio logits (B, T, 4160)], text logits (B, T, 152000)) for every position.
        """
        input_pos = input_pos.to(self.device)
        cos = self.cos.index_select(0, input_pos)
        sin = self.sin.index_select(0, input_pos)
        mask = self.causal.index_select(2, input_pos)
        wte = self.w["transformer.wte.weight"]
        rows = [F.embedding(ids.to(self.device).long(), wte) for ids in input_ids]
        if audio_features is not None:
            audio = gated_mlp(audio_features.to(self.device), self.w, "whisper_adapter.")
            image = None
            if clip_features is not None:
                image = gated_mlp(clip_features.to(self.device), self.w, "vision_adapter.")
            rows = self.concat_features(rows, audio, image, whisper_lens, task)
        x = rows[0]
        for r in rows[1:]:
            x = x + r
        x = x / 8
        for layer in range(self.n_layer):
            x = self.block(layer, x, cos, sin, mask, input_pos)
        logits = F.linear(rms_norm(x, self.w["transformer.ln_f.weight"], self.eps), self.w["lm_head.weight"])
        tv, av = self.text_vocab_size, self.audio_vocab_size
        audio_logits = [logits[..., tv + av * i: tv + av * (i + 1)] for i in range(N_AUDIO)]
        return audio_logits, logits[..., :tv]


# ---------------------------------------------------------------------------------------------
# Sampling (the release's `sample`)
# ---------------------------------------------------------------------------------------------
@dataclass
class Sampling:
    temperature: float = 0.9
    top_k: int | None = 1
    top_p: float = 1.0
    generator: torch.Generator | None = None


def keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = torch.sort(logits, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p)
    drop[-1:] = 0  # the most probable token always stays
    return logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))


def sample(logits: torch.Tensor, s: Sampling) -> int:
    """One 1-D logit vector -> one id."""
    if s.top_p < 0.0 or s.top_p > 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {s.top_p}")
    if s.top_k is not None:
        values, idx = torch.topk(logits, min(s.top_k, logits.size(-1)))
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, idx, values)
    if s.temperature > 0.0 or s.top_p > 0.0:
        if s.temperature > 0.0:
            logits = logits / s.temperature
        if s.top_p < 1.0:
            logits = keep_top_p(logits, s.top_p)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=s.generator)[0])
    return int(torch.argmax(logits, dim=-1))


def margin(logits: torch.Tensor) -> float:
    """Top-1 minus top-2 of a 1-D logit vector."""
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


# ---------------------------------------------------------------------------------------------
# Prompt builders (the release's layouts; each returns 8 tensors (B, T))
# ---------------------------------------------------------------------------------------------
def _rows(audio_local_per_item: list[list[int]], text_per_item: list[list[int]]) -> list[torch.Tensor]:
    out = []
    for layer in range(N_AUDIO):
        out.append(torch.tensor([[layershift(a, layer) for a in item] for item in audio_local_per_item]))
    out.append(torch.tensor(text_per_item))
    return out


def prompt_text_to_text(text_ids: list[int]) -> list[torch.Tensor]:
    """T1T2: audio rows all `_pad_a`; text `_input_t`, ids, `_eot`, `_answer_t`."""
    n = len(text_ids)
    return _rows([[PAD_A] * (n + 3)], [[INPUT_T, *text_ids, EOT, ANSWER_T]])


def prompt_text_to_speech(text_ids: list[int]) -> list[torch.Tensor]:
    """T1A2: as T1T2 but the last audio column is `_answer_a`."""
    n = len(text_ids)
    return _rows([[PAD_A] * (n + 2) + [ANSWER_A]], [[INPUT_T, *text_ids, EOT, ANSWER_T]])


def prompt_speech(n_frames: int, last_audio: int, last_text: int) -> list[torch.Tensor]:
    """A1T2 / ASR / A1A2: `_input_a`, n_frames pads, `_eoa`, last; text `_input_t`, pads, `_eot`, last."""
    audio = [INPUT_A] + [PAD_A] * n_frames + [EOA, last_audio]
    text = [INPUT_T] + [PAD_T] * n_frames + [EOT, last_text]
    return _rows([audio], [text])


def prompt_speech_pair(n_frames: int) -> list[torch.Tensor]:
    """AA/AT batch: item 0 = A1A2 layout (speaks), item 1 = A1T2 layout (text only)."""
    speak = [INPUT_A] + [PAD_A] * n_frames + [EOA, ANSWER_A]
    quiet = [INPUT_A] + [PAD_A] * n_frames + [EOA, PAD_A]
    text = [INPUT_T] + [PAD_T] * n_frames + [EOT, ANSWER_T]
    return _rows([speak, quiet], [text, text])


def prompt_image_speech_pair(n_frames: int) -> list[torch.Tensor]:
    """ImageQA batch: `_image`, 50 pads, `_eoimage`, `_input_a`, frames, `_eoa`, then `_answer_a`/`_pad_a`."""
    head = [IMAGE] + [PAD_A] * N_IMAGE_TOKENS + [EOIMAGE, INPUT_A] + [PAD_A] * n_frames + [EOA]
    text = [PAD_T] * (N_IMAGE_TOKENS + 2 + 2 + n_frames) + [ANSWER_T]
    return _rows([head + [ANSWER_A], head + [PAD_A]], [text, text])


# ---------------------------------------------------------------------------------------------
# SNAC codes from the recorded audio rows, and decoding (the release's helpers)
# ---------------------------------------------------------------------------------------------
def codes_for_frames(frames: list[list[int]]) -> list[list[int]]:
    """Frames (7 layer tokens each) -> [c0, c1, c2] code lists (lengths n, 2n, 4n)."""
    c0, c1, c2 = [], [], []
    for f in frames:
        c0.append(f[0])
        c1 += [f[1], f[4]]
        c2 += [f[2], f[3], f[5], f[6]]
    return [c0, c1, c2]


def stream_frames(audio_rows: list[list[int]], index: int, stride: int) -> list[list[int]]:
    """The `stride` frames the release decodes when step `index` was just recorded (`get_snac`)."""
    first = index - stride - 5
    return [[audio_rows[j][first + j + i] for j in range(N_AUDIO)] for i in range(stride)]


def all_frames(audio_rows: list[list[int]]) -> list[list[int]]:
    """Every complete frame of the recorded rows (`reconscruct_snac`): layer j shifted by j+1 steps."""
    shifted = [audio_rows[j][j + 1:] for j in range(N_AUDIO)]
    return [[shifted[j][f] for j in range(N_AUDIO)] for f in range(len(shifted[-1]))]


def snac_decode(snac, codes: list[list[int]], seed: int | None) -> np.ndarray:
    """SNAC.decode of [c0, c1, c2]; torch.manual_seed(seed) immediately before it (the fixtures' rule)."""
    device = next(snac.parameters()).device
    tensors = [torch.tensor(c, device=device).unsqueeze(0) for c in codes]
    with torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        wav = snac.decode(tensors)
    return wav.squeeze().float().cpu().numpy()


def to_stream_pcm(wav: np.ndarray) -> np.ndarray:
    """The release's chunk bytes as int16: float64 * 32768, cast (truncation, no clipping)."""
    return (np.asarray(wav).astype(np.float64) * 32768.0).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------------
@dataclass
class Record:
    """What a loop produced. tokens: one list per recorded row (text-only: [text]; speech: 7 audio + text)."""
    labels: list[str] | None
    input_ids: list[torch.Tensor]
    prefill_text: np.ndarray | None = None   # (B, 152000)
    prefill_audio: np.ndarray | None = None  # (B, 7, 4160)
    tokens: list[list[int]] = field(default_factory=list)
    margins: list[list[float]] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)  # per step: text forced to `_pad_t`
    stop_kind: str = "step budget"
    stop_step: int | None = None
    stop_margin: float | None = None  # margin of the slice whose choice ended the loop
    chunks: list[dict] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.tokens[-1])


def _prefill(llm: ReferenceLLM, rec: Record, batch: int, audio_features, clip_features, lens, labels):
    T = rec.input_ids[0].size(1)
    llm.set_kv_cache(batch)
    logits_a, logit_t = llm.forward(rec.input_ids, torch.arange(0, T), audio_features, clip_features, lens, labels)
    rec.prefill_text = logit_t[:, -1].float().cpu().numpy()
    rec.prefill_audio = torch.stack([la[:, -1] for la in logits_a], dim=1).float().cpu().numpy()
    return logits_a, logit_t


@torch.inference_mode()
def text_loop(llm: ReferenceLLM, input_ids, budget: int, sampling: Sampling, audio_features=None,
              lens=None, labels=None) -> Record:
    """generate_TT / generate_AT / generate_ASR: only text is sampled; audio rows are fed `_pad_a`."""
    rec = Record(labels, input_ids, tokens=[[]], margins=[[]])
    T = input_ids[0].size(1)
    max_returned = T + budget
    _, logit_t = _prefill(llm, rec, 1, audio_features, None, lens, labels)
    token = sample(logit_t[0, -1], sampling)
    rec.tokens[0].append(token)
    rec.margins[0].append(margin(logit_t[0, -1]))
    rec.forced.append(False)
    pos = T
    for _ in range(2, max_returned - T + 1):
        feed = [torch.tensor([[layershift(PAD_A, i)]]) for i in range(N_AUDIO)] + [torch.tensor([[token]])]
        _, logit_t = llm.forward(feed, torch.tensor([pos]))
        token = sample(logit_t[0, -1], sampling)
        if token == EOT:
            rec.stop_kind, rec.stop_step = "text _eot sampled (not recorded)", rec.steps
            rec.stop_margin = margin(logit_t[0, -1])
            break
        rec.tokens[0].append(token)
        rec.margins[0].append(margin(logit_t[0, -1]))
        rec.forced.append(False)
        pos += 1
    llm.clear_kv_cache()
    return rec


def _record_speech_step(rec: Record, audio: list[int], text: int, a_logits, t_logits, forced: bool):
    for i in range(N_AUDIO):
        rec.tokens[i].append(audio[i])
        rec.margins[i].append(margin(a_logits[i]))
    rec.tokens[N_AUDIO].append(text)
    rec.margins[N_AUDIO].append(margin(t_logits))
    rec.forced.append(forced)


@torch.inference_mode()
def speech_loop(llm: ReferenceLLM, input_ids, budget: int, sampling: Sampling, audio_features=None,
                lens=None, labels=None) -> Record:
    """generate_TA / generate_AA: one item, all 8 streams sampled and fed back."""
    rec = Record(labels, input_ids, tokens=[[] for _ in range(8)], margins=[[] for _ in range(8)])
    T = input_ids[0].size(1)
    max_returned = T + budget
    logits_a, logit_t = _prefill(llm, rec, 1, audio_features, None, lens, labels)
    a_rows = [la[0, -1] for la in logits_a]
    audio = [sample(r, sampling) for r in a_rows]
    text = sample(logit_t[0, -1], sampling)
    _record_speech_step(rec, audio, text, a_rows, logit_t[0, -1], False)
    pos = T
    text_end = False
    for _ in range(2, max_returned - T + 1):
        feed = [torch.tensor([[layershift(audio[i], i)]]) for i in range(N_AUDIO)] + [torch.tensor([[text]])]
        logits_a, logit_t = llm.forward(feed, torch.tensor([pos]))
        a_rows = [la[0, -1] for la in logits_a]
        audio = [sample(r, sampling) for r in a_rows]
        text = sample(logit_t[0, -1], sampling)
        forced = text_end
        if text_end:
            text = PAD_T
        if audio[-1] == EOA:
            rec.stop_kind, rec.stop_step = "layer-6 _eoa sampled (not recorded)", rec.steps
            rec.stop_margin = margin(a_rows[-1])
            break
        if text == EOT:
            text_end = True
        _record_speech_step(rec, audio, text, a_rows, logit_t[0, -1], forced)
        pos += 1
    llm.clear_kv_cache()
    return rec


@torch.inference_mode()
def pair_stream(llm: ReferenceLLM, input_ids, budget: int, sampling: Sampling, audio_features, lens, labels,
                snac, tokenizer, clip_features=None, stride: int = 4, snac_seed: int | None = None,
                rec: Record | None = None) -> Iterator[tuple[np.ndarray, str]]:
    """run_AT_batch_stream / run_vision_AA_batch_stream: B=2, audio from item 0, text from item 1.

    Yields (int16 PCM chunk, text delta) as the release does; fills `rec` (tokens, margins, chunks).
    """
    rec = rec if rec is not None else Record(labels, input_ids)
    rec.labels, rec.input_ids = labels, input_ids
    rec.tokens, rec.margins = [[] for _ in range(8)], [[] for _ in range(8)]
    T = input_ids[0].size(1)
    max_returned = T + budget
    logits_a, logit_t = _prefill(llm, rec, 2, audio_features, clip_features, lens, labels)
    a_rows = [la[0, -1] for la in logits_a]
    t_row = logit_t[1, -1]
    audio = [sample(r, sampling) for r in a_rows]
    text = sample(t_row, sampling)
    _record_speech_step(rec, audio, text, a_rows, t_row, False)

    def feed_for(audio_tokens, text_token):
        rows = [torch.tensor([[layershift(audio_tokens[i], i)], [layershift(PAD_A, i)]]) for i in range(N_AUDIO)]
        return rows + [torch.tensor([[text_token], [text_token]])]

    feed = feed_for(audio, text)
    pos = T
    text_end = False
    index, counting, since_chunk = 1, False, 0
    text_sent, text_done = 0, False
    for _ in range(2, max_returned - T + 1):
        logits_a, logit_t = llm.forward(feed, torch.tensor([pos]))
        a_rows = [la[0, -1] for la in logits_a]
        t_row = logit_t[1, -1]
        audio = [sample(r, sampling) for r in a_rows]
        text = sample(t_row, sampling)
        forced = text_end
        if text_end:
            text = PAD_T
        if audio[-1] == EOA:
            rec.stop_kind, rec.stop_step = "layer-6 _eoa sampled (not recorded)", rec.steps
            rec.stop_margin = margin(a_rows[-1])
            break
        if text == EOT:
            text_end = True
        _record_speech_step(rec, audio, text, a_rows, t_row, forced)
        feed = feed_for(audio, text)
        if index == 7:
            counting = True
        if counting:
            since_chunk += 1
            if since_chunk == stride:
                since_chunk = 0
                frames = stream_frames(rec.tokens, index, stride)
                codes = codes_for_frames(frames)
                wav = snac_decode(snac, codes, snac_seed)
                pcm = to_stream_pcm(wav)
                if text_done:
                    delta = ""
                else:
                    new = rec.tokens[N_AUDIO][text_sent:]
                    text_sent += len(new)
                    if EOT in new:
                        new, text_done = new[:new.index(EOT)], True
                    delta = tokenizer.decode(new) if new else ""
                first = index - stride - 6
                rec.chunks.append(dict(index=len(rec.chunks), emitted_after_step=index,
                                       frames=[first, first + stride - 1], num_samples=int(pcm.size),
                                       text_delta=delta, codes=codes, float_min=float(wav.min()),
                                       float_max=float(wav.max()), pcm=pcm))
                yield pcm, delta
        pos += 1
        index += 1
    llm.clear_kv_cache()


# ---------------------------------------------------------------------------------------------
# The whole system: loading, front ends, the seven fixture tasks
# ---------------------------------------------------------------------------------------------
TASKS = ("T1T2", "T1A2", "A1T2", "ASR", "A1A2", "AA_AT_batch", "ImageQA_batch")
SPEECH_TASKS = ("T1A2", "A1A2", "AA_AT_batch", "ImageQA_batch")
BATCH_TASKS = ("AA_AT_batch", "ImageQA_batch")
# official task name and the labels the model receives inside the release's loops
LABELS = {"T1T2": ("T1T2", None), "T1A2": ("T1A2", None), "A1T2": ("AT", ["AT"]), "ASR": ("A1T1", ["asr"]),
          "A1A2": ("A1T2", ["A1T2"]), "AA_AT_batch": (["A1T2", "A1T2"], ["A1T2", "A1T2"]),
          "ImageQA_batch": (["ImageQA_A", "ImageQA_AT"], ["ImageQA_A", "ImageQA_AT"])}


class Tokenizer:
    """The release's litgpt tokenizer, Hugging Face backend: plain encode, decode skipping unknown ids."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        self.processor = HFTokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(list(ids))


@dataclass
class Frontend:
    samples: np.ndarray
    mel: np.ndarray                      # (80, 3000)
    L: int                               # Whisper frames used
    whisper_out: np.ndarray              # (1500, d)
    clip_input: np.ndarray | None = None   # (3, R, R)
    clip_out: np.ndarray | None = None     # (50, d)


class ReferenceSystem:
    def __init__(self, ckpt_dir, device="cpu"):
        from snac import SNAC

        from omnitalk.model.clip import load_clip_vision
        from omnitalk.model.whisper import load_whisper_encoder

        ckpt = Path(ckpt_dir)
        self.device = torch.device(device)
        self.cfg = yaml.safe_load((ckpt / "model_config.yaml").read_text())
        self.cfg["post_adapter"] = False  # the release forces it off
        weights = torch.load(ckpt / "lit_model.pth", map_location="cpu", weights_only=True)
        self.llm = ReferenceLLM(self.cfg, weights, self.device)
        self.whisper = load_whisper_encoder(ckpt / "small.pt", self.device)
        clip_file = ckpt / "ViT-B-32.pt"
        self.clip = load_clip_vision(clip_file, self.device) if clip_file.is_file() else None
        self.snac = SNAC.from_pretrained(str(ckpt / "snac")).eval().to(self.device)
        self.tokenizer = Tokenizer(ckpt / "tokenizer.json")

    # ---- front ends -----------------------------------------------------------------------
    @torch.inference_mode()
    def frontend(self, wav, image=None) -> Frontend:
        from omnitalk import audio as audio_io
        from omnitalk import vision
        from omnitalk.model.whisper import encode

        samples = audio_io.load_audio(wav)
        L = int((len(samples) / 16000) * 1000 / 20) + 1  # the release's length rule
        mel = audio_io.log_mel_spectrogram(samples)
        out = encode(self.whisper, mel)[0]
        fe = Frontend(samples, mel.numpy(), L, out.float().cpu().numpy())
        if image is not None and self.clip is not None:
            img = vision.load_image(image, convert_rgb=False)
            x = vision.preprocess_image(img, size=self.clip.dims.image_resolution)
            fe.clip_input = x.numpy()
            fe.clip_out = self.clip(x[None].to(self.device))[0].float().cpu().numpy()
        return fe

    # ---- tasks ----------------------------------------------------------------------------
    def run_task(self, name: str, fe: Frontend | None, prompt: str | None, budget: int = 48, stride: int = 4,
                 sampling: Sampling | None = None, snac_seed: int | None = 1234) -> Record:
        """Run one of the seven fixture tasks the way the release runs it; batch tasks are streamed."""
        s = sampling or Sampling()
        _, labels = LABELS[name]
        if name in ("T1T2", "T1A2"):
            ids = self.tokenizer.encode(prompt)
            if name == "T1T2":
                return text_loop(self.llm, prompt_text_to_text(ids), budget, s)
            return speech_loop(self.llm, prompt_text_to_speech(ids), budget, s)
        L = fe.L
        feats = torch.from_numpy(fe.whisper_out[:L]).unsqueeze(0)
        if name == "A1T2":
            return text_loop(self.llm, prompt_speech(L, PAD_A, ANSWER_T), budget, s, feats, [L], labels)
        if name == "ASR":
            return text_loop(self.llm, prompt_speech(L, PAD_A, ASR), budget, s, feats, [L], labels)
        if name == "A1A2":
            return speech_loop(self.llm, prompt_speech(L, ANSWER_A, ANSWER_T), budget, s, feats, [L], labels)
        pair = torch.cat([feats, feats])
        rec = Record(labels, [])
        if name == "AA_AT_batch":
            ids = prompt_speech_pair(L)
            gen = pair_stream(self.llm, ids, budget, s, pair, [ids[0].size(1) - 3] * 2, labels, self.snac,
                              self.tokenizer, stride=stride, snac_seed=snac_seed, rec=rec)
        elif name == "ImageQA_batch":
            clip = torch.from_numpy(fe.clip_out).unsqueeze(0)
            gen = pair_stream(self.llm, prompt_image_speech_pair(L), budget, s, pair, [L, L], labels, self.snac,
                              self.tokenizer, clip_features=torch.cat([clip, clip]), stride=stride,
                              snac_seed=snac_seed, rec=rec)
        else:
            raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")
        for _ in gen:
            pass
        return rec

    def decode_all(self, rec: Record, snac_seed: int | None = 1234) -> tuple[list[list[int]], np.ndarray]:
        """The whole-answer decode the release saves: codes of every complete frame, float waveform."""
        codes = codes_for_frames(all_frames(rec.tokens[:N_AUDIO]))
        return codes, snac_decode(self.snac, codes, snac_seed)

    def decoded_text(self, name: str, rec: Record) -> str:
        """What the release's task function returns as text (text-only tasks: every recorded id)."""
        texts = rec.tokens[-1]
        if name in SPEECH_TASKS and EOT in texts:
            texts = texts[:texts.index(EOT)]
        return self.tokenizer.decode(texts).strip()
