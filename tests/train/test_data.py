"""Manifest format, corpus readers, SNAC strings, answer encoding and the feature cache."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from omnitalk.train.data import (FeatureCache, ManifestError, encode_answers, format_snac_string, iter_voiceassistant,
                                 load_wav, make_record, parse_snac_string, read_libri, read_librispeech, read_libritts,
                                 read_manifest, validate_record, write_manifest)


def tone(seconds=0.3, sr=16000, f=220.0):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32)


def write_lines(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


FRAMES = [[1, 2, 3, 4, 5, 6, 7], [4095, 0, 10, 20, 30, 40, 50]]


# ---- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rec, field, words", [
    ({"task": "qa", "question_text": "q", "answer_text": "a"}, "id", "required"),
    ({"id": "x", "task": "chat", "question_text": "q", "answer_text": "a"}, "task", "must be one of"),
    ({"id": "x", "task": "asr", "answer_text": "a"}, "question_audio", "needs the audio"),
    ({"id": "x", "task": "asr", "question_audio": "a.wav", "answer_text": "a", "speak": True}, "speak", "text only"),
    ({"id": "x", "task": "qa", "answer_text": "a"}, "question_text", "at least one"),
    ({"id": "x", "task": "qa", "question_text": "q"}, "answer_text", "needs the answer"),
    ({"id": "x", "task": "qa", "question_text": "q", "answer_text": "a", "speak": True}, "answer_snac", "neither"),
    ({"id": "x", "task": "qa", "question_text": "q", "answer_text": "a", "speak": "yes"}, "speak", "true or false"),
    ({"id": "x", "task": "qa", "question_text": "q", "answer_text": "a", "answer_snac": [[1, 2, 3]]},
     "answer_snac", "shape [n,7]"),
    ({"id": "x", "task": "qa", "question_text": "q", "answer_text": "a", "answer_snac": [[1, 2, 3, 4, 5, 6, 4097]]},
     "answer_snac", "frame 0 layer 6 holds 4097"),
    ({"id": "x", "task": "text", "question_audio": "a.wav", "question_text": "q", "answer_text": "a"},
     "question_audio", "typed text alone"),
    ({"id": "x", "task": "tts", "question_text": "hello"}, "answer_snac", "needs the speech"),
    ({"id": "x", "task": "interrupt", "labels": [0]}, "listen_frames", "needs listen_frames"),
    ({"id": "x", "task": "interrupt", "listen_frames": FRAMES, "labels": [0]}, "labels", "1 labels for 2"),
    ({"id": "x", "task": "interrupt", "listen_frames": FRAMES, "labels": [1, 0]}, "labels", "0...0 then 1...1"),
    ({"id": "x", "task": "interrupt", "listen_frames": FRAMES, "labels": [0, 2]}, "labels", "found 2"),
])
def test_validation_names_the_field(rec, field, words):
    with pytest.raises(ManifestError) as e:
        validate_record(rec, "m.jsonl:3")
    msg = str(e.value)
    assert msg.startswith(f"m.jsonl:3: field '{field}'") and words in msg, msg


def test_validation_fills_defaults():
    r = validate_record({"id": "t", "task": "tts", "question_text": "hi", "answer_snac": FRAMES})
    assert r["speak"] is True and r["answer_text"] == "hi" and r["question_image"] is None
    r = validate_record({"id": "q", "task": "qa", "question_text": "hi", "answer_text": "a"})
    assert r["speak"] is False and r["answer_snac"] is None


def test_read_manifest_errors_name_line_and_field(tmp_path):
    m = write_lines(tmp_path / "m.jsonl", [{"id": "a", "task": "text", "question_text": "q", "answer_text": "x"},
                                           "", "{not json"])
    with pytest.raises(ManifestError, match=r"m.jsonl:3: not valid JSON"):
        read_manifest(m)
    write_lines(m, [{"id": "a", "task": "text", "question_text": "q", "answer_text": "x"},
                    {"id": "a", "task": "text", "question_text": "q", "answer_text": "y"}])
    with pytest.raises(ManifestError, match=r"m.jsonl:2: field 'id': duplicate id 'a' \(first on line 1\)"):
        read_manifest(m)
    write_lines(m, [{"id": "a", "task": "asr", "question_audio": "missing.wav", "answer_text": "x"}])
    with pytest.raises(ManifestError, match=r"m.jsonl:1: field 'question_audio': file not found"):
        read_manifest(m)
    assert read_manifest(m, check_files=False)[0]["question_audio"] == str(tmp_path / "missing.wav")
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_write_read_roundtrip_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    wav = tmp_path / "data" / "q.wav"
    sf.write(wav, tone(), 16000)
    recs = [make_record("r1", "asr", question_audio=str(wav), answer_text="hello", voice="v1"),
            make_record("r2", "tts", question_text="hi", answer_snac=np.asarray(FRAMES), speak=True)]
    out = write_manifest(recs, tmp_path / "sets" / "m.jsonl")
    line = json.loads(out.read_text().splitlines()[0])
    assert line["question_audio"] == "../data/q.wav" and line["voice"] == "v1"
    back = read_manifest(out)
    assert back[0]["question_audio"] == str(wav.resolve()) and back[1]["answer_snac"] == FRAMES
    with pytest.raises(ManifestError, match="duplicate id"):
        write_manifest(recs + recs[:1], tmp_path / "dup.jsonl")
    with pytest.raises(ManifestError, match=r"record 0 \(id 'bad'\): field 'answer_text'"):
        write_manifest([make_record("bad", "asr", question_audio=str(wav))], tmp_path / "bad.jsonl")


# ---- SNAC strings --------------------------------------------------------------------------------
def test_snac_string_roundtrip():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 4096, size=(9, 7))
    s = format_snac_string(frames)
    assert s.startswith("# ") and s.count("#") == 9
    assert np.array_equal(parse_snac_string(s), frames)
    assert np.array_equal(parse_snac_string("#1 2 3 4 5 6 7#8 9 10 11 12 13 14 "), np.arange(1, 15).reshape(2, 7))
    assert parse_snac_string("").shape == (0, 7)
    with pytest.raises(ValueError, match="frame 1 has 6 codes"):
        parse_snac_string("# 1 2 3 4 5 6 7 # 1 2 3 4 5 6")
    with pytest.raises(ValueError, match="start with '#'"):
        parse_snac_string("1 2 3 4 5 6 7")
    with pytest.raises(ValueError, match="outside 0..4095"):
        parse_snac_string("# 1 2 3 4 5 6 4096")


# ---- LibriSpeech / LibriTTS ----------------------------------------------------------------------
def test_librispeech_reader(tmp_path):
    root = tmp_path / "LibriSpeech" / "test-clean"
    for spk, ch, texts in (("1089", "134686", ["HE HOPED THERE WOULD BE STEW", "STUFF IT INTO YOU"]),
                           ("121", "121726", ["ALSO A POPULAR CONTRIVANCE"])):
        d = root / spk / ch
        d.mkdir(parents=True)
        lines = []
        for i, t in enumerate(texts):
            utt = f"{spk}-{ch}-{i:04d}"
            sf.write(d / f"{utt}.flac", tone(), 16000, format="FLAC")
            lines.append(f"{utt} {t}")
        (d / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    recs = read_librispeech(tmp_path / "LibriSpeech")
    assert [r["id"] for r in recs] == ["1089-134686-0000", "1089-134686-0001", "121-121726-0000"]
    r = recs[0]
    assert r["task"] == "asr" and r["answer_text"] == "HE HOPED THERE WOULD BE STEW" and r["speaker"] == "1089"
    assert r["question_audio"].endswith("1089-134686-0000.flac")
    assert read_libri(root, lowercase=True, limit=2)[1]["answer_text"] == "stuff it into you"
    write_manifest(recs, tmp_path / "m.jsonl")
    assert len(read_manifest(tmp_path / "m.jsonl")) == 3
    (root / "121" / "121726" / "121-121726-0000.flac").unlink()
    with pytest.raises(ValueError, match="no audio file 121-121726-0000.flac"):
        read_librispeech(root)


def test_libritts_reader(tmp_path):
    d = tmp_path / "LibriTTS" / "dev-clean" / "84" / "121123"
    d.mkdir(parents=True)
    for i, text in enumerate(["Go, do you hear?", "But in less than five minutes, the staircase groaned."]):
        utt = f"84_121123_000007_00000{i}"
        sf.write(d / f"{utt}.wav", tone(sr=24000), 24000)
        (d / f"{utt}.normalized.txt").write_text(text)
        (d / f"{utt}.original.txt").write_text(text.upper())
    recs = read_libritts(tmp_path / "LibriTTS")
    assert [r["answer_text"] for r in recs] == ["Go, do you hear?",
                                                "But in less than five minutes, the staircase groaned."]
    assert recs[0]["speaker"] == "84" and recs[0]["corpus"] == "libritts"
    assert read_libri(tmp_path / "LibriTTS")[1]["id"] == "84_121123_000007_000001"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither LibriSpeech"):
        read_libri(tmp_path / "empty")


# ---- VoiceAssistant-400K -------------------------------------------------------------------------
def test_voiceassistant_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the data extra) reads parquet")
    import io

    import pyarrow.parquet as pq

    rows = []
    rng = np.random.default_rng(1)
    want = []
    for i in range(3):
        buf = io.BytesIO()
        sf.write(buf, tone(0.2, 22050, 200 + 50 * i), 22050, format="WAV")
        frames = rng.integers(0, 4096, size=(4 + i, 7))
        want.append(frames)
        rows.append({"split_name": "identity", "index": i, "round": 0, "question": f"question {i}?",
                     "question_audio": {"bytes": buf.getvalue(), "path": f"q{i}.wav"},
                     "answer": f"answer {i}.", "answer_snac": format_snac_string(frames)})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000.parquet")
    out = tmp_path / "out"
    recs = list(iter_voiceassistant(tmp_path, out))
    assert [r["id"] for r in recs] == ["va-identity-0-0", "va-identity-1-0", "va-identity-2-0"]
    r = recs[1]
    assert r["task"] == "qa" and r["speak"] and r["question_text"] is None
    assert r["question_transcript"] == "question 1?" and r["answer_text"] == "answer 1."
    assert np.array_equal(r["answer_snac"], want[1])
    x, sr = sf.read(r["question_audio"])
    assert sr == 22050 and len(x) == int(0.2 * 22050)
    write_manifest(recs, out / "va.jsonl")
    assert len(read_manifest(out / "va.jsonl")) == 3
    assert len(list(iter_voiceassistant(tmp_path / "train-00000.parquet", out, limit=2))) == 2
    rows[0]["answer_snac"] = "# 1 2 3"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000.parquet")
    with pytest.raises(ValueError, match="row 0: answer_snac frame 0 has 3 codes"):
        list(iter_voiceassistant(tmp_path, out))


# ---- codes and features --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    from omnitalk.engine import OmniModel
    return OmniModel.from_random("tiny", seed=0)


def test_encode_answers(tmp_path, tiny_model):
    sf.write(tmp_path / "a.wav", tone(0.25, 16000), 16000)  # resampled to 24 kHz: 6000 samples -> 3 frames
    recs = [make_record("a", "tts", question_text="hi", answer_audio=str(tmp_path / "a.wav")),
            make_record("b", "tts", question_text="hi", answer_snac=FRAMES)]
    out = encode_answers(recs, tiny_model.codec, progress=False)
    assert np.asarray(out[0]["answer_snac"]).shape == (3, 7) and out[1]["answer_snac"] == FRAMES
    assert recs[0]["answer_snac"] is None  # inputs untouched
    want = tiny_model.codec.encode(load_wav(tmp_path / "a.wav", 24000))
    assert np.array_equal(out[0]["answer_snac"], want)


def test_feature_cache_hits_and_misses(tmp_path, tiny_model):
    from PIL import Image

    from omnitalk.engine import OmniModel

    for i in range(2):
        sf.write(tmp_path / f"q{i}.wav", tone(0.5 + 0.5 * i, 16000, 300 + i), 16000)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "img.png")
    recs = [make_record(f"r{i}", "qa", question_audio=str(tmp_path / f"q{i}.wav"), answer_text="x") for i in range(2)]
    recs.append(make_record("r2", "qa", question_audio=str(tmp_path / "q0.wav"),
                            question_image=str(tmp_path / "img.png"), answer_text="x"))
    cache = FeatureCache(tmp_path / "cache", tiny_model)
    rep = cache.prepare(recs, progress=False, batch_size=2)
    assert rep == {"audio": {"hits": 0, "misses": 2}, "image": {"hits": 0, "misses": 1}}
    a0 = cache.audio(tmp_path / "q0.wav")
    assert a0.shape == (26, tiny_model.whisper.dims.n_audio_state)  # 0.5 s -> int(500 / 20) + 1 frames
    assert cache.audio(tmp_path / "q1.wav").shape[0] == 51
    assert cache.image(tmp_path / "img.png").shape == (50, tiny_model.clip.dims.output_dim)
    assert cache.stats["audio"].hits == 2 and cache.stats["image"].hits == 1
    # the cached value is the engine's Whisper output for the first L frames
    from omnitalk import audio as audio_io
    from omnitalk.model.whisper import encode
    x = audio_io.load_audio(tmp_path / "q0.wav")
    torch.testing.assert_close(a0, encode(tiny_model.whisper, audio_io.log_mel_spectrogram(x))[0, :26])
    assert FeatureCache(tmp_path / "cache", tiny_model).prepare(recs, progress=False) == \
        {"audio": {"hits": 2, "misses": 0}, "image": {"hits": 1, "misses": 0}}
    # a changed file misses; a different encoder uses its own folder
    sf.write(tmp_path / "q1.wav", tone(0.7, 16000, 500), 16000)
    assert cache.prepare(recs, progress=False)["audio"] == {"hits": 1, "misses": 1}
    other = FeatureCache(tmp_path / "cache", OmniModel.from_random("tiny", seed=1))
    assert other.encoder_id("audio") != cache.encoder_id("audio")
    assert other.prepare(recs, progress=False)["audio"] == {"hits": 0, "misses": 2}
    assert len(list((tmp_path / "cache").glob("whisper-*"))) == 2
