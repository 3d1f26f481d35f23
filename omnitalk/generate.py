"""Decoding loops: text-only, single 8-stream, and the batch-parallel pair; sampling; stop rules.

A loop yields one `Step` per recorded step, exactly as the release records them:
- step 0 comes from the prefill and is always recorded;
- text-only loop: a step whose text token is `_eot` ends the loop and is not recorded;
- speech loops: once `_eot` was recorded, later text tokens are forced to `_pad_t`; a step whose
  layer-6 audio token is `_eoa` ends the loop and is not recorded;
- at most `max_tokens` steps are recorded.
In the pair loop audio comes from item 0 (asked to speak) and text from item 1 (text only); both items
are fed that text token, item 0 its own audio and item 1 `_pad_a`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from omnitalk.model.llm import OmniLM
from omnitalk.prompts import Prompt
from omnitalk.tokens import TokenLayout


@dataclass
class Sampling:
    """temperature 0 (or top_k 1) = greedy. The release's defaults (0.9, top_k 1) are greedy too.

    audio_grammar: the spoken answer keeps the delay pattern (reference §7.3). From step j+1 until its
    `_eoa`, audio layer j may emit only SNAC codes, and `_eoa` only on layer 0, on layer 6 (whose `_eoa`
    ends the answer, as in the release) or once layer j-1 has ended. A special id inside a frame would
    otherwise make the release index past the SNAC codebook (reference Q8) and costs omnitalk the rest of
    the answer's speech. A model that keeps the pattern by itself samples exactly as without it;
    False is the release's unconstrained loop.
    """
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    audio_grammar: bool = True

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """logits (N, V) -> ids (N,). top-k, then temperature, then top-p (nucleus), then multinomial."""
    if s.greedy:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


@dataclass
class Step:
    text: int                     # absolute text id as recorded (after `_pad_t` forcing)
    audio: list[int] | None = None  # 7 local audio ids (speech loops), None for text-only loops
    margins: list[float] | None = None  # top-1 minus top-2 logit per sampled slice (7 audio, text)


def _margins(logits: torch.Tensor) -> list[float]:
    top2 = torch.topk(logits.float(), 2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).reshape(-1).tolist()


MODES = ("text", "speech", "pair")


class StepRules:
    """The stop/forcing/feedback rules of one request, one step at a time (shared by `decode` and the
    multi-session scheduler). `take(h)` samples step k from the last hidden states h (B, C) and returns
    the recorded Step, or None when the loop ends; `inputs` then holds the (B, 8, 1) ids to feed."""

    def __init__(self, lm: OmniLM, layout: TokenLayout, mode: str, max_tokens: int, sampling: Sampling,
                 margins: bool = False):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.lm, self.layout, self.mode, self.max_tokens = lm, layout, mode, max_tokens
        self.sampling, self.margins = sampling, margins
        self.B = 2 if mode == "pair" else 1
        device = lm.transformer.ln_f.weight.device
        self.gen = None if sampling.seed is None else torch.Generator(device=device).manual_seed(sampling.seed)
        n_audio = layout.n_audio_layers
        self.offsets = torch.tensor([layout.audio_offset(j) for j in range(n_audio)], device=device)
        self.pad_audio = self.offsets + layout.pad_a                     # (7,) absolute `_pad_a`
        # the delay grammar (Sampling.audio_grammar): from step j+1 until its `_eoa`, layer j emits SNAC codes;
        # `_eoa` only on layer 0, on layer 6 (the release's stop rule) or once layer j-1 has ended
        codes_only = torch.zeros(layout.audio_vocab_size, dtype=torch.bool, device=device)  # (Va,) True = masked
        codes_only[layout.codebook_size:] = True
        codes_or_eoa = codes_only.clone()
        codes_or_eoa[layout.eoa] = False
        self.masks = torch.stack([codes_only, codes_or_eoa])             # (2, Va), row: may the layer end now
        self.first_step = torch.arange(n_audio, device=device) + 1       # (7,) layer j's first code: step j+1
        self.ended = torch.zeros(n_audio, dtype=torch.bool, device=device)  # (7,) layer j emitted its `_eoa`
        self.free_end = torch.zeros(n_audio, dtype=torch.bool, device=device)  # (7,) layers 0 and 6
        self.free_end[[0, n_audio - 1]] = True
        self.inputs = torch.empty(self.B, layout.n_streams, 1, dtype=torch.long, device=device)
        self.k = 0              # steps recorded so far
        self.text_end = False   # `_eot` recorded: later text is forced to `_pad_t`
        self.done = False       # no more steps: nothing to feed

    @torch.inference_mode()
    def take(self, h: torch.Tensor) -> Step | None:
        lm, L, n_audio, k = self.lm, self.layout, self.layout.n_audio_layers, self.k
        if self.done:
            return None
        if self.mode == "text":
            t_logits = lm.text_logits(h)
            text = int(sample(t_logits, self.sampling, self.gen)[0])
            if k > 0 and text == L.eot:
                self.done = True
                return None
            step = Step(text, margins=_margins(t_logits) if self.margins else None)
            self.inputs[0, :n_audio, 0] = self.pad_audio
        else:
            a_logits = lm.audio_logits(h[0])                                # (7, Va), item 0
            if self.sampling.audio_grammar:
                speaking = (self.first_step <= k) & ~self.ended                 # (7,)
                may_end = self.free_end | torch.cat([self.ended.new_zeros(1), self.ended[:-1]])
                a_logits = a_logits.masked_fill(speaking[:, None] & self.masks[may_end.long()], float("-inf"))
            t_logits = lm.text_logits(h[self.B - 1:self.B])                 # (1, Vt), item 1 in a pair
            audio = sample(a_logits, self.sampling, self.gen)               # (7,) local ids
            text = int(sample(t_logits, self.sampling, self.gen)[0])
            if k > 0:
                if self.text_end:
                    text = L.pad_t
                if int(audio[-1]) == L.eoa:
                    self.done = True
                    return None
                if text == L.eot:
                    self.text_end = True
            self.ended |= (audio == L.eoa) & (self.first_step <= k)         # a pre-delay `_eoa` ends nothing
            step = Step(text, audio.tolist(), _margins(a_logits) + _margins(t_logits) if self.margins else None)
            self.inputs[0, :n_audio, 0] = audio + self.offsets
            if self.mode == "pair":
                self.inputs[1, :n_audio, 0] = self.pad_audio
        self.inputs[:, n_audio, 0] = text
        self.k += 1
        self.done = self.k >= self.max_tokens  # the last recorded step is never fed back
        return step


def shared_prefix(ids: torch.Tensor) -> int:
    """ids (B, 8, T) -> how many leading columns are the same in every row (T when B == 1)."""
    same = (ids == ids[:1]).all(dim=(0, 1))  # (T,)
    return int(same.long().cumprod(0).sum())


@torch.inference_mode()
def decode(lm: OmniLM, layout: TokenLayout, prompts: list[Prompt], features: list[tuple[int, torch.Tensor]],
           mode: str, max_tokens: int, sampling: Sampling = Sampling(), start_pos: int = 0,
           margins: bool = False) -> Iterator[Step]:
    """Run one request. `features`: (position, (n, C) adapter output) pairs, the same for every item.

    mode 'text' / 'speech' take one prompt, 'pair' takes [speaking prompt, text-only prompt].
    """
    rules = StepRules(lm, layout, mode, max_tokens, sampling, margins)
    if len(prompts) != rules.B:
        raise ValueError(f"mode {mode!r} needs {rules.B} prompt(s), got {len(prompts)}")
    T = prompts[0].length
    if any(p.length != T for p in prompts):
        raise ValueError("the prompts of a pair must have the same length")
    ctx = lm.cfg.block_size
    if start_pos + T >= ctx:
        raise ValueError(f"the prompt has {T} positions but the model's context is {ctx}; "
                         "shorten the input (text or audio)")
    rules.max_tokens = min(max_tokens, ctx - start_pos - T)
    device = rules.inputs.device
    if start_pos == 0:
        lm.setup_cache(rules.B, T + rules.max_tokens)

    ids = torch.as_tensor(np.stack([p.ids for p in prompts]), device=device)  # (B, 8, T)
    feats = [(p, f.to(device).expand(rules.B, -1, -1)) for p, f in features]
    h = lm.prefill(lm.embed(ids, feats), start_pos, shared_prefix(ids))  # (B, C)
    pos = start_pos + T
    while (step := rules.take(h)) is not None:
        yield step
        if rules.done:
            return
        h = lm.decode_step(rules.inputs, pos)  # (B, C)
        pos += 1
