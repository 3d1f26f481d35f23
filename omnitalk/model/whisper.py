"""Whisper audio encoder (OpenAI whisper's `AudioEncoder`, same module names and math) and its loader."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnitalk.errors import CheckpointError, InputError


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int  # 80
    n_audio_ctx: int  # 1500 encoder frames (20 ms each)
    n_audio_state: int  # width d
    n_audio_head: int
    n_audio_layer: int

    @classmethod
    def from_dict(cls, dims: Mapping) -> "WhisperDims":
        """From a checkpoint's `dims` dict; the text (decoder) keys are ignored."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in dims]
        if missing:
            raise CheckpointError(f"whisper checkpoint 'dims' lacks {missing}; found {sorted(dims)}")
        d = cls(**{n: int(dims[n]) for n in names})
        if min(dataclasses.astuple(d)) <= 0 or d.n_audio_state % d.n_audio_head:
            raise CheckpointError(f"invalid whisper dims {d}: sizes must be positive and "
                                  "n_audio_state divisible by n_audio_head")
        return d


def whisper_dims_small() -> WhisperDims:
    """Dims of Whisper small, the encoder Mini-Omni2 uses."""
    return WhisperDims(n_mels=80, n_audio_ctx=1500, n_audio_state=768, n_audio_head=12, n_audio_layer=12)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's positional table (length, channels): sin on the first half, cos on the second."""
    inc = torch.log(torch.tensor(max_timescale)) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (as whisper does), result cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, d)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d/H), non-causal
        return self.out(a.transpose(1, 2).flatten(2))  # (B, T, d)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d)
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.dims = dims
        d = dims.n_audio_state
        self.conv1 = nn.Conv1d(dims.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # The stored (float16-rounded) sinusoid table is loaded from the checkpoint, never recomputed.
        self.register_buffer("positional_embedding", torch.zeros(dims.n_audio_ctx, d))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(d, dims.n_audio_head) for _ in range(dims.n_audio_layer))
        self.ln_post = LayerNorm(d)

    def forward(self, mel: Tensor) -> Tensor:
        """mel: (B, n_mels, 2n) -> features (B, n, d); n = n_audio_ctx (1500) for the exact 30-s window,
        fewer for a trimmed window (positions 0..n-1 of the table)."""
        x = F.gelu(self.conv1(mel))  # (B, d, 2n)
        x = F.gelu(self.conv2(x))  # (B, d, n)
        x = x.permute(0, 2, 1)  # (B, n, d)
        x = (x + self.positional_embedding[: x.size(1)]).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


WINDOWS = ("exact", "trimmed")


def trimmed_mel(audio) -> Tensor:
    """The log-mel frames (80, 2L) of a trimmed window, L = num_whisper_frames(len(audio))."""
    from omnitalk import audio as audio_io

    L = audio_io.num_whisper_frames(len(audio))
    mel = audio_io.log_mel_spectrogram(audio, padding_to=None)[..., : 2 * L]
    return F.pad(mel, (0, 2 * L - mel.size(-1)), value=float(mel.min()))


def pool_frames(feats: Tensor, k: int) -> Tensor:
    """(L, d) encoder features -> (ceil(L / k), d): the mean of each run of k consecutive frames (the last
    run averages the frames it has). k = 1 returns the input unchanged (the release's layout)."""
    if k == 1:
        return feats
    return ctc_compress(feats, torch.arange(feats.shape[0], device=feats.device) // k)  # runs of k labels


def ctc_compress(feats: Tensor, labels: Tensor) -> Tensor:
    """(L, d) encoder features + (L,) frame labels -> (n, d): one position per run of equal consecutive
    labels, the mean of its frames (CTC compression, Gaido et al. 2021, "avg"; runs of the blank label are
    kept as positions too, so a word the CTC head missed still reaches the LLM inside its blank run).
    With the labels of a CTC head over words, a spoken question becomes one or two positions per word
    instead of 50 per second."""
    L = feats.shape[0]
    if labels.shape != (L,):
        raise ValueError(f"ctc_compress: labels of shape {tuple(labels.shape)} for {L} frames; expected ({L},)")
    if L == 0:
        return feats
    starts = torch.ones(L, dtype=torch.bool, device=feats.device)
    starts[1:] = labels[1:] != labels[:-1]
    run = torch.cumsum(starts.long(), 0) - 1                         # (L,) run index of every frame
    n = int(run[-1]) + 1
    sums = torch.zeros(n, *feats.shape[1:], dtype=feats.dtype, device=feats.device).index_add_(0, run, feats)
    counts = torch.bincount(run, minlength=n).to(feats.dtype)
    return sums / counts.view(-1, *([1] * (feats.dim() - 1)))


COMPRESS = ("none", "ctc")


def speech_positions(feats: Tensor, encoder: AudioEncoder | None, pool: int = 1, compress: str = "none") -> Tensor:
    """Encoder features (L, d) -> what the LLM's whisper_adapter takes for them: unchanged (the release),
    averaged `pool` frames at a time (Config.audio_pool), or merged by the encoder's CTC head
    (Config.audio_compress 'ctc': `ctc_compress` with the head's best label per frame)."""
    if compress == "ctc":
        head = getattr(encoder, "ctc_head", None)
        if head is None:
            raise CheckpointError("the model config says audio_compress: ctc, but the Whisper checkpoint "
                                  "(small.pt) has no 'ctc_head'; use the small.pt that stage 0 of the training "
                                  "recipe wrote with its CTC head, or set audio_compress: none")
        labels = head(feats.to(head.weight.dtype)).argmax(-1)
        feats = ctc_compress(feats, labels)
    elif compress != "none":
        raise ValueError(f"unknown audio_compress {compress!r}; use one of {COMPRESS}")
    return pool_frames(feats, pool)


def features(encoder: AudioEncoder, audio, window: str | None = None) -> Tensor:
    """16 kHz speech (float array) -> encoder features (L, d) for the L = num_whisper_frames(len) frames
    the LLM takes. window 'exact' runs the padded 30-s window as the release does (parity); 'trimmed'
    only the 2L mel frames the input covers (much faster; what the small recipe's encoders are trained
    on). Default: the encoder's own `window` (set by load_whisper_encoder from the checkpoint)."""
    from omnitalk import audio as audio_io

    window = window or getattr(encoder, "window", "exact")
    if window not in WINDOWS:
        raise InputError(f"unknown whisper window {window!r}; use one of {WINDOWS}")
    L = audio_io.num_whisper_frames(len(audio))
    mel = trimmed_mel(audio) if window == "trimmed" else audio_io.log_mel_spectrogram(audio)
    return encode(encoder, mel)[0, :L]


@torch.no_grad()
def encode(encoder: AudioEncoder, mel) -> Tensor:
    """Run the encoder on log-mels (80, 3000) or (B, 80, 3000) -> (B, 1500, d), without autograd."""
    mel = torch.as_tensor(mel)
    if mel.dim() == 2:
        mel = mel.unsqueeze(0)
    dims = encoder.dims
    want = (dims.n_mels, 2 * dims.n_audio_ctx)
    if mel.dim() != 3 or mel.shape[1] != want[0] or mel.shape[2] > want[1] or mel.shape[2] % 2:
        raise InputError(f"whisper encoder expects log-mels of shape (B, {want[0]}, {want[1]}) (or an even number "
                         f"of frames below {want[1]} for a trimmed window), got {tuple(mel.shape)}; make them with "
                         "omnitalk.audio.log_mel_spectrogram (pads to 30 s)")
    p = encoder.conv1.weight
    return encoder(mel.to(device=p.device, dtype=p.dtype))


def _read_checkpoint(path) -> Mapping:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"whisper checkpoint not found: {path} (expected OpenAI's small.pt)")
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:  # legacy (non-zip) torch.save format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read whisper checkpoint {path}: {e}; expected an OpenAI whisper "
                              "checkpoint saved with torch.save (e.g. small.pt)") from e


def load_whisper_encoder(path, device="cpu", dtype: torch.dtype = torch.float32) -> AudioEncoder:
    """Load the encoder of an OpenAI whisper checkpoint ({"dims", "model_state_dict"}), cast to `dtype`.

    An optional top-level "window" ("exact" or "trimmed", omnitalk's addition; OpenAI's loader ignores
    it) says how the encoder was trained to be run; it becomes `encoder.window` (default "exact").

    `path` may also be the already loaded checkpoint dict. Raises CheckpointError for a missing or
    foreign file, missing/unexpected `encoder.*` keys, or a tensor whose shape does not fit `dims`.
    """
    ckpt = path if isinstance(path, Mapping) else _read_checkpoint(path)
    where = "checkpoint" if isinstance(path, Mapping) else str(path)
    if not isinstance(ckpt, Mapping) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        found = sorted(map(str, ckpt))[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{where} is not an OpenAI whisper checkpoint: expected a dict with 'dims' and "
                              f"'model_state_dict' (like small.pt), found {found}")
    dims = WhisperDims.from_dict(ckpt["dims"])
    sd = {k[len("encoder."):]: v for k, v in ckpt["model_state_dict"].items() if k.startswith("encoder.")}
    # the CTC head: small.pt's top-level "ctc_head", or "ctc_head.*" tensors (our safetensors layout)
    head = {k[len("ctc_head."):]: sd.pop(k) for k in list(sd) if k.startswith("ctc_head.")} or ckpt.get("ctc_head")
    if not sd:
        raise CheckpointError(f"{where} has no 'encoder.*' tensors; expected an OpenAI whisper checkpoint")

    with torch.device("meta"):
        encoder = AudioEncoder(dims)
    expected = encoder.state_dict()
    missing = [f"encoder.{k}" for k in expected if k not in sd]
    unexpected = [f"encoder.{k}" for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit a whisper encoder with {dims}: "
                              f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: tensor 'encoder.{k}' has shape {tuple(sd[k].shape)}, "
                                  f"expected {tuple(t.shape)} for {dims}")
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    window = ckpt.get("window", "exact")
    if window not in WINDOWS:
        raise CheckpointError(f"{where}: unknown 'window' {window!r}; expected one of {WINDOWS}")
    encoder.load_state_dict(sd, strict=True, assign=True)
    if head is not None:
        encoder.ctc_head = _ctc_head(head, dims, where)
    encoder = encoder.to(device=device, dtype=dtype).eval()
    encoder.window = window
    return encoder


def _ctc_head(d, dims: WhisperDims, where: str) -> nn.Linear:
    """omnitalk's optional top-level "ctc_head" of small.pt ({"weight" (V+1, d), "bias" (V+1,)}, the last
    class the blank) as a Linear: frame features -> CTC label logits."""
    w, b = (d.get(k) if isinstance(d, Mapping) else None for k in ("weight", "bias"))
    if not (torch.is_tensor(w) and torch.is_tensor(b) and w.dim() == 2 and w.shape[1] == dims.n_audio_state
            and b.shape == (w.shape[0],)):
        raise CheckpointError(f"{where}: 'ctc_head' must hold 'weight' (classes, {dims.n_audio_state}) and 'bias' "
                              "(classes,) tensors, as stage 0 of the training recipe writes them")
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return head.requires_grad_(False)
