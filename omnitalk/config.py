"""Model configuration: the fields of Mini-Omni2's `model_config.yaml`, presets, YAML in/out."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from omnitalk.errors import CheckpointError


def read_yaml_mapping(path: str | Path, what: str, error: type[Exception] = CheckpointError) -> dict:
    """A YAML file that must hold a mapping (an empty file is an empty mapping), or `error` saying why."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None
    if d is not None and not isinstance(d, dict):
        raise error(f"{what} {path} is not a YAML mapping")
    return d or {}


@dataclass
class Config:
    # LLM (Qwen2-0.5B as shipped)
    block_size: int = 2048
    n_layer: int = 24
    n_embd: int = 896
    n_head: int = 14
    n_query_groups: int = 2
    head_size: int = 64
    intermediate_size: int = 4864
    norm_eps: float = 1e-6
    rope_base: float = 1_000_000
    add_qkv_bias: bool = True
    tie_word_embeddings: bool = True
    # vocabulary: text ids [0, text_vocab_size), then 7 audio layers of audio_vocab_size each
    padded_vocab_size: int = 181120
    text_vocab_size: int = 152000
    audio_vocab_size: int = 4160
    n_audio_layers: int = 7
    n_specials: int = 64  # the last n_specials ids of the text range and of each audio layer
    # adapters
    whisper_adapter_dim: int = 768
    vision_adapter_dim: int = 512
    asr_adapter: str = "llamamlp"
    # our extension: Whisper frames averaged into one LLM position before the adapter (1 = the release's
    # 50 positions per second; a small model learns much faster from a shorter speech sequence)
    audio_pool: int = 1
    # our extension: "ctc" merges the Whisper frames into one position per run of equal labels of the
    # encoder's CTC head (small.pt's "ctc_head", written by the small recipe's stage 0); "none" = release
    audio_compress: str = "none"
    # everything else from the YAML, kept so it can be written back unchanged
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def n_streams(self) -> int:
        return self.n_audio_layers + 1

    def validate(self) -> "Config":
        problems = []
        if self.n_embd != self.n_head * self.head_size:
            problems.append(f"n_embd {self.n_embd} != n_head {self.n_head} * head_size {self.head_size}")
        if self.n_head % self.n_query_groups:
            problems.append(f"n_head {self.n_head} is not a multiple of n_query_groups {self.n_query_groups}")
        expect = self.text_vocab_size + self.n_audio_layers * self.audio_vocab_size
        if self.padded_vocab_size != expect:
            problems.append(f"padded_vocab_size {self.padded_vocab_size} != text_vocab_size + "
                            f"{self.n_audio_layers} * audio_vocab_size = {expect}")
        if not isinstance(self.audio_pool, int) or self.audio_pool < 1:
            problems.append(f"audio_pool must be a whole number >= 1 (Whisper frames per LLM position; 1 = "
                            f"the release), got {self.audio_pool!r}")
        if self.audio_compress not in ("none", "ctc"):
            problems.append(f"audio_compress must be 'none' (the release) or 'ctc' (merge frames by the Whisper "
                            f"checkpoint's CTC head), got {self.audio_compress!r}")
        if self.asr_adapter != "llamamlp":
            problems.append(f"asr_adapter {self.asr_adapter!r} is not supported (only 'llamamlp' was released)")
        if problems:
            raise CheckpointError("invalid model config: " + "; ".join(problems))
        return self

    # ---- YAML ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if d.get("post_adapter"):
            extra["post_adapter"] = False  # the release forces it off as well (inference.py load_model)
        return cls(**known, extra=extra).validate()

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        return cls.from_dict(read_yaml_mapping(path, "model config"))

    def to_dict(self) -> dict:
        """The YAML fields. Our own fields (n_audio_layers, n_specials, audio_pool, audio_compress) only when
        they differ from the release, so a written file stays readable by the official code."""
        ours = ("n_audio_layers", "n_specials", "audio_pool", "audio_compress")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "extra" and not (f.name in ours and getattr(self, f.name) == f.default)}
        return {**self.extra, **d}

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


PRESETS: dict[str, dict] = {
    # the released gpt-omni/mini-omni2 shapes
    "mini-omni2": {},
    # the parity fixture's shapes: tiny LLM, official vocabulary
    "tiny": dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, head_size=8, intermediate_size=64,
                 whisper_adapter_dim=32, vision_adapter_dim=24),
}


def preset(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return Config(**{**PRESETS[name], **overrides}).validate()
