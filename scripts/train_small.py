#!/usr/bin/env python3
"""The small CPU recipe end to end (issue 4, "Proof that it learns, on a 2-core CPU"; docs/training.md).

    python scripts/train_small.py                       # = make train-small (configs/small-recipe.yaml)
    python scripts/train_small.py --preset smoke        # a few minutes (tests/train/test_recipe_smoke.py)

Steps (each is skipped when its output exists, so a re-run resumes at the first missing piece):

  1. assets    random, seeded encoders and codec of the official architectures, saved once in the layouts
               the engine loads (`<out>/assets/`): Whisper encoder `small.pt` (a narrow one: the release's
               Whisper-small cannot be downloaded here), CLIP ViT `ViT-B-32.pt` (a narrow ViT, patch 32,
               224 px, 50 tokens), SNAC 24 kHz with the official config (`snac/`), random weights. All
               three stay frozen; the adapters and the LLM learn to read them.
  2. world     `omnitalk.train.world.make_world`: espeak-ng questions in varied voice settings, Pillow
               images, answers in the model's fixed voice, interruption clips; held-out sentences and
               held-out voice settings form eval.jsonl / interrupt_eval.jsonl. Answer audio and
               interruption audio become SNAC frames with the random codec. With `world.pictures: {n, weight}`
               also n written picture questions on distinct scenes (`world.make_pictures`, pictures.jsonl),
               sampled at `weight` each next to the world's records.
  3. features  the frozen encoders' outputs cached once (`omnitalk.train.data.FeatureCache`).
  4. train     stage 1 (adapters only, text answers) -> stage 2 (LLM only, text answers) -> stage 3
               (LLM + adapters, every task with spoken answers, plus interruption); each stage starts from
               the previous one's final export (`model.init: checkpoint`). With `stage0.llm` a pass of
               the LLM and the vision adapter over the typed questions comes first (`<out>/stage0_llm`).
  5. eval      the exported model through the engine (`OmniModel.from_pretrained`): ASR WER, QA exact
               match (spoken and visual), first-codebook match of spoken answers, interruption
               F1 / false interruptions / reaction delay, on held-out data.
  6. report    `<out>/report.json` (numbers, wall and CPU seconds per step, targets met) and loss curves
               `<out>/loss_stage{1,2,3}.png` (copied to docs/img/ with --docs-img).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("train_small")

TARGETS = {"asr_wer_max": 0.10, "qa_accuracy_min": 0.90, "interrupt_f1_min": 0.95,
           "false_interruption_max": 0.02, "median_delay_ms_max": 300.0, "codebook0_match_min": 0.80,
           "train_minutes_max": 60.0}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Timer:
    def __init__(self):
        self.rows: dict[str, dict] = {}

    def __call__(self, name: str):
        timer = self

        class _T:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), cpu_seconds()
                return self

            def __exit__(self, *exc):
                timer.rows[name] = {"wall_s": round(time.perf_counter() - self.w, 1),
                                    "cpu_s": round(cpu_seconds() - self.c, 1)}
                log.info("%s: %.1f s wall, %.1f s CPU", name, timer.rows[name]["wall_s"], timer.rows[name]["cpu_s"])
        return _T()


# ---------------------------------------------------------------------------------------------
# 1. assets
# ---------------------------------------------------------------------------------------------

# The official SNAC 24 kHz config (hubertsiuzdak/snac_24khz); the recipe narrows only encoder_dim (48 -> 16,
# recipe key snac.encoder_dim): the official encoder takes ~0.5 s of CPU per second of audio here, which
# for the interruption clips alone would cost half an hour. The decoder and quantizer are the official ones.
SNAC_24KHZ = dict(sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024,
                  decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
                  vq_strides=[4, 2, 1], noise=True, depthwise=True)

CALIBRATION_TEXTS = ("what is three plus four", "the red circle is above the blue star", "stop omni",
                     "how many squares can you see", "seven", "twelve", "green", "triangle", "stop",
                     "there are four green squares in the picture", "take two from nine", "hey omni",
                     "please turn on the lights", "what color is the square", "purple", "nineteen")


def spherical_kmeans(x, k: int, iters: int, g):
    """Unit vectors x (N, D) -> k unit centroids (k, D) by cosine k-means (k-means++-style seeding by
    random picks, empty clusters re-seeded from random points)."""
    import torch
    import torch.nn.functional as F

    c = x[torch.randint(0, x.shape[0], (k,), generator=g)].clone()
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        if empty.any():
            new[empty] = x[torch.randint(0, x.shape[0], (int(empty.sum()),), generator=g)]
        c = F.normalize(new, dim=1)
    return c


def calibrate_snac(snac, wavs, seed: int, codes: int = 256) -> dict:
    """Data-initialised codebooks for a random SNAC (k-means VQ initialisation, no gradient training):
    with random weights every frame maps to the same code (the projected latents share one dominant
    direction). For each of the 3 residual levels in turn: centre the factorised projection (in_proj
    bias -= mean latent), then cluster the normalised latents of real speech into `codes` centroids
    (spherical k-means) and fill the 4096-entry codebook with them, repeated (a repeated entry is never
    chosen: the nearest-code search keeps the first of equal distances). Only `codes` ids per level are
    in use, so each id is seen often in training and its embedding generalises across voices and noise;
    the token layout stays the official 4096 + 64 specials. Returns code-usage statistics."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zs = [snac.encoder(snac.preprocess(torch.as_tensor(w).reshape(1, 1, -1))) for w in wavs]  # (1, D, T)
        residuals = zs
        stats = {"codes_per_level": codes}
        for i, q in enumerate(snac.quantizer.quantizers):
            pooled = [F.avg_pool1d(r, q.stride, q.stride) if q.stride > 1 else r for r in residuals]
            ze = torch.cat([q.in_proj(p)[0].T for p in pooled])           # (N, 8)
            q.in_proj.bias -= ze.mean(0)
            ze = F.normalize(torch.cat([q.in_proj(p)[0].T for p in pooled]), dim=1)
            cent = spherical_kmeans(ze, min(codes, ze.shape[0]), 25, g)
            n = q.codebook.weight.shape[0]
            q.codebook.weight.copy_(cent.repeat(-(-n // cent.shape[0]), 1)[:n])
            new = []
            used = set()
            for r in residuals:
                zq, idx = q(r)
                used.update(idx.flatten().tolist())
                new.append(r - zq)
            residuals = new
            stats[f"level{i}_codes_used"] = len(used)
            stats[f"level{i}_max_id"] = max(used)
        stats["latent_frames"] = int(sum(z.shape[-1] for z in zs))
    return stats


def make_assets(out: Path, rc: dict, seed: int) -> Path:
    """Random seeded Whisper encoder (small.pt), CLIP vision tower (ViT-B-32.pt) and SNAC (snac/)."""
    import random

    import torch
    from snac import SNAC

    from omnitalk.model.clip import VisionDims, VisionTransformer
    from omnitalk.model.whisper import AudioEncoder, WhisperDims, sinusoids
    from omnitalk.train.tts import MODEL_VOICE_ESPEAK, EspeakSynth, VoiceSpace, synth_to

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "small.pt").is_file():
        torch.manual_seed(seed)
        w = rc["whisper"]
        dims = WhisperDims(80, 1500, w["width"], w["heads"], w["layers"])
        enc = AudioEncoder(dims)
        with torch.no_grad():
            enc.positional_embedding.copy_(sinusoids(dims.n_audio_ctx, dims.n_audio_state))
        torch.save({"dims": {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": w["width"],
                             "n_audio_head": w["heads"], "n_audio_layer": w["layers"]},
                    "model_state_dict": {f"encoder.{k}": v for k, v in enc.state_dict().items()}},
                   out / "small.pt")
    if not (out / "ViT-B-32.pt").is_file():
        torch.manual_seed(seed + 1)
        c = rc["clip"]
        vit = VisionTransformer(VisionDims(224, 32, c["width"], c["layers"], c["width"] // 64, c["output_dim"]))
        torch.save(vit.state_dict(), out / "ViT-B-32.pt")
    if rc.get("codec") and not (out / "snac" / "config.json").is_file():
        # a trained codec (omnitalk train-codec, configs/codec-small.yaml): its folder becomes assets/snac
        src = Path(rc["codec"])
        src = src if src.is_absolute() else ROOT / src
        if not (src / "config.json").is_file():
            raise SystemExit(f"recipe key codec: {src} is not a trained codec folder (config.json + "
                             "model.safetensors); train it first: omnitalk train-codec configs/codec-small.yaml")
        shutil.copytree(src, out / "snac")
    if not (out / "snac" / "config.json").is_file():
        torch.manual_seed(seed + 2)
        cfg = {**SNAC_24KHZ, **rc.get("snac", {})}
        snac = SNAC(**cfg).eval()
        synth, rng = EspeakSynth(), random.Random(seed)
        train_voices, _ = VoiceSpace.espeak().split()  # calibration never hears a held-out voice setting
        wavs = [synth_to(synth, t, MODEL_VOICE_ESPEAK, 24000) for t in CALIBRATION_TEXTS]
        wavs += [synth_to(synth, t, train_voices.sample(rng), 24000, peak=rng.uniform(0.3, 0.9))
                 for t in CALIBRATION_TEXTS for _ in range(rc.get("snac_calibration", {}).get("repeats", 2))]
        stats = calibrate_snac(snac, wavs, seed, codes=rc.get("snac_calibration", {}).get("codes", 256))
        (out / "snac").mkdir(exist_ok=True)
        (out / "snac" / "config.json").write_text(json.dumps(cfg, indent=2))
        torch.save(snac.state_dict(), out / "snac" / "pytorch_model.bin")
        (out / "snac_calibration.json").write_text(json.dumps(stats, indent=2))
    return out


# ---------------------------------------------------------------------------------------------
# stage 0: the encoders learn the world (omnitalk.train.stage0)
# ---------------------------------------------------------------------------------------------

def run_stage0(rc: dict, assets: Path, world: Path, seed: int) -> dict:
    """Train the narrow Whisper encoder (CTC on the training questions' audio, trimmed windows) and the
    narrow CLIP ViT (scene attributes of drawn images) in place of the random ones in `assets`; both
    stay frozen afterwards. Each part is skipped when its result exists (`<assets>/stage0_audio.json`,
    `stage0_vision.json`: a previous run's), so a re-run after changing one part trains only that one."""
    from tokenizers import Tokenizer

    from omnitalk.model.clip import load_clip_vision
    from omnitalk.model.whisper import load_whisper_encoder
    from omnitalk.train.data import read_manifest
    from omnitalk.train.export import save_replacing
    from omnitalk.train.stage0 import (pretrain_audio_encoder, pretrain_vision_encoder, save_audio_encoder,
                                       transcribed_audio)

    s0, progress = rc["stage0"], rc.get("progress", True)
    res = {}
    done_audio, done_vision = assets / "stage0_audio.json", assets / "stage0_vision.json"
    if done_audio.is_file():
        res["audio"] = json.loads(done_audio.read_text())
    else:
        w0, c0 = time.perf_counter(), cpu_seconds()
        tok = Tokenizer.from_file(str(world / "tokenizer.json"))
        items = transcribed_audio(read_manifest(world / "train.jsonl"))
        held = transcribed_audio(read_manifest(world / "eval.jsonl"))[:100]
        enc = load_whisper_encoder(assets / "small.pt")
        a = s0["audio"]
        ra = pretrain_audio_encoder(enc, items, lambda t: tok.encode(t).ids, tok.get_vocab_size(), steps=a["steps"],
                                    batch_size=a.get("batch_size", 16), lr=a.get("lr", 2e-3), seed=seed,
                                    max_minutes=a.get("max_minutes"), held_out=held, progress=progress,
                                    spec_augment_prob=a.get("spec_augment", 0.0),
                                    speed=tuple(a.get("speed", (0.9, 1.1))))
        save_audio_encoder(assets / "small.pt", enc, ra.head)  # with its CTC head (model.audio_compress: ctc)
        res["audio"] = {"steps": ra.steps, "of": a["steps"], "seconds": round(ra.seconds, 1), "utterances": len(items),
                        "held_out": ra.metrics, "loss": ra.losses,
                        "wall_s": round(time.perf_counter() - w0, 1), "cpu_s": round(cpu_seconds() - c0, 1)}
        done_audio.write_text(json.dumps(res["audio"], indent=2))
    if done_vision.is_file():
        res["vision"] = json.loads(done_vision.read_text())
    else:
        w0, c0 = time.perf_counter(), cpu_seconds()
        v = s0["vision"]
        vit = load_clip_vision(assets / "ViT-B-32.pt")
        layout = json.loads((world / "world.json").read_text()).get("image_layout", "free")  # the world's pictures
        rv = pretrain_vision_encoder(vit, steps=v["steps"], batch_size=v.get("batch_size", 32),
                                     n_images=v.get("n_images", 2000), lr=v.get("lr", 1e-3), seed=seed,
                                     max_minutes=v.get("max_minutes"), progress=progress, layout=layout)
        save_replacing(assets / "ViT-B-32.pt", {k: v.clone() for k, v in vit.state_dict().items()})
        res["vision"] = {"steps": rv.steps, "of": v["steps"], "seconds": round(rv.seconds, 1), "held_out": rv.metrics,
                         "loss": rv.losses, "wall_s": round(time.perf_counter() - w0, 1),
                         "cpu_s": round(cpu_seconds() - c0, 1)}
        done_vision.write_text(json.dumps(res["vision"], indent=2))
    res["wall_s"] = round(res["audio"]["wall_s"] + res["vision"]["wall_s"], 1)
    res["cpu_s"] = round(res["audio"]["cpu_s"] + res["vision"]["cpu_s"], 1)
    log.info("stage 0: audio CTC WER %.3f (held out), vision count accuracy %.3f",
             res["audio"]["held_out"].get("ctc_wer", float("nan")), res["vision"]["held_out"]["count_accuracy"])
    return res


# ---------------------------------------------------------------------------------------------
# 2. world, 3. features
# ---------------------------------------------------------------------------------------------

def make_world_dir(out: Path, rc: dict, assets: Path, seed: int) -> Path:
    from omnitalk.codec import Codec
    from omnitalk.train.tts import EspeakSynth, PiperSynth
    from omnitalk.train.world import make_world

    if (out / "world.json").is_file():
        return out
    codec = Codec.from_pretrained(assets / "snac")
    w = rc["world"]
    voice = w.get("answer_synth", "espeak")  # the model's voice: espeak-ng's MODEL_VOICE_ESPEAK, or Piper's joe voice
    if voice not in ("espeak", "piper"):
        raise SystemExit(f"recipe key world.answer_synth must be espeak or piper, got {voice!r}")
    answer_synth = PiperSynth() if voice == "piper" else None  # None: espeak-ng in its model voice
    make_world(out, n_train=w["n_train"], n_eval=w["n_eval"], synth=EspeakSynth(), seed=seed, codec=codec,
               answer_synth=answer_synth,
               n_interrupt_train=w["n_interrupt_train"], n_interrupt_eval=w["n_interrupt_eval"],
               mix=w.get("mix"), eval_mix=w.get("eval_mix"), speak_written=w.get("speak_written", False),
               answer_prefix=w.get("answer_prefix") or "", image_layout=w.get("image_layout", "free"),
               progress=rc.get("progress", True))
    return out


def pictures_key(rc: dict) -> dict | None:
    """The recipe's `world.pictures: {n, weight, spoken}` (spoken optional, default 0), checked; None when
    absent or n is 0."""
    p = rc["world"].get("pictures")
    if p is None:
        return None
    if not isinstance(p, dict) or not {"n", "weight"} <= set(p) <= {"n", "weight", "spoken"} \
            or not isinstance(p["n"], int) or p["n"] < 0 or not isinstance(p["weight"], (int, float)) \
            or p["weight"] <= 0 or not isinstance(p.get("spoken", 0), (int, float)) \
            or not 0 <= p.get("spoken", 0) <= 1:
        raise SystemExit(f"recipe key world.pictures must be {{n: pictures >= 0, weight: > 0, spoken: share in "
                         f"[0, 1] (optional)}} (e.g. {{n: 20000, weight: 0.1}}), got {p!r}")
    return {"spoken": 0, **p} if p["n"] else None


def make_pictures_step(world: Path, rc: dict, seed: int) -> Path | None:
    """`world.pictures: {n, weight, spoken}`: n more picture questions on distinct scenes, the share `spoken`
    of them asked aloud with the world's own recordings of the phrasing (world.make_pictures,
    `<world>/pictures.jsonl`; skipped when it exists with n records and the same spoken share, which
    `pictures.json` records)."""
    from omnitalk.train.world import make_pictures, spoken_recordings

    p = pictures_key(rc)
    if p is None:
        return None
    path, stamp = world / "pictures.jsonl", world / "pictures.json"
    done = json.loads(stamp.read_text()) if stamp.is_file() else {"spoken": 0}  # before the stamp: written only
    if path.is_file() and sum(1 for line in path.read_text().splitlines() if line.strip()) == p["n"] \
            and done.get("spoken") == p["spoken"]:
        return path
    meta = json.loads((world / "world.json").read_text())
    recordings = spoken_recordings(world / "train.jsonl") if p["spoken"] else None
    out = make_pictures(world, p["n"], seed, held_out_fraction=meta["held_out_fraction"],
                        image_size=meta["image_size"], image_layout=meta["image_layout"],
                        answer_prefix=meta.get("answer_prefix", ""), spoken=p["spoken"], recordings=recordings,
                        progress=rc.get("progress", True))
    stamp.write_text(json.dumps({"n": p["n"], "spoken": p["spoken"]}) + "\n")
    return out


def prepare_features(world: Path, assets: Path, progress: bool, pictures: Path | None = None) -> dict:
    from omnitalk.train.data import FeatureCache, read_manifest
    from omnitalk.train.loop import _encoders_from_dir

    cache = FeatureCache(world / "features", _encoders_from_dir(assets))
    recs = read_manifest(world / "train.jsonl") + read_manifest(world / "eval.jsonl")
    if pictures is not None:  # the recipe's world.pictures (make_pictures_step)
        recs += read_manifest(pictures)
    return cache.prepare(recs, progress=progress, batch_size=16)


# ---------------------------------------------------------------------------------------------
# 4. training
# ---------------------------------------------------------------------------------------------

def model_section(rc: dict, world: Path, init: Path | None) -> dict:
    from omnitalk.train.world import text_vocab_size

    vocab = json.loads((world / "world.json").read_text())["vocab_size"]
    text_vocab = text_vocab_size(vocab)  # the world's words + the 64 specials, rounded up to 64
    m = rc["model"]
    cfg = {"n_layer": m["n_layer"], "n_embd": m["n_embd"], "n_head": m["n_head"],
           "n_query_groups": m["n_query_groups"], "head_size": m["n_embd"] // m["n_head"],
           "intermediate_size": m["intermediate_size"], "text_vocab_size": text_vocab, "audio_vocab_size": 4160,
           "whisper_adapter_dim": rc["whisper"]["width"], "vision_adapter_dim": rc["clip"]["output_dim"],
           "block_size": m["block_size"]}
    if m.get("audio_pool", 1) != 1:
        cfg["audio_pool"] = m["audio_pool"]
    if m.get("audio_compress", "none") != "none":
        cfg["audio_compress"] = m["audio_compress"]
    if not m.get("tie_word_embeddings", True):  # an output head of its own (the release ties it to the table)
        cfg["tie_word_embeddings"] = False
    sec = {"preset": "mini-omni2", "config": cfg, "tokenizer": str(world / "tokenizer.json"),
           "init_style": m.get("init_style", "gpt"), "init_std": m.get("init_std", 0.02),
           "dropout": m.get("dropout", 0.0)}
    if init is None:
        sec["init"] = "random"
    else:
        sec.update(init="checkpoint", checkpoint=str(init))
    return sec


def stage_config(rc: dict, stage: int, world: Path, assets: Path, out: Path, init: Path | None) -> dict:
    """Stage 1, 2 or 3 of the recipe, or "llm": stage 0's written-questions pass of the LLM (`llm_stage_config`)."""
    if stage == "llm":
        return llm_stage_config(rc, world, assets, out)
    s = rc["stages"][stage]
    train = [{"path": str(world / "train.jsonl"), "weight": 1.0}]
    pictures = pictures_key(rc)
    if pictures:  # each extra picture at its own weight (their total: n x weight records)
        train.append({"path": str(world / "pictures.jsonl"), "weight": pictures["weight"]})
    evals = [str(world / "eval.jsonl")]
    if stage == 3:
        train.append({"path": str(world / "interrupt_train.jsonl"), "weight": s.get("interrupt_weight", 1.0)})
        evals.append(str(world / "interrupt_eval.jsonl"))
    return {
        "model": model_section(rc, world, init),
        "stage": stage,
        "data": {"train": train, "eval": evals, "tasks": s.get("tasks"), "follow_text": s.get("follow_text", 0.0),
                 "features": {"cache_dir": str(world / "features"), "encoders": str(assets)},
                 "max_len": rc["model"]["block_size"]},
        "optim": {"lr": s["lr"], "min_lr": s["min_lr"], "warmup_steps": s["warmup_steps"], "steps": s["steps"],
                  "weight_decay": s.get("weight_decay", 0.05), "grad_clip": 1.0, "lr_scale": s.get("lr_scale") or {}},
        # batch_tokens: length buckets; without it, random batches of batch_size records (every task mixed)
        "batch": {"batch_tokens": s.get("batch_tokens"), "batch_size": s.get("batch_size", 32),
                  "max_batch": s.get("max_batch")},
        "loss": {"text": 1.0, "audio": 1.0, "text_norm": s.get("text_norm", "token")},
        "dtype": "fp32", "device": "cpu", "threads": rc.get("threads", 2),
        "checkpoint_every": 0, "keep_checkpoints": 1, "eval_every": s.get("eval_every", 0), "eval_batches": 8,
        "log_every": 1, "seed": rc.get("seed", 0) + stage, "out_dir": str(out / f"stage{stage}"),
        "export_assets": str(assets), "progress": rc.get("progress", True),
    }


# The LLM's part of stage 0 (recipe key `stage0.llm`): the LLM and the vision adapter learn the world's
# *written* questions (typed arithmetic t2t, typed picture questions it2t and the extra pictures) before
# stage 1, so that stage 1 aligns the speech adapter to an LLM that already reads the world, as the
# paper's stage 1 aligns it to a pre-trained Qwen2 (our small LLM starts random).
LLM_STAGE_PARAMS = ["transformer.", "lm_head.", "vision_adapter."]
LLM_STAGE_KEYS = {"steps", "max_minutes", "lr", "min_lr", "warmup_steps", "batch_size"}


def llm_stage_key(rc: dict) -> dict | None:
    """The recipe's `stage0.llm: {steps, max_minutes, lr, min_lr, warmup_steps, batch_size}`, checked; None
    when absent."""
    s = (rc.get("stage0") or {}).get("llm")
    if s is None:
        return None
    if not isinstance(s, dict) or not {"steps", "lr"} <= set(s) <= LLM_STAGE_KEYS:
        raise SystemExit(f"recipe key stage0.llm must be a mapping with steps and lr (and optionally "
                         f"{', '.join(sorted(LLM_STAGE_KEYS - {'steps', 'lr'}))}), e.g. {{steps: 600, lr: 3.0e-3, "
                         f"max_minutes: 3}}; got {s!r}")
    return s


def written_manifest(src: Path, dst: Path) -> Path:
    """The records of the manifest `src` whose question is typed (no question audio; tasks text and qa),
    written to `dst` beside it (rewritten on every call)."""
    from omnitalk.train.data import read_manifest, write_manifest

    return write_manifest([r for r in read_manifest(src, check_files=False)
                           if r["question_audio"] is None and r["task"] in ("text", "qa")], dst)


def llm_stage_config(rc: dict, world: Path, assets: Path, out: Path) -> dict:
    s = llm_stage_key(rc)
    train = [{"path": str(written_manifest(world / "train.jsonl", world / "written.jsonl")), "weight": 1.0}]
    pictures = pictures_key(rc)
    if pictures:  # the typed ones of the extra pictures, at their weight
        train.append({"path": str(written_manifest(world / "pictures.jsonl", world / "pictures-written.jsonl")),
                      "weight": pictures["weight"]})
    spec = {"min_lr": s["lr"] / 10, "warmup_steps": 40, "batch_size": 48, **s}
    d = stage_config({**rc, "stages": {2: spec}}, 2, world, assets, out, None)
    d["data"]["train"], d["data"]["tasks"], d["eval_every"] = train, None, 0
    d["train_params"] = LLM_STAGE_PARAMS
    d["out_dir"] = str(out / stage_name("llm"))
    return d


def run_stage(rc: dict, stage: int | str, world: Path, assets: Path, out: Path, init: Path | None) -> Path:
    """Train one stage (1, 2, 3 or "llm", stage 0's written-questions pass of the LLM); returns its exported
    model folder. A stage with `max_minutes` stops at the first step boundary past that wall time (through
    the loop's SIGTERM path, which saves a checkpoint) and is exported from that checkpoint: the recipe
    keeps to its time budget on a loaded machine."""
    import signal

    from omnitalk.train.config import TrainConfig
    from omnitalk.train.export import export_checkpoint
    from omnitalk.train.loop import run

    name = stage_name(stage)
    final = out / name / "final"
    if (final / "lit_model.pth").is_file():
        return final
    d = stage_config(rc, stage, world, assets, out, init)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    cfg = TrainConfig.from_dict(d)
    budget = (llm_stage_key(rc) if stage == "llm" else rc["stages"][stage]).get("max_minutes")
    t0, fired = time.perf_counter(), []

    def guard(step, row):
        if budget and not fired and time.perf_counter() - t0 > budget * 60:
            fired.append(step)
            log.warning("stage %s: %.1f-minute budget reached at step %d; stopping", stage, budget, step)
            os.kill(os.getpid(), signal.SIGTERM)

    res = run(cfg, callbacks=[guard])
    if res.stopped:
        export_checkpoint(res.path, final, assets=assets)
        (out / name / "stopped_at.json").write_text(json.dumps({"step": res.step, "of": cfg.optim.steps}))
        return final
    return res.path


def stage_name(stage: int | str) -> str:
    """The folder (and timing row) of a stage: stage1..stage3, stage0_llm for stage 0's LLM part."""
    return "stage0_llm" if stage == "llm" else f"stage{stage}"


def plot_stage(out: Path, stage: int | str) -> Path | None:
    """Loss curves (train text / audio CE, held-out CE) of one stage (omnitalk.train.metrics.plot_metrics:
    matplotlib when installed, else Pillow)."""
    from omnitalk.train.metrics import plot_metrics

    f = out / stage_name(stage) / "metrics.jsonl"
    if not f.is_file():
        return None
    names = {1: "stage 1, adapters only", 2: "stage 2, LLM, text answers",
             3: "stage 3, LLM + adapters, speech + interruption",
             "llm": "stage 0, LLM + vision adapter, written questions"}
    try:
        return plot_metrics(f, out / f"loss_{stage_name(stage)}.png", title=f"small recipe, {names[stage]}")
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# 5. evaluation
# ---------------------------------------------------------------------------------------------

def evaluate(final: Path, world: Path, rc: dict) -> dict:
    from omnitalk.engine import OmniModel
    from omnitalk.eval.cli import evaluate_asr, evaluate_interrupt, evaluate_qa
    from omnitalk.train.data import read_manifest

    progress = rc.get("progress", True)
    model = OmniModel.from_pretrained(final, device="cpu", download=False)
    recs = read_manifest(world / "eval.jsonl")
    lim = rc.get("eval_limit")
    asr = [r for r in recs if r["task"] == "asr"][:lim]
    qa = [r for r in recs if r["task"] in ("qa", "text")][:lim]
    irq = read_manifest(world / "interrupt_eval.jsonl")
    rep = {"asr": evaluate_asr(model, asr, max_tokens=64, progress=progress),
           "qa": evaluate_qa(model, qa, speech=True, max_tokens=96, progress=progress),
           "interrupt": evaluate_interrupt(model, irq, progress=progress)}
    if model.tokenizer.can_write("stop omni"):  # the world had cmd records: the server's ASR stop detector too
        rep["interrupt_asr"] = evaluate_interrupt(model, irq, progress=progress, detector="asr")
    # spoken + visual QA split out (the issue's two numbers)
    items = {i["id"]: i for i in rep["qa"]["items"]}
    by_kind: dict[str, list] = {}
    for r in qa:
        by_kind.setdefault(r.get("kind", r["task"]), []).append(items[r["id"]]["correct"])
    rep["qa"]["accuracy_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    spoken = [items[r["id"]]["correct"] for r in qa if r.get("question_audio") and not r.get("question_image")]
    visual = [items[r["id"]]["correct"] for r in qa if r.get("question_image")]
    rep["qa"]["spoken_accuracy"] = sum(spoken) / len(spoken) if spoken else None
    rep["qa"]["visual_accuracy"] = sum(visual) / len(visual) if visual else None
    rep["qa"]["n_spoken"], rep["qa"]["n_visual"] = len(spoken), len(visual)
    return rep


def evaluate_train_subset(final: Path, world: Path, n: int, progress: bool = False) -> dict:
    """The same measurements on the first n *training* records / clips (memorisation vs generalisation)."""
    from omnitalk.engine import OmniModel
    from omnitalk.eval.cli import evaluate_asr, evaluate_interrupt, evaluate_qa
    from omnitalk.train.data import read_manifest

    model = OmniModel.from_pretrained(final, device="cpu", download=False)
    recs = read_manifest(world / "train.jsonl")
    asr = evaluate_asr(model, [r for r in recs if r["task"] == "asr"][:n], max_tokens=64, progress=progress)
    qa = evaluate_qa(model, [r for r in recs if r["task"] in ("qa", "text")][:n], speech=True, max_tokens=96,
                     progress=progress)
    irq = evaluate_interrupt(model, read_manifest(world / "interrupt_train.jsonl")[:n], progress=progress)
    return {"n": n, "asr_wer": asr["wer"], "qa_accuracy": qa["accuracy"],
            "qa_accuracy_by_group": qa["accuracy_by_group"], "codebook0_match": qa["codebook0_match"],
            "audio_layer_match": qa.get("audio_layer_match"), "interrupt_f1": irq["f1"],
            "false_interruption_rate": irq["false_interruption_rate"], "median_delay_ms": irq["median_delay_ms"]}


def summarize(rep: dict, train_wall_s: float) -> dict:
    a, q, i = rep["asr"], rep["qa"], rep["interrupt"]
    s = {
        "asr_wer": a["wer"],
        "spoken_qa_accuracy": q["spoken_accuracy"],
        "visual_qa_accuracy": q["visual_accuracy"],
        "qa_accuracy_all": q["accuracy"],
        "codebook0_match": q["codebook0_match"],
        "audio_layer_match": q.get("audio_layer_match"),  # layers 0-6 (c0 c1 c2 c2 c1 c2 c2), for reference
        "interrupt_f1": i["f1"], "interrupt_precision": i["precision"], "interrupt_recall": i["recall"],
        "false_interruption_rate": i["false_interruption_rate"], "median_delay_ms": i["median_delay_ms"],
        "train_wall_minutes": train_wall_s / 60,
    }
    if "interrupt_asr" in rep:  # `omnitalk serve --stop-detector asr` replayed over the same clips
        j = rep["interrupt_asr"]
        s.update(asr_stop_f1=j["f1"], asr_stop_false_rate=j["false_interruption_rate"],
                 asr_stop_delay_ms=j["median_delay_ms"], asr_stop_look_ms=j.get("asr_look_ms_median"))
    T = TARGETS
    met = {
        "asr_wer": s["asr_wer"] <= T["asr_wer_max"],
        "spoken_qa_accuracy": (s["spoken_qa_accuracy"] or 0) >= T["qa_accuracy_min"],
        "visual_qa_accuracy": (s["visual_qa_accuracy"] or 0) >= T["qa_accuracy_min"],
        "interrupt_f1": s["interrupt_f1"] >= T["interrupt_f1_min"],
        "false_interruption_rate": s["false_interruption_rate"] <= T["false_interruption_max"],
        "median_delay_ms": s["median_delay_ms"] is not None and s["median_delay_ms"] <= T["median_delay_ms_max"],
        "codebook0_match": (s["codebook0_match"] or 0) >= T["codebook0_match_min"],
        "train_wall_minutes": s["train_wall_minutes"] <= T["train_minutes_max"],
    }
    return {"summary": s, "targets": T, "met": met}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def load_recipe(path: Path, preset: str | None) -> dict:
    d = yaml.safe_load(path.read_text())
    if preset:
        for k, v in d.get("presets", {}).get(preset, {}).items():
            if isinstance(v, dict) and isinstance(d.get(k), dict):
                if k == "stages":
                    for st, sv in v.items():
                        d[k][int(st)] = {**d[k].get(int(st), {}), **sv}
                else:
                    d[k] = {**d[k], **v}
            else:
                d[k] = v
    d["stages"] = {int(k): v for k, v in d["stages"].items()}
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "configs" / "small-recipe.yaml"))
    p.add_argument("--preset", default=None, help="a named override in the recipe's `presets` (e.g. smoke)")
    p.add_argument("--out", default=None, help="output folder (default: the recipe's out_dir)")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--docs-img", default=None, help="also copy the loss curves to this folder")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    rc = load_recipe(Path(args.recipe), args.preset)
    if args.quiet:
        rc["progress"] = False
    out = Path(args.out or rc["out_dir"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch
    torch.set_num_threads(rc.get("threads", 2))
    seed = rc.get("seed", 0)
    T = Timer()
    w0, c0 = time.perf_counter(), cpu_seconds()
    with T("assets"):
        assets = make_assets(out / "assets", rc, seed)
    world = out / "world"
    with T("world"):
        make_world_dir(world, rc, assets, seed)
    with T("pictures"):
        pictures = make_pictures_step(world, rc, seed)
    shutil.copyfile(world / "tokenizer.json", assets / "tokenizer.json")
    stage0 = None
    if rc.get("stage0"):
        with T("train_stage0"):
            stage0 = run_stage0(rc, assets, world, seed)
    with T("features"):
        feats = prepare_features(world, assets, rc.get("progress", True), pictures)
    stages = [int(s) for s in args.stages.split(",") if s]
    init, train_wall, train_cpu = None, 0.0, 0.0
    if stage0 is not None:  # stage 0's own record when it ran in an earlier invocation
        train_wall += max(T.rows["train_stage0"]["wall_s"], stage0.get("wall_s", 0.0))
        train_cpu += max(T.rows["train_stage0"]["cpu_s"], stage0.get("cpu_s", 0.0))
    if llm_stage_key(rc) and stages[:1] == [1]:  # stage 0's LLM part: the written questions, before stage 1
        stages = ["llm"] + stages
    for st in stages:
        key = f"train_{stage_name(st)}"
        timing = out / stage_name(st) / "timing.json"
        with T(key):
            init = run_stage(rc, st, world, assets, out, init)
        row = T.rows[key]
        if timing.is_file():  # trained by an earlier invocation: its time, not this skip's
            done = json.loads(timing.read_text())
            row = T.rows[key] = {k: max(v, done[k]) for k, v in row.items()}
        else:  # trained now: keep its time for the report of a later re-run
            timing.write_text(json.dumps(row))
        train_wall += row["wall_s"]
        train_cpu += row["cpu_s"]
        plot_stage(out, st)
    report = {"recipe": rc, "out": str(out), "final": str(init), "features": feats, "stage0": stage0,
              "world": json.loads((world / "world.json").read_text())}
    if not args.no_eval:
        with T("eval"):
            rep = evaluate(init, world, rc)
        report.update(summarize(rep, train_wall))
        report["eval"] = {k: {kk: vv for kk, vv in v.items() if kk != "items"} for k, v in rep.items()}
        (out / "eval_items.json").write_text(json.dumps({k: v.get("items") for k, v in rep.items()}, indent=1))
        if rc.get("eval_train_limit"):
            with T("eval_train_subset"):
                report["train_subset"] = evaluate_train_subset(init, world, rc["eval_train_limit"])
    report["timing"] = {**T.rows, "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
                        "total_wall_s": round(time.perf_counter() - w0, 1),
                        "total_cpu_s": round(cpu_seconds() - c0, 1), "threads": rc.get("threads", 2),
                        "cpu_count": os.cpu_count(), "load_avg_end": os.getloadavg()}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    if args.docs_img:
        d = Path(args.docs_img)
        d.mkdir(parents=True, exist_ok=True)
        for st in stages:
            if (out / f"loss_{stage_name(st)}.png").is_file():
                shutil.copyfile(out / f"loss_{stage_name(st)}.png", d / f"small-loss-{stage_name(st)}.png")
    print(json.dumps({"summary": report.get("summary"), "met": report.get("met"), "timing": report["timing"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
