"""CLIP ViT vision tower, written like OpenAI CLIP's `clip/model.py`, with Mini-Omni2's fork change:
`ln_post` and `proj` are applied to *all* tokens, so the output is (B, 1 + grid**2, output_dim), row 0 = class token.

Parameter names match the `visual.*` part of OpenAI's state dict (prefix stripped), so OpenAI's
TorchScript archive (ViT-B-32.pt) and plain `torch.save`d state dicts load directly.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omnitalk.errors import CheckpointError


@dataclass(frozen=True)
class VisionDims:
    image_resolution: int  # 224
    patch_size: int  # 32
    width: int  # 768
    layers: int  # 12
    heads: int  # 12
    output_dim: int  # 512

    @property
    def grid(self) -> int:
        return self.image_resolution // self.patch_size

    @property
    def num_tokens(self) -> int:  # class token + grid*grid patches (50 for ViT-B/32)
        return self.grid**2 + 1


def clip_vit_b32_dims() -> VisionDims:
    """OpenAI ViT-B/32, the tower Mini-Omni2 uses."""
    return VisionDims(image_resolution=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512)


class LayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: computed in fp32 (weights included), result cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, D)
        B, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, L, D)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd), no mask in the vision tower
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        if dims.width % dims.heads:
            raise ValueError(f"width {dims.width} is not divisible by heads {dims.heads}")
        self.dims = dims
        w = dims.width
        scale = w**-0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=dims.patch_size, stride=dims.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(dims.num_tokens, w))
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(w, dims.layers, dims.heads)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, dims.output_dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, R, R) normalised pixels -> (B, 1 + grid**2, output_dim); row 0 = class token."""
        x = self.conv1(image.to(self.dtype))  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid**2, width), raster order
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + grid**2, width)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x)  # (B, L, width)
        x = self.ln_post(x)  # fork: every token, not only x[:, 0]
        return x @ self.proj.to(x.dtype)  # (B, L, output_dim)


# ---------------------------------------------------------------------------------------------- loading


def _first_line(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first.split('. ')[0]}"


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """OpenAI's TorchScript archive or a plain `torch.save`d state dict."""
    errors = []
    try:
        with warnings.catch_warnings():  # torch 2.x deprecates torch.jit.load; OpenAI ships this format
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as e:
        errors.append(f"as TorchScript archive: {_first_line(e)}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        errors.append(f"as torch.save file: {_first_line(e)}")
        raise CheckpointError(
            f"cannot read CLIP checkpoint {str(path)!r}: the file is truncated, corrupt or not a PyTorch "
            f"checkpoint ({'; '.join(errors)}); re-download ViT-B-32.pt"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"CLIP checkpoint {str(path)!r} holds a {type(obj).__name__}, not a name->tensor state dict; "
            f"save it with torch.save(model.state_dict(), path)"
        )
    return obj


def infer_vision_dims(sd: Mapping[str, torch.Tensor], prefix: str = "") -> VisionDims:
    """Dims of the vision tower from its (prefix-stripped) state dict, as CLIP's `build_model` derives them."""
    for key in ("conv1.weight", "positional_embedding", "proj"):
        if key not in sd:
            raise CheckpointError(f"CLIP checkpoint has no '{prefix}{key}'; it is not a CLIP ViT vision tower")
    width = sd["conv1.weight"].shape[0]
    layers = len([k for k in sd if k.startswith("transformer.resblocks.") and k.endswith(".attn.in_proj_weight")])
    patch = sd["conv1.weight"].shape[-1]
    grid = round((sd["positional_embedding"].shape[0] - 1) ** 0.5)
    if width < 64 or width % 64:
        raise CheckpointError(
            f"CLIP vision width {width} ('{prefix}conv1.weight' {tuple(sd['conv1.weight'].shape)}) is not a "
            f"positive multiple of 64; CLIP derives heads = width // 64, so this checkpoint cannot be loaded"
        )
    return VisionDims(patch * grid, patch, width, layers, width // 64, sd["proj"].shape[1])


def load_clip_vision(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VisionTransformer:
    """Load the vision tower from OpenAI's ViT-*.pt archive or a `torch.save`d state dict
    (full CLIP with `visual.*` keys, or the vision tower's keys alone). Returns the model in eval mode.

    Weights are cast to `dtype`, except LayerNorm parameters, which stay float32 as in CLIP's
    `convert_weights` (CLIP's fp16 GPU path); on CPU the official code runs everything in float32.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"CLIP checkpoint {str(path)!r} {'is not a file' if path.exists() else 'does not exist'}; "
            f"pass the path of ViT-B-32.pt (OpenAI's archive) or of a saved state dict"
        )
    raw = read_state_dict(path)
    if any(k.startswith("visual.") for k in raw):
        prefix = "visual."
        sd = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    elif "conv1.weight" in raw:
        prefix, sd = "", dict(raw)
    else:
        raise CheckpointError(
            f"CLIP checkpoint {str(path)!r} has no 'visual.*' keys (found e.g. {list(raw)[:3]}); "
            f"pass OpenAI's ViT-B-32.pt or a CLIP state dict"
        )

    dims = infer_vision_dims(sd, prefix)
    with torch.device("meta"):
        model = VisionTransformer(dims)
    expected = model.state_dict()
    missing = [prefix + k for k in expected if k not in sd]
    unexpected = [prefix + k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"CLIP checkpoint {str(path)!r} does not fit a ViT vision tower {dims}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} (ResNet CLIP models are not supported)"
        )
    for k, ref in expected.items():
        if sd[k].shape != ref.shape:
            raise CheckpointError(
                f"CLIP checkpoint {str(path)!r}: '{prefix}{k}' has shape {tuple(sd[k].shape)}, expected "
                f"{tuple(ref.shape)} for {dims}; the file is inconsistent or not an OpenAI CLIP ViT"
            )
    cast = {
        k: v.to(device=device, dtype=torch.float32 if ".ln_" in f".{k}" else dtype) for k, v in sd.items()
    }
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval()
