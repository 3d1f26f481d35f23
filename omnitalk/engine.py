"""OmniModel: the loaded system (LLM, Whisper, CLIP, SNAC, tokenizer) and its public API.

    model = OmniModel.from_pretrained("checkpoint/")           # or a hub repo id
    for chunk in model.stream(audio="question.wav"):            # speech in, speech + text out
        play(chunk.audio); print(chunk.text, end="")
    reply = model.generate(text="What is the capital of France?", reply="text")
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from omnitalk import audio as audio_io
from omnitalk import checkpoint as ckpt_io
from omnitalk import prompts as P
from omnitalk import vision
from omnitalk.codec import Codec, StreamDecoder, frames_from_layers, pcm_reference, to_pcm16
from omnitalk.config import Config
from omnitalk.errors import CheckpointError, InputError
from omnitalk.generate import Sampling, Step, decode, shared_prefix
from omnitalk.kernels import native_bf16
from omnitalk.model.clip import VisionTransformer, infer_vision_dims, load_clip_vision
from omnitalk.model.llm import OmniLM
from omnitalk.model.whisper import AudioEncoder, features as whisper_features, load_whisper_encoder, speech_positions
from omnitalk.tokenizer import StreamingText, TextTokenizer
from omnitalk.tokens import TokenLayout

log = logging.getLogger("omnitalk")

REPLIES = ("speech", "text")


@dataclass
class Request:
    """What the model is asked: built from the inputs, then decoded."""
    mode: str                   # 'text', 'speech' or 'pair' (generate.decode)
    prompts: list[P.Prompt]
    features: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    @property
    def speaks(self) -> bool:
        return self.mode != "text"


@dataclass
class StreamChunk:
    audio: np.ndarray  # int16 PCM, 24 kHz mono (empty when this chunk carries only text)
    text: str          # text delta


@dataclass
class Reply:
    text: str
    tokens: np.ndarray              # (1, S) text ids or (8, S): 7 audio rows (local ids) + text
    frames: np.ndarray | None = None  # (n, 7) SNAC frames of the spoken answer
    waveform: np.ndarray | None = None  # float32, 24 kHz
    sample_rate: int = 24000


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r} ({e}); use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but this PyTorch build sees no CUDA GPU; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device type {dev.type!r} is not supported; use 'cpu', 'cuda' or 'mps'")
    return dev


def encoder_dtype(mode: str, device: torch.device) -> torch.dtype:
    """The Whisper / CLIP weights' dtype for a mode: fp32 for the parity mode and wherever bf16 is
    emulated; bf16 in the bf16 / int8 modes where the hardware multiplies bf16 natively (half the memory,
    AMX speed; the features then differ at bf16 rounding level: docs/performance.md)."""
    return torch.bfloat16 if mode in ("bf16", "int8") and native_bf16(device) else torch.float32


class OmniModel:
    def __init__(self, cfg: Config, lm: OmniLM, whisper: AudioEncoder, clip: VisionTransformer | None,
                 codec: Codec | None, tokenizer: TextTokenizer, device: torch.device):
        self.cfg, self.lm, self.whisper, self.clip, self.codec = cfg, lm, whisper, clip, codec
        self.tokenizer, self.device = tokenizer, device
        self.layout = TokenLayout.from_config(cfg)
        self.path: Path | None = None  # the checkpoint directory, when loaded from files
        # 'exact': Whisper over the padded 30-s window, as the release (parity). 'trimmed': only the frames
        # the input needs — much faster for short questions, features differ slightly (docs/performance.md).
        # Default: what the encoder was trained with (its checkpoint's "window"; "exact" for Whisper-small)
        self.whisper_window = getattr(whisper, "window", "exact")

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path = "checkpoint", device=None, mode: str = "fp32",
                        download: bool = True) -> "OmniModel":
        """Load a checkpoint directory (official layout or ours); download what is missing.

        mode: 'fp32' reproduces the release exactly; 'bf16' and 'int8' (weight-only, per-channel) are
        faster and smaller (docs/performance.md has their measured cost in accuracy).

        A hub repo id ("gpt-omni/mini-omni2") downloads into the hub cache; a directory that lacks files
        is completed from the hub unless `download=False` or HF_HUB_OFFLINE=1, in which case the error
        lists each missing file and the command that fetches it.
        """
        dev = resolve_device(device)
        path = Path(path_or_repo_id)
        if not path.exists() and "/" in str(path_or_repo_id) and not str(path_or_repo_id).startswith((".", "/")):
            from huggingface_hub.constants import HF_HUB_CACHE
            path = Path(HF_HUB_CACHE) / "omnitalk" / str(path_or_repo_id).replace("/", "--")
            if ckpt_io.missing_files(path) and download and not ckpt_io.is_offline():
                ckpt_io.download(path, repo_id=str(path_or_repo_id))
        elif ckpt_io.missing_files(path) and download and not ckpt_io.is_offline():
            ckpt_io.download(path)
        ckpt_io.require_files(path)
        cfg = Config.from_file(path / "model_config.yaml")
        tokenizer = TextTokenizer(path / "tokenizer.json")
        if (path / ckpt_io.OURS).is_file():
            parts, meta = ckpt_io.read_ours(path)
            lm = ckpt_io.load_llm(path, cfg, dev, mode, state_dict=parts["llm"])
            whisper = load_whisper_encoder({"dims": json.loads(meta["whisper_dims"]),
                                            "window": meta.get("whisper_window", "exact"), "model_state_dict":
                                            {f"encoder.{k}": v for k, v in parts["whisper"].items()}}, dev)
            clip = _clip_from_state_dict(parts["clip"], dev) if parts["clip"] else None
        else:
            lm = ckpt_io.load_llm(path, cfg, dev, mode)
            if lm.tied_head_equal is False:
                log.info("lit_model.pth: lm_head.weight differs from transformer.wte.weight; using wte as the "
                         "output head, as the reference does (tie_word_embeddings)")
            whisper = load_whisper_encoder(path / "small.pt", dev)
            clip_file = next((path / f for f in ckpt_io.CLIP_FILES if (path / f).is_file()), None)
            clip = None if clip_file is None else (
                _clip_from_state_dict(_read_safetensors(clip_file), dev) if clip_file.suffix == ".safetensors"
                else load_clip_vision(clip_file, dev))
        snac_dir = path / "snac"
        codec = Codec.from_pretrained(snac_dir if snac_dir.is_dir() else ckpt_io.SNAC_REPO_ID, dev)
        model = cls(cfg, lm, whisper, clip, codec, tokenizer, dev)
        model.path = path.resolve()
        return model.set_encoder_dtype(encoder_dtype(mode, dev))

    @classmethod
    def from_random(cls, preset: str | Config = "mini-omni2", seed: int = 0, device=None,
                    mode: str = "fp32", whisper_dims=None, clip_dims=None,
                    snac_config: dict | None = None, tokenizer: TextTokenizer | None = None) -> "OmniModel":
        """A model of the given shapes with random weights and no files: for tests and benchmarks.

        Defaults are the official shapes (Whisper small, CLIP ViT-B/32, SNAC 24 kHz) for preset
        'mini-omni2' and matching small ones for smaller presets.
        """
        from snac import SNAC

        from omnitalk.config import preset as make_preset
        from omnitalk.model.clip import VisionDims, clip_vit_b32_dims
        from omnitalk.model.llm import rope_cache
        from omnitalk.model.whisper import WhisperDims, sinusoids, whisper_dims_small

        dev = resolve_device(device)
        cfg = preset if isinstance(preset, Config) else make_preset(preset)
        full = cfg.whisper_adapter_dim == 768 and cfg.vision_adapter_dim == 512
        whisper_dims = whisper_dims or (whisper_dims_small() if full else
                                        WhisperDims(80, 1500, cfg.whisper_adapter_dim, 2, 2))
        clip_dims = clip_dims or (clip_vit_b32_dims() if full else
                                  VisionDims(224, 32, 128, 2, 2, cfg.vision_adapter_dim))
        snac_config = snac_config or dict(sampling_rate=24000, encoder_dim=48 if full else 8, encoder_rates=[2, 4, 8, 8],
                                          decoder_dim=1024 if full else 64, decoder_rates=[8, 8, 4, 2],
                                          attn_window_size=None, codebook_size=4096, codebook_dim=8,
                                          vq_strides=[4, 2, 1], noise=True, depthwise=True)
        torch.manual_seed(seed)
        with torch.device(dev):
            lm = OmniLM(cfg)
            whisper = AudioEncoder(whisper_dims)
            whisper.positional_embedding.copy_(sinusoids(whisper_dims.n_audio_ctx, whisper_dims.n_audio_state))
            clip = VisionTransformer(clip_dims)
            snac = SNAC(**snac_config)
        lm.rope_cos, lm.rope_sin = (t.to(dev) for t in rope_cache(cfg.block_size, cfg.head_size, cfg.rope_base))
        lm.tied_head_equal = True
        from omnitalk.quant import quantize_lm
        lm = quantize_lm(lm.eval().requires_grad_(False), mode)
        model = cls(cfg, lm, whisper.eval(), clip.eval(),
                    Codec(snac.eval(), dev), tokenizer or TextTokenizer.byte_level(), dev)
        return model.set_encoder_dtype(encoder_dtype(mode, dev))

    def compile(self, mode: str | None = None) -> "OmniModel":
        """Decode through `torch.compile` (static caches, a CUDA graph per step on a GPU): the same tokens
        as the plain step (the parity fixture passes either way), after a compile at the first call here.
        For single requests (`generate`, `stream`, `steps`); the server's multi-session scheduler batches
        its own steps and is not compiled."""
        if self.device.type == "cpu":
            log.warning("--compile on a CPU: omnitalk's own decode kernels are several times faster than the "
                        "compiled step there (docs/performance.md); compiling anyway")
        self.lm.compile_decode(mode)
        return self

    def set_encoder_dtype(self, dtype: torch.dtype) -> "OmniModel":
        """Cast Whisper and CLIP (their norms still compute in fp32; features reach the adapters in the
        LLM's dtype)."""
        self.whisper = self.whisper.to(dtype)
        if self.clip is not None:
            self.clip = self.clip.to(dtype)
        return self

    # ---- encoders -----------------------------------------------------------------------
    @torch.inference_mode()
    def audio_features(self, audio, sr: int | None = None) -> torch.Tensor:
        """Speech (path, file bytes, or float array with `sr`) -> adapter output (L, C), 50 per second
        (50 / cfg.audio_pool with pooling; one per run of equal CTC labels with audio_compress: ctc)."""
        x = audio_io.load_audio(audio, sr=sr)
        audio_io.check_duration(x)
        feats = whisper_features(self.whisper, x, self.whisper_window)  # (L, d_whisper)
        feats = speech_positions(feats, self.whisper, self.cfg.audio_pool, self.cfg.audio_compress)  # (n, d_whisper)
        return self.lm.whisper_adapter(feats.to(self.lm.act_dtype))

    @torch.inference_mode()
    def image_features(self, image) -> torch.Tensor:
        """Image (path, bytes, PIL) -> adapter output (50, C)."""
        if self.clip is None:
            raise CheckpointError("this checkpoint has no CLIP weights (ViT-B-32.pt); run `omnitalk download`")
        img = vision.load_image(image, convert_rgb=False)  # CLIP resizes before converting to RGB
        x = vision.preprocess_image(img, size=self.clip.dims.image_resolution).unsqueeze(0).to(self.device)
        feats = self.clip(x)[0]  # (50, d_clip)
        return self.lm.vision_adapter(feats.to(self.lm.act_dtype))

    # ---- requests -----------------------------------------------------------------------
    # ---- the listening item (interruption) ---------------------------------------------------
    @property
    def has_listening_head(self) -> bool:
        """True when the checkpoint was trained on the interruption task (its model_config.yaml says
        `interrupt_trained: true`, which omnitalk's training export writes): its listening item emits
        irq / n_irq status tokens. The released weights were not (reference §12)."""
        return bool(self.cfg.extra.get("interrupt_trained"))

    @torch.inference_mode()
    def listen(self, audio=None, *, frames=None, sr: int | None = None) -> list[int]:
        """The listening item of the paper's duplex design over user speech: the audio (any rate; path,
        bytes or float array with `sr`) is SNAC-encoded, its frames enter the 7 audio streams
        (omnitalk.train.sequences.listen_ids) and the model emits one status per 85.3-ms frame:
        1 = irq (stop talking), 0 = n_irq. One causal forward without any KV cache, so it can run
        between the decode steps of other sessions. Meaningful only when `has_listening_head`."""
        from omnitalk.train.sequences import listen_ids

        if frames is None:
            if audio is None:
                raise InputError("listen() needs audio or SNAC frames")
            if self.codec is None:
                raise CheckpointError("this model has no SNAC codec to encode the user's audio")
            if isinstance(audio, np.ndarray) and sr == 24000:
                x = audio.astype(np.float32, copy=False)
            else:  # load_audio gives 16 kHz (what the server holds); SNAC takes 24 kHz
                x = audio_io.resample(audio_io.load_audio(audio, sr=sr), 16000, 24000)
            frames = self.codec.encode(x)
        fr = np.asarray(frames, dtype=np.int64).reshape(-1, self.layout.n_audio_layers)
        if len(fr) == 0:
            return []
        ids = torch.as_tensor(listen_ids(self.layout, fr), device=self.device)[None]  # (1, S, n + 7)
        if ids.shape[-1] > self.cfg.block_size:  # the newest frames that fit
            return self.listen(frames=fr[-(self.cfg.block_size - self.layout.n_audio_layers):])
        saved = [b.attn.kv_cache for b in self.lm.transformer.h]
        self.lm.clear_cache()
        try:
            h = self.lm.forward_hidden(self.lm.embed(ids), 0)[0]  # (T, C)
        finally:
            for b, c in zip(self.lm.transformer.h, saved):
                b.attn.kv_cache = c
        logits = self.lm.text_logits(h).float()
        irq = logits[:, self.layout.irq] > logits[:, self.layout.n_irq]  # (T,)
        return [int(v) for v in irq[1:len(fr) + 1].tolist()]  # frame f's status is read at column f + 1

    @staticmethod
    def check_inputs(*, audio=None, image=None, text: str | None = None, reply: str = "speech",
                     task: str = "qa", strategy: str = "pair") -> None:
        """The checks that need no model (so a CLI can fail before loading weights)."""
        if reply not in REPLIES:
            raise InputError(f"reply must be one of {REPLIES}, got {reply!r}")
        if strategy not in ("pair", "single"):
            raise InputError(f"strategy must be 'pair' or 'single', got {strategy!r}")
        if task not in ("qa", "asr"):
            raise InputError(f"task must be 'qa' or 'asr', got {task!r}")
        if audio is None and image is None and not text:
            raise InputError("nothing to answer: give audio, an image or text")
        if task == "asr" and (audio is None or image is not None or text):
            raise InputError("transcription takes audio alone")
        for what, src in (("audio", audio), ("image", image)):
            if isinstance(src, (str, Path)) and not Path(src).is_file():
                raise InputError(f"{what} file not found: {src}")

    def request(self, *, audio=None, image=None, text: str | None = None, reply: str = "speech",
                task: str = "qa", strategy: str = "pair", sr: int | None = None) -> Request:
        """Inputs -> prompts + features. task 'qa' answers, 'asr' transcribes the audio.

        strategy 'pair' (default for spoken replies) runs the release's batch-parallel decoding: the
        text-only branch leads the words; 'single' runs one 8-stream sequence (T1A2/A1A2 as released).
        """
        self.check_inputs(audio=audio, image=image, text=text, reply=reply, task=task, strategy=strategy)
        L = self.layout
        speak = reply == "speech" and task != "asr"
        ids = self.tokenizer.encode(text) if text else []
        features = []
        if audio is not None:
            a = self.audio_features(audio, sr=sr)
        if image is not None:
            v = self.image_features(image)
            features.append((1, v))
            if audio is not None:
                build, args = P.image_speech_prompt, dict(n_frames=a.size(0), n_image=v.size(0), text_ids=ids)
                features.append((v.size(0) + 2, a))
            else:
                build, args = P.image_text_prompt, dict(text_ids=ids, n_image=v.size(0))
        elif audio is not None:
            build, args = P.speech_prompt, dict(n_frames=a.size(0), task=task, text_ids=ids)
            features.append((1, a))
        else:
            build, args = P.text_prompt, dict(text_ids=ids)
        if not speak:
            return Request("text", [build(L, speak=False, **args)], features)
        if strategy == "single":
            return Request("speech", [build(L, speak=True, **args)], features)
        return Request("pair", P.batch_pair(L, build, **args), features)

    def _check_length(self, req: Request) -> None:
        T = req.prompts[0].length
        if T >= self.cfg.block_size:
            raise InputError(f"the input takes {T} positions but the model's context is {self.cfg.block_size}; "
                             "shorten the text or audio")

    def steps(self, req: Request, max_tokens: int = 2048, sampling: Sampling = Sampling(),
              margins: bool = False) -> Iterator[Step]:
        """The recorded decoding steps of a request (see generate.decode for the rules)."""
        self._check_length(req)
        return decode(self.lm, self.layout, req.prompts, req.features, req.mode, max_tokens, sampling,
                      margins=margins)

    @torch.inference_mode()
    def prefill_logits(self, req: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the last prompt position of every item: text (B, Vt), audio (B, 7, Va)."""
        self._check_length(req)
        self.lm.clear_cache()
        ids = torch.as_tensor(np.stack([p.ids for p in req.prompts]), device=self.device)
        feats = [(p, f.expand(len(req.prompts), -1, -1)) for p, f in req.features]
        self.lm.setup_cache(len(req.prompts), ids.size(-1))
        h = self.lm.prefill(self.lm.embed(ids, feats), 0, shared_prefix(ids))
        self.lm.clear_cache()
        return self.lm.text_logits(h).float(), self.lm.audio_logits(h).float()

    # ---- streaming ----------------------------------------------------------------------
    def stream(self, req: Request | None = None, *, max_tokens: int = 2048, sampling: Sampling = Sampling(),
               stream_mode: str = "context", stride: int = 4, snac_seed: int | None = None,
               snac_noise: bool = True, **inputs) -> Iterator[StreamChunk]:
        """Yield (int16 PCM chunk, text delta) as the answer is generated.

        stream_mode 'context' (default): each chunk is decoded with codec context so the concatenated
        audio equals a one-pass decode; the last partial chunk is flushed; text deltas never split a
        UTF-8 character and go out as soon as they are whole. 'reference': the release's chunks exactly
        (frames decoded `stride` at a time on their own, no clipping, last partial chunk and its text
        dropped, per-chunk text decode).
        """
        req = req or self.request(**inputs)
        asm = ChunkAssembler(self, req.speaks, stream_mode, stride, snac_seed, snac_noise)
        for step in self.steps(req, max_tokens, sampling):
            yield from asm.push(step)
        yield from asm.finish()

    # ---- whole answers ------------------------------------------------------------------
    def generate(self, req: Request | None = None, *, max_tokens: int = 2048, sampling: Sampling = Sampling(),
                 decode_audio: bool = True, snac_seed: int | None = None, snac_noise: bool = True,
                 **inputs) -> Reply:
        """Run a request to the end: text, recorded tokens, SNAC frames and the one-pass waveform."""
        req = req or self.request(**inputs)
        steps = list(self.steps(req, max_tokens, sampling))
        texts = [s.text for s in steps]
        cut = texts.index(self.layout.eot) if self.layout.eot in texts else len(texts)
        text = self.tokenizer.decode(texts[:cut]).strip()
        if not req.speaks:
            return Reply(text, np.asarray([texts], dtype=np.int64))
        tokens = np.asarray([[s.audio[j] for s in steps] for j in range(self.layout.n_audio_layers)] + [texts],
                            dtype=np.int64)
        frames = frames_from_layers(tokens[:-1], on_special="truncate")
        wav = None
        if decode_audio:
            wav = self.codec.decode(frames, noise=snac_noise, seed=snac_seed).numpy()
        return Reply(text, tokens, frames, wav)


class ChunkAssembler:
    """Turns recorded decoding steps into StreamChunks: SNAC frames -> PCM chunks, text ids -> deltas."""

    def __init__(self, model: OmniModel, speaks: bool, stream_mode: str = "context", stride: int = 4,
                 snac_seed: int | None = None, snac_noise: bool = True):
        if stream_mode not in ("context", "reference"):
            raise InputError(f"stream_mode must be 'context' or 'reference', got {stream_mode!r}")
        self.layout, self.tokenizer = model.layout, model.tokenizer
        self.reference = stream_mode == "reference"
        self.codec = StreamDecoder(model.codec, stride, stream_mode, seed=snac_seed, noise=snac_noise) \
            if speaks else None
        self.texts: list[int] = []
        self.layers: list[list[int]] = [[] for _ in range(self.layout.n_audio_layers)]
        self.text_done = False  # `_eot` seen: later text ids are not part of the answer
        self.text_sent = 0      # reference mode: index of the next text id to decode (-1: ended)
        self.live = StreamingText(self.tokenizer)
        self.audio_ok = True
        self.frames = 0         # SNAC frames passed to the codec

    def _reference_text(self) -> str:  # the release: decode the new ids, cut at `_eot`, nothing after it
        if self.text_sent == -1:
            return ""
        new = self.texts[self.text_sent:]
        self.text_sent = len(self.texts)
        if self.layout.eot in new:
            new, self.text_sent = new[:new.index(self.layout.eot)], -1
        return self.tokenizer.decode(new) if new else ""

    def push(self, step: Step) -> list[StreamChunk]:
        out, L, empty = [], self.layout, np.zeros(0, np.int16)
        k = len(self.texts)
        self.texts.append(step.text)
        if step.text == L.eot:
            self.text_done = True
        elif not self.reference and not self.text_done:
            delta = self.live.push([step.text])  # text goes out as soon as it is whole
            if delta:
                out.append(StreamChunk(empty, delta))
        if self.codec is None:
            return out
        for j, tok in enumerate(step.audio):
            self.layers[j].append(tok)
        f = k - L.n_audio_layers  # the frame whose layer-6 token arrived at this step
        if f < 0 or not self.audio_ok:
            return out
        frame = [self.layers[j][f + 1 + j] for j in range(L.n_audio_layers)]
        if max(frame) >= L.codebook_size:
            if self.reference:
                raise InputError(f"frame {f} holds an audio special id ({frame}); the release would index "
                                 "past the SNAC codebook here")
            self.audio_ok = False  # the model broke its own audio; keep the text, stop the speech
            return out
        self.frames += 1
        for chunk in self.codec.push(frame):
            if self.reference:
                out.append(StreamChunk(pcm_reference(chunk.numpy()), self._reference_text()))
            else:
                out.append(StreamChunk(to_pcm16(chunk.numpy()), ""))
        return out

    def finish(self) -> list[StreamChunk]:
        empty = np.zeros(0, np.int16)
        if self.reference:
            text = self._reference_text() if self.codec is None else ""  # text-only loops: text once, at the end
            return [StreamChunk(empty, text)] if text else []
        tail = self.codec.flush() if self.codec is not None else None
        rest = self.live.flush()
        if tail is None and not rest:
            return []
        return [StreamChunk(to_pcm16(tail.numpy()) if tail is not None else empty, rest)]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({e}); delete it and run `omnitalk download`") from None
    return {k.removeprefix("visual."): v for k, v in sd.items()}


def _clip_from_state_dict(sd: dict[str, torch.Tensor], device) -> VisionTransformer:
    from omnitalk.checkpoint import check_state_dict
    with torch.device("meta"):
        clip = VisionTransformer(infer_vision_dims(sd))
    check_state_dict(sd, clip.state_dict(), "CLIP weights")
    clip.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return clip.to(device).eval()
