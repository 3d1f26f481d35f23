"""Losses: text cross-entropy plus the mean of the 7 audio-layer cross-entropies on delay-shifted targets.

    loss = w_text * CE(text) + w_audio * mean_j CE(audio layer j)

Each CE is a mean over the target tokens (IGNORE = -100 excluded) that carry that part's loss; the
per-task masks are already in the targets (omnitalk.train.sequences). A part with no targets counts 0.

Text normalisation (`loss.text_norm`): "token" (default, the usual LM loss) averages the text CE over all
text target tokens, so a sample's weight is its number of text targets — an ASR transcript of ten words
counts five times a two-token answer. "sample" averages each sample's text CE over its own targets first
and then over the samples that have text targets, so every question weighs the same.

Normalisation for accumulation and data parallelism: `norm` holds the *global* token counts of an
optimizer step (all micro-batches, all ranks; `count_targets` + an all-reduce). Each micro-batch then
contributes sum_CE / global_count, so summing micro-batch losses (and averaging ranks' gradients times the
world size) gives exactly the loss of the whole global batch computed at once.

Memory: `forward_loss` runs the big output head only at positions that have targets (hidden states are
gathered first), and optionally in checkpointed chunks so the (N, 152000) text logits are never all stored.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from omnitalk.train.config import TEXT_NORMS
from omnitalk.train.sequences import IGNORE

DEFAULT_WEIGHTS = {"text": 1.0, "audio": 1.0}


def count_targets(targets: torch.Tensor, text_norm: str = "token") -> torch.Tensor:
    """targets (B, S, T) -> float64 counts (S,): [audio layer 0..S-2, text] target tokens per stream;
    with text_norm "sample" the text entry counts the samples that have text targets."""
    counts = (targets != IGNORE).sum(dim=(0, 2)).double()
    if text_norm == "sample":
        counts[-1] = float(((targets[:, -1] != IGNORE).sum(-1) > 0).sum())
    return counts


def text_token_weights(text_targets: torch.Tensor, text_norm: str = "token") -> torch.Tensor | None:
    """text_targets (B, T) -> per-position weights (B, T) of the text CE sum: None for "token" (all 1),
    1 / (the sample's number of text targets) for "sample"."""
    if text_norm == "token":
        return None
    if text_norm != "sample":
        raise ValueError(f"loss.text_norm must be one of {TEXT_NORMS}, got {text_norm!r}")
    mask = text_targets != IGNORE
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    return mask.float() / n


def _combine(text_sum: torch.Tensor, audio_sums: torch.Tensor, counts: torch.Tensor, weights) -> tuple[torch.Tensor, dict]:
    """Sums of CE (text scalar, audio (n_layers,)) + counts (S,) -> (loss, parts)."""
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    counts = counts.to(text_sum.device)
    c_text, c_audio = counts[-1], counts[:-1]
    text = text_sum / c_text.clamp(min=1).to(text_sum.dtype)
    active = c_audio > 0
    n_active = int(active.sum())
    per_layer = audio_sums / c_audio.clamp(min=1).to(audio_sums.dtype)  # (n_layers,)
    audio = per_layer.sum() / max(n_active, 1)
    loss = w["text"] * text + w["audio"] * audio
    parts = {"loss": loss.detach(), "text": text.detach(), "audio": audio.detach()}
    for j in range(per_layer.shape[0]):
        parts[f"audio_{j}"] = (per_layer[j] / max(n_active, 1)).detach()  # sums to "audio"
    return loss, parts


def omni_loss(text_logits: torch.Tensor, audio_logits: torch.Tensor, targets: torch.Tensor,
              weights: dict | None = None, norm: torch.Tensor | None = None,
              text_norm: str = "token") -> tuple[torch.Tensor, dict]:
    """Full-sequence form. text_logits (B, T, Vt), audio_logits (B, T, n_layers, Va), targets (B, S, T)
    with local ids (text row last). norm: global counts (S,) (default: this batch's). Returns (loss,
    parts) where parts holds detached "loss", "text", "audio" and "audio_j" (j-th layer's share of
    "audio", so that every part adds up over micro-batches and ranks)."""
    n_layers = audio_logits.shape[-2]
    tt = targets[:, n_layers]                          # (B, T)
    ta = targets[:, :n_layers].transpose(1, 2)         # (B, T, n_layers)
    tce = F.cross_entropy(text_logits.float().flatten(0, 1), tt.flatten(), ignore_index=IGNORE,
                          reduction="none").view(tt.shape)
    tw = text_token_weights(tt, text_norm)
    text_sum = tce.sum() if tw is None else (tce * tw).sum()
    ce = F.cross_entropy(audio_logits.float().flatten(0, 2), ta.flatten(), ignore_index=IGNORE,
                         reduction="none").view(ta.shape)
    audio_sums = ce.sum(dim=(0, 1))                    # (n_layers,)
    return _combine(text_sum, audio_sums, count_targets(targets, text_norm) if norm is None else norm, weights)


# ---- the gathered training forward -----------------------------------------------------------
def embed_batch(lm, ids: torch.Tensor, audio_feats: torch.Tensor, audio_index: torch.Tensor,
                image_feats: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """OmniLM.embed with per-item feature slots: adapter outputs replace the audio-row embeddings at
    (item, position) pairs; streams summed in order and divided by S, as the reference does.
    Both adapters always run (on empty inputs when a batch has no such slot) so that every trainable
    parameter takes part in every step (DDP needs that)."""
    emb = lm.transformer.wte(ids)                      # (B, S, T, C)
    n_audio = ids.size(1) - 1
    dt = emb.dtype
    for adapter, feats, index in ((lm.whisper_adapter, audio_feats, audio_index),
                                  (lm.vision_adapter, image_feats, image_index)):
        if feats.shape[-1] != adapter.fc_1.in_features:
            if feats.shape[0] == 0:
                feats = feats.new_zeros(0, adapter.fc_1.in_features)
            else:
                raise ValueError(f"features of width {feats.shape[-1]} for an adapter expecting "
                                 f"{adapter.fc_1.in_features}")
        f = adapter(feats.to(dt))                      # (N, C)
        emb[index[:, 0], :n_audio, index[:, 1]] = f.to(dt).unsqueeze(1).expand(-1, n_audio, -1)
    x = emb[:, 0]
    for s in range(1, ids.size(1)):
        x = x + emb[:, s]
    return x / ids.size(1)


def _ce_sum(h: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, unflatten: tuple | None,
            row_w: torch.Tensor | None = None) -> torch.Tensor:
    logits = F.linear(h, weight).float()
    if unflatten is not None:  # audio: (N, n_layers * Va) -> (N * n_layers, Va)
        logits = logits.view(-1, unflatten[1])
        ce = F.cross_entropy(logits, tgt.reshape(-1), ignore_index=IGNORE, reduction="none")
        return ce.view(-1, unflatten[0]).sum(0)
    if row_w is not None:  # per-row weights of the text CE (text_norm "sample")
        return (F.cross_entropy(logits, tgt, ignore_index=IGNORE, reduction="none") * row_w).sum()
    return F.cross_entropy(logits, tgt, ignore_index=IGNORE, reduction="sum")


def _head_sums(h: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, unflatten, chunk: int | None,
               row_w: torch.Tensor | None = None):
    if not chunk or h.shape[0] <= chunk:
        return _ce_sum(h, weight, tgt, unflatten, row_w)
    total = None
    for i in range(0, h.shape[0], chunk):  # recomputed in backward: only one chunk's logits live at a time
        w = None if row_w is None else row_w[i:i + chunk]
        part = checkpoint(_ce_sum, h[i:i + chunk], weight, tgt[i:i + chunk], unflatten, w, use_reentrant=False)
        total = part if total is None else total + part
    return total


def forward_sums(lm, ids, targets, audio_feats, audio_index, image_feats, image_index,
                 head_chunk: int | None = None, text_norm: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropies (text scalar, audio (n_layers,)) with the head only at target positions;
    the text sum weighted per text_norm (text_token_weights)."""
    cfg = lm.cfg
    n_layers = cfg.n_audio_layers
    x = embed_batch(lm, ids, audio_feats, audio_index, image_feats, image_index)
    h = lm.forward_hidden(x, 0)                        # (B, T, C)
    W = lm.lm_head.weight
    tt = targets[:, n_layers]                          # (B, T)
    tmask = tt != IGNORE
    tw = text_token_weights(tt, text_norm)
    text_sum = _head_sums(h[tmask], W[:cfg.text_vocab_size], tt[tmask], None, head_chunk,
                          None if tw is None else tw[tmask])
    ta = targets[:, :n_layers].transpose(1, 2)         # (B, T, n_layers)
    amask = (ta != IGNORE).any(-1)
    audio_sums = _head_sums(h[amask], W[cfg.text_vocab_size:], ta[amask], (n_layers, cfg.audio_vocab_size),
                            head_chunk)               # (n_layers,)
    return text_sum, audio_sums


def forward_loss(lm, ids, targets, audio_feats, audio_index, image_feats, image_index,
                 weights: dict | None = None, norm: torch.Tensor | None = None,
                 head_chunk: int | None = None, text_norm: str = "token") -> tuple[torch.Tensor, dict]:
    """The training forward of OmniLM with the head only at target positions; same value as
    omni_loss(*lm.forward(...), targets) but without the (B, T, vocab) logits."""
    text_sum, audio_sums = forward_sums(lm, ids, targets, audio_feats, audio_index, image_feats, image_index,
                                        head_chunk, text_norm)
    return _combine(text_sum, audio_sums, count_targets(targets, text_norm) if norm is None else norm, weights)


def combine_sums(text_sum, audio_sums, counts, weights=None) -> tuple[torch.Tensor, dict]:
    """Summed CEs and counts (e.g. accumulated over an evaluation set) -> (loss, parts)."""
    return _combine(torch.as_tensor(text_sum, dtype=torch.float64), torch.as_tensor(audio_sums, dtype=torch.float64),
                    torch.as_tensor(counts, dtype=torch.float64), weights)


class TrainModule(nn.Module):
    """OmniLM + the loss in one forward, the unit that DDP / FSDP wrap."""

    def __init__(self, lm, weights: dict | None = None, head_chunk: int | None = None):
        super().__init__()
        self.lm = lm
        weights = dict(weights or DEFAULT_WEIGHTS)
        self.text_norm = weights.pop("text_norm", "token")
        self.weights = weights
        self.head_chunk = head_chunk

    def forward(self, ids, targets, audio_feats, audio_index, image_feats, image_index, norm=None,
                return_sums: bool = False):
        if return_sums:  # evaluation: raw sums, to be added up over batches and ranks
            return forward_sums(self.lm, ids, targets, audio_feats, audio_index, image_feats, image_index,
                                self.head_chunk, self.text_norm)
        return forward_loss(self.lm, ids, targets, audio_feats, audio_index, image_feats, image_index,
                            self.weights, norm, self.head_chunk, self.text_norm)
