"""Export trained weights: the official `lit_model.pth` layout and our safetensors layout.

Official layout (reference §2.5, §2.7, §9): `lit_model.pth` is `torch.save` of a flat name -> float32 tensor
dict in module-registration order (whisper_adapter.*, lm_head.weight, vision_adapter.*, transformer.*),
storing `lm_head.weight` and `transformer.wte.weight` as two separate tensors (equal when the head is tied,
as released; an untied head's own matrix with `tie_word_embeddings: false`), next to a
`model_config.yaml` with the released field set (41 fields, released order). The directory is complete
(loadable by `OmniModel.from_pretrained` and the official `inference.py`) once the encoder / codec /
tokenizer files sit beside it: pass `assets=` (a checkpoint directory to copy them from).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

import torch

from omnitalk.config import Config

# the released model_config.yaml, field by field in its order (reference §2.1; values of the release)
RELEASED_FIELDS: tuple[tuple[str, object], ...] = (
    ("add_qkv_bias", True), ("asr_adapter", "llamamlp"), ("attn_dropout", 0.0), ("bias", False),
    ("block_size", 2048), ("force_align", False), ("gelu_approximate", "none"), ("head_size", 64),
    ("hf_config", {"name": "Qwen2-0.5B", "org": "Qwen"}), ("intermediate_size", 4864), ("lm_head_bias", False),
    ("mlp_class_name", "LLaMAMLP"), ("n_embd", 896), ("n_expert", 0), ("n_expert_per_token", 0), ("n_head", 14),
    ("n_layer", 24), ("n_query_groups", 2), ("name", "Qwen2-0.5B"), ("norm_class_name", "RMSNorm"),
    ("norm_eps", 1e-6), ("padded_vocab_size", 181120), ("padding_multiple", 512), ("parallel_residual", False),
    ("pos_type", "rope"), ("post_adapter", False), ("post_adapter_layers", 6), ("prompt_vocab_size", None),
    ("rope_base", 1000000), ("rope_condense_ratio", 1), ("rotary_percentage", 1), ("scale_embeddings", False),
    ("shared_attention_norm", False), ("tie_word_embeddings", True), ("use_pretrain_phoneme_emb", False),
    ("vocab_size", 50254), ("text_vocab_size", 152000), ("cat_audio_vocab_size", 29120),
    ("audio_vocab_size", 4160), ("whisper_adapter_dim", 768), ("vision_adapter_dim", 512),
)
ASSET_FILES = ("tokenizer.json", "small.pt", "ViT-B-32.pt", "ViT-B-32.safetensors")


def released_config_dict(cfg: Config) -> dict:
    """The released field set with this model's values; our own extra fields (n_audio_layers,
    n_specials when they differ from the release) after them."""
    ours = cfg.to_dict()
    out = {}
    for name, default in RELEASED_FIELDS:
        out[name] = ours.get(name, default)
    out["cat_audio_vocab_size"] = cfg.n_audio_layers * cfg.audio_vocab_size
    out["post_adapter"] = False
    for k, v in ours.items():
        if k not in out:
            out[k] = v
    return out


def write_model_config(cfg: Config, path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(released_config_dict(cfg), sort_keys=False))
    return path


def lit_state_dict(model_or_sd, tied: bool = True) -> dict[str, torch.Tensor]:
    """OmniLM (or its state dict, optionally with a 'lm.' prefix from the training wrapper) -> the
    official flat dict: float32, CPU, contiguous; lm_head.weight a separate copy equal to wte when `tied`
    (the release), the model's own head otherwise."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else dict(model_or_sd)
    if all(k.startswith("lm.") for k in sd):
        sd = {k[3:]: v for k, v in sd.items()}
    if not tied and "lm_head.weight" not in sd:
        raise ValueError("an untied model's state dict has no lm_head.weight (the head of its own)")
    head = sd["transformer.wte.weight"] if tied else sd["lm_head.weight"]
    out = {}
    order = [k for k in sd if k.startswith("whisper_adapter.")] + ["lm_head.weight"] + \
        [k for k in sd if k.startswith("vision_adapter.")] + [k for k in sd if k.startswith("transformer.")]
    for k in order:
        v = head if k == "lm_head.weight" else sd[k]
        v = v.detach().to("cpu", torch.float32)
        out[k] = v.clone() if k == "lm_head.weight" else v.contiguous()
    return out


def save_replacing(path, obj) -> None:
    """torch.save to a new file, then rename it over `path`: a model may have been loaded memory-mapped
    from `path`, and writing into a mapped file in place would pull the pages from under it (SIGBUS)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def export_lit(model_or_sd, cfg: Config, out_dir: str | Path, assets: str | Path | None = None,
               tokenizer=None) -> Path:
    """Write out_dir/lit_model.pth + model_config.yaml; copy tokenizer/encoder/codec files from `assets`;
    save `tokenizer` (a TextTokenizer) as tokenizer.json when `assets` has none. Returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_replacing(out / "lit_model.pth", lit_state_dict(model_or_sd, cfg.tie_word_embeddings))
    write_model_config(cfg, out / "model_config.yaml")
    if assets is not None:
        src = Path(assets)
        for name in ASSET_FILES:
            if (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
                shutil.copyfile(src / name, out / name)
        if (src / "snac").is_dir() and (src / "snac").resolve() != (out / "snac").resolve():
            shutil.copytree(src / "snac", out / "snac", dirs_exist_ok=True)
    if tokenizer is not None and not (out / "tokenizer.json").is_file():
        tokenizer._tok.save(str(out / "tokenizer.json"))
    return out


def export_safetensors(lit_dir: str | Path, dst: str | Path) -> Path:
    """An exported (complete) official directory -> our layout (omnitalk.safetensors etc.) in dst."""
    from omnitalk.checkpoint import convert

    return convert(lit_dir, dst)


def load_training_state(ckpt_dir: str | Path) -> tuple[Mapping[str, torch.Tensor], Config]:
    """A training checkpoint directory (state.pt + model_config.yaml) -> (OmniLM state dict, Config)."""
    ckpt_dir = Path(ckpt_dir)
    state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False)
    sd = {k[3:] if k.startswith("lm.") else k: v for k, v in state["model"].items()}
    return sd, Config.from_dict(state["model_config"])


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, assets: str | Path | None = None) -> Path:
    """A training checkpoint directory -> the official layout in out_dir."""
    sd, cfg = load_training_state(ckpt_dir)
    return export_lit(sd, cfg, out_dir, assets)
