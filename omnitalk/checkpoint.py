"""Checkpoint files: the official directory layout, validation, download, our safetensors layout.

Official layout (gpt-omni/mini-omni2 on the Hugging Face hub):
    model_config.yaml  lit_model.pth  tokenizer.json  small.pt  [ViT-B-32.pt]  [snac/{config.json,pytorch_model.bin}]
Our layout (`omnitalk convert`):
    model_config.yaml  tokenizer.json  omnitalk.safetensors (llm.*, whisper.*, clip.*)  snac/
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from omnitalk.config import Config
from omnitalk.errors import CheckpointError

REPO_ID = "gpt-omni/mini-omni2"
SNAC_REPO_ID = "hubertsiuzdak/snac_24khz"
# OpenAI's ViT-B/32 weights as converted by OpenAI for `transformers` (same tensors, HF key names)
CLIP_REPO_ID = "openai/clip-vit-base-patch32"

OFFICIAL_FILES = ("model_config.yaml", "lit_model.pth", "tokenizer.json", "small.pt")
CLIP_FILES = ("ViT-B-32.pt", "ViT-B-32.safetensors")
SNAC_FILES = ("snac/config.json", "snac/pytorch_model.bin")
OURS = "omnitalk.safetensors"


def _fix_hint(ckpt: Path) -> str:
    return f"run `omnitalk download --checkpoint {ckpt}` (needs network access to the Hugging Face hub)"


def stored_llm_mode(ckpt: str | Path) -> str | None:
    """How a folder's omnitalk.safetensors stores the LLM ('fp32', 'bf16', 'int8'); None without that file."""
    from safetensors import safe_open

    path = Path(ckpt) / OURS
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("llm_mode", "fp32")
    except Exception:  # unreadable: loading it names the problem
        return None


def loadable_mode(ckpt: str | Path, wanted: str) -> str:
    """`wanted`, unless the folder stores its LLM in int8: such a file has no fp32 / bf16 weights to give."""
    return "int8" if stored_llm_mode(ckpt) == "int8" else wanted


def missing_files(ckpt: str | Path) -> list[str]:
    """Files the engine needs that are not in `ckpt` (SNAC may also come from the hub cache)."""
    ckpt = Path(ckpt)
    if (ckpt / OURS).is_file():
        need = ["model_config.yaml", "tokenizer.json"]
    else:
        need = list(OFFICIAL_FILES)
        if not any((ckpt / f).is_file() for f in CLIP_FILES):
            need.append(CLIP_FILES[0])
    snac_weights = ("snac/pytorch_model.bin", "snac/model.safetensors")  # the release's / omnitalk train-codec's
    if not ((ckpt / SNAC_FILES[0]).is_file() and any((ckpt / f).is_file() for f in snac_weights)):
        need += list(SNAC_FILES)
    return [f for f in need if not (ckpt / f).is_file()]


def require_files(ckpt: str | Path) -> None:
    ckpt = Path(ckpt)
    missing = missing_files(ckpt)
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete; missing: {', '.join(missing)}. "
                              f"To fetch them, {_fix_hint(ckpt)}")


# ---- reading ----------------------------------------------------------------------------------
def read_torch_file(path: Path) -> Mapping[str, torch.Tensor]:
    """torch.load memory-mapped (no second copy of a 2.8 GB file), with errors that say what to do."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}. {_fix_hint(path.parent)}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a zip archive: truncated or corrupt "
                              f"download?). Delete it and {_fix_hint(path.parent)}")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {first}); the file is truncated or "
                              f"corrupt. Delete it and {_fix_hint(path.parent)}") from None


def check_state_dict(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str,
                     ignore: tuple[str, ...] = ()) -> None:
    """Same keys and shapes, or a CheckpointError naming the key and both shapes."""
    missing = [k for k in expected if k not in sd and k not in ignore]
    unexpected = [k for k in sd if k not in expected and k not in ignore]
    if missing or unexpected:
        hint = ""
        if len(missing) > len(expected) // 2:
            hint = " It does not look like a Mini-Omni2 LLM state dict (wrong model or wrong file?)."
        raise CheckpointError(f"{source}: state dict does not match the model config. Missing keys: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}); unexpected keys: "
                              f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}).{hint}")
    for k, ref in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: '{k}' has shape {tuple(sd[k].shape)}, expected {tuple(ref.shape)} "
                                  f"for this model_config.yaml (config and weights from different models?)")


def load_llm(ckpt: Path, cfg: Config, device="cpu", mode: str = "fp32", state_dict=None):
    """Build OmniLM from `lit_model.pth` (or a given state dict) without a second copy in memory.

    mode 'fp32' (parity), 'bf16', or 'int8' (weight-only, omnitalk.quant). A state dict that is
    already int8 (our safetensors written with `convert --mode int8`) loads as int8 directly.
    """
    from omnitalk.model.llm import OmniLM, rope_cache
    from omnitalk.quant import MODES, fp32_norms, quantize_lm

    if mode not in MODES:
        raise CheckpointError(f"unknown mode {mode!r}; use one of {MODES}")
    source = str(ckpt / "lit_model.pth") if state_dict is None else str(ckpt / OURS)
    sd = state_dict if state_dict is not None else read_torch_file(ckpt / "lit_model.pth")
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{source} holds a {type(sd).__name__}, not a name->tensor state dict")
    stored_int8 = sd.get("transformer.wte.weight", torch.zeros(0)).dtype == torch.int8
    with torch.device("meta"):
        lm = OmniLM(cfg)
        if stored_int8:
            if mode != "int8":
                raise CheckpointError(f"{source} holds int8 weights; load it with mode='int8' (or convert the "
                                      "official checkpoint again without --mode int8)")
            quantize_lm(lm, "int8")
    tied = cfg.tie_word_embeddings
    check_state_dict(sd, lm.state_dict(), source, ignore=("lm_head.weight",) if tied else ())
    head = sd.get("lm_head.weight") if tied else None
    # Quirk Q3: the release ties the head to wte and its loader overwrites the shared tensor with
    # `transformer.wte.weight`; the stored `lm_head.weight` is never used. Untied (tie_word_embeddings:
    # false, a small model's option), the stored head is the head, as the official loader has it too.
    tied_equal = None if head is None else bool(torch.equal(head, sd["transformer.wte.weight"]))
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    sd = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() and not stored_int8 else v.to(device)
          for k, v in sd.items() if not unused_head(k, tied)}
    lm.load_state_dict(sd, strict=False, assign=True)
    if tied and not stored_int8:
        lm.lm_head.weight = lm.transformer.wte.weight
    cos, sin = rope_cache(cfg.block_size, cfg.head_size, cfg.rope_base)
    lm.rope_cos, lm.rope_sin = cos.to(device), sin.to(device)
    lm.tied_head_equal = tied_equal
    if stored_int8:
        fp32_norms(lm)
    lm = lm.eval().requires_grad_(False)
    return quantize_lm(lm, mode) if mode == "int8" and not stored_int8 else lm


def unused_head(name: str, tied: bool) -> bool:
    """`lm_head.weight` of a tied model: the head is `transformer.wte.weight` itself, so no copy of it is
    stored or read (a release file's copy is ignored, as the release's loader overwrites it: quirk Q3)."""
    return tied and name == "lm_head.weight"


# ---- our safetensors layout -------------------------------------------------------------------
def convert(src: str | Path, dst: str | Path, mode: str = "fp32") -> Path:
    """Official directory -> our layout: one safetensors file (llm.*, whisper.*, clip.*), config, tokenizer, snac/.

    mode 'int8' stores the LLM and adapters quantised (int8 + per-row scales), 'bf16' in bfloat16.
    """
    from safetensors.torch import save_file

    from omnitalk.model.clip import load_clip_vision
    from omnitalk.model.whisper import load_whisper_encoder

    src, dst = Path(src), Path(dst)
    require_files(src)
    cfg = Config.from_file(src / "model_config.yaml")
    lm = load_llm(src, cfg, mode=mode)
    whisper = load_whisper_encoder(src / "small.pt")
    clip = load_clip_vision(next(src / f for f in CLIP_FILES if (src / f).is_file()))
    tensors = {f"llm.{k}": v for k, v in lm.state_dict().items()
               if not unused_head(k, cfg.tie_word_embeddings) and v is not None}
    tensors |= {f"whisper.{k}": v for k, v in whisper.state_dict().items()}
    tensors |= {f"clip.{k}": v for k, v in clip.state_dict().items()}
    dst.mkdir(parents=True, exist_ok=True)
    meta = {"format": "omnitalk/1", "llm_mode": mode, "whisper_dims": json.dumps(whisper.dims.__dict__),
            "whisper_window": getattr(whisper, "window", "exact"),
            "clip_dims": json.dumps(clip.dims.__dict__)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / OURS, metadata=meta)
    for f in ("model_config.yaml", "tokenizer.json", *SNAC_FILES):
        if (src / f).is_file() and (src / f).resolve() != (dst / f).resolve():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f, dst / f)
    return dst / OURS


def source_tensors(src: str | Path) -> dict[str, torch.Tensor]:
    """The official files' tensors under the names of our safetensors file (llm.*, whisper.*, clip.*)."""
    from safetensors.torch import load_file

    from omnitalk.model.clip import read_state_dict

    src = Path(src)
    tied = Config.from_file(src / "model_config.yaml").tie_word_embeddings
    out = {f"llm.{k}": v for k, v in read_torch_file(src / "lit_model.pth").items()
           if not unused_head(k, tied)}
    whisper = read_torch_file(src / "small.pt")
    out |= {f"whisper.{k[len('encoder.'):]}": v for k, v in whisper["model_state_dict"].items()
            if k.startswith("encoder.")}
    out |= {f"whisper.ctc_head.{k}": v for k, v in (whisper.get("ctc_head") or {}).items()}  # omnitalk's addition
    clip_file = next(src / f for f in CLIP_FILES if (src / f).is_file())
    clip = load_file(str(clip_file)) if clip_file.suffix == ".safetensors" else read_state_dict(clip_file)
    out |= {f"clip.{k[len('visual.'):]}": v for k, v in clip.items() if k.startswith("visual.")}
    return out


def verify_conversion(src: str | Path, dst: str | Path) -> int:
    """Every tensor of dst's safetensors equals the official source's (fp32 conversions); returns the count."""
    from safetensors import safe_open

    ref, seen = source_tensors(src), set()
    out = Path(dst) / OURS
    with safe_open(str(out), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if k not in ref:
                raise CheckpointError(f"verification failed: {k} is in {out} but not in {src}")
            if tuple(t.shape) != tuple(ref[k].shape) or not torch.equal(ref[k].to(t.dtype), t):
                raise CheckpointError(f"verification failed: {k} differs from the source in {src}")
            seen.add(k)
    if seen != set(ref):
        raise CheckpointError(f"verification failed: {len(set(ref) - seen)} source tensors missing from {out}, "
                              f"e.g. {sorted(set(ref) - seen)[:3]}")
    require_files(dst)
    return len(seen)


def read_ours(ckpt: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """Our safetensors file -> ({'llm': sd, 'whisper': sd, 'clip': sd}, metadata); memory-mapped."""
    from safetensors import safe_open

    path = ckpt / OURS
    try:
        parts: dict[str, dict[str, torch.Tensor]] = {"llm": {}, "whisper": {}, "clip": {}}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                part, _, name = k.partition(".")
                parts.setdefault(part, {})[name] = f.get_tensor(k)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {str(e)[:200]}); the file is truncated "
                              f"or corrupt. Re-create it with `omnitalk convert`") from None
    if meta.get("format") != "omnitalk/1":
        raise CheckpointError(f"{path} is not an omnitalk safetensors file (metadata format="
                              f"{meta.get('format')!r}); create one with `omnitalk convert`")
    return parts, meta


# ---- download ---------------------------------------------------------------------------------
def download(ckpt: str | Path, repo_id: str = REPO_ID, revision: str = "main") -> Path:
    """Fetch whatever is missing: the release files, SNAC 24 kHz into snac/, CLIP ViT-B/32.

    Uses huggingface_hub (progress bars, resumable, cached); sizes are verified against the hub.
    """
    from huggingface_hub import HfApi, hf_hub_download

    ckpt = Path(ckpt)
    created = not ckpt.exists()
    ckpt.mkdir(parents=True, exist_ok=True)
    api = HfApi()
    try:
        for repo, files, sub in ((repo_id, OFFICIAL_FILES, ""), (SNAC_REPO_ID, ("config.json", "pytorch_model.bin"), "snac")):
            sizes = {s.path: s.size for s in api.get_paths_info(repo, list(files), revision=revision)}
            for name in files:
                target = ckpt / sub / name
                if target.is_file() and sizes.get(name) in (None, target.stat().st_size):
                    continue
                path = Path(hf_hub_download(repo, name, revision=revision, local_dir=ckpt / sub))
                if sizes.get(name) is not None and path.stat().st_size != sizes[name]:
                    raise CheckpointError(f"{path} has {path.stat().st_size} bytes, the hub says {sizes[name]}; "
                                          "delete it and download again")
        if not any((ckpt / f).is_file() for f in CLIP_FILES):
            _download_clip(ckpt)
    except CheckpointError:
        raise
    except Exception as e:
        if created and not any(ckpt.iterdir()):
            ckpt.rmdir()
        raise CheckpointError(f"download into {ckpt} failed ({type(e).__name__}: {str(e)[:300]}). Still "
                              f"missing: {', '.join(missing_files(ckpt))}. Check the network / HF_ENDPOINT / "
                              "HF_TOKEN; files already fetched are kept and the next `omnitalk download` "
                              "resumes") from None
    return ckpt


def _download_clip(ckpt: Path) -> None:
    """OpenAI's ViT-B/32 from the hub (transformers key names) -> ViT-B-32.safetensors in OpenAI's names."""
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file, save_file

    path = hf_hub_download(CLIP_REPO_ID, "model.safetensors")
    save_file(clip_from_hf(load_file(path)), ckpt / "ViT-B-32.safetensors")


def clip_from_hf(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`transformers` CLIPModel vision weights -> OpenAI's `visual.*` names (the same numbers)."""
    p = "vision_model."
    out = {
        "conv1.weight": hf[p + "embeddings.patch_embedding.weight"],
        "class_embedding": hf[p + "embeddings.class_embedding"],
        "positional_embedding": hf[p + "embeddings.position_embedding.weight"],
        "ln_pre.weight": hf[p + "pre_layrnorm.weight"], "ln_pre.bias": hf[p + "pre_layrnorm.bias"],
        "ln_post.weight": hf[p + "post_layernorm.weight"], "ln_post.bias": hf[p + "post_layernorm.bias"],
        "proj": hf["visual_projection.weight"].t(),
    }
    i = 0
    while f"{p}encoder.layers.{i}.self_attn.q_proj.weight" in hf:
        s, d = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[d + f"attn.in_proj_{kind}"] = torch.cat([hf[s + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[d + f"attn.out_proj.{kind}"] = hf[s + f"self_attn.out_proj.{kind}"]
            out[d + f"ln_1.{kind}"] = hf[s + f"layer_norm1.{kind}"]
            out[d + f"ln_2.{kind}"] = hf[s + f"layer_norm2.{kind}"]
            out[d + f"mlp.c_fc.{kind}"] = hf[s + f"mlp.fc1.{kind}"]
            out[d + f"mlp.c_proj.{kind}"] = hf[s + f"mlp.fc2.{kind}"]
        i += 1
    return {f"visual.{k}": v.contiguous() for k, v in out.items()}


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
