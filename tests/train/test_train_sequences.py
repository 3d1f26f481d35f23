"""Training sequences: exact layouts per task, delay pattern, terminal targets, masks, collate, buckets.

Also holds the small helpers (tiny config, synthetic records) that the other tests/train files import.
The tiny layout: text_vocab 320 (256 byte ids + 64 specials: _eot 256, _pad_t 257, _input_t 258, _answer_t
259, _asr 260, irq 261, n_irq 262), audio_vocab 128 per layer (64 codes + specials: _eoa 64, _pad_a 65,
_input_a 66, _answer_a 67, _image 69, _eoimage 70), layer j's absolute ids start at 320 + 128 j.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from omnitalk.config import Config
from omnitalk.tokenizer import TextTokenizer
from omnitalk.tokens import TokenLayout
from omnitalk.train.sequences import (IGNORE, RecordError, build_sample, collate, follow_text_copies,
                                      frame_statuses, length_buckets, listen_column, listen_ids, status_targets)

# ---- shared helpers --------------------------------------------------------------------------------
MODEL_OVERRIDES = dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, head_size=8, intermediate_size=64,
                       text_vocab_size=320, audio_vocab_size=128, whisper_adapter_dim=16, vision_adapter_dim=12,
                       block_size=256)
D_AUDIO, D_IMAGE, N_CODES = 16, 12, 64


def tiny_config() -> Config:
    return Config(**MODEL_OVERRIDES, padded_vocab_size=320 + 7 * 128).validate()


LAYOUT = TokenLayout.from_config(tiny_config())
TOK = TextTokenizer.byte_level()


def synthetic(n: int = 4, seed: int = 0, tasks=("qa_speech", "asr", "image", "interrupt", "tts", "text")):
    """Random records of each kind + in-memory features {path: tensor}."""
    from omnitalk.train.loop import MemoryFeatures

    g = np.random.default_rng(seed)
    recs, A, I = [], {}, {}
    for i in range(n):
        A[f"a{i}"] = torch.from_numpy(g.standard_normal((int(g.integers(4, 9)), D_AUDIO))).float()
        I[f"i{i}"] = torch.from_numpy(g.standard_normal((50, D_IMAGE))).float()
        snac = lambda k: g.integers(0, N_CODES, (k, 7)).tolist()
        if "qa_speech" in tasks:
            recs.append(dict(id=f"q{i}", task="qa", question_audio=f"a{i}", answer_text=f"is {i}", speak=True,
                             answer_snac=snac(3)))
        if "asr" in tasks:
            recs.append(dict(id=f"r{i}", task="asr", question_audio=f"a{i}", answer_text=f"w{i}"))
        if "image" in tasks:
            recs.append(dict(id=f"v{i}", task="qa", question_image=f"i{i}", question_text="c?",
                             answer_text=f"c{i}", speak=False))
        if "interrupt" in tasks:
            k = int(g.integers(1, 5))
            recs.append(dict(id=f"s{i}", task="interrupt", listen_frames=snac(5), labels=[0] * k + [1] * (5 - k)))
        if "tts" in tasks:
            recs.append(dict(id=f"t{i}", task="tts", question_text=f"say {i}", answer_snac=snac(2)))
        if "text" in tasks:
            recs.append(dict(id=f"x{i}", task="text", question_text=f"{i}+1", answer_text=f"{i + 1}", speak=False))
    return recs, MemoryFeatures(A, I)


def train_config(out_dir, **over):
    from omnitalk.train.config import TrainConfig

    d = dict(model=dict(preset="tiny", config=dict(MODEL_OVERRIDES)), stage=3,
             optim=dict(lr=3e-3, warmup_steps=2, steps=8, weight_decay=0.01), batch=dict(batch_size=4),
             out_dir=str(out_dir), checkpoint_every=0, progress=False, seed=7, threads=1)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return TrainConfig.from_dict(d)


def shifted(local, j):
    return LAYOUT.shift(local, j)


L = LAYOUT
FR = np.array([[1, 2, 3, 4, 5, 6, 7], [11, 12, 13, 14, 15, 16, 17]])  # 2 SNAC frames


# ---- layouts -----------------------------------------------------------------------------------------
def test_special_ids_of_the_tiny_layout():
    assert (L.eot, L.pad_t, L.input_t, L.answer_t, L.asr, L.irq, L.n_irq) == (256, 257, 258, 259, 260, 261, 262)
    assert (L.eoa, L.pad_a, L.input_a, L.answer_a) == (64, 65, 66, 67)
    full = TokenLayout.from_config(Config())
    assert (full.irq, full.n_irq) == (151941, 151942)


def test_text_question_text_answer():
    q, a = TOK.encode("ab"), TOK.encode("c")
    s = build_sample(dict(id="x", task="text", question_text="ab", answer_text="c", speak=False), L, TOK)
    # prompt: _input_t a b _eot _answer_t (P = 5); answer steps: c, _eot (K = 2); T = P + K - 1
    assert s.ids.shape == (8, 6)
    assert s.ids[7].tolist() == [L.input_t, *q, L.eot, L.answer_t, *a]
    assert s.targets[7].tolist() == [IGNORE] * 4 + [*a, L.eot]
    for j in range(7):
        assert s.ids[j].tolist() == [shifted(L.pad_a, j)] * 6
    assert (s.targets[:7] == IGNORE).all()  # text-only answer: no audio loss
    assert s.slots == [] and s.task == "text"


def test_text_question_speech_answer_delay_pattern():
    a = TOK.encode("c")
    s = build_sample(dict(id="x", task="qa", question_text="ab", answer_text="c", speak=True,
                          answer_snac=FR.tolist()), L, TOK)
    P, n = 5, 2
    K = n + 8  # layer 6's _eoa is the last step: 1 + 6 + n + 1
    assert s.ids.shape == (8, P + K - 1)
    assert s.ids[0, P - 1] == shifted(L.answer_a, 0)  # T1A2 asks for speech
    # text: answer, _eot, then _pad_t (with loss)
    assert s.targets[7, P - 1:].tolist() == [*a, L.eot] + [L.pad_t] * (K - 2)
    # layer j: _pad_a at steps 0..j, frame codes at j+1, j+2, _eoa at j+3, _pad_a after (local ids)
    for j in range(7):
        want = [L.pad_a] * (j + 1) + [FR[0, j], FR[1, j], L.eoa] + [L.pad_a] * (K - j - 4)
        assert s.targets[j, P - 1:].tolist() == want, j
        assert (s.targets[j, :P - 1] == IGNORE).all()
        # inputs are the same steps fed back one position later, as absolute ids
        assert s.ids[j, P:].tolist() == [shifted(x, j) for x in want[:-1]]
    assert s.targets[6, -1] == L.eoa and s.targets[0, P - 1 + 3] == L.eoa
    assert s.ids[7, P:].tolist() == [*a, L.eot] + [L.pad_t] * (K - 3)


def test_speech_question_text_answer_with_feature_slot():
    feats = torch.randn(3, D_AUDIO)
    s = build_sample(dict(id="x", task="qa", question_audio="q.wav", answer_text="ok", speak=False), L, TOK, feats)
    # A1T2: _input_a, 3 slots, _eoa, _pad_a (audio rows) / _input_t, _pad_t x3, _eot, _answer_t (text)
    P = 6
    assert s.ids[0, :P].tolist() == [shifted(x, 0) for x in (L.input_a, L.pad_a, L.pad_a, L.pad_a, L.eoa, L.pad_a)]
    assert s.ids[7, :P].tolist() == [L.input_t, L.pad_t, L.pad_t, L.pad_t, L.eot, L.answer_t]
    assert len(s.slots) == 1 and s.slots[0].pos == 1 and s.slots[0].kind == "audio"
    assert torch.equal(s.slots[0].feats, feats)
    assert s.targets[7].tolist() == [IGNORE] * (P - 1) + TOK.encode("ok") + [L.eot]
    assert (s.targets[:7] == IGNORE).all()


def test_asr_text_loss_only_and_asr_marker():
    s = build_sample(dict(id="x", task="asr", question_audio="q.wav", answer_text="hi"), L, TOK,
                     torch.randn(2, D_AUDIO))
    assert s.ids[7, 4] == L.asr and s.ids[0, 4] == shifted(L.pad_a, 0)
    assert s.targets[7].tolist() == [IGNORE] * 4 + TOK.encode("hi") + [L.eot]
    assert (s.targets[:7] == IGNORE).all()


def test_tts_audio_loss_only_text_row_carries_the_words():
    s = build_sample(dict(id="x", task="tts", question_text="ab", answer_snac=FR[:1].tolist()), L, TOK)
    P = 5
    assert (s.targets[7] == IGNORE).all()
    assert s.ids[7, P:].tolist()[:3] == [*TOK.encode("ab"), L.eot]  # the words, as input only
    assert s.targets[0, P - 1:].tolist()[:3] == [L.pad_a, FR[0, 0], L.eoa]
    assert s.targets[6, -1] == L.eoa


def test_text_loss_false_keeps_the_words_as_input_and_trains_the_speech_only():
    rec = dict(id="x", task="qa", question_text="ab", answer_text="c", speak=True, answer_snac=FR.tolist())
    full, follow = build_sample(rec, L, TOK), build_sample({**rec, "text_loss": False}, L, TOK)
    assert torch.equal(full.ids, follow.ids)                        # the same inputs, text row included
    assert torch.equal(full.targets[:7], follow.targets[:7])        # the same speech targets
    assert (follow.targets[7] == IGNORE).all() and (full.targets[7] != IGNORE).any()
    with pytest.raises(RecordError, match="text_loss: false leaves nothing to learn"):
        build_sample({**rec, "speak": False, "text_loss": False}, L, TOK)


def test_follow_text_copies_say_another_answer_in_words_and_speech():
    recs = [dict(id=f"r{i}", task="qa", question_text=f"q{i}", answer_text=f"a{i % 3}", speak=True,
                 answer_snac=[[i % 3] * 7], answer_audio=f"a{i % 3}.wav") for i in range(200)]
    recs += [dict(id="t", task="qa", question_text="q", answer_text="a0", speak=False),   # not spoken: never copied
             dict(id="s", task="asr", question_audio="q.wav", answer_text="a1")]
    pairs = follow_text_copies(recs, 0.3, seed=1)
    copies = [c for _, c in pairs]
    assert 40 <= len(copies) <= 80 and pairs == follow_text_copies(recs, 0.3, seed=1)  # a seeded share
    assert pairs != follow_text_copies(recs, 0.3, seed=2)
    by_id = {r["id"]: r for r in recs}
    for i, c in pairs:
        orig = by_id[c["id"][:-3]]
        assert recs[i] is orig
        assert c["id"].endswith("-ft") and c["question_text"] == orig["question_text"] and c["text_loss"] is False
        assert c["answer_text"] != orig["answer_text"]                  # another answer ...
        k = int(c["answer_text"][1])
        assert c["answer_snac"] == [[k] * 7] and c["answer_audio"] == f"a{k}.wav"  # ... with its own speech
    assert follow_text_copies(recs, 0.0) == [] and follow_text_copies(recs[:1], 1.0) == []  # one answer: none
    assert len(follow_text_copies(recs, 1.0)) == 200
    with pytest.raises(ValueError, match="follow_text share must be in"):
        follow_text_copies(recs, 1.5)


def test_image_and_speech_question_slots():
    s = build_sample(dict(id="x", task="qa", question_audio="q", question_image="i", answer_text="a", speak=True,
                          answer_snac=FR.tolist()), L, TOK, torch.randn(4, D_AUDIO), torch.randn(50, D_IMAGE))
    kinds = {sl.kind: sl.pos for sl in s.slots}
    assert kinds == {"image": 1, "audio": 52}  # quirk Q2 of the release: frame 0 at the _input_a slot
    assert s.ids[0, 0] == shifted(L.image, 0) and s.ids[0, 51] == shifted(L.eoimage, 0)


def test_image_text_question():
    s = build_sample(dict(id="x", task="qa", question_image="i", question_text="c?", answer_text="red",
                          speak=False), L, TOK, None, torch.randn(50, D_IMAGE))
    assert [(sl.pos, sl.kind) for sl in s.slots] == [(1, "image")]
    P = 52 + len(TOK.encode("c?")) + 2 + 1
    assert s.ids[7, P - 1] == L.answer_t
    assert s.targets[7, P - 1:].tolist() == TOK.encode("red") + [L.eot]


def test_interrupt_listening_layout():
    labels = [0, 1, 1]
    frames = FR.tolist() + [[21, 22, 23, 24, 25, 26, 27]]
    s = build_sample(dict(id="x", task="interrupt", listen_frames=frames, labels=labels), L, TOK)
    T = 3 + 7
    assert s.ids.shape == (8, T)
    assert s.ids[7].tolist() == [L.n_irq] * T  # the status fed back: n_irq (listening stops at the first irq)
    assert s.ids[0].tolist() == [shifted(x, 0) for x in [L.input_a, 1, 11, 21] + [L.pad_a] * 6]
    assert s.ids[6].tolist() == [shifted(x, 6) for x in [L.input_a] + [L.pad_a] * 6 + [7, 17, 27]]
    assert L.eoa not in (s.ids[:7] - torch.tensor([[L.audio_offset(j)] for j in range(7)])).flatten().tolist()
    # column c's status is about frame c-1 (its coarse code entered at c): labels[1] = 1 -> irq from column 2
    assert s.targets[7].tolist() == [L.n_irq, L.n_irq] + [L.irq] * 8
    assert (s.targets[:7] == IGNORE).all()
    assert np.array_equal(listen_ids(L, frames), s.ids.numpy())
    for c in range(T):  # streaming: column c needs only the frames heard so far
        assert np.array_equal(listen_column(L, frames[:c], c), s.ids[:, c].numpy()), c
    assert status_targets(L, [0, 0, 0]).tolist() == [L.n_irq] * 10
    # a perfect detector's columns map back onto the labels, frame by frame
    assert frame_statuses(L, s.targets[7].tolist(), 3) == labels


@pytest.mark.parametrize("rec, msg", [
    (dict(task="qa", answer_text="x"), "no question"),
    (dict(task="qa", question_text="q", answer_text="x", speak=True), "answer_snac"),
    (dict(task="asr", question_audio="a", answer_text="x", speak=True), "speak"),
    (dict(task="interrupt", listen_frames=[[1] * 7], labels=[0, 1]), "labels"),
    (dict(task="chat", question_text="q"), "unknown task"),
])
def test_bad_records_say_why(rec, msg):
    with pytest.raises(RecordError, match=msg):
        build_sample({"id": "bad", **rec}, L, TOK, torch.randn(2, D_AUDIO) if rec.get("question_audio") else None)


def test_tokenizer_ids_must_fit_the_text_vocabulary():
    small = TokenLayout(text_vocab_size=64 + 64, audio_vocab_size=128, n_audio_layers=7, n_specials=64)
    with pytest.raises(RecordError, match="text vocabulary"):
        build_sample(dict(id="x", task="text", question_text="zz", answer_text="z"), small, TOK)


# ---- batching ----------------------------------------------------------------------------------------
def test_collate_pads_and_indexes_features():
    recs, feats = synthetic(1)
    samples = []
    for r in recs:
        af = feats.audio(r["question_audio"]) if r.get("question_audio") else None
        vf = feats.image(r["question_image"]) if r.get("question_image") else None
        samples.append(build_sample(r, L, TOK, af, vf))
    b = collate(samples, L, pad_to_multiple=8)
    T = max(s.length for s in samples)
    assert b.ids.shape[2] % 8 == 0 and b.ids.shape[2] >= T and b.ids.shape[:2] == (len(samples), 8)
    for i, s in enumerate(samples):
        assert torch.equal(b.ids[i, :, :s.length], s.ids)
        assert (b.targets[i, :, s.length:] == IGNORE).all()
        assert b.ids[i, 7, s.length:].eq(L.pad_t).all() and b.ids[i, 3, s.length:].eq(shifted(L.pad_a, 3)).all()
    n_audio = sum(sl.feats.shape[0] for s in samples for sl in s.slots if sl.kind == "audio")
    assert b.audio_feats.shape == (n_audio, D_AUDIO) and b.image_feats.shape == (50, D_IMAGE)
    item = b.tasks.index("asr")
    rows = b.audio_index[:, 0] == item
    assert b.audio_index[rows, 1].tolist() == list(range(1, 1 + int(rows.sum())))
    # a batch without images still has a correctly shaped (empty) image tensor
    b2 = collate(samples[:1], L, image_dim=D_IMAGE)
    assert b2.image_feats.shape == (0, D_IMAGE) and b2.image_index.shape == (0, 2)


def test_length_buckets_respect_the_token_budget():
    lengths = [5, 30, 9, 17, 8, 31, 3, 64, 100]
    batches = length_buckets(lengths, batch_tokens=64, pad_to_multiple=8)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(-(-lengths[i] // 8) * 8 for i in b)
        assert len(b) == 1 or longest * len(b) <= 64
    assert [8] in batches and [7] in batches  # 100 > budget: alone; 64 fills the budget alone
    # ties keep the given order
    assert length_buckets([4, 4, 4], 100, order=[2, 0, 1]) == [[2, 0, 1]]
