"""The decoder: GQA cache vs full attention vs an expanded-head reference, tied head, state-dict keys."""
import json
import math
from pathlib import Path

import pytest
import torch

from omnitalk.config import Config, preset
from omnitalk.model.llm import OmniLM, RMSNorm, apply_rope, rope_cache

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "parity"


def small(n_head=4, groups=2, **kw):
    cfg = preset("tiny", n_head=n_head, n_query_groups=groups, n_embd=n_head * 8, head_size=8, **kw)
    torch.manual_seed(0)
    lm = OmniLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2 and p is not lm.transformer.wte.weight:
                p.normal_(0, 2 / math.sqrt(p.size(1)))
    return lm


def random_ids(cfg: Config, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randint(0, 4096, (B, 7, T), generator=g) + torch.tensor(
        [cfg.text_vocab_size + cfg.audio_vocab_size * j for j in range(7)])[None, :, None]
    text = torch.randint(0, 1000, (B, 1, T), generator=g)
    return torch.cat([audio, text], 1)


def naive_forward(lm: OmniLM, ids):
    """Expanded heads, explicit softmax: an independent statement of the math."""
    cfg = lm.cfg
    x = lm.transformer.wte(ids).sum(1) / ids.size(1)
    B, T, C = x.shape
    cos, sin = rope_cache(T, cfg.head_size, cfg.rope_base)
    for blk in lm.transformer.h:
        h = blk.norm_1(x)
        qkv = blk.attn.attn(h).view(B, T, cfg.n_query_groups, -1, cfg.head_size)
        per = cfg.n_head // cfg.n_query_groups
        q = qkv[:, :, :, :per].reshape(B, T, cfg.n_head, -1).transpose(1, 2)
        k = qkv[:, :, :, per:per + 1].expand(-1, -1, -1, per, -1).reshape(B, T, cfg.n_head, -1).transpose(1, 2)
        v = qkv[:, :, :, per + 1:].expand(-1, -1, -1, per, -1).reshape(B, T, cfg.n_head, -1).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.head_size)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + blk.attn.proj((att @ v).transpose(1, 2).reshape(B, T, -1))
        x = x + blk.mlp(blk.norm_2(x))
    return lm.transformer.ln_f(x) @ lm.transformer.wte.weight.T


@pytest.mark.parametrize("n_head, groups", [(4, 1), (4, 2), (4, 4), (6, 3)])
def test_matches_naive_expanded_heads(n_head, groups):
    lm = small(n_head, groups)
    ids = random_ids(lm.cfg, 2, 12)
    text, audio = lm(ids)
    ref = naive_forward(lm, ids)
    assert torch.allclose(text, ref[..., :152000], atol=1e-4, rtol=1e-4)
    assert torch.allclose(audio.flatten(-2), ref[..., 152000:], atol=1e-4, rtol=1e-4)


def test_cached_decoding_equals_full_forward():
    lm = small()
    ids = random_ids(lm.cfg, 2, 16, seed=3)
    full_text, full_audio = lm(ids)
    lm.setup_cache(2, 16)
    with torch.no_grad():
        h = [lm.forward_hidden(lm.embed(ids[..., :9]), 0)]       # prefill 9 positions
        h += [lm.forward_hidden(lm.embed(ids[..., 9:13]), 9)]    # a chunk after the cache (masked path)
        for t in range(13, 16):                                  # then one position at a time
            h.append(lm.forward_hidden(lm.embed(ids[..., t:t + 1]), t))
    h = torch.cat(h, 1)
    assert torch.allclose(lm.text_logits(h), full_text, atol=1e-4)
    assert torch.allclose(lm.audio_logits(h), full_audio, atol=1e-4)
    # the cache holds only the key/value heads
    assert lm.transformer.h[0].attn.kv_cache.k.shape == (2, 2, 16, 8)


def test_static_step_equals_the_plain_step():
    """The step torch.compile traces (whole cache under a mask, position as a tensor) computes what the
    plain cached step computes, and writes only its own position of the cache."""
    lm = small()
    ids = random_ids(lm.cfg, 2, 14, seed=5)
    with torch.no_grad():
        lm.setup_cache(2, 14)
        plain = [lm.forward_hidden(lm.embed(ids[..., :9]), 0)[:, -1]]
        plain += [lm.forward_hidden(lm.embed(ids[..., t:t + 1]), t)[:, -1] for t in range(9, 14)]
        lm.setup_cache(2, lm.cfg.block_size)
        static = [lm.forward_hidden(lm.embed(ids[..., :9]), 0)[:, -1]]
        for t in range(9, 14):
            static.append(lm.static_step(ids[..., t:t + 1], torch.full((2,), t)))
            k = lm.transformer.h[0].attn.kv_cache.k
            assert k[:, :, t].abs().sum() > 0 and k[:, :, t + 1:].abs().sum() == 0
    torch.testing.assert_close(torch.stack(static), torch.stack(plain), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # one row alone (speech mode) reads row 0 of the same caches
        one = lm.static_step(ids[:1, :, 13:14], torch.full((1,), 13))
    torch.testing.assert_close(one, plain[-1][:1], atol=1e-5, rtol=1e-5)


def test_compiled_step_shares_static_caches():
    """After compile_decode every request gets the same block_size caches (addresses a CUDA graph keeps);
    a request set up without them runs the plain step."""
    lm = small()
    lm.compile_decode(warmup=False)
    lm.setup_cache(1, 20)
    first = lm.transformer.h[0].attn.kv_cache
    assert first.k.shape == (2, lm.cfg.n_query_groups, lm.cfg.block_size, lm.cfg.head_size)
    lm.clear_cache()
    lm.setup_cache(2, 50)
    assert lm.transformer.h[0].attn.kv_cache is first
    static = lm.compiled_step
    assert static.ready(lm, 2) and not static.ready(lm, 3)
    lm.transformer.h[0].attn.kv_cache = None
    assert not static.ready(lm, 1)


def test_context_limit_is_enforced():
    lm = small()
    with pytest.raises(ValueError, match="context of 2048"):
        lm.setup_cache(1, 2049)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        lm.forward_hidden(torch.zeros(1, 3, lm.cfg.n_embd), 2047)


def test_features_replace_audio_rows_only():
    lm = small()
    ids = random_ids(lm.cfg, 1, 6)
    f = torch.randn(1, 2, lm.cfg.n_embd)
    x = lm.embed(ids, [(2, f)])
    wte = lm.transformer.wte
    expect = (7 * f[0, 1] + wte(ids[0, 7, 3])) / 8
    assert torch.allclose(x[0, 3], expect, atol=1e-6)
    assert torch.allclose(x[0, 0], wte(ids[0, :, 0]).sum(0) / 8, atol=1e-6)


def test_head_is_tied_to_the_embedding():
    lm = small()
    assert lm.lm_head.weight is lm.transformer.wte.weight


def test_rmsnorm_normalises_in_fp32():
    n = RMSNorm(8, 1e-6)
    x = (torch.randn(3, 8) * 300).to(torch.bfloat16)
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(n(x), ref)


def test_full_size_state_dict_matches_release_manifest():
    manifest = json.loads((FIX / "manifests" / "lit_model.json").read_text())["tensors"]
    with torch.device("meta"):
        lm = OmniLM(Config.from_file(FIX / "manifests" / "model_config.yaml"))
    got = [(k, list(v.shape)) for k, v in lm.state_dict().items()]
    assert got == [(m["name"], m["shape"]) for m in manifest]
    n_params = sum(p.numel() for p in lm.parameters())  # parameters() counts the tied head once
    assert n_params == 541_349_760


def test_small_row_linear_matches_f_linear():
    """omnitalk.model.llm.linear: omnitalk's gemv kernel (or weight @ x.T without it) for a few rows on
    the CPU (decode steps), F.linear otherwise; the same values up to float rounding, gradients included."""
    import torch.nn.functional as F

    from omnitalk.model.llm import Linear, linear

    torch.manual_seed(0)
    w, b = torch.randn(48, 32), torch.randn(48)
    for shape in [(2, 32), (2, 1, 32), (1, 32), (8, 32), (3, 5, 32)]:
        x = torch.randn(*shape)
        for bias in (None, b):
            y = linear(x, w, bias)
            assert y.shape == (*shape[:-1], 48)
            torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    big = torch.randn(40, 32)
    assert torch.equal(linear(big, w, b), F.linear(big, w, b))  # many rows: F.linear itself
    lin = Linear(32, 48)
    x = torch.randn(2, 32, requires_grad=True)
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(2, -1))
    assert set(lin.state_dict()) == {"weight", "bias"}


@torch.no_grad()
def test_prefill_computes_a_shared_prefix_once():
    """OmniLM.prefill: a pair whose prompts differ only in the last column runs the common prefix for row
    0 alone and copies its keys/values; hidden states and caches equal a full batch-2 forward pass,
    for the module's own KVCache and for rows of a SlotCache pool."""
    from omnitalk.generate import shared_prefix

    lm = small()
    ids = random_ids(lm.cfg, 1, 9).repeat(2, 1, 1)
    ids[1, :, -1] = random_ids(lm.cfg, 1, 1, seed=5)[0, :, 0]   # the rows differ in the last column only
    assert shared_prefix(ids) == 8
    assert shared_prefix(ids[:1]) == 9
    x = lm.embed(ids)
    full = lm.forward_hidden(x, 0)[:, -1]
    calls = []
    forward_hidden = lm.forward_hidden
    lm.forward_hidden = lambda x, *a: calls.append(tuple(x.shape[:2])) or forward_hidden(x, *a)
    lm.setup_cache(2, 12)
    h = lm.prefill(x, 0, shared_prefix(ids))
    del lm.forward_hidden
    assert calls == [(1, 8), (2, 1)]                          # the prefix once, then both last columns
    torch.testing.assert_close(h, full, rtol=1e-5, atol=1e-5)
    k_shared = lm.transformer.h[0].attn.kv_cache.k[:, :, :9].clone()
    lm.setup_cache(2, 12)
    lm.forward_hidden(x, 0)
    torch.testing.assert_close(k_shared, lm.transformer.h[0].attn.kv_cache.k[:, :, :9], rtol=1e-5, atol=1e-5)
    lm.clear_cache()
    pool = lm.slot_caches(6, 12)
    rows = torch.tensor([4, 1])
    h2 = lm.prefill(x, 0, 8, pool, rows)
    torch.testing.assert_close(h2, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool[0].k[4, :, :8], pool[0].k[1, :, :8])
    assert not pool[0].k[[0, 2, 3, 5]].any()                    # other rows untouched
    different = random_ids(lm.cfg, 2, 9)
    assert shared_prefix(different) == 0
    expected = lm.forward_hidden(lm.embed(different), 0)[:, -1]
    lm.setup_cache(2, 12)
    torch.testing.assert_close(lm.prefill(lm.embed(different), 0, 0), expected)


def test_residual_dropout_acts_only_in_training():
    lm = small()
    ids = random_ids(lm.cfg, 2, 6)
    x = lm.embed(ids)
    ref = lm.forward_hidden(x, 0)
    for b in lm.transformer.h:
        b.dropout = 0.5
    torch.testing.assert_close(lm.forward_hidden(x, 0), ref, rtol=0, atol=0)      # eval mode: no dropout
    lm.train()
    torch.manual_seed(1)
    a = lm.forward_hidden(x, 0)
    torch.manual_seed(2)
    assert not torch.allclose(a, lm.forward_hidden(x, 0))                        # a random mask per call
    for b in lm.transformer.h:
        b.dropout = 0.0
    torch.testing.assert_close(lm.forward_hidden(x, 0), ref)                      # p = 0: the plain block
