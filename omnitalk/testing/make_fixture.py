"""Write a parity fixture of any (small) shape from random weights, with an independent oracle.

    python -m omnitalk.testing.make_fixture OUT --seed 7 --n-layer 3 --n-query-groups 1 [--check]

The folder has the layout of tests/fixtures/parity (see its README): checkpoint/ in the official formats
(model_config.yaml, lit_model.pth with separate lm_head/wte tensors, an OpenAI-style small.pt, a CLIP
state dict, snac/, tokenizer.json), inputs/ and expected/. The expected outputs are computed by
omnitalk.testing.reference (an official-style re-implementation), never by omnitalk's engine, so
`python -m omnitalk.testing.parity OUT` compares the engine against an independent computation.

Weights are drawn like the README (§2) describes so that generation is varied: embedding rows with
per-range scales (text ids inside the tokenizer's vocabulary dominate, `_eot` and layer-6 `_eoa` occur at
moderate rates, audio specials stay out of SNAC frames), an `lm_head.weight` that differs from
`transformer.wte.weight` (the release ignores it), and linear layers with gain 4/sqrt(fan_in). A draw is
rejected and the next seed tried when it would make parity ill-defined: a chosen token (or a stop
decision) whose top-1/top-2 logit margin is below `min_margin` (default 1e-3: float32 implementations
that differ only in summation order were measured to disagree on margins by up to 5e-5), a speech loop
with fewer than 8 recorded steps (the release crashes there), an audio special inside a SNAC frame, or a
batch task that streams fewer than `min_chunks` chunks.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import yaml

from omnitalk.testing import reference as R

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity"
DEFAULT_PROMPT = "What is the capital of France?"
SNAC_24KHZ = {"sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8], "decoder_dim": 1024,
              "decoder_rates": [8, 8, 4, 2], "attn_window_size": None, "codebook_size": 4096, "codebook_dim": 8,
              "vq_strides": [4, 2, 1], "noise": True, "depthwise": True}
WHISPER_DEFAULT = {"n_audio_state": 32, "n_audio_head": 2, "n_audio_layer": 2}
CLIP_DEFAULT = {"width": 128, "layers": 2, "patch": 32, "output_dim": 24}
SNAC_DEFAULT = {"encoder_dim": 8, "decoder_dim": 64}


README = """# Generated parity fixture

Written by `python -m omnitalk.testing.make_fixture` (seed {seed}) from random weights. The layout, file
formats and decoding rules are those of `tests/fixtures/parity/README.md`; the sizes, seeds and weight
construction are in `expected/versions.json`.

* tasks: {tasks}
* budget {budget} recorded steps, streaming stride {stride}
* `torch.manual_seed({snac_seed})` immediately before every SNAC decode

`expected/` was computed by `omnitalk.testing.reference`, an official-style re-implementation of the
release's LLM, prompt builders, loops and streaming (it shares only the Whisper/CLIP/SNAC front ends and
preprocessing with omnitalk), not by omnitalk's engine. Check with
`python -m omnitalk.testing.parity <this folder>`.
"""


class FixtureError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# checkpoint/
# ---------------------------------------------------------------------------------------------
def model_config(n_layer, n_embd, n_head, n_query_groups, head_size, intermediate_size, whisper_dim, vision_dim):
    """The released model_config.yaml: its 41 fields in its order, with the given sizes."""
    return {
        "add_qkv_bias": True, "asr_adapter": "llamamlp", "attn_dropout": 0.0, "bias": False, "block_size": 2048,
        "force_align": False, "gelu_approximate": "none", "head_size": head_size,
        "hf_config": {"name": "Qwen2-0.5B", "org": "Qwen"}, "intermediate_size": intermediate_size,
        "lm_head_bias": False, "mlp_class_name": "LLaMAMLP", "n_embd": n_embd, "n_expert": 0,
        "n_expert_per_token": 0, "n_head": n_head, "n_layer": n_layer, "n_query_groups": n_query_groups,
        "name": "Qwen2-0.5B", "norm_class_name": "RMSNorm", "norm_eps": 1e-06, "padded_vocab_size": 181120,
        "padding_multiple": 512, "parallel_residual": False, "pos_type": "rope", "post_adapter": False,
        "post_adapter_layers": 6, "prompt_vocab_size": None, "rope_base": 1000000, "rope_condense_ratio": 1,
        "rotary_percentage": 1, "scale_embeddings": False, "shared_attention_norm": False,
        "tie_word_embeddings": True, "use_pretrain_phoneme_emb": False, "vocab_size": 50254,
        "text_vocab_size": 152000, "cat_audio_vocab_size": 29120, "audio_vocab_size": 4160,
        "whisper_adapter_dim": whisper_dim, "vision_adapter_dim": vision_dim,
    }


def embedding_scales(tokenizer_vocab: int) -> torch.Tensor:
    """Per-row std of transformer.wte (README §2)."""
    s = torch.full((181120,), 0.3)
    s[:tokenizer_vocab] = 1.0
    s[[R.PAD_T, R.INPUT_T, R.ANSWER_T, R.ASR]] = 1.0
    s[R.EOT] = 1.8
    for layer in range(R.N_AUDIO):
        base = R.layershift(0, layer)
        s[base:base + R.AUDIO_VOCAB] = 1.0
        s[base + R.AUDIO_VOCAB:base + R.AUDIO_PADDED] = 0.5
    s[R.layershift(R.EOA, R.N_AUDIO - 1)] = 1.5
    return s


def llm_weights(cfg: dict, tokenizer_vocab: int, seed: int, head_seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    C, I = cfg["n_embd"], cfg["intermediate_size"]

    def linear(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) * (4.0 / math.sqrt(in_f))

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    w: dict[str, torch.Tensor] = {}
    w["whisper_adapter.fc_1.weight"] = linear(I, cfg["whisper_adapter_dim"])
    w["whisper_adapter.fc_2.weight"] = linear(I, cfg["whisper_adapter_dim"])
    w["whisper_adapter.proj.weight"] = linear(C, I)
    w["lm_head.weight"] = torch.randn(181120, C, generator=torch.Generator().manual_seed(head_seed))
    w["vision_adapter.fc_1.weight"] = linear(I, cfg["vision_adapter_dim"])
    w["vision_adapter.fc_2.weight"] = linear(I, cfg["vision_adapter_dim"])
    w["vision_adapter.proj.weight"] = linear(C, I)
    w["transformer.wte.weight"] = torch.randn(181120, C, generator=g) * embedding_scales(tokenizer_vocab)[:, None]
    qkv = (cfg["n_head"] + 2 * cfg["n_query_groups"]) * cfg["head_size"]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        w[p + "norm_1.weight"] = norm(C)
        w[p + "attn.attn.weight"] = linear(qkv, C)
        w[p + "attn.attn.bias"] = 0.2 * torch.randn(qkv, generator=g)
        w[p + "attn.proj.weight"] = linear(C, cfg["n_head"] * cfg["head_size"])
        w[p + "norm_2.weight"] = norm(C)
        w[p + "mlp.fc_1.weight"] = linear(I, C)
        w[p + "mlp.fc_2.weight"] = linear(I, C)
        w[p + "mlp.proj.weight"] = linear(C, I)
    w["transformer.ln_f.weight"] = norm(C)
    return w


def sinusoid_table(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's encoder position table: sin on the first half of the channels, cos on the second."""
    step = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-step * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def whisper_checkpoint(dims: dict, seed: int) -> dict:
    """An openai-whisper checkpoint {dims, model_state_dict}, every tensor float16 (as OpenAI stores them)."""
    g = torch.Generator().manual_seed(seed)
    d, n_mels = dims["n_audio_state"], dims["n_mels"]

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    def ln(prefix, n):
        return {prefix + ".weight": 1 + rnd(n, std=0.1), prefix + ".bias": rnd(n, std=0.1)}

    def attention(prefix, n):
        return {f"{prefix}.query.weight": rnd(n, n, std=n ** -0.5), f"{prefix}.query.bias": rnd(n, std=0.1),
                f"{prefix}.key.weight": rnd(n, n, std=n ** -0.5),
                f"{prefix}.value.weight": rnd(n, n, std=n ** -0.5), f"{prefix}.value.bias": rnd(n, std=0.1),
                f"{prefix}.out.weight": rnd(n, n, std=n ** -0.5), f"{prefix}.out.bias": rnd(n, std=0.1)}

    def mlp(prefix, n):
        return {f"{prefix}.0.weight": rnd(4 * n, n, std=n ** -0.5), f"{prefix}.0.bias": rnd(4 * n, std=0.1),
                f"{prefix}.2.weight": rnd(n, 4 * n, std=(4 * n) ** -0.5), f"{prefix}.2.bias": rnd(n, std=0.1)}

    sd = {"encoder.positional_embedding": sinusoid_table(dims["n_audio_ctx"], d),
          "encoder.conv1.weight": rnd(d, n_mels, 3, std=(3 * n_mels) ** -0.5), "encoder.conv1.bias": rnd(d, std=0.1),
          "encoder.conv2.weight": rnd(d, d, 3, std=(3 * d) ** -0.5), "encoder.conv2.bias": rnd(d, std=0.1)}
    for i in range(dims["n_audio_layer"]):
        p = f"encoder.blocks.{i}"
        sd |= attention(p + ".attn", d) | ln(p + ".attn_ln", d) | mlp(p + ".mlp", d) | ln(p + ".mlp_ln", d)
    sd |= ln("encoder.ln_post", d)
    t = dims["n_text_state"]
    sd |= {"decoder.positional_embedding": rnd(dims["n_text_ctx"], t, std=0.01),
           "decoder.token_embedding.weight": rnd(dims["n_vocab"], t, std=0.02)}
    for i in range(dims["n_text_layer"]):
        p = f"decoder.blocks.{i}"
        sd |= attention(p + ".attn", t) | ln(p + ".attn_ln", t) | attention(p + ".cross_attn", t)
        sd |= ln(p + ".cross_attn_ln", t) | mlp(p + ".mlp", t) | ln(p + ".mlp_ln", t)
    sd |= ln("decoder.ln", t)
    return {"dims": dict(dims), "model_state_dict": {k: v.half() for k, v in sd.items()}}


def clip_state_dict(width: int, layers: int, patch: int, output_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP state dict (ViT vision tower + a minimal text tower), OpenAI's key names and dtypes.

    Weights of convolutions, linears, attention and projections are float16, layer norms and embeddings
    float32, as in OpenAI's files. The vision tower sees 7x7 patches (input 7 * patch) -> 50 tokens.
    """
    if width % 64:
        raise FixtureError(f"CLIP width must be a multiple of 64 (heads = width / 64), got {width}")
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    def resblock(prefix, n):
        return {f"{prefix}.attn.in_proj_weight": rnd(3 * n, n, std=n ** -0.5).half(),
                f"{prefix}.attn.in_proj_bias": rnd(3 * n, std=0.1).half(),
                f"{prefix}.attn.out_proj.weight": rnd(n, n, std=n ** -0.5).half(),
                f"{prefix}.attn.out_proj.bias": rnd(n, std=0.1).half(),
                f"{prefix}.ln_1.weight": 1 + rnd(n, std=0.1), f"{prefix}.ln_1.bias": rnd(n, std=0.1),
                f"{prefix}.mlp.c_fc.weight": rnd(4 * n, n, std=n ** -0.5).half(),
                f"{prefix}.mlp.c_fc.bias": rnd(4 * n, std=0.1).half(),
                f"{prefix}.mlp.c_proj.weight": rnd(n, 4 * n, std=(4 * n) ** -0.5).half(),
                f"{prefix}.mlp.c_proj.bias": rnd(n, std=0.1).half(),
                f"{prefix}.ln_2.weight": 1 + rnd(n, std=0.1), f"{prefix}.ln_2.bias": rnd(n, std=0.1)}

    text_width, grid = 64, 7
    sd = {"positional_embedding": rnd(77, text_width, std=0.01),
          "text_projection": rnd(text_width, output_dim, std=text_width ** -0.5).half(),
          "logit_scale": torch.tensor(math.log(1 / 0.07)),
          "visual.class_embedding": rnd(width, std=width ** -0.5),
          "visual.positional_embedding": rnd(grid * grid + 1, width, std=width ** -0.5),
          "visual.proj": rnd(width, output_dim, std=width ** -0.5).half(),
          "visual.conv1.weight": rnd(width, 3, patch, patch, std=(3 * patch * patch) ** -0.5).half(),
          "visual.ln_pre.weight": 1 + rnd(width, std=0.1), "visual.ln_pre.bias": rnd(width, std=0.1)}
    for i in range(layers):
        sd |= resblock(f"visual.transformer.resblocks.{i}", width)
    sd |= {"visual.ln_post.weight": 1 + rnd(width, std=0.1), "visual.ln_post.bias": rnd(width, std=0.1)}
    sd |= resblock("transformer.resblocks.0", text_width)
    sd |= {"token_embedding.weight": rnd(512, text_width, std=0.02),
           "ln_final.weight": 1 + rnd(text_width, std=0.1), "ln_final.bias": rnd(text_width, std=0.1)}
    return sd


def write_snac(folder: Path, encoder_dim: int, decoder_dim: int, seed: int) -> dict:
    from snac import SNAC

    cfg = dict(SNAC_24KHZ, encoder_dim=encoder_dim, decoder_dim=decoder_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SNAC(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return cfg


def write_checkpoint(ckpt: Path, *, seed: int, llm_cfg: dict, whisper_dims: dict, clip: dict, snac: dict,
                     tokenizer_file: Path) -> dict:
    """Every file of checkpoint/; returns the seeds used."""
    from tokenizers import Tokenizer

    seeds = {"llm_weights": seed, "llm_lm_head_weight": seed + 7919, "whisper_weights": seed + 1,
             "clip_weights": seed + 2, "snac_weights": seed + 3}
    ckpt.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_file, ckpt / "tokenizer.json")
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(llm_cfg, sort_keys=False))
    torch.save(llm_weights(llm_cfg, vocab, seeds["llm_weights"], seeds["llm_lm_head_weight"]), ckpt / "lit_model.pth")
    torch.save(whisper_checkpoint(whisper_dims, seeds["whisper_weights"]), ckpt / "small.pt")
    torch.save(clip_state_dict(clip["width"], clip["layers"], clip["patch"], clip["output_dim"],
                               seeds["clip_weights"]), ckpt / "ViT-B-32.pt")
    write_snac(ckpt / "snac", snac["encoder_dim"], snac["decoder_dim"], seeds["snac_weights"])
    return seeds


# ---------------------------------------------------------------------------------------------
# inputs/
# ---------------------------------------------------------------------------------------------
def write_inputs(inp: Path, question_wav, image, prompt: str) -> None:
    from PIL import Image

    inp.mkdir(parents=True, exist_ok=True)
    wav = Path(question_wav) if question_wav is not None else DEFAULT_SOURCE / "inputs" / "question.wav"
    info = sf.info(str(wav))
    if info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16" and info.format == "WAV":
        shutil.copyfile(wav, inp / "question.wav")
    else:  # convert: 16 kHz mono PCM16, what the fixture format promises
        from omnitalk import audio as audio_io
        x = audio_io.load_audio(wav)
        sf.write(inp / "question.wav", np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16), 16000,
                 subtype="PCM_16")
    img = Path(image) if image is not None else DEFAULT_SOURCE / "inputs" / "image.png"
    if img.suffix.lower() == ".png":
        shutil.copyfile(img, inp / "image.png")
    else:
        Image.open(img).save(inp / "image.png")
    (inp / "prompt.txt").write_text(prompt, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# expected/
# ---------------------------------------------------------------------------------------------
def problems(name: str, rec: R.Record, min_margin: float, min_chunks: int) -> list[str]:
    """Why this draw is unusable for parity (empty when it is fine)."""
    out = []
    rows = len(rec.tokens)
    for k in range(rec.steps):
        for r in range(rows):
            if r == rows - 1 and rec.forced[k]:
                continue  # a forced `_pad_t`: the model's choice is ignored
            if rec.margins[r][k] < min_margin:
                out.append(f"{name}: near-tie at step {k} row {r} (margin {rec.margins[r][k]:.2e})")
    if rec.stop_margin is not None and rec.stop_margin < min_margin:
        out.append(f"{name}: near-tie in the stop decision at step {rec.stop_step} ({rec.stop_margin:.2e})")
    if name in R.SPEECH_TASKS:
        if rec.steps < 8:
            out.append(f"{name}: only {rec.steps} recorded steps (< 8: the release's final decode crashes)")
        frames = R.all_frames(rec.tokens[:R.N_AUDIO])
        if any(c >= R.AUDIO_VOCAB for f in frames for c in f):
            out.append(f"{name}: an audio special id inside a SNAC frame")
    if name in R.BATCH_TASKS and len(rec.chunks) < min_chunks:
        out.append(f"{name}: {len(rec.chunks)} streamed chunks (< {min_chunks})")
    return out


def _ids_array(input_ids: list[torch.Tensor]) -> np.ndarray:
    return torch.stack(input_ids, dim=1).numpy().astype(np.int64)  # (B, 8, T)


def write_task(d: Path, name: str, rec: R.Record, system: R.ReferenceSystem, fe: R.Frontend, budget: int,
               stride: int, snac_seed: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    ids = _ids_array(rec.input_ids)
    B, _, T = ids.shape
    np.save(d / "input_ids.npy", ids)
    np.savez(d / "prefill_logits.npz", text=rec.prefill_text.astype(np.float32),
             audio=rec.prefill_audio.astype(np.float32))
    np.save(d / "tokens.npy", np.array(rec.tokens, dtype=np.int64).reshape(len(rec.tokens), -1))
    np.save(d / "margins.npy", np.array(rec.margins, dtype=np.float32).reshape(len(rec.tokens), -1))
    official, labels = R.LABELS[name]
    texts = rec.tokens[-1]
    stop = {"kind": rec.stop_kind, "at_step": rec.stop_step} if rec.stop_step is not None else \
        {"kind": rec.stop_kind, "recorded_steps": rec.steps}
    meta = {"task": name, "official_task_label": official, "T": int(T), "batch_size": int(B),
            "steps_recorded": rec.steps, "step_budget": budget, "stopped_early": rec.stop_step is not None,
            "stop_reason": stop,
            "stop_rule": ("layer-6 _eoa ends generation (not recorded); after text _eot the text stream is "
                          "forced to _pad_t") if name in R.SPEECH_TASKS else
                         "text _eot ends generation (not recorded)",
            "eot_step": texts.index(R.EOT) if R.EOT in texts else None}
    if name in R.BATCH_TASKS:
        meta["text_concat_of_deltas"] = "".join(c["text_delta"] for c in rec.chunks)
    else:
        meta["decoded_text"] = system.decoded_text(name, rec)
    meta["whisper_lens"] = None if labels is None else [fe.L] * B
    meta["task_labels_seen_by_model"] = labels
    (d / "meta.json").write_text(json.dumps(meta, indent=2))
    if name not in R.BATCH_TASKS:
        return
    (d / "stream").mkdir(exist_ok=True)
    for c in rec.chunks:
        np.save(d / "stream" / f"chunk_{c['index']:02d}.npy", c["pcm"])
    codes, full = system.decode_all(rec, snac_seed)
    spec = {"stream_stride": stride, "sample_rate": 24000, "snac_seed_before_each_decode": snac_seed,
            "num_chunks": len(rec.chunks), "full_num_samples": int(full.size), "frames_total": len(codes[0]),
            "frames_streamed": stride * len(rec.chunks),
            "chunks": [{k: v for k, v in c.items() if k != "pcm"} for c in rec.chunks]}
    (d / "stream.json").write_text(json.dumps(spec, indent=1))
    (d / "snac_codes.json").write_text(json.dumps(codes))
    np.save(d / "full_float.npy", full.astype(np.float32))
    sf.write(d / "full.wav", full, 24000)  # soundfile's WAV default: PCM_16, as the release saves it


def _versions(**extra) -> dict:
    import snac
    import tokenizers
    import PIL
    return {"oracle": "omnitalk.testing.reference (official-style re-implementation; not the engine)",
            "official_behaviour": {"repository": "gpt-omni/mini-omni2", "commit": "75f450e"},
            "torch": torch.__version__, "snac": getattr(snac, "__version__", "?"),
            "tokenizers": tokenizers.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "soundfile": sf.__version__, "device": "cpu", "dtype": "float32", **extra}


# ---------------------------------------------------------------------------------------------
# make_fixture
# ---------------------------------------------------------------------------------------------
def make_fixture(out_dir, *, seed: int, n_layer: int = 2, n_embd: int | None = None, n_head: int = 4,
                 n_query_groups: int = 2, head_size: int = 8, intermediate_size: int = 64,
                 whisper: dict | None = None, clip: dict | None = None, snac: dict | None = None,
                 question_wav=None, image=None, prompt: str = DEFAULT_PROMPT, max_tokens: int = 48,
                 stride: int = 4, snac_seed: int = 1234, min_margin: float = 1e-3, min_chunks: int = 1,
                 max_attempts: int = 20, tasks=R.TASKS, tokenizer=None, overwrite: bool = True,
                 log=None) -> dict:
    """Write a complete fixture folder; returns a summary (seed used, attempts, timings).

    whisper: {"n_audio_state", "n_audio_head", "n_audio_layer"}; clip: {"width", "layers", "patch",
    "output_dim"}; snac: {"encoder_dim", "decoder_dim"}. `tasks` limits expected/ to some task folders.
    Raises FixtureError when no usable draw is found within `max_attempts` seeds.
    """
    out = Path(out_dir)
    whisper = {**WHISPER_DEFAULT, **(whisper or {})}
    clip = {**CLIP_DEFAULT, **(clip or {})}
    snac = {**SNAC_DEFAULT, **(snac or {})}
    n_embd = n_embd if n_embd is not None else n_head * head_size
    if n_head % n_query_groups:
        raise FixtureError(f"n_head {n_head} is not a multiple of n_query_groups {n_query_groups}")
    if head_size % 2:
        raise FixtureError(f"head_size must be even (rotary embedding halves), got {head_size}")
    if clip["width"] % 64 or clip["width"] <= 0:
        raise FixtureError(f"CLIP width must be a positive multiple of 64 (CLIP derives heads = width / 64), "
                           f"got {clip['width']}")
    if whisper["n_audio_state"] % whisper["n_audio_head"]:
        raise FixtureError(f"Whisper width {whisper['n_audio_state']} is not a multiple of its "
                           f"{whisper['n_audio_head']} heads")
    if max_tokens < 1 or stride < 1:
        raise FixtureError("max_tokens and stride must be >= 1")
    unknown = [t for t in tasks if t not in R.TASKS]
    if unknown:
        raise FixtureError(f"unknown tasks {unknown}; choose from {R.TASKS}")
    tokenizer = Path(tokenizer) if tokenizer else DEFAULT_SOURCE / "checkpoint" / "tokenizer.json"
    if not tokenizer.is_file():
        raise FixtureError(f"tokenizer.json not found at {tokenizer}; pass tokenizer=PATH")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FixtureError(f"{out} exists and is not empty")
        for sub in ("checkpoint", "inputs", "expected"):
            shutil.rmtree(out / sub, ignore_errors=True)
    llm_cfg = model_config(n_layer, n_embd, n_head, n_query_groups, head_size, intermediate_size,
                           whisper["n_audio_state"], clip["output_dim"])
    whisper_dims = {"n_mels": 80, "n_audio_ctx": 1500, **{k: whisper[k] for k in WHISPER_DEFAULT},
                    "n_vocab": 51865, "n_text_ctx": 448, "n_text_state": whisper["n_audio_state"],
                    "n_text_head": whisper["n_audio_head"], "n_text_layer": 1}
    write_inputs(out / "inputs", question_wav, image, prompt)
    order = sorted(tasks, key=lambda t: (t in R.BATCH_TASKS, t in R.SPEECH_TASKS))  # cheap checks first
    rejected: list[str] = []
    t_start = time.perf_counter()
    for attempt in range(max_attempts):
        s = seed + attempt
        seeds = write_checkpoint(out / "checkpoint", seed=s, llm_cfg=llm_cfg, whisper_dims=whisper_dims,
                                 clip=clip, snac=snac, tokenizer_file=tokenizer)
        with torch.random.fork_rng(devices=[]):
            system = R.ReferenceSystem(out / "checkpoint")
            fe = system.frontend(out / "inputs" / "question.wav", out / "inputs" / "image.png")
            records, bad = {}, []
            for name in order:
                rec = system.run_task(name, fe, prompt, budget=max_tokens, stride=stride, snac_seed=snac_seed)
                bad = problems(name, rec, min_margin, min_chunks)
                if bad:
                    break
                records[name] = rec
        if bad:
            rejected.append(f"seed {s}: {bad[0]}")
            if log:
                log(f"seed {s} rejected: {bad[0]}")
            continue
        exp = out / "expected"
        exp.mkdir(parents=True, exist_ok=True)
        np.save(exp / "mel.npy", fe.mel.astype(np.float32))
        n = len(fe.samples)
        (exp / "audio_len.json").write_text(json.dumps(
            {"num_samples": n, "sample_rate": 16000, "duration_ms": n / 16000 * 1000, "L": fe.L}, indent=2))
        np.save(exp / "whisper_features.npy", fe.whisper_out.astype(np.float32))
        np.save(exp / "clip_input.npy", fe.clip_input.astype(np.float32))
        np.save(exp / "clip_features.npy", fe.clip_out.astype(np.float32))
        with torch.random.fork_rng(devices=[]):
            for name in tasks:
                write_task(exp / name, name, records[name], system, fe, max_tokens, stride, snac_seed)
        summary = {"seed_requested": seed, "seed_used": s, "attempts": attempt + 1, "rejected": rejected,
                   "seconds": round(time.perf_counter() - t_start, 2), "tasks": list(tasks),
                   "steps": {k: r.steps for k, r in records.items()},
                   "min_margin": min(min(m for row in r.margins for m in row) for r in records.values())}
        (out / "README.md").write_text(README.format(seed=s, tasks=", ".join(tasks), budget=max_tokens,
                                                       stride=stride, snac_seed=snac_seed))
        (exp / "versions.json").write_text(json.dumps(_versions(
            seeds={"master": s, **seeds, "snac_noise": {"torch.manual_seed": snac_seed,
                                                         "when": "immediately before every SNAC decode call"}},
            model={k: llm_cfg[k] for k in ("n_layer", "n_embd", "n_head", "n_query_groups", "head_size",
                                           "intermediate_size", "whisper_adapter_dim", "vision_adapter_dim")},
            whisper_dims=whisper_dims, clip=clip, snac=snac,
            llm_embedding_std={"text ids < tokenizer vocab size": 1.0, "other text ids < 151936": 0.3,
                               "_pad_t/_input_t/_answer_t/_asr": 1.0, "_eot": 1.8, "other text specials": 0.3,
                               "audio codes 0..4095 (every layer)": 1.0, "audio specials 4096..4159": 0.5,
                               "layer-6 _eoa": 1.5, "lm_head.weight (ignored by the official loader)": 1.0},
            llm_linear_std="4.0 / sqrt(fan_in); qkv bias std 0.2; RMSNorm weights 1 + N(0, 0.1^2)",
            decode_steps_budget=max_tokens, sampling={"temperature": 0.9, "top_k": 1, "top_p": 1.0},
            stream_stride=stride, min_margin_required=min_margin, generation=summary), indent=2))
        return summary
    raise FixtureError(f"no usable draw in {max_attempts} seeds from {seed}: " + "; ".join(rejected[-3:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omnitalk.testing.make_fixture", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-query-groups", type=int, default=2)
    ap.add_argument("--head-size", type=int, default=8)
    ap.add_argument("--intermediate-size", type=int, default=64)
    ap.add_argument("--whisper-width", type=int, default=32)
    ap.add_argument("--whisper-heads", type=int, default=2)
    ap.add_argument("--whisper-layers", type=int, default=2)
    ap.add_argument("--clip-width", type=int, default=128, help="multiple of 64")
    ap.add_argument("--clip-layers", type=int, default=2)
    ap.add_argument("--clip-patch", type=int, default=32, help="input size is 7 * patch (50 tokens)")
    ap.add_argument("--clip-output-dim", type=int, default=24)
    ap.add_argument("--snac-encoder-dim", type=int, default=8)
    ap.add_argument("--snac-decoder-dim", type=int, default=64)
    ap.add_argument("--question-wav", type=Path)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--min-margin", type=float, default=1e-3,
                    help="smallest top-1/top-2 logit gap accepted for a chosen token or stop (1e-3)")
    ap.add_argument("--max-attempts", type=int, default=20)
    ap.add_argument("--check", action="store_true", help="run the parity checker on the result")
    a = ap.parse_args(argv)
    try:
        summary = make_fixture(
            a.out, seed=a.seed, n_layer=a.n_layer, n_head=a.n_head, n_query_groups=a.n_query_groups,
            head_size=a.head_size, intermediate_size=a.intermediate_size,
            whisper={"n_audio_state": a.whisper_width, "n_audio_head": a.whisper_heads,
                     "n_audio_layer": a.whisper_layers},
            clip={"width": a.clip_width, "layers": a.clip_layers, "patch": a.clip_patch,
                  "output_dim": a.clip_output_dim},
            snac={"encoder_dim": a.snac_encoder_dim, "decoder_dim": a.snac_decoder_dim},
            question_wav=a.question_wav, image=a.image, prompt=a.prompt, max_tokens=a.max_tokens,
            stride=a.stride, min_margin=a.min_margin, max_attempts=a.max_attempts,
            log=lambda m: print(m, file=sys.stderr))
    except FixtureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if a.check:
        from omnitalk.testing import parity
        return parity.main([str(a.out), "--max-tokens", str(a.max_tokens), "--stride", str(a.stride)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
