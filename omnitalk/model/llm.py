"""The Mini-Omni2 language model: a Qwen2-style decoder reading and writing 8 token streams.

Parameter names follow the released `lit_model.pth` so the file loads as it is.
Shapes: B batch, T positions, C = n_embd, nh query heads, ng key/value heads (groups), hs head size.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnitalk import kernels
from omnitalk.config import Config
from omnitalk.model import decode


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # the reference normalises in fp32
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(dtype) * self.weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for a few rows on the CPU (decode steps): there omnitalk's gemv kernel streams
    the (out, in) weight once for all rows (fp32 or bf16 weights, fp32 sums), while MKL's x @ weight.T
    packs the whole weight first — 2-3x slower for 2 rows. Same products, another summation order
    (differences at float rounding level). Without the kernel, `weight @ x.T` for up to 8 fp32 rows."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        y = kernels.gemv(x, weight)  # None where it does not apply (rows, dtypes, autograd, not built)
        if y is None and x.dtype == torch.float32 and weight.dtype == torch.float32 \
                and x.numel() <= 8 * x.shape[-1]:
            y = (weight @ x.reshape(-1, x.shape[-1]).T).T.reshape(*x.shape[:-1], weight.shape[0])
        if y is not None:
            y = y.to(x.dtype)
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) running `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class GatedMLP(nn.Module):
    """proj(silu(fc_1 x) * fc_2 x): the LLM's SwiGLU and both adapters (litgpt's LLaMAMLP)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc_1 = Linear(d_in, d_hidden, bias=False)
        self.fc_2 = Linear(d_in, d_hidden, bias=False)
        self.proj = Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


def rope_cache(n_pos: int, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotary tables (n_pos, hs) in fp32, angles duplicated over both halves."""
    theta = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32), theta).repeat(1, 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, h, T, hs); cos/sin: (T, hs)
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of one layer for the ng shared heads only, for `max_len` positions."""

    def __init__(self, batch: int, n_groups: int, max_len: int, head_size: int, dtype, device):
        super().__init__()
        shape = (batch, n_groups, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k: torch.Tensor, v: torch.Tensor):
        """-> (keys, values, mask or None) for attention of the written positions.

        pos int: k, v (b, ng, T, hs) written at [pos, pos+T) of rows 0..b-1 (b <= the cache's batch; b = 1
        for a shared prefix); returns their filled prefix (b, ng, pos+T, hs) and no mask.
        pos (b,) tensor, T == 1 (the static step of `OmniLM.compile_decode`): row r written at pos[r];
        returns all max_len positions and a (b, 1, 1, max_len) mask of those <= pos[r]: the same shapes at
        every step, so the step compiles once and runs as one CUDA graph.
        """
        b = k.size(0)
        if isinstance(pos, int):
            end = pos + k.size(2)
            self.k[:b, :, pos:end] = k
            self.v[:b, :, pos:end] = v
            return self.k[:b, :, :end], self.v[:b, :, :end], None
        r = torch.arange(b, device=pos.device)
        self.k[r, :, pos] = k[:, :, 0]
        self.v[r, :, pos] = v[:, :, 0]
        mask = (torch.arange(self.k.size(2), device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]
        return self.k[:b], self.v[:b], mask

    def copy_rows(self, src: int, dst, start: int, end: int) -> None:
        """Positions [start, end) of row `src` into rows `dst` (a shared prompt prefix, computed once)."""
        self.k[dst, :, start:end] = self.k[src, :, start:end]
        self.v[dst, :, start:end] = self.v[src, :, start:end]


class SlotCache(nn.Module):
    """Keys and values of many sequences in fixed rows of one pool (per layer), for continuous batching.

    Each call names the rows it touches: a prefill writes positions [pos, pos+T) of some rows; a batched
    decode step writes one position per row, each at its own `pos[r]`, and attends over that row's prefix.
    """

    def __init__(self, rows: int, n_groups: int, max_len: int, head_size: int, dtype, device):
        super().__init__()
        shape = (rows, n_groups, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor):
        """-> (keys, values, mask or None) for attention of the written positions."""
        if isinstance(pos, int):  # k: (B, ng, T, hs) for rows (B,)
            end = pos + k.size(2)
            self.k[rows, :, pos:end] = k
            self.v[rows, :, pos:end] = v
            return self.k[rows, :, :end], self.v[rows, :, :end], None
        # one position per row: k (B, ng, 1, hs), pos (B,)
        self.k[rows, :, pos] = k[:, :, 0]
        self.v[rows, :, pos] = v[:, :, 0]
        S = int(pos.max()) + 1
        mask = (torch.arange(S, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, S)
        return self.k[rows, :, :S], self.v[rows, :, :S], mask

    copy_rows = KVCache.copy_rows


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.nh, self.ng, self.hs = cfg.n_head, cfg.n_query_groups, cfg.head_size
        # litgpt's grouped layout: per group, its nh/ng query heads, then one key and one value head
        self.attn = Linear(cfg.n_embd, (self.nh + 2 * self.ng) * self.hs, bias=cfg.add_qkv_bias)
        self.proj = Linear(self.nh * self.hs, cfg.n_embd, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos, cache=None, rows=None):
        """pos: int (every row at pos..pos+T-1) or (B,) positions of a one-step batch over a SlotCache."""
        B, T, _ = x.shape
        q_per_kv = self.nh // self.ng
        qkv = self.attn(x).view(B, T, self.ng, q_per_kv + 2, self.hs)
        q = qkv[:, :, :, :q_per_kv].reshape(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = qkv[:, :, :, q_per_kv].transpose(1, 2)                                 # (B, ng, T, hs)
        v = qkv[:, :, :, q_per_kv + 1].transpose(1, 2)                             # (B, ng, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(pos, k, v, rows)
        elif self.kv_cache is not None:
            k, v, mask = self.kv_cache.update(pos, k, v)
        S = k.size(2)  # keys visible: everything cached so far
        if mask is not None or T == 1:
            causal = False
        elif S == T:
            mask, causal = None, True
        else:  # a chunk appended after cached positions (multi-turn): causal within the chunk
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=1.0 / math.sqrt(self.hs), enable_gqa=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm_1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm_2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.n_embd, cfg.intermediate_size, cfg.n_embd)
        self.dropout = 0.0  # residual dropout, training only (the release trains none; set by omnitalk.train)

    def forward(self, x, cos, sin, pos, cache=None, rows=None):
        a = self.attn(self.norm_1(x), cos, sin, pos, cache, rows)
        if self.dropout and self.training:
            a = F.dropout(a, self.dropout, True)
        x = x + a
        m = self.mlp(self.norm_2(x))
        if self.dropout and self.training:
            m = F.dropout(m, self.dropout, True)
        return x + m


class OmniLM(nn.Module):
    """Decoder over 8 streams: embeddings summed and divided by 8, one head (tied to the table, as released)
    sliced per stream."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        # registration order = the released state dict's order
        self.whisper_adapter = GatedMLP(cfg.whisper_adapter_dim, cfg.intermediate_size, C)
        self.lm_head = nn.Linear(C, cfg.padded_vocab_size, bias=False)
        self.vision_adapter = GatedMLP(cfg.vision_adapter_dim, cfg.intermediate_size, C)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab_size, C),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=RMSNorm(C, cfg.norm_eps),
        ))
        if cfg.tie_word_embeddings:
            # the release: the output head *is* the embedding table (quirk Q3: the file's separate
            # lm_head.weight is overwritten at load by the reference, so we never use it). Untied (a small
            # model's option, as Qwen2's larger models have it): lm_head is a matrix of its own.
            self.lm_head.weight = self.transformer.wte.weight
        cos, sin = rope_cache(cfg.block_size, cfg.head_size, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.compiled_step: StaticStep | None = None  # set by compile_decode()

    # ---- KV cache -----------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int) -> None:
        """Allocate caches for `max_len` positions (<= block_size), only the ng key/value heads.

        After `compile_decode()` every request shares one set of static caches (2 rows, block_size
        positions, allocated once): the compiled step keeps its shapes and its CUDA graph's addresses."""
        if max_len > self.cfg.block_size:
            raise ValueError(f"{max_len} positions exceed the model's context of {self.cfg.block_size}")
        static = self.compiled_step
        caches = static.caches(self) if static is not None and batch <= static.rows else self._new_caches(batch, max_len)
        for block, cache in zip(self.transformer.h, caches):
            block.attn.kv_cache = cache

    def _new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        dev = self.transformer.ln_f.weight.device
        return [KVCache(batch, self.cfg.n_query_groups, max_len, self.cfg.head_size, self.act_dtype, dev)
                for _ in self.transformer.h]

    def clear_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @property
    def act_dtype(self) -> torch.dtype:
        return self.transformer.ln_f.weight.dtype

    # ---- forward pieces -----------------------------------------------------------------
    def embed(self, ids: torch.Tensor, features: list[tuple[int, torch.Tensor]] = ()) -> torch.Tensor:
        """ids (B, S, T) absolute -> (B, T, C).

        `features`: (start, F) with F (B, n, C) adapter outputs; positions start..start+n-1 of every
        audio row take F instead of their token embedding (the text row keeps its own).
        """
        emb = self.transformer.wte(ids)  # (B, S, T, C)
        n_audio = ids.size(1) - 1
        for start, f in features:
            emb[:, :n_audio, start:start + f.size(1)] = f.to(emb.dtype).unsqueeze(1)
        x = emb[:, 0]
        for s in range(1, ids.size(1)):  # sum in stream order, as the reference does
            x = x + emb[:, s]
        return x / ids.size(1)

    def forward_hidden(self, x: torch.Tensor, pos, caches: list | None = None,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> final hidden states (B, T, C) after ln_f.

        pos: int, the absolute position of x[:, 0] (every row alike), or a (B,) tensor of per-row
        positions for a one-step batch (T == 1) over `caches` (one SlotCache per layer) at `rows`.
        Without `caches` the module's own KVCache (setup_cache) is used, if any.
        """
        T = x.size(1)
        if caches is not None and not isinstance(pos, int) and rows is not None:
            # one sequence's rows (a pair) at one position: slices of the pool, no gather and no mask
            p0, r0 = int(pos[0]), int(rows[0])
            if bool((pos == p0).all()) and bool((rows == torch.arange(r0, r0 + len(rows))).all()):
                pos, rows = p0, slice(r0, r0 + len(rows))
        last = (int(pos) if isinstance(pos, int) else int(pos.max())) + T
        if last > self.cfg.block_size:
            raise ValueError(f"position {last} exceeds the model's context of {self.cfg.block_size}")
        if T == 1 and (h := decode.hidden(self, x, pos, caches, rows)) is not None:
            return h  # a decode step on the CPU: the same blocks through fused kernels (model/decode.py)
        if isinstance(pos, int):
            cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        else:  # (B, 1, 1, hs): each row rotated at its own position
            cos, sin = self.rope_cos[pos][:, None, None], self.rope_sin[pos][:, None, None]
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, pos, None if caches is None else caches[i], rows)
        return self.transformer.ln_f(x)

    def prefill(self, x: torch.Tensor, pos: int, shared: int = 0, caches: list | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt columns x (B, T, C) at positions pos.. -> final hidden states of the last column (B, C).

        The first `shared` columns are the same in every row (the batch-parallel pair's prompts differ only
        in their last column): they run once, for row 0, and their keys/values are copied to the other
        rows, so a pair's prefill costs one row's, not two. Then the remaining columns run for every row.
        """
        B, T = x.shape[:2]
        shared = min(shared, T - 1)
        if B == 1 or shared < 1:
            return self.forward_hidden(x, pos, caches, rows)[:, -1]
        self.forward_hidden(x[:1, :shared], pos, caches, None if rows is None else rows[:1])
        for i, block in enumerate(self.transformer.h):
            cache = block.attn.kv_cache if caches is None else caches[i]
            src, dst = (0, slice(1, B)) if rows is None else (int(rows[0]), rows[1:])
            cache.copy_rows(src, dst, pos, pos + shared)
        return self.forward_hidden(x[:, shared:], pos + shared, caches, rows)[:, -1]

    def slot_caches(self, rows: int, max_len: int) -> list[SlotCache]:
        """A pool of `rows` cache rows of `max_len` positions per layer (continuous batching)."""
        if max_len > self.cfg.block_size:
            raise ValueError(f"{max_len} positions exceed the model's context of {self.cfg.block_size}")
        dev = self.transformer.ln_f.weight.device
        return [SlotCache(rows, self.cfg.n_query_groups, max_len, self.cfg.head_size, self.act_dtype, dev)
                for _ in self.transformer.h]

    def _head(self, h: torch.Tensor, rows: slice) -> torch.Tensor:
        """Only the rows of the output head that are asked for: each step reads each head row once."""
        head = self.transformer.wte if self.cfg.tie_word_embeddings else self.lm_head
        if hasattr(head, "logits"):  # int8 (omnitalk.quant.Int8Embedding / Int8Linear)
            return head.logits(h, rows)
        return linear(h, head.weight[rows])

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., C) -> (..., text_vocab_size)."""
        return self._head(h, slice(0, self.cfg.text_vocab_size))

    def audio_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., C) -> (..., n_audio_layers, audio_vocab_size), local ids per layer."""
        logits = self._head(h, slice(self.cfg.text_vocab_size, self.cfg.padded_vocab_size))
        return logits.unflatten(-1, (self.cfg.n_audio_layers, self.cfg.audio_vocab_size))

    # ---- the decode step, plain or compiled ----------------------------------------------
    def decode_step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids (B, 8, 1) fed at position pos (every row) -> final hidden states (B, C), through the
        module caches. After `compile_decode()` this is the compiled static step."""
        static = self.compiled_step
        if static is not None and static.ready(self, ids.size(0)):
            return static(ids, pos)
        return self.forward_hidden(self.embed(ids), pos)[:, -1]

    def static_step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The decode step with the same shapes at every position (what torch.compile traces): ids (B, 8, 1),
        pos (B,) -> (B, C). Attends over the whole cache under a mask instead of its filled prefix: no
        host syncs, no data-dependent shapes."""
        x = self.embed(ids)                                                      # (B, 1, C)
        cos, sin = self.rope_cos[pos][:, None, None], self.rope_sin[pos][:, None, None]  # (B, 1, 1, hs)
        for block in self.transformer.h:
            x = block(x, cos, sin, pos)
        return self.transformer.ln_f(x)[:, -1]

    def compile_decode(self, mode: str | None = None, warmup: bool = True) -> "OmniLM":
        """Run decode steps through `torch.compile` (gpt-fast's recipe): static caches of block_size
        positions, one graph per batch size, and on CUDA mode 'reduce-overhead', i.e. each step replayed
        as one CUDA graph (no per-kernel launch cost). `warmup` compiles both batch sizes now (minutes on
        a CPU, tens of seconds on a GPU) instead of in the first answer. On the CPU omnitalk's own decode
        kernels are usually faster (docs/performance.md); compiling is for GPUs."""
        self.compiled_step = StaticStep(self, mode)
        if warmup:
            self.compiled_step.warmup(self)
        return self

    def forward(self, ids: torch.Tensor, pos: int = 0, features=()) -> tuple[torch.Tensor, torch.Tensor]:
        """Full logits for every position: text (B, T, Vt), audio (B, T, 7, Va). For tests/training."""
        h = self.forward_hidden(self.embed(ids, features), pos)
        return self.text_logits(h), self.audio_logits(h)


class StaticStep:
    """`OmniLM.static_step` compiled, with its position held in a device tensor (no per-step copies)."""
    rows = 2  # the static caches hold a pair: speech mode (1 row) and pair mode (2 rows) share them

    def __init__(self, lm: OmniLM, mode: str | None = None):
        dev = lm.transformer.ln_f.weight.device
        self.cuda = dev.type == "cuda"
        self.mode = mode or ("reduce-overhead" if self.cuda else "default")
        self.fn = torch.compile(lm.static_step, mode=self.mode, fullgraph=True, dynamic=False)
        self.pos = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.static_caches: list[KVCache] | None = None
        self.calls = 0  # steps run through the compiled function (tests and the bench check it is used)

    def caches(self, lm: OmniLM) -> list[KVCache]:
        """The static caches (rows x block_size per layer), allocated at the first request and then shared
        by every request: the CUDA graph reads and writes them in place, so their addresses stay fixed."""
        if self.static_caches is None:
            self.static_caches = lm._new_caches(self.rows, lm.cfg.block_size)
            for c in self.static_caches:
                torch._dynamo.mark_static_address(c.k)
                torch._dynamo.mark_static_address(c.v)
        return self.static_caches

    def ready(self, lm: OmniLM, batch: int) -> bool:
        """True when the module caches are the static ones (a request set up after compile_decode)."""
        cache = lm.transformer.h[0].attn.kv_cache
        return self.static_caches is not None and cache is self.static_caches[0] and batch <= self.rows

    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        self.pos.fill_(pos)
        self.calls += 1
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's output may be overwritten
        return self.fn(ids, self.pos[:ids.size(0)])

    @torch.inference_mode()
    def warmup(self, lm: OmniLM) -> None:
        """Compile (and on CUDA record) the step for both batch sizes, at the last position of the caches
        (which every request overwrites before it reads it)."""
        lm.setup_cache(self.rows, lm.cfg.block_size)
        ids = torch.zeros(self.rows, lm.cfg.n_audio_layers + 1, 1, dtype=torch.long, device=self.pos.device)
        for b in (1, self.rows):
            for _ in range(3 if self.cuda else 1):  # cudagraph trees record on the second call
                self(ids[:b], lm.cfg.block_size - 1)
        lm.clear_cache()
