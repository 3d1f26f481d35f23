"""Export: the official lit_model.pth layout (engine-loadable, same logits), our safetensors layout,
fine-tuning the released-layout fixture end to end, and the Qwen2 weight mapping."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from omnitalk import checkpoint as ck
from omnitalk.config import Config
from omnitalk.engine import OmniModel
from omnitalk.model.llm import OmniLM
from omnitalk.train.export import export_checkpoint, export_lit, export_safetensors, lit_state_dict
from test_train_sequences import tiny_config, train_config

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "parity" / "checkpoint"


def _ids(cfg: Config, T=9, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 200, (1, 1, T), generator=g)
    audio = torch.stack([torch.randint(0, 4096, (1, T), generator=g) + cfg.text_vocab_size + cfg.audio_vocab_size * j
                         for j in range(7)], 1)
    return torch.cat([audio, text], 1)


def _trained_fixture_lm():
    cfg = Config.from_file(FIX / "model_config.yaml")
    lm = ck.load_llm(FIX, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # stands in for training: every tensor moves
        for p in lm.parameters():
            p.data = p.data + 0.01 * torch.randn_like(p)
    lm.lm_head.weight = lm.transformer.wte.weight
    return cfg, lm


def test_export_official_layout_loads_in_the_engine_with_identical_logits(tmp_path):
    cfg, lm = _trained_fixture_lm()
    out = export_lit(lm, cfg, tmp_path / "exp", assets=FIX)
    sd = torch.load(out / "lit_model.pth", weights_only=True)
    ref = torch.load(FIX / "lit_model.pth", weights_only=True, mmap=True)
    assert list(sd) == list(ref)  # official names, official order, flat
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    assert sd["lm_head.weight"].untyped_storage().data_ptr() != sd["transformer.wte.weight"].untyped_storage().data_ptr()
    y, y_ref = yaml.safe_load((out / "model_config.yaml").read_text()), yaml.safe_load((FIX / "model_config.yaml").read_text())
    assert list(y) == list(y_ref) and y == y_ref  # the released field set and order
    ids = _ids(cfg)
    with torch.no_grad():
        want = lm(ids)
        m = OmniModel.from_pretrained(out, device="cpu", download=False)
        got = m.lm(ids)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        dst = tmp_path / "ours"
        export_safetensors(out, dst)
        m2 = OmniModel.from_pretrained(dst, device="cpu", download=False)
        got2 = m2.lm(ids)
        assert torch.equal(want[0], got2[0]) and torch.equal(want[1], got2[1])


def test_untied_head_exports_loads_and_matches_the_reference_code(tmp_path):
    """tie_word_embeddings: false: lit_model.pth stores the model's own head, the config says so, and the engine
    (official layout, ours, int8) and the release's forward pass (omnitalk.testing.reference, which uses the
    file's lm_head.weight when the config unties it) all answer with that head."""
    import dataclasses

    from omnitalk.testing.reference import ReferenceLLM

    cfg0, lm0 = _trained_fixture_lm()
    cfg = dataclasses.replace(cfg0, tie_word_embeddings=False)
    lm = OmniLM(cfg)
    sd = {k: v for k, v in lm0.state_dict().items() if k != "lm_head.weight"}
    sd["lm_head.weight"] = torch.randn_like(lm0.transformer.wte.weight) * 0.05
    lm.load_state_dict(sd)
    assert lm.lm_head.weight is not lm.transformer.wte.weight
    out = export_lit(lm, cfg, tmp_path / "exp", assets=FIX)
    file = torch.load(out / "lit_model.pth", weights_only=True)
    assert torch.equal(file["lm_head.weight"], sd["lm_head.weight"])
    assert not torch.equal(file["lm_head.weight"], file["transformer.wte.weight"])
    assert yaml.safe_load((out / "model_config.yaml").read_text())["tie_word_embeddings"] is False
    ids = _ids(cfg)
    with torch.no_grad():
        want = lm(ids)
        assert not torch.allclose(want[0], lm0(ids)[0])  # the head matters: the tied model answers otherwise
        ref = ReferenceLLM(yaml.safe_load((out / "model_config.yaml").read_text()), file)
        ref.set_kv_cache(1)
        ref_audio, ref_text = ref.forward([ids[0, s:s + 1] for s in range(8)], torch.arange(ids.shape[-1]))
        assert torch.allclose(want[0], ref_text, atol=1e-4)
        assert torch.allclose(want[1], torch.stack(ref_audio, 2), atol=1e-4)
        m = OmniModel.from_pretrained(out, device="cpu", download=False)
        assert torch.equal(m.lm(ids)[0], want[0]) and torch.equal(m.lm(ids)[1], want[1])
        export_safetensors(out, tmp_path / "ours")  # verify_conversion keeps the stored head
        m2 = OmniModel.from_pretrained(tmp_path / "ours", device="cpu", download=False)
        assert torch.equal(m2.lm(ids)[0], want[0])
        q = OmniModel.from_pretrained(out, device="cpu", mode="int8", download=False).lm
        assert type(q.lm_head).__name__ == "Int8Linear"
        got = q(ids)[0]
        assert float((got - want[0]).abs().max()) < 0.05 * float(want[0].abs().max())
        ck.convert(out, tmp_path / "int8", mode="int8")  # stored int8 (head and scales) loads as int8
        q2 = OmniModel.from_pretrained(tmp_path / "int8", device="cpu", mode="int8", download=False).lm
        assert torch.equal(q2(ids)[0], got)
    broken = {k: v for k, v in file.items() if k != "lm_head.weight"}
    with pytest.raises(ck.CheckpointError, match=r"Missing keys: \['lm_head.weight'\]"):
        ck.load_llm(out, cfg, state_dict=broken)


def test_small_vocabulary_model_round_trips(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(1)
    lm = OmniLM(cfg)
    out = export_lit(lm, cfg, tmp_path)
    back = Config.from_file(out / "model_config.yaml")
    assert back.text_vocab_size == 320 and back.padded_vocab_size == cfg.padded_vocab_size
    y = yaml.safe_load((out / "model_config.yaml").read_text())
    assert y["cat_audio_vocab_size"] == 7 * 128 and y["post_adapter"] is False
    lm2 = ck.load_llm(out, back)
    for k, v in lm.state_dict().items():
        assert torch.equal(v, lm2.state_dict()[k]), k


def test_finetune_the_released_layout_and_export(tmp_path):
    """init: checkpoint from the official-layout fixture, 3 steps of stage 3, export with the fixture's
    encoders/codec/tokenizer: the result loads in the engine and answers like the trained weights."""
    from omnitalk.train.loop import MemoryFeatures, run
    from omnitalk.tokenizer import TextTokenizer

    g = np.random.default_rng(0)
    tok = TextTokenizer(FIX / "tokenizer.json")
    recs = [dict(id="a", task="qa", question_audio="q", answer_text="ok fine", speak=True,
                 answer_snac=g.integers(0, 4096, (3, 7)).tolist()),
            dict(id="b", task="text", question_text="hello", answer_text="hi", speak=False)]
    feats = MemoryFeatures({"q": torch.randn(6, 32)})
    cfg = train_config(tmp_path / "run", model=dict(init="checkpoint", checkpoint=str(FIX), preset=None, config={}),
                       optim=dict(steps=3, lr=1e-3), batch=dict(batch_size=2), export_assets=str(FIX),
                       checkpoint_every=2)
    res = run(cfg, records=recs, features=feats)
    assert res.path == tmp_path / "run" / "final" and math.isfinite(res.last_loss)
    assert (res.path / "tokenizer.json").read_text() == (FIX / "tokenizer.json").read_text()
    m = OmniModel.from_pretrained(res.path, device="cpu", download=False)
    assert m.tokenizer.encode("hello") == tok.encode("hello")
    before = ck.load_llm(FIX, m.cfg)
    assert not torch.equal(before.transformer.h[0].mlp.fc_1.weight, m.lm.transformer.h[0].mlp.fc_1.weight)
    # the training checkpoint exports to the same weights
    exp = export_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000003", tmp_path / "again", assets=FIX)
    a, b = torch.load(exp / "lit_model.pth", weights_only=True), torch.load(res.path / "lit_model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    reply = m.generate(text="hello", reply="text", max_tokens=8)
    assert isinstance(reply.text, str)


def _omni_to_qwen2(lm: OmniLM) -> dict:
    """The inverse mapping, written independently: split the grouped fused QKV per group."""
    cfg = lm.cfg
    nh, ng, hs = cfg.n_head, cfg.n_query_groups, cfg.head_size
    qpk = nh // ng
    hf = {"model.norm.weight": lm.transformer.ln_f.weight.detach().clone(),
          "model.embed_tokens.weight": lm.transformer.wte.weight.detach()[:cfg.text_vocab_size - cfg.n_specials].clone()}
    for i, blk in enumerate(lm.transformer.h):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            w = getattr(blk.attn.attn, kind).detach()
            rows = w.reshape(ng, (qpk + 2) * hs, *w.shape[1:])
            hf[p + f"self_attn.q_proj.{kind}"] = rows[:, :qpk * hs].reshape(nh * hs, *w.shape[1:]).clone()
            hf[p + f"self_attn.k_proj.{kind}"] = rows[:, qpk * hs:(qpk + 1) * hs].reshape(ng * hs, *w.shape[1:]).clone()
            hf[p + f"self_attn.v_proj.{kind}"] = rows[:, (qpk + 1) * hs:].reshape(ng * hs, *w.shape[1:]).clone()
        hf[p + "self_attn.o_proj.weight"] = blk.attn.proj.weight.detach().clone()
        hf[p + "input_layernorm.weight"] = blk.norm_1.weight.detach().clone()
        hf[p + "post_attention_layernorm.weight"] = blk.norm_2.weight.detach().clone()
        hf[p + "mlp.gate_proj.weight"] = blk.mlp.fc_1.weight.detach().clone()
        hf[p + "mlp.up_proj.weight"] = blk.mlp.fc_2.weight.detach().clone()
        hf[p + "mlp.down_proj.weight"] = blk.mlp.proj.weight.detach().clone()
    return hf


def test_qwen2_init_maps_hugging_face_weights(tmp_path):
    """init: qwen2 reads a HF Qwen2 directory: a model exported to HF names and read back has the same
    transformer, and q/k/v land in the right heads (checked against plain per-head attention)."""
    from safetensors.torch import save_file

    from omnitalk.train.loop import build_model, model_config

    torch.manual_seed(3)
    cfg = tiny_config()
    src = OmniLM(cfg)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.3)
    hf = _omni_to_qwen2(src)
    (tmp_path / "qwen").mkdir()
    save_file({k: v.contiguous() for k, v in hf.items()}, tmp_path / "qwen" / "model.safetensors")
    tc = train_config(tmp_path / "run", model=dict(init="qwen2", checkpoint=str(tmp_path / "qwen")))
    lm = build_model(tc, model_config(tc))
    for k, v in src.state_dict().items():
        if k.startswith("transformer.") and k not in ("transformer.wte.weight",):
            assert torch.equal(lm.state_dict()[k], v), k
    n = cfg.text_vocab_size - cfg.n_specials
    assert torch.equal(lm.transformer.wte.weight[:n], src.transformer.wte.weight[:n])
    assert lm.lm_head.weight is lm.transformer.wte.weight
    # head-level check of the q/k/v placement: HF-style attention over separate projections
    x = torch.randn(1, 5, cfg.n_embd)
    p = "model.layers.0.self_attn."
    q = (x @ hf[p + "q_proj.weight"].T + hf[p + "q_proj.bias"]).view(1, 5, cfg.n_head, cfg.head_size)
    k = (x @ hf[p + "k_proj.weight"].T + hf[p + "k_proj.bias"]).view(1, 5, cfg.n_query_groups, cfg.head_size)
    fused = lm.transformer.h[0].attn.attn(x).view(1, 5, cfg.n_query_groups, -1, cfg.head_size)
    qpk = cfg.n_head // cfg.n_query_groups
    for h in range(cfg.n_head):  # HF repeat_kv: query head h uses key/value head h // qpk
        g, s = divmod(h, qpk)
        assert torch.allclose(fused[0, :, g, s], q[0, :, h], atol=1e-5)
        assert torch.allclose(fused[0, :, g, qpk], k[0, :, g], atol=1e-5)
    # an untied model takes the HF head where the download has one (Qwen2-1.5B and up), else the table
    untied = dict(tiny_config().to_dict(), tie_word_embeddings=False)
    head = torch.randn(n, cfg.n_embd)
    for extra, want in (({}, hf["model.embed_tokens.weight"]), ({"lm_head.weight": head}, head)):
        save_file({k: v.contiguous() for k, v in {**hf, **extra}.items()}, tmp_path / "qwen" / "model.safetensors")
        tc = train_config(tmp_path / "run", model=dict(init="qwen2", checkpoint=str(tmp_path / "qwen"),
                                                       preset=None, config=untied))
        lm = build_model(tc, model_config(tc))
        assert lm.lm_head.weight is not lm.transformer.wte.weight
        assert torch.equal(lm.lm_head.weight[:n], want)
        assert torch.equal(lm.transformer.wte.weight[:n], src.transformer.wte.weight[:n])


def test_lit_state_dict_strips_the_training_wrapper_prefix():
    torch.manual_seed(0)
    lm = OmniLM(tiny_config())
    sd = {f"lm.{k}": v for k, v in lm.state_dict().items()}
    out = lit_state_dict(sd)
    assert list(out)[:4] == ["whisper_adapter.fc_1.weight", "whisper_adapter.fc_2.weight",
                             "whisper_adapter.proj.weight", "lm_head.weight"]
    assert torch.equal(out["lm_head.weight"], lm.transformer.wte.weight)
