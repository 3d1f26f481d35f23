"""Losses: the definition, masks, weights, global normalisation, and the gathered-head forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from omnitalk.model.llm import OmniLM
from omnitalk.train.losses import count_targets, forward_loss, omni_loss
from omnitalk.train.sequences import IGNORE, build_sample, collate
from test_train_sequences import LAYOUT, TOK, synthetic, tiny_config


def _batch(n=2, **kw):
    recs, feats = synthetic(n, **kw)
    samples = []
    for r in recs:
        af = feats.audio(r["question_audio"]) if r.get("question_audio") else None
        vf = feats.image(r["question_image"]) if r.get("question_image") else None
        samples.append(build_sample(r, LAYOUT, TOK, af, vf))
    return samples


def _model(seed=0):
    torch.manual_seed(seed)
    lm = OmniLM(tiny_config())
    for p in lm.parameters():  # moderate logits
        p.data.mul_(0.3)
    return lm


def test_omni_loss_matches_the_definition():
    torch.manual_seed(0)
    B, T, Vt, Va = 2, 5, 320, 128
    tl, al = torch.randn(B, T, Vt), torch.randn(B, T, 7, Va)
    tg = torch.full((B, 8, T), IGNORE)
    tg[:, 7, 2:] = torch.randint(0, Vt, (B, 3))
    tg[0, :7, 1:] = torch.randint(0, Va, (7, 4))
    tg[0, 3, 1] = IGNORE  # one layer with a masked position
    loss, parts = omni_loss(tl, al, tg, {"text": 0.5, "audio": 2.0})
    text = F.cross_entropy(tl.reshape(-1, Vt), tg[:, 7].reshape(-1), ignore_index=IGNORE)
    layers = [F.cross_entropy(al[:, :, j].reshape(-1, Va), tg[:, j].reshape(-1), ignore_index=IGNORE)
              for j in range(7)]
    audio = torch.stack(layers).mean()
    assert torch.allclose(loss, 0.5 * text + 2.0 * audio, atol=1e-5)
    assert torch.allclose(parts["text"], text, atol=1e-6) and torch.allclose(parts["audio"], audio, atol=1e-6)
    assert torch.allclose(sum(parts[f"audio_{j}"] for j in range(7)), audio, atol=1e-6)


def test_missing_parts_count_zero_not_nan():
    tl, al = torch.randn(1, 4, 320), torch.randn(1, 4, 7, 128)
    tg = torch.full((1, 8, 4), IGNORE)
    tg[0, 7, 3] = 5  # text only
    loss, parts = omni_loss(tl, al, tg)
    assert torch.isfinite(loss) and parts["audio"] == 0
    tg = torch.full((1, 8, 4), IGNORE)
    loss, parts = omni_loss(tl, al, tg)
    assert loss == 0 and parts["text"] == 0


def test_huge_logits_stay_finite():
    tl = torch.full((1, 2, 320), 1e4)
    tl[0, 0, 3] = 3e4
    tg = torch.full((1, 8, 2), IGNORE)
    tg[0, 7] = torch.tensor([3, 4])
    loss, _ = omni_loss(tl, torch.zeros(1, 2, 7, 128), tg)
    assert torch.isfinite(loss)


def _full_reference(lm, samples, b):
    """Per-item OmniLM.forward (the engine's embedding path) padded into one batch of logits."""
    tls, als = [], []
    T = b.ids.shape[2]
    for s in samples:
        feats = [(sl.pos, (lm.whisper_adapter if sl.kind == "audio" else lm.vision_adapter)(sl.feats)[None])
                 for sl in s.slots]
        t, a = lm.forward(s.ids[None], 0, feats)
        tls.append(F.pad(t, (0, 0, 0, T - t.shape[1])))
        als.append(F.pad(a, (0, 0, 0, 0, 0, T - a.shape[1])))
    return torch.cat(tls), torch.cat(als)


def test_gathered_forward_equals_full_logits_loss():
    lm = _model()
    samples = _batch(2)
    b = collate(samples, LAYOUT, 8, 16, 12)
    loss, parts = forward_loss(lm, b.ids, b.targets, b.audio_feats, b.audio_index, b.image_feats, b.image_index)
    ref, ref_parts = omni_loss(*_full_reference(lm, samples, b), b.targets)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-5)
    for k in ref_parts:
        assert torch.allclose(parts[k], ref_parts[k], rtol=1e-5, atol=1e-5), k
    # chunked, checkpointed head: same value and same gradients
    loss.backward()
    g = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    loss2, _ = forward_loss(lm, b.ids, b.targets, b.audio_feats, b.audio_index, b.image_feats, b.image_index,
                            head_chunk=7)
    loss2.backward()
    assert torch.allclose(loss, loss2, atol=1e-6)
    for n, p in lm.named_parameters():
        assert torch.allclose(p.grad, g[n], atol=1e-6), n


def test_global_normalisation_makes_micro_batches_add_up():
    lm = _model(1)
    samples = _batch(2, seed=3)
    full = collate(samples, LAYOUT, 8, 16, 12)
    halves = [collate(samples[:5], LAYOUT, 8, 16, 12), collate(samples[5:], LAYOUT, 8, 16, 12)]
    norm = sum(count_targets(h.targets) for h in halves)
    assert torch.equal(norm, count_targets(full.targets))
    ref, _ = forward_loss(lm, full.ids, full.targets, full.audio_feats, full.audio_index, full.image_feats,
                          full.image_index)
    ref.backward()
    g = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    total = 0.0
    for h in halves:
        loss, _ = forward_loss(lm, h.ids, h.targets, h.audio_feats, h.audio_index, h.image_feats, h.image_index,
                               norm=norm)
        loss.backward()
        total = total + loss.detach()
    assert torch.allclose(total, ref.detach(), atol=1e-5)
    for n, p in lm.named_parameters():
        assert torch.allclose(p.grad, g[n], atol=1e-5), n


def test_text_answer_gives_no_audio_gradient_signal():
    lm = _model(2)
    s = [build_sample(dict(id="x", task="text", question_text="1+1", answer_text="2"), LAYOUT, TOK)]
    b = collate(s, LAYOUT, 8, 16, 12)
    _, parts = forward_loss(lm, b.ids, b.targets, b.audio_feats, b.audio_index, b.image_feats, b.image_index)
    assert parts["audio"] == 0 and parts["text"] > 0
    # and the loss weights apply
    loss, _ = forward_loss(lm, b.ids, b.targets, b.audio_feats, b.audio_index, b.image_feats, b.image_index,
                           weights={"text": 0.0, "audio": 1.0})
    assert loss == 0


def test_sample_text_norm_weighs_every_sample_the_same():
    torch.manual_seed(4)
    B, T, Vt, Va = 3, 6, 320, 128
    tl, al = torch.randn(B, T, Vt), torch.randn(B, T, 7, Va)
    tg = torch.full((B, 8, T), IGNORE)
    tg[0, 7, 1:] = torch.randint(0, Vt, (5,))   # a long transcript: 5 text targets
    tg[1, 7, 4] = 7                             # a one-token answer
    # item 2 has no text targets: it must not count as a sample
    loss, parts = omni_loss(tl, al, tg, norm=None, text_norm="sample")
    per_item = [F.cross_entropy(tl[b], tg[b, 7], ignore_index=IGNORE) for b in (0, 1)]
    assert torch.allclose(parts["text"], (per_item[0] + per_item[1]) / 2, atol=1e-6)
    token, _ = omni_loss(tl, al, tg)            # the default: mean over the 6 tokens
    assert torch.allclose(token, F.cross_entropy(tl.reshape(-1, Vt), tg[:, 7].reshape(-1), ignore_index=IGNORE))
    assert not torch.allclose(token, loss)
    assert count_targets(tg, "sample")[-1] == 2 and count_targets(tg)[-1] == 6


def test_sample_text_norm_gathered_forward_and_micro_batches():
    lm = _model(5)
    samples = _batch(2, seed=6)
    full = collate(samples, LAYOUT, 8, 16, 12)
    ref, ref_parts = omni_loss(*_full_reference(lm, samples, full), full.targets, text_norm="sample")
    halves = [collate(samples[:5], LAYOUT, 8, 16, 12), collate(samples[5:], LAYOUT, 8, 16, 12)]
    norm = sum(count_targets(h.targets, "sample") for h in halves)
    assert torch.equal(norm, count_targets(full.targets, "sample"))
    total = sum(forward_loss(lm, h.ids, h.targets, h.audio_feats, h.audio_index, h.image_feats, h.image_index,
                             norm=norm, head_chunk=3, text_norm="sample")[0] for h in halves)
    assert torch.allclose(total, ref, rtol=1e-5, atol=1e-5)


def test_unknown_text_norm_is_refused():
    import pytest

    from omnitalk.train.config import TrainConfig, TrainConfigError

    with pytest.raises(TrainConfigError, match="loss.text_norm must be 'token'.*got 'frame'"):
        TrainConfig.from_dict({"loss": {"text": 1.0, "audio": 1.0, "text_norm": "frame"}})
