"""TrainConfig: one YAML file describes a training run (see configs/*.yaml for commented examples).

    model:     preset / config overrides / config_path, init (random | checkpoint | qwen2), checkpoint, tokenizer,
               init_style (gpt | pytorch), init_std, dropout (residual, training only)
    stage:     1 | 2 | 3 -> which parameters train (STAGE_PARAMS) and the default schedule (STAGE_LR)
    data:      train / eval manifests (JSONL) with sampling weights, task mixture weights, features
    optim:     lr, min_lr, warmup_steps, steps (cosine), weight_decay, betas, eps, grad_clip,
               lr_scale ({name prefix: multiple of the lr}, e.g. {vision_adapter.: 5})
    batch:     batch_size (records per global micro-batch) or batch_tokens (length buckets), grad_accum
    loss:      weights of the text and audio parts; text_norm: token (default) | sample (every sample weighs the same)
    dtype, device, strategy (auto | ddp | fsdp), checkpoint_every, eval_every, log_every, seed, out_dir

Stages (reference §11.1): 1 trains only the two adapters (LLM and encoders frozen, answers in text);
2 trains the LLM (`transformer.*` and the output head, tied to the table as released or its own with
`tie_word_embeddings: false`), adapters frozen, text answers only;
3 trains LLM + adapters on every task with spoken answers and interruption. The encoders (Whisper, CLIP)
stay frozen throughout: training runs on their cached outputs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# name prefixes of the parameters that train in each stage
STAGE_PARAMS: dict[int, tuple[str, ...]] = {
    1: ("whisper_adapter.", "vision_adapter."),
    2: ("transformer.", "lm_head."),
    3: ("transformer.", "lm_head.", "whisper_adapter.", "vision_adapter."),
}
# (lr, min_lr) per stage: the authors' schedule (reference §11.2, M1#112)
STAGE_LR: dict[int, tuple[float, float]] = {1: (1e-3, 4e-6), 2: (4e-4, 4e-6), 3: (4e-4, 4e-6)}
# loss.text_norm: the text CE averaged over text tokens, or per sample first (omnitalk.train.losses)
TEXT_NORMS = ("token", "sample")
# model.init_style: how a random model starts (omnitalk.train.loop.init_weights)
INIT_STYLES = ("gpt", "pytorch")


class TrainConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    preset: str | None = "mini-omni2"      # omnitalk.config.PRESETS name (the base of `config`)
    config: dict = field(default_factory=dict)  # Config field overrides (a config-driven small model)
    config_path: str | None = None         # a model_config.yaml (instead of preset + config)
    init: str = "random"                   # random | checkpoint | qwen2 (Hugging Face Qwen2 weights)
    checkpoint: str | None = None          # init checkpoint: dir with model_config.yaml + lit_model.pth,
                                           # omnitalk.safetensors or state.pt; init qwen2: a HF Qwen2 dir
    tokenizer: str | None = None           # tokenizer.json; None: the checkpoint's, else byte-level
    init_style: str = "gpt"                # random init: gpt (N(0, init_std) matrices, the scaled table below)
                                           # | pytorch (each module's own reset: nn.Linear uniform
                                           # +-1/sqrt(fan_in), the table N(0, 1); init_std unused)
    init_std: float = 0.02                 # random init: N(0, init_std) for every matrix
    embedding_init_std: float | None = None  # random init of the embedding table; None: init_std x the
                                           # number of streams (8): the input is the streams' mean
    zero_audio_pad: bool = True            # random init: the 7 `_pad_a` embedding rows start at zero
    dropout: float = 0.0                   # residual dropout after every attention and MLP (training only)


@dataclass
class DataSection:
    train: list = field(default_factory=list)   # [{path, weight}] or plain paths
    eval: list = field(default_factory=list)
    tasks: dict | None = None              # {task: weight}; None = every task with weight 1
    text_answers_only: bool | None = None  # None: true in stages 1-2 (spoken answers become text-only)
    features: dict | None = None           # {factory: "module:callable", kwargs: {...}} -> FeatureSource
    max_len: int | None = None             # drop samples longer than this (default: block_size)
    follow_text: float = 0.0               # + copies of this share of spoken qa answers saying another answer,
                                           #   text loss off (sequences.follow_text_copies); speech stages only


@dataclass
class OptimSection:
    lr: float | None = None                # None: STAGE_LR[stage]
    min_lr: float | None = None
    warmup_steps: int = 100
    steps: int = 1000
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    lr_scale: dict = field(default_factory=dict)  # {parameter-name prefix: multiplier of the scheduled lr}


@dataclass
class BatchSection:
    batch_size: int = 8                    # records per global micro-batch (all ranks together)
    batch_tokens: int | None = None        # instead: padded tokens per global micro-batch (length buckets)
    max_batch: int | None = None           # with batch_tokens: at most this many records per micro-batch
    grad_accum: int = 1
    pad_to_multiple: int = 8
    head_chunk: int | None = None          # output head in checkpointed chunks of this many positions


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    stage: int = 3
    train_params: list | None = None       # override STAGE_PARAMS with these name prefixes
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    batch: BatchSection = field(default_factory=BatchSection)
    loss: dict = field(default_factory=lambda: {"text": 1.0, "audio": 1.0})
    dtype: str = "fp32"                    # fp32 | bf16 (autocast; master weights stay fp32)
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    strategy: str = "ddp"                  # ddp | fsdp (used when WORLD_SIZE > 1)
    threads: int | None = None             # torch.set_num_threads (CPU)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 0                    # 0 = never
    eval_batches: int | None = None        # cap on eval batches per evaluation
    eval_hook: str | None = None           # "module:function(model, step) -> dict" extra metrics
    log_every: int = 1
    seed: int = 1337
    out_dir: str = "runs/train"
    export_assets: str | None = None       # dir with tokenizer.json, small.pt, ViT-B-32.*, snac/ for exports
    progress: bool = True

    # ---- derived -------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else STAGE_LR[self.stage][0]

    @property
    def min_lr(self) -> float:
        return self.optim.min_lr if self.optim.min_lr is not None else STAGE_LR[self.stage][1]

    @property
    def trainable_prefixes(self) -> tuple[str, ...]:
        return tuple(self.train_params) if self.train_params else STAGE_PARAMS[self.stage]

    @property
    def text_norm(self) -> str:
        return self.loss.get("text_norm", "token")

    @property
    def text_answers_only(self) -> bool:
        t = self.data.text_answers_only
        return self.stage in (1, 2) if t is None else bool(t)

    def validate(self) -> "TrainConfig":
        problems = []
        if self.stage not in STAGE_PARAMS:
            problems.append(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if self.model.init not in ("random", "checkpoint", "qwen2"):
            problems.append(f"model.init must be 'random', 'checkpoint' or 'qwen2', got {self.model.init!r}")
        if self.model.init in ("checkpoint", "qwen2") and not self.model.checkpoint:
            problems.append(f"model.init is {self.model.init!r} but model.checkpoint is not set")
        if self.model.init_style not in INIT_STYLES:
            problems.append(f"model.init_style must be 'gpt' (N(0, init_std) matrices) or 'pytorch' (PyTorch's "
                            f"own module init), got {self.model.init_style!r}")
        if not 0.0 <= self.model.dropout < 1.0:
            problems.append(f"model.dropout must be in [0, 1), got {self.model.dropout!r}")
        if self.dtype not in ("fp32", "bf16"):
            problems.append(f"dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        if self.strategy not in ("ddp", "fsdp"):
            problems.append(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.batch.max_batch is not None and self.batch.max_batch < 1:
            problems.append(f"batch.max_batch must be >= 1 (or null for no cap), got {self.batch.max_batch}")
        if self.batch.batch_size < 1 or self.batch.grad_accum < 1:
            problems.append("batch.batch_size and batch.grad_accum must be >= 1")
        if not 0.0 <= float(self.data.follow_text) <= 1.0:
            problems.append(f"data.follow_text is a share in [0, 1], got {self.data.follow_text!r}")
        if self.optim.steps < 1:
            problems.append("optim.steps must be >= 1")
        if set(self.loss) - {"text", "audio", "text_norm"}:
            problems.append(f"loss keys are 'text', 'audio' (weights) and 'text_norm', got {sorted(self.loss)}")
        if self.text_norm not in TEXT_NORMS:
            problems.append(f"loss.text_norm must be 'token' (mean over text tokens) or 'sample' (mean over "
                            f"samples of each sample's mean), got {self.text_norm!r}")
        if problems:
            raise TrainConfigError("invalid training config: " + "; ".join(problems))
        return self

    # ---- YAML ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        return _build(cls, d or {}, where).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        from omnitalk.config import read_yaml_mapping
        return cls.from_dict(read_yaml_mapping(path, "training config", TrainConfigError), str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        d = self.to_dict()
        d["optim"]["betas"] = list(d["optim"]["betas"])
        Path(path).write_text(yaml.safe_dump(d, sort_keys=False))


def _build(cls, d: dict, where: str) -> Any:
    if not isinstance(d, dict):
        raise TrainConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise TrainConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        default = fields[k].default_factory() if fields[k].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and v is not None:
            kwargs[k] = _build(type(default), v, f"{where}.{k}")
        elif k == "betas":
            kwargs[k] = tuple(float(x) for x in v)
        elif k in ("lr", "min_lr", "eps", "weight_decay", "grad_clip", "init_std") and v is not None:
            kwargs[k] = float(v)  # YAML reads 1e-3 as a string
        else:
            kwargs[k] = v
    return cls(**kwargs)
