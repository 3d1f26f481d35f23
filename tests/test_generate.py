"""Decoding rules with a scripted model: stops, forcing, feedback, budgets, sampling."""
import pytest
import torch

from omnitalk import prompts as P
from omnitalk.config import preset
from omnitalk.generate import Sampling, decode, sample
from omnitalk.tokens import TokenLayout

CFG = preset("tiny")
L = TokenLayout.from_config(CFG)


class ScriptedLM:
    """Stands in for OmniLM: step k's logits pick script[k] = (text id, [7 audio ids]) per batch item."""

    def __init__(self, script, batch=1):
        self.cfg, self.script, self.k, self.fed = CFG, script, 0, []
        weight = type("W", (), {"weight": torch.zeros(1)})()
        self.transformer = type("T", (), {"wte": weight, "ln_f": weight})()
        self.batch = batch

    def setup_cache(self, B, n):
        self.cache_len = n

    def embed(self, ids, features=()):
        self.fed.append(ids.clone())
        return ids

    def forward_hidden(self, ids, pos):
        out = torch.full((ids.size(0), ids.size(-1), 1), float(self.k))
        self.k += 1
        return out

    def prefill(self, ids, pos, shared=0):
        return self.forward_hidden(ids, pos)[:, -1]

    def decode_step(self, ids, pos):
        return self.forward_hidden(self.embed(ids), pos)[:, -1]

    def text_logits(self, h):
        k = int(h[0, 0])
        logits = torch.zeros(h.size(0), CFG.text_vocab_size)
        for b in range(h.size(0)):
            logits[b, self.script[k][0]] = 5.0
        return logits

    def audio_logits(self, h):
        k = int(h.reshape(-1)[0])
        logits = torch.zeros(7, CFG.audio_vocab_size)
        logits[torch.arange(7), torch.tensor(self.script[k][1])] = 5.0
        return logits


A = [1, 2, 3, 4, 5, 6, 7]
EOA6 = [1, 2, 3, 4, 5, 6, L.eoa]


def run(script, mode, max_tokens=50, prompts=None, sampling=Sampling()):
    lm = ScriptedLM(script)
    prompts = prompts or ([P.text_prompt(L, [5], speak=True), P.text_prompt(L, [5], speak=False)]
                          if mode == "pair" else [P.text_prompt(L, [5], speak=mode == "speech")])
    steps = list(decode(lm, L, prompts, [], mode, max_tokens, sampling))
    return steps, lm


def test_text_loop_stops_on_eot_not_recorded_but_records_step0_eot():
    steps, _ = run([(L.eot, A), (11, A), (12, A), (L.eot, A), (13, A)], "text")
    assert [s.text for s in steps] == [L.eot, 11, 12]
    assert steps[0].audio is None


def test_text_loop_feeds_pad_a_and_previous_text():
    steps, lm = run([(10, A), (11, A), (L.eot, A)], "text")
    fed = lm.fed[1][0, :, 0]
    assert fed[7] == 10 and all(fed[j] == L.shift(L.pad_a, j) for j in range(7))


def test_speech_loop_forces_pad_after_eot_and_stops_on_layer6_eoa():
    script = [(10, A), (L.eot, A), (12, A), (13, A), (14, EOA6), (15, A)]
    steps, lm = run(script, "speech")
    assert [s.text for s in steps] == [10, L.eot, L.pad_t, L.pad_t]  # eoa step not recorded
    assert steps[2].audio == A
    assert lm.fed[3][0, 7, 0] == L.pad_t and lm.fed[3][0, 0, 0] == L.shift(1, 0)


def test_speech_loop_step0_rules():
    # step 0 is always recorded: its eoa does not stop, its eot does not start the forcing
    steps, _ = run([(L.eot, EOA6), (11, A), (12, EOA6)], "speech")
    assert [s.text for s in steps] == [L.eot, 11]


def test_audio_grammar_keeps_specials_out_of_frames():
    """A model that breaks the delay pattern — `_pad_a` on layer 3 at its first code step, a stray `_eoa` on
    layer 2 while layer 1 still speaks, `_pad_a` on layer 1 after an `_eoa` before its delay — samples its best
    SNAC code there instead (the scripted logits tie at 0 elsewhere, so code 0), and the fed-back ids
    follow. Pre-delay steps are free; layer 0's `_eoa`, then layer 1's, stay allowed."""
    P_, E = L.pad_a, L.eoa
    pre = [P_] * 7
    script = [(10, pre), (11, [1, E, P_, P_, P_, P_, P_]),                       # layer 1: pre-delay `_eoa`
              (12, [1, 2, P_, P_, P_, P_, P_]), (13, [1, P_, 3, P_, P_, P_, P_]),   # ... ends nothing
              (14, [1, 2, 3, P_, P_, P_, P_]),                                      # layer 3: `_pad_a` at step 4
              (15, [1, 2, E, 4, 5, P_, P_]),                                      # layer 2: `_eoa` at step 5
              (16, [E, 2, 3, 4, 5, 6, P_]), (17, [P_, E, 3, 4, 5, 6, 7]), (18, [P_, P_, E, 4, 5, 6, 7])]
    steps, lm = run(script, "speech", max_tokens=9)
    audio = [s.audio for s in steps]
    assert audio[1] == [1, E, P_, P_, P_, P_, P_] and audio[3] == [1, 0, 3, P_, P_, P_, P_]
    assert audio[4] == [1, 2, 3, 0, P_, P_, P_]
    assert audio[5] == [1, 2, 0, 4, 5, P_, P_]
    assert audio[6:] == [[E, 2, 3, 4, 5, 6, P_], [P_, E, 3, 4, 5, 6, 7], [P_, P_, E, 4, 5, 6, 7]]
    assert lm.fed[5][0, 3, 0] == L.shift(0, 3)   # the code, not the model's `_pad_a`, is fed back
    raw, _ = run(script, "speech", max_tokens=9, sampling=Sampling(audio_grammar=False))
    assert [s.audio for s in raw] == [a for _, a in script]   # the release's loop records them as sampled


def test_pair_feeds_item0_audio_and_item1_pad_with_the_same_text():
    steps, lm = run([(10, A), (11, A), (12, A)], "pair", max_tokens=3)
    fed = lm.fed[1]
    assert fed.shape == (2, 8, 1)
    assert fed[0, :7, 0].tolist() == [L.shift(a, j) for j, a in enumerate(A)]
    assert fed[1, :7, 0].tolist() == [L.shift(L.pad_a, j) for j in range(7)]
    assert fed[0, 7, 0] == fed[1, 7, 0] == 10


def test_budget_and_no_feed_after_last_step():
    steps, lm = run([(10 + k, A) for k in range(20)], "speech", max_tokens=5)
    assert len(steps) == 5 and len(lm.fed) == 5  # prefill + 4 feeds; the 5th step is not fed
    assert lm.cache_len == 3 + 1 + 5  # prompt T + budget


def test_arguments_are_checked():
    lm = ScriptedLM([(1, A)])
    with pytest.raises(ValueError, match="unknown mode"):
        list(decode(lm, L, [P.text_prompt(L, [1], False)], [], "duplex", 5))
    with pytest.raises(ValueError, match="needs 2 prompt"):
        list(decode(lm, L, [P.text_prompt(L, [1], False)], [], "pair", 5))
    with pytest.raises(ValueError, match="context is 2048"):
        list(decode(lm, L, [P.text_prompt(L, list(range(2046)), False)], [], "text", 5))


def test_sampling():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert sample(logits, Sampling(), None).tolist() == [1]
    assert sample(logits, Sampling(temperature=0.9, top_k=1), None).tolist() == [1]
    draws = lambda s: {int(sample(logits, s, torch.Generator().manual_seed(i))) for i in range(200)}
    assert draws(Sampling(temperature=1.0, top_k=2)) == {1, 2}
    assert draws(Sampling(temperature=1.0, top_p=0.3)) == {1}
    assert draws(Sampling(temperature=5.0)) == {0, 1, 2, 3}
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    big = torch.randn(4, 1000)
    s = Sampling(temperature=1.0, top_p=0.9)
    assert torch.equal(sample(big, s, g1), sample(big, s, g2))
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=0)):
        with pytest.raises(ValueError):
            Sampling(**bad)
