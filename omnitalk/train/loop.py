"""The training loop: `train(cfg) -> Path`.

    model      random init of a config-driven model, or a checkpoint's weights (fine-tuning)
    freezing   per stage (config.STAGE_PARAMS); the tied embedding/head trains with `transformer.*`, an
               untied head (tie_word_embeddings: false) as `lm_head.`
    data       JSONL manifests -> records -> TrainSamples (sequences.build_sample) with cached encoder
               features; a deterministic plan of global micro-batches per (seed, epoch)
    step       grad_accum micro-batches, each rank its shard, loss normalised by the global token counts,
               AdamW, cosine schedule with linear warm-up, gradient clipping, optional bf16 autocast
    output     <out_dir>/metrics.{jsonl,csv}, checkpoints/step-NNNNNNN/state.pt every checkpoint_every
               steps and on SIGTERM (the flag is checked at step boundaries; the run saves and returns, the
               CLI exits 0), final/ = the official lit_model.pth layout (+ tokenizer.json, model_config.yaml)

Resume (`resume=True`) restores model, optimizer, schedule, step, data position (epoch, batch) and the torch
RNG from the latest checkpoint: a killed and resumed run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from omnitalk.config import Config, preset as make_preset
from omnitalk.model.whisper import speech_positions
from omnitalk.tokens import TokenLayout
from omnitalk.train import dist as D
from omnitalk.train.config import INIT_STYLES, TrainConfig
from omnitalk.train.losses import TrainModule, combine_sums, count_targets
from omnitalk.train.metrics import MetricsWriter
from omnitalk.train.sequences import (Batch, RecordError, TrainSample, build_sample, collate, follow_text_copies,
                                      length_buckets, text_only)

log = logging.getLogger("omnitalk.train")


# ---- model ---------------------------------------------------------------------------------------
def model_config(cfg: TrainConfig) -> Config:
    """The model's Config: a checkpoint's model_config.yaml, a config_path, or preset + overrides
    (padded_vocab_size follows the text/audio vocabulary sizes unless given)."""
    m = cfg.model
    if m.init == "checkpoint" and not m.config_path and not m.config:
        return Config.from_file(Path(m.checkpoint) / "model_config.yaml")
    if m.config_path:
        base = Config.from_file(m.config_path).to_dict()
    else:
        base = Config.from_dict({}).to_dict() if m.preset is None else make_preset(m.preset).to_dict()
    over = dict(m.config or {})
    d = {**base, **over}
    if "padded_vocab_size" not in over:
        d["padded_vocab_size"] = d["text_vocab_size"] + d.get("n_audio_layers", 7) * d["audio_vocab_size"]
    return Config.from_dict(d)


def init_weights(lm, std: float, embedding_std: float | None = None, zero_audio_pad: bool = False,
                 style: str = "gpt") -> None:
    """Init for training from scratch. style 'gpt': N(0, std) matrices, zero biases; the embedding table
    N(0, embedding_std) (default: std x the number of streams). style 'pytorch': every Linear and the
    table as PyTorch starts them (reset_parameters: uniform +-1/sqrt(fan_in), the table N(0, 1)); std and
    embedding_std are not used.

    The model's input is the *mean* of its 8 streams' embeddings (reference §5), so a table drawn at the
    matrices' scale enters the residual stream 8x smaller than a GPT's, and its updates too: a small model
    trained from nothing then barely reads its input (measured: a 4-layer model memorises the world's
    arithmetic facts in ~150 steps with the scaled table, and is still at 0.6 nats after 300 without).
    With `zero_audio_pad` the 7 `_pad_a` rows start at zero: on text positions they are the same vector
    at every position, 7/8 of the input at init, and carry nothing.

    The small recipe starts 'pytorch' with an untied head: its picture lookup was not learnt from the
    'gpt' start with the tied head (scripts/probe_lookup.py and full runs, docs/training.md)."""
    if style not in INIT_STYLES:
        raise ValueError(f"init style must be one of {INIT_STYLES}, got {style!r}")
    for mod in lm.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            if style == "pytorch":
                mod.reset_parameters()
                continue
            torch.nn.init.normal_(mod.weight, 0.0, std)
            if getattr(mod, "bias", None) is not None:
                torch.nn.init.zeros_(mod.bias)
    cfg = lm.cfg
    wte = lm.transformer.wte.weight
    with torch.no_grad():
        if style == "gpt":
            torch.nn.init.normal_(wte, 0.0, embedding_std if embedding_std is not None
                                  else std * (cfg.n_audio_layers + 1))
        if zero_audio_pad:
            pad = TokenLayout.from_config(cfg).pad_a
            for j in range(cfg.n_audio_layers):
                wte[cfg.text_vocab_size + j * cfg.audio_vocab_size + pad].zero_()


def qwen2_to_omni(hf: dict, mcfg: Config) -> dict:
    """Hugging Face Qwen2 weights (model.layers.N.self_attn.q_proj ...) -> OmniLM names and layout.

    q/k/v go into litgpt's grouped fused QKV (per group g: its n_head/n_query_groups query heads, then
    its key head, then its value head; reference §2.2); gate/up/down -> fc_1/fc_2/proj. Embedding rows
    beyond Qwen2's vocabulary (the 64 text specials and the 7 audio layers) are left to the caller."""
    nh, ng, hs = mcfg.n_head, mcfg.n_query_groups, mcfg.head_size
    qpk = nh // ng
    out = {"transformer.ln_f.weight": hf["model.norm.weight"]}
    for i in range(mcfg.n_layer):
        p, o = f"model.layers.{i}.", f"transformer.h.{i}."
        a = p + "self_attn."
        for kind in ("weight", "bias"):
            if a + f"q_proj.{kind}" not in hf:
                continue
            q = hf[a + f"q_proj.{kind}"].reshape(ng, qpk * hs, -1)
            k = hf[a + f"k_proj.{kind}"].reshape(ng, hs, -1)
            v = hf[a + f"v_proj.{kind}"].reshape(ng, hs, -1)
            fused = torch.cat([q, k, v], dim=1).reshape((qpk + 2) * hs * ng, -1)
            out[o + f"attn.attn.{kind}"] = fused.squeeze(-1) if kind == "bias" else fused
        out[o + "attn.proj.weight"] = hf[a + "o_proj.weight"]
        out[o + "norm_1.weight"] = hf[p + "input_layernorm.weight"]
        out[o + "norm_2.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[o + "mlp.fc_1.weight"] = hf[p + "mlp.gate_proj.weight"]
        out[o + "mlp.fc_2.weight"] = hf[p + "mlp.up_proj.weight"]
        out[o + "mlp.proj.weight"] = hf[p + "mlp.down_proj.weight"]
    return out


def _read_hf_dir(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors (expected a Hugging Face Qwen2 download, e.g. "
                                "`huggingface-cli download Qwen/Qwen2-0.5B --local-dir {path}`)")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def build_model(cfg: TrainConfig, mcfg: Config):
    from omnitalk import checkpoint as ckpt_io
    from omnitalk.model.llm import OmniLM

    if cfg.model.init in ("random", "qwen2"):
        lm = OmniLM(mcfg)
        init_weights(lm, cfg.model.init_std, cfg.model.embedding_init_std, cfg.model.zero_audio_pad,
                     cfg.model.init_style)
        if cfg.model.init == "qwen2":  # the paper's starting point: Qwen2-0.5B base, vocabulary extended
            hf = _read_hf_dir(Path(cfg.model.checkpoint))
            emb = hf["model.embed_tokens.weight"]
            n = min(emb.shape[0], TokenLayout.from_config(mcfg).text_special_base)
            sd = qwen2_to_omni(hf, mcfg)
            with torch.no_grad():
                lm.transformer.wte.weight[:n] = emb[:n].float()
                if not mcfg.tie_word_embeddings:  # Qwen2's larger models store their own head; 0.5B ties it
                    lm.lm_head.weight[:n] = hf.get("lm_head.weight", emb)[:n].float()
                missing = [k for k, v in sd.items() if lm.state_dict()[k].shape != v.shape]
                if missing:
                    raise ValueError(f"Qwen2 weights do not fit the model config (e.g. {missing[0]}: "
                                     f"{tuple(sd[missing[0]].shape)} vs {tuple(lm.state_dict()[missing[0]].shape)})")
                lm.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        return lm
    path = Path(cfg.model.checkpoint)
    if (path / "state.pt").is_file():  # one of our training checkpoints
        from omnitalk.train.export import load_training_state
        sd, _ = load_training_state(path)
        lm = ckpt_io.load_llm(path, mcfg, state_dict=sd)
    elif (path / ckpt_io.OURS).is_file():
        parts, _ = ckpt_io.read_ours(path)
        lm = ckpt_io.load_llm(path, mcfg, state_dict=parts["llm"])
    else:
        lm = ckpt_io.load_llm(path, mcfg)
    # own the memory (the checkpoint is memory-mapped) and make the tie explicit
    for p in lm.parameters():
        p.data = p.data.clone()
    if mcfg.tie_word_embeddings:
        lm.lm_head.weight = lm.transformer.wte.weight
    return lm


def set_trainable(lm, prefixes: Sequence[str]) -> list[str]:
    """requires_grad by name prefix; a tied parameter trains if any of its names matches. Returns the
    names (first name of each parameter) that train."""
    lm.requires_grad_(False)
    for name, p in lm.named_parameters(remove_duplicate=False):
        if name.startswith(tuple(prefixes)):
            p.requires_grad_(True)
    return [n for n, p in lm.named_parameters() if p.requires_grad]


def load_tokenizer(cfg: TrainConfig):
    from omnitalk.tokenizer import TextTokenizer

    t = cfg.model.tokenizer
    if t in (None, "auto") and cfg.model.checkpoint and (Path(cfg.model.checkpoint) / "tokenizer.json").is_file():
        return TextTokenizer(Path(cfg.model.checkpoint) / "tokenizer.json")
    if t in (None, "auto", "byte-level"):
        return TextTokenizer.byte_level()
    return TextTokenizer(t)


# ---- optimisation --------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine down to min_lr at `steps`."""
    lr, min_lr, warm, total = cfg.lr, cfg.min_lr, cfg.optim.warmup_steps, cfg.optim.steps
    if warm > 0 and step < warm:
        return lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors do not. `optim.lr_scale` {prefix: k}: the parameters whose name
    (as in the model's state dict, e.g. `vision_adapter.`) starts with a prefix learn at k x the
    scheduled lr (its own param groups, `lr_scale` recorded in each group)."""
    scales = {str(k): float(v) for k, v in (cfg.optim.lr_scale or {}).items()}
    groups: dict[tuple, list] = {}
    matched = set()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        name = name.split("lm.", 1)[-1]  # without the TrainModule (+ DDP) prefix
        prefix = next((k for k in scales if name.startswith(k)), None)
        matched.add(prefix)
        groups.setdefault((p.dim() >= 2, scales.get(prefix, 1.0)), []).append(p)
    unused = sorted(set(scales) - matched)
    if unused:
        raise ValueError(f"optim.lr_scale: no trainable parameter starts with {unused} (names look like "
                         "'vision_adapter.fc_1.weight', 'transformer.h.0.attn.attn.weight')")
    out = [{"params": ps, "weight_decay": cfg.optim.weight_decay if decay else 0.0, "lr_scale": k}
           for (decay, k), ps in groups.items()]
    return torch.optim.AdamW(out, lr=cfg.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


# ---- data ----------------------------------------------------------------------------------------
class FileFeatures:
    """Feature source for manifests whose question_audio / question_image point at saved encoder
    outputs (.npy or .pt) instead of media; anything else asks for `data.features` in the config."""

    def _load(self, path: str) -> torch.Tensor:
        p = str(path)
        if p.endswith(".npy"):
            return torch.from_numpy(np.load(p)).float()
        if p.endswith(".pt"):
            return torch.load(p, map_location="cpu", weights_only=True).float()
        raise RecordError(f"{p} is media, not cached features: set data.features in the training config (e.g. "
                          "{cache_dir: ..., encoders: <checkpoint dir>}) so encoder outputs can be looked up")

    audio = image = _load


class MemoryFeatures:
    """Features held in dicts keyed by path (tests, small in-memory experiments)."""

    def __init__(self, audio: dict | None = None, image: dict | None = None):
        self._a, self._i = audio or {}, image or {}

    def audio(self, path):
        return self._a[path]

    def image(self, path):
        return self._i[path]


def _encoders_from_dir(path: str | Path):
    """The frozen encoders of a checkpoint directory (small.pt, ViT-B-32.*) without the LLM."""
    from omnitalk import checkpoint as ckpt_io
    from omnitalk.model.whisper import load_whisper_encoder

    path = Path(path)
    whisper = load_whisper_encoder(path / "small.pt") if (path / "small.pt").is_file() else None
    clip = None
    f = next((path / n for n in ckpt_io.CLIP_FILES if (path / n).is_file()), None)
    if f is not None and f.suffix == ".safetensors":
        from omnitalk.engine import _clip_from_state_dict, _read_safetensors
        clip = _clip_from_state_dict(_read_safetensors(f), "cpu")
    elif f is not None:
        from omnitalk.model.clip import load_clip_vision
        clip = load_clip_vision(f)
    return SimpleNamespace(whisper=whisper, clip=clip, device=torch.device("cpu"))


def make_features(spec: dict | None):
    """data.features -> a feature source (.audio(path), .image(path)).

    {factory: "module:callable", kwargs: {...}}: whatever the callable returns;
    {cache_dir: DIR, encoders: CKPT_DIR}: omnitalk.train.data.FeatureCache over that checkpoint's encoders;
    None: FileFeatures (paths that are .npy/.pt features)."""
    if not spec:
        return FileFeatures()
    if "factory" in spec:
        mod, _, name = spec["factory"].partition(":")
        return getattr(importlib.import_module(mod), name)(**spec.get("kwargs", {}))
    if "cache_dir" in spec:
        from omnitalk.train.data import FeatureCache
        return FeatureCache(spec["cache_dir"], _encoders_from_dir(spec["encoders"]))
    raise ValueError(f"data.features must have 'factory' or 'cache_dir', got {sorted(spec)}")


def read_records(path: str | Path) -> list[dict]:
    try:
        from omnitalk.train.data import read_manifest
    except ImportError:  # pragma: no cover - the data module ships with the package
        import json
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return read_manifest(path, check_files=False)


def load_sources(entries: Iterable, cfg: TrainConfig) -> tuple[list[dict], list[float]]:
    """Manifest entries ({path, weight} or paths) -> (records, sampling weights) after the task mixture
    and the stage's text-answer policy, plus `data.follow_text` copies (each at its original's weight)."""
    records, weights = [], []
    for e in entries:
        e = {"path": e} if isinstance(e, str) else dict(e)
        recs = e["records"] if "records" in e else read_records(e["path"])
        for r in recs:
            w = float(e.get("weight", 1.0)) * _task_weight(r.get("task"), cfg)
            if cfg.text_answers_only:
                r = text_only(r)
            if r is None or w <= 0:
                continue
            records.append(r)
            weights.append(w)
    if cfg.data.follow_text and not cfg.text_answers_only:
        for i, copy in follow_text_copies(records, float(cfg.data.follow_text), cfg.seed):
            records.append(copy)
            weights.append(weights[i])
    return records, weights


def _task_weight(task: str | None, cfg: TrainConfig) -> float:
    if cfg.data.tasks is None:
        return 1.0
    return float(cfg.data.tasks.get(task, 0.0))


class SampleBuilder:
    """Record index -> TrainSample, with encoder features from the feature source."""

    def __init__(self, records: list[dict], layout: TokenLayout, tokenizer, features, audio_pool: int = 1,
                 audio_compress: str = "none"):
        self.records, self.layout, self.tokenizer, self.features = records, layout, tokenizer, features
        # the model's Config.audio_pool / audio_compress: cached Whisper frames are pooled or merged here,
        # as the engine does (omnitalk.model.whisper.speech_positions; 'ctc' uses the cache's encoder's head)
        self.audio_pool, self.audio_compress = audio_pool, audio_compress
        self.whisper = getattr(getattr(features, "model", None), "whisper", None) if audio_compress != "none" else None

    def __call__(self, i: int) -> TrainSample:
        r = self.records[i]
        af = vf = None
        if r.get("question_audio") is not None and r.get("task") != "interrupt":
            af = speech_positions(self.features.audio(r["question_audio"]), self.whisper, self.audio_pool,
                                  self.audio_compress)
        if r.get("question_image") is not None and r.get("task") != "interrupt":
            vf = self.features.image(r["question_image"])
        return build_sample(r, self.layout, self.tokenizer, af, vf)


class BatchPlan:
    """Deterministic global micro-batches per epoch from (seed, epoch): each record appears floor(w) or
    ceil(w) times (w = its sampling weight; the fraction drawn), in a random order; batches are chunks
    of batch_size or, with batch_tokens, length buckets in random order."""

    def __init__(self, weights: Sequence[float], lengths: Sequence[int], cfg: TrainConfig):
        self.weights = torch.tensor(list(weights), dtype=torch.float64)
        self.lengths = list(lengths)
        self.bs, self.bt = cfg.batch.batch_size, cfg.batch.batch_tokens
        self.mult, self.seed, self.max_batch = cfg.batch.pad_to_multiple, cfg.seed, cfg.batch.max_batch
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        base = self.weights.floor()
        reps = (base + (torch.rand(len(self.weights), generator=g, dtype=torch.float64) < self.weights - base)).long()
        idx = torch.repeat_interleave(torch.arange(len(self.weights)), reps)
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        if self.bt:
            b = length_buckets(self.lengths, self.bt, order=idx, pad_to_multiple=self.mult, max_batch=self.max_batch)
            batches = [b[i] for i in torch.randperm(len(b), generator=g).tolist()]
        else:
            n = len(idx) // self.bs * self.bs if len(idx) >= self.bs else len(idx)
            batches = [idx[i:i + self.bs] for i in range(0, n, self.bs)]
        if not batches:
            raise ValueError("the training data gives no batch (no records with a positive weight?)")
        self._cache = (epoch, batches)
        return batches


class DataCursor:
    """Position in the plan: (epoch, next batch); the only data-order state a checkpoint needs."""

    def __init__(self, plan: BatchPlan, epoch: int = 0, pos: int = 0):
        self.plan, self.epoch, self.pos = plan, epoch, pos

    def next(self) -> list[int]:
        batches = self.plan.epoch(self.epoch)
        if self.pos >= len(batches):
            self.epoch, self.pos = self.epoch + 1, 0
            batches = self.plan.epoch(self.epoch)
        b = batches[self.pos]
        self.pos += 1
        return b

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


# ---- checkpoints ---------------------------------------------------------------------------------
def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ck = Path(out_dir) / "checkpoints"
    f = ck / "latest"
    if f.is_file() and (ck / f.read_text().strip() / "state.pt").is_file():
        return ck / f.read_text().strip()
    found = sorted(p for p in ck.glob("step-*") if (p / "state.pt").is_file()) if ck.is_dir() else []
    return found[-1] if found else None


def save_checkpoint(module, optimizer, step: int, cursor: DataCursor, cfg: TrainConfig, mcfg: Config,
                    info: D.DistInfo) -> Path:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _sd_options()
    model_sd = get_model_state_dict(module, options=opts)      # collective under FSDP
    if mcfg.tie_word_embeddings:
        model_sd.pop("lm.lm_head.weight", None)  # tied to lm.transformer.wte.weight: store it once
    optim_sd = get_optimizer_state_dict(module, optimizer, options=opts)
    ck = Path(cfg.out_dir) / "checkpoints"
    name = f"step-{step:07d}"
    if info.is_main:
        ck.mkdir(parents=True, exist_ok=True)
        tmp = ck / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state = {"model": model_sd, "optimizer": optim_sd, "step": step, "data": cursor.state(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                 "config": cfg.to_dict(), "model_config": mcfg.to_dict()}
        torch.save(state, tmp / "state.pt")
        mcfg.to_yaml(tmp / "model_config.yaml")
        shutil.rmtree(ck / name, ignore_errors=True)
        tmp.replace(ck / name)
        (ck / "latest.tmp").write_text(name)
        (ck / "latest.tmp").replace(ck / "latest")
        old = sorted(p for p in ck.glob("step-*") if p.name != name)
        for p in old[:max(0, len(old) - max(0, cfg.keep_checkpoints - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    D.barrier(info)
    return ck / name


def load_checkpoint(path: Path, module, optimizer, expected_keys: set[str] | None = None) -> dict:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if expected_keys is not None and set(state["model"]) != expected_keys:
        diff = sorted(set(state["model"]) ^ expected_keys)
        raise ValueError(f"{path}/state.pt does not fit this model ({len(diff)} differing keys, e.g. {diff[:3]}); "
                         "was it written with another model config?")
    set_model_state_dict(module, state["model"], options=_sd_options(strict=False))
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=_sd_options())
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


# ---- SIGTERM -------------------------------------------------------------------------------------
class StopFlag:
    """SIGTERM (and SIGUSR1) set a flag; the loop saves a checkpoint at the next step boundary."""

    SIGNALS = (signal.SIGTERM, getattr(signal, "SIGUSR1", signal.SIGTERM))

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in set(self.SIGNALS):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True
        log.warning("signal %s: saving a checkpoint at the next step boundary", signum)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ---- the loop ------------------------------------------------------------------------------------
@dataclass
class RunResult:
    path: Path          # final/ (completed) or the checkpoint written on SIGTERM
    step: int
    stopped: bool       # True: stopped by a signal before the last step
    last_loss: float | None = None


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            log.warning("bf16 asked for but this GPU lacks it; training in fp32")
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _reduce(t: torch.Tensor, info: D.DistInfo) -> torch.Tensor:
    """Sum a CPU tensor over ranks (through the GPU for nccl)."""
    if not info.enabled:
        return t
    return D.all_reduce_sum(t.to(info.device), info).cpu()


def _call(module, b: Batch, norm=None, return_sums=False):
    return module(b.ids, b.targets, b.audio_feats, b.audio_index, b.image_feats, b.image_index, norm,
                  return_sums=return_sums)


def _lengths(builder: SampleBuilder, n: int, max_len: int, main: bool, progress: bool) -> tuple[list[int], list[int]]:
    """Sample lengths (with the real feature lengths); indices that are invalid or too long are dropped."""
    from tqdm.auto import tqdm

    lengths, bad, errors = [], [], []
    for i in tqdm(range(n), desc="measuring samples", disable=not (main and progress) or n < 2000, leave=False):
        try:
            L = builder(i).length
        except RecordError as e:
            errors.append(str(e))
            L = None
        if L is None or L > max_len:
            bad.append(i)
        lengths.append(L or 0)
    if errors and main:
        log.warning("%d record(s) skipped: %s%s", len(errors), errors[0], " ..." if len(errors) > 1 else "")
    too_long = len(bad) - len(errors)
    if too_long and main:
        log.warning("%d sample(s) longer than %d positions skipped", too_long, max_len)
    return lengths, bad


def run(cfg: TrainConfig, *, resume: bool = False, records: list[dict] | None = None,
        eval_records: list[dict] | None = None, features=None,
        callbacks: Sequence[Callable[[int, dict], None]] = ()) -> RunResult:
    """Train per `cfg`. records / eval_records / features override the config's manifests and feature
    source (tests, notebooks). callbacks(step, row) run after every optimizer step."""
    from tqdm.auto import tqdm

    cfg.validate()
    info = D.setup(cfg.device)
    threads = torch.get_num_threads()
    stopper = StopFlag().__enter__()  # from the start: a SIGTERM during set-up stops at step boundary 0
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        out = Path(cfg.out_dir)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(out / "train_config.yaml")

        # model
        mcfg = model_config(cfg)
        layout = TokenLayout.from_config(mcfg)
        tokenizer = load_tokenizer(cfg)
        lm = build_model(cfg, mcfg)
        lm.clear_cache()
        for block in lm.transformer.h:
            block.dropout = cfg.model.dropout
        trainable = set_trainable(lm, cfg.trainable_prefixes)
        if not trainable:
            raise ValueError(f"no parameter matches the trainable prefixes {cfg.trainable_prefixes}")
        lm.train().to(info.device)
        module = D.wrap(TrainModule(lm, cfg.loss, cfg.batch.head_chunk), info, cfg.strategy)
        optimizer = make_optimizer(module, cfg)

        # data
        feats = features if features is not None else make_features(cfg.data.features)
        train_entries = [{"records": records}] if records is not None else cfg.data.train
        recs, weights = load_sources(train_entries, cfg)
        if not recs:
            raise ValueError("no training records (check data.train and data.tasks)")
        if any(r.get("task") == "interrupt" and w > 0 for r, w in zip(recs, weights)):
            # the exported model_config.yaml says so: servers use its listening item for "stop omni"
            mcfg.extra["interrupt_trained"] = True
        builder = SampleBuilder(recs, layout, tokenizer, feats, mcfg.audio_pool, mcfg.audio_compress)
        max_len = min(cfg.data.max_len or mcfg.block_size, mcfg.block_size)
        lengths, bad = _lengths(builder, len(recs), max_len, info.is_main, cfg.progress)
        for i in bad:
            weights[i] = 0.0
        plan = BatchPlan(weights, lengths, cfg)
        cursor = DataCursor(plan)
        eval_entries = [{"records": eval_records}] if eval_records is not None else cfg.data.eval
        eval_builder = None
        if eval_entries and cfg.eval_every:
            erecs, _ = load_sources(eval_entries, cfg)
            eval_builder = SampleBuilder(erecs, layout, tokenizer, feats, mcfg.audio_pool, mcfg.audio_compress)
            _, ebad = _lengths(eval_builder, len(erecs), max_len, info.is_main, cfg.progress)
            ebad = set(ebad)
            eval_builder.records = [r for i, r in enumerate(erecs) if i not in ebad]
            if not eval_builder.records:
                eval_builder = None

        # resume
        step = 0
        metrics = MetricsWriter(out, enabled=info.is_main)
        if resume:
            ck = latest_checkpoint(out)
            if ck is None:
                if info.is_main:
                    log.warning("--resume: no checkpoint in %s; starting from step 0", out / "checkpoints")
            else:
                from omnitalk.checkpoint import unused_head
                expected = {f"lm.{k}" for k in lm.state_dict() if not unused_head(k, mcfg.tie_word_embeddings)}
                state = load_checkpoint(ck, module, optimizer, expected)
                step = int(state["step"])
                cursor = DataCursor(plan, **state["data"])
                metrics.truncate_after(step)
                if info.is_main:
                    log.info("resumed from %s (step %d)", ck, step)
        elif info.is_main and metrics.jsonl.exists():
            metrics.truncate_after(-1)  # a fresh run in an old directory: start the files over

        device = info.device
        audio_dim, image_dim = mcfg.whisper_adapter_dim, mcfg.vision_adapter_dim
        bar = tqdm(total=cfg.optim.steps, initial=step, disable=not (info.is_main and cfg.progress),
                   desc=f"stage {cfg.stage}", dynamic_ncols=True)
        stopped, last_loss, path = False, None, None
        while step < cfg.optim.steps:
            if D.any_flag(stopper.set, info):
                path = save_checkpoint(module, optimizer, step, cursor, cfg, mcfg, info)
                stopped = True
                break
            t0 = time.perf_counter()
            micro = []
            for _ in range(cfg.batch.grad_accum):
                idx, scale = D.shard(cursor.next(), info)
                b = collate([builder(i) for i in idx], layout, cfg.batch.pad_to_multiple, audio_dim, image_dim)
                micro.append((b.to(device), scale))
            lr = lr_at(step, cfg)
            row = train_step(module, optimizer, micro, lr, cfg, info)
            step += 1
            dt = time.perf_counter() - t0
            row = {"step": step, **row, "tokens_per_s": row["tokens"] / max(dt, 1e-9), "epoch": cursor.epoch}
            last_loss = row["loss"]
            if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.optim.steps):
                metrics.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{lr:.2e}")
            if eval_builder is not None and (step % cfg.eval_every == 0 or step == cfg.optim.steps):
                erow = evaluate(module, eval_builder, cfg, layout, info, audio_dim, image_dim)
                erow.update(_eval_hook(cfg, lm, step, info))
                metrics.log({"step": step, **erow})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in erow.items()
                                                       if isinstance(v, float)))
            for cb in callbacks:
                cb(step, row)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.optim.steps:
                save_checkpoint(module, optimizer, step, cursor, cfg, mcfg, info)
        bar.close()
        if not stopped:
            path = save_checkpoint(module, optimizer, step, cursor, cfg, mcfg, info)
            path = export_final(module, cfg, mcfg, tokenizer, info) or path
        return RunResult(path, step, stopped, last_loss)
    finally:
        stopper.__exit__(None, None, None)
        torch.set_num_threads(threads)
        D.teardown(info)


def train_step(module, optimizer, micro: list[tuple[Batch, float]], lr: float, cfg: TrainConfig,
               info: D.DistInfo) -> dict:
    """One optimizer step over this rank's micro-batches (batch, loss scale): losses normalised by the
    global target counts, gradients accumulated (synchronised on the last micro-batch only), clipped,
    AdamW. Returns the step's metrics summed over micro-batches and ranks (= the global-batch values)."""
    S = micro[0][0].targets.shape[1]
    counts = torch.zeros(S, dtype=torch.float64)
    n_tok = 0.0
    for b, scale in micro:
        counts += count_targets(b.targets, cfg.text_norm).cpu() * scale
        n_tok += float(b.lengths.sum()) * scale
    counts = _reduce(counts, info)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    parts_sum: dict[str, torch.Tensor] = {}
    for k, (b, scale) in enumerate(micro):
        sync = k == len(micro) - 1 or not hasattr(module, "no_sync")
        with contextlib.nullcontext() if sync else module.no_sync():
            with _autocast(cfg, info.device):
                loss, parts = _call(module, b, counts)
            (loss * (scale * info.world)).backward()  # DDP/FSDP average over ranks: undo it
        for name, v in parts.items():
            parts_sum[name] = parts_sum.get(name, 0.0) + v.float().cpu() * scale
    grad_norm = None
    if cfg.optim.grad_clip:
        params = [p for p in module.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    names = sorted(parts_sum)
    vec = torch.stack([torch.as_tensor(parts_sum[n], dtype=torch.float64) for n in names]
                      + [torch.tensor(n_tok, dtype=torch.float64)])
    vec = _reduce(vec, info)
    row = {n: float(vec[i]) for i, n in enumerate(names)}
    row.update(lr=lr, tokens=int(vec[-1]))
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    return row


def train(cfg: TrainConfig, **kwargs) -> Path:
    """Train; returns <out_dir>/final (the exported model) or, when stopped by SIGTERM, the checkpoint
    it saved (resume with resume=True / `--resume`)."""
    return run(cfg, **kwargs).path


def export_final(module, cfg: TrainConfig, mcfg: Config, tokenizer, info: D.DistInfo) -> Path | None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from omnitalk.train.export import export_lit

    sd = get_model_state_dict(module, options=_sd_options())
    out = None
    if info.is_main:
        assets = cfg.export_assets or (cfg.model.checkpoint if cfg.model.init == "checkpoint" else None)
        out = export_lit(sd, mcfg, Path(cfg.out_dir) / "final", assets=assets, tokenizer=tokenizer)
    D.barrier(info)
    return out if info.is_main else Path(cfg.out_dir) / "final"


@torch.no_grad()
def evaluate(module, builder: SampleBuilder, cfg: TrainConfig, layout: TokenLayout, info: D.DistInfo,
             audio_dim: int, image_dim: int) -> dict:
    """Mean loss over the eval records (token-weighted over the whole set, all ranks)."""
    was = module.training
    module.eval()
    n = len(builder.records)
    bs = cfg.batch.batch_size
    batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
    if cfg.eval_batches:
        batches = batches[:cfg.eval_batches]
    S = layout.n_streams
    acc = torch.zeros(2 * S, dtype=torch.float64)  # [text_sum, audio_sums (S-1), counts (S)]
    for idx in batches:
        mine, scale = D.shard(idx, info)
        b = collate([builder(i) for i in mine], layout, cfg.batch.pad_to_multiple, audio_dim, image_dim).to(info.device)
        with _autocast(cfg, info.device):
            text_sum, audio_sums = _call(module, b, return_sums=True)
        acc[0] += float(text_sum) * scale
        acc[1:S] += audio_sums.double().cpu() * scale
        acc[S:] += count_targets(b.targets, cfg.text_norm).cpu() * scale
    acc = _reduce(acc, info)
    _, parts = combine_sums(acc[0], acc[1:S], acc[S:], cfg.loss)
    module.train(was)
    return {"eval_loss": float(parts["loss"]), "eval_text": float(parts["text"]), "eval_audio": float(parts["audio"])}


def _eval_hook(cfg: TrainConfig, lm, step: int, info: D.DistInfo) -> dict:
    if not cfg.eval_hook:
        return {}
    if cfg.strategy == "fsdp" and info.enabled:
        log.warning("eval_hook is skipped under FSDP (the weights are sharded)")
        return {}
    out = {}
    if info.is_main:
        mod, _, name = cfg.eval_hook.partition(":")
        was = lm.training
        lm.eval()
        with torch.no_grad():
            out = dict(getattr(importlib.import_module(mod), name)(model=lm, step=step, cfg=cfg) or {})
        lm.train(was)
    D.barrier(info)
    return out
