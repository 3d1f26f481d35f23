"""Training a SNAC codec: `omnitalk train-codec configs/codec-small.yaml`.

The model is the `snac` package's SNAC class in a smaller configuration with the token layout the LLM
needs (omnitalk.codec): 24 kHz, hop 512 (encoder rates multiply to 512), three codebooks of 4096 codes at
strides 4 / 2 / 1, so one LLM frame is 2048 samples and holds 1 + 2 + 4 = 7 codes. Only the widths
(encoder_dim, decoder_dim) and the attention window are free; `check_layout` enforces the rest.

Losses (the DAC / SNAC recipe without the adversarial terms):
    loss = mel * sum_s L1(log10 mel_s(y), log10 mel_s(x))      multi-scale mel, 7 window sizes
         + waveform * L1(y, x)
         + commitment * sum_q MSE(z_e, sg(z_q)) + codebook * sum_q MSE(z_q, sg(z_e))
where x is the input segment, y the reconstruction, z_e / z_q each quantizer's projected input and its
nearest code (the straight-through estimator carries the gradient past the quantizer). Codes unused for
`dead_code_every` steps are re-drawn from recent encoder outputs, so the 4096-code books stay in use.

Data: the small world's speech, synthesised here (espeak-ng; `data.world`): the world's training
sentences, the interruption phrases and other speech, half in the model's own voice and half in the
training voice settings; held-out sentences in the model's voice and in held-out voice settings for
evaluation. `data.audio` adds the user's own files (WAV files, folders of them, or JSONL manifests with
`audio` and optional `text`). With `data.answer_share` a share of the training utterances are the
world's answers as a model with `answer_prefix` says them ("the answer is seven", model voice): the
demo model only ever speaks those 31 phrases, so its codec learns them, and the eval group "answers"
(trained on, not held out) reports how each is heard. Everything is kept in memory at 24 kHz; training draws random segments.

Output (`out_dir`): metrics.jsonl / .csv, checkpoints/step-N/ (model, optimizer, RNG and sampler state:
`--resume` continues exactly), final/ = a SNAC folder (config.json, model.safetensors and the snac
package's pytorch_model.bin) that `omnitalk.codec.Codec.from_pretrained` and `SNAC.from_pretrained` load,
and eval.json: reconstruction error, codebook use and, with faster-whisper installed, the WER of an
independent recogniser on the decoded held-out sentences next to its WER on the original audio.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from omnitalk.train.config import TrainConfigError, _build

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
FRAME = 2048  # samples per LLM frame
LAYOUT = {"sampling_rate": 24000, "hop_length": 512, "vq_strides": [4, 2, 1], "codebook_size": 4096}

# the small world's codec: the official 24 kHz layout, narrow (about 1.7 M parameters)
SMALL_SNAC = dict(sampling_rate=24000, encoder_dim=16, encoder_rates=[2, 4, 8, 8], decoder_dim=256,
                  decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
                  vq_strides=[4, 2, 1], noise=True, depthwise=True)


class CodecConfigError(TrainConfigError):
    pass


@dataclass
class CodecDataSection:
    world: bool = True               # synthesise the small world's speech
    synth: str = "espeak"            # with: "espeak" (espeak-ng, 41 + 12 voice settings) or "piper" (the joe voice)
    n_train: int = 1500              # training utterances
    n_eval: int = 30                 # held-out utterances per voice group (model voice, held-out voices)
    model_voice_share: float = 0.5   # share of training utterances in the model's own voice
    held_out_fraction: float = 0.15  # the world's sentence split (as make_world)
    answer_prefix: str | None = None  # with answer_share: the world's answers as the demo says them, in the
    answer_share: float = 0.0        # model's voice ("the answer is seven"): this share of the training
                                     # utterances, and an eval group "answers" (every answer once; trained on)
    seed: int = 0
    audio: list = field(default_factory=list)       # extra training audio: files, folders, manifests
    eval_audio: list = field(default_factory=list)  # extra evaluation audio (same forms)


@dataclass
class CodecLossSection:
    mel: float = 15.0
    waveform: float = 1.0
    commitment: float = 0.25
    codebook: float = 1.0
    adversarial: float = 0.0         # > 0: train a discriminator (omnitalk.train.discriminators) beside the codec
    feature: float = 2.0             # feature matching, with the adversarial term
    mel_windows: list = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024, 2048])
    mel_bins: list = field(default_factory=lambda: [5, 10, 20, 40, 80, 160, 320])


@dataclass
class CodecTrainConfig:
    out_dir: str = "runs/codec"
    model: dict = field(default_factory=dict)     # SNAC(**{**SMALL_SNAC, **model})
    init: str | None = None          # start from a trained codec folder (config.json + model.safetensors)
    train_part: str = "all"          # "decoder": encoder and codebooks frozen, every audio keeps its codes
    data: CodecDataSection = field(default_factory=CodecDataSection)
    loss: CodecLossSection = field(default_factory=CodecLossSection)
    steps: int = 3000
    batch_size: int = 8
    segment_frames: int = 4          # training segment = segment_frames * 2048 samples
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    betas: tuple = (0.8, 0.99)
    disc_lr: float | None = None     # the discriminator's peak learning rate (default: lr)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gain: tuple = (0.3, 1.0)         # random input gain (peak-normalised speech times this)
    dead_code_every: int = 200       # 0 = never re-draw unused codes
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0              # reconstruction error on the held-out set every N steps (0 = end only)
    log_every: int = 10
    max_minutes: float | None = None  # stop training (then export) after this wall time
    recognizer: bool = True          # final eval: independent-recogniser WER when faster-whisper is installed
    threads: int | None = None
    compile: bool = False            # torch.compile the training step (faster steps, minutes to compile)
    seed: int = 0
    progress: bool = True

    @property
    def snac_config(self) -> dict:
        return {**SMALL_SNAC, **self.model}

    def validate(self) -> "CodecTrainConfig":
        problems = []
        unknown = sorted(set(self.model) - set(SMALL_SNAC) - {"latent_dim"})
        if unknown:
            problems.append(f"model: unknown SNAC argument(s) {unknown}; known: {sorted(SMALL_SNAC)}")
        else:
            try:
                check_layout(self.snac_config)
            except CodecConfigError as e:
                problems.append(str(e))
        for name in ("steps", "batch_size", "segment_frames", "log_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.train_part not in ("all", "decoder"):
            problems.append(f"train_part must be 'all' or 'decoder', got {self.train_part!r}")
        if self.train_part == "decoder" and not self.init:
            problems.append("train_part: decoder needs init: a trained codec folder whose codes stay fixed")
        if self.init and not (Path(self.init) / "config.json").is_file():
            problems.append(f"init: {self.init!r} is not a codec folder (config.json + model.safetensors); "
                            "give the final/ folder of an `omnitalk train-codec` run")
        if len(self.loss.mel_windows) != len(self.loss.mel_bins):
            problems.append("loss.mel_windows and loss.mel_bins must have the same length")
        if self.data.synth not in ("espeak", "piper"):
            problems.append(f"data.synth must be 'espeak' or 'piper', got {self.data.synth!r}")
        if not 0.0 <= self.data.answer_share < 1.0:
            problems.append(f"data.answer_share must be in [0, 1), got {self.data.answer_share!r}")
        if self.data.answer_share and not self.data.world:
            problems.append("data.answer_share needs data.world: true (the answers are the world's)")
        if not self.data.world and not self.data.audio:
            problems.append("no training audio: set data.world: true or list files in data.audio")
        if problems:
            raise CodecConfigError("invalid codec config: " + "; ".join(problems))
        return self

    @classmethod
    def from_dict(cls, d: dict, where: str = "codec config") -> "CodecTrainConfig":
        d = dict(d or {})
        for k in ("betas", "gain"):
            if k in d and d[k] is not None:
                d[k] = tuple(float(x) for x in d[k])
        try:
            cfg = _build(cls, d, where)
        except CodecConfigError:
            raise
        except TrainConfigError as e:  # unknown keys, wrong types: the same message, the codec's error class
            raise CodecConfigError(str(e)) from None
        return cfg.validate()

    @classmethod
    def from_yaml(cls, path) -> "CodecTrainConfig":
        from omnitalk.config import read_yaml_mapping
        return cls.from_dict(read_yaml_mapping(path, "codec config", CodecConfigError), str(path))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"], d["gain"] = list(self.betas), list(self.gain)
        return d


def check_layout(cfg: dict) -> None:
    """The LLM's token layout fixes these SNAC settings; raise CodecConfigError naming any that differ."""
    hop = int(np.prod(cfg["encoder_rates"]))
    got = {"sampling_rate": cfg["sampling_rate"], "hop_length": hop, "vq_strides": list(cfg["vq_strides"]),
           "codebook_size": cfg["codebook_size"]}
    bad = [f"{k} {got[k]} (must be {v})" for k, v in LAYOUT.items() if got[k] != v]
    if int(np.prod(cfg["decoder_rates"])) != hop:
        bad.append(f"decoder_rates multiply to {int(np.prod(cfg['decoder_rates']))} (must equal the hop, {hop})")
    if bad:
        raise CodecConfigError("the codec must keep the LLM's token layout (24 kHz, hop 512, codebooks of 4096 at "
                               "strides 4/2/1): " + ", ".join(bad))


def build_snac(cfg: dict):
    from snac import SNAC

    check_layout({**SMALL_SNAC, **cfg})
    return SNAC(**{**SMALL_SNAC, **cfg})


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------

class MultiScaleMelLoss(nn.Module):
    """Sum over window sizes of the L1 distance between log10 mel spectrograms (hop = window / 4)."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, windows: Sequence[int] = (32, 64, 128, 256, 512, 1024, 2048),
                 n_mels: Sequence[int] = (5, 10, 20, 40, 80, 160, 320), eps: float = 1e-5):
        super().__init__()
        from omnitalk.audio import mel_filters

        self.windows, self.eps = list(windows), eps
        for w, m in zip(windows, n_mels):
            self.register_buffer(f"fb{w}", torch.from_numpy(mel_filters(m, sample_rate, w)), persistent=False)
            self.register_buffer(f"win{w}", torch.hann_window(w), persistent=False)

    def log_mel(self, x: torch.Tensor, w: int) -> torch.Tensor:  # x (B, T) -> (B, n_mels, L)
        spec = torch.stft(x, n_fft=w, hop_length=w // 4, window=getattr(self, f"win{w}"), center=True,
                          return_complex=True).abs()  # (B, w // 2 + 1, L)
        return torch.log10((getattr(self, f"fb{w}") @ spec).clamp_min(self.eps))

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # (B, T) each
        return sum(F.l1_loss(self.log_mel(y, w), self.log_mel(x, w)) for w in self.windows)


@dataclass
class Quantized:
    z_q: torch.Tensor                 # (B, D, T) the decoder's input
    codes: list                       # [(B, T/4), (B, T/2), (B, T)]
    latents: list                     # each quantizer's projected input z_e, flattened (N_i, codebook_dim)
    commitment: torch.Tensor
    codebook: torch.Tensor


def quantize(rvq, z: torch.Tensor) -> Quantized:
    """SNAC's ResidualVectorQuantize.forward with the VQ training losses (same codes and z_q)."""
    z_q, residual = 0, z
    codes, latents, commit, cb = [], [], z.new_zeros(()), z.new_zeros(())
    for q in rvq.quantizers:
        r = F.avg_pool1d(residual, q.stride, q.stride) if q.stride > 1 else residual
        z_e = q.in_proj(r)                                   # (B, d, T / stride)
        z_c, idx = q.decode_latents(z_e)                     # nearest code (cosine), its (unnormalised) vector
        commit = commit + F.mse_loss(z_e, z_c.detach())
        cb = cb + F.mse_loss(z_c, z_e.detach())
        z_c = z_e + (z_c - z_e).detach()                     # straight-through
        out = q.out_proj(z_c)
        if q.stride > 1:
            out = out.repeat_interleave(q.stride, dim=-1)
        z_q, residual = z_q + out, residual - out
        codes.append(idx)
        latents.append(z_e.detach().transpose(1, 2).reshape(-1, z_e.shape[1]))
    return Quantized(z_q, codes, latents, commit, cb)


def forward_losses(snac, x: torch.Tensor, mel_loss: MultiScaleMelLoss, weights: CodecLossSection,
                   decoder_only: bool = False):
    """x (B, 1, T), T a multiple of 2048 -> (total loss, {part: loss tensor}, Quantized, y (B, 1, T)).
    decoder_only: the encoder and quantizer run without gradients (frozen) and add no VQ terms."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not decoder_only):
        z = snac.encoder(snac.preprocess(x))                # (B, D, T / 512)
        qz = quantize(snac.quantizer, z)
    y = snac.decoder(qz.z_q)[..., :x.shape[-1]]              # (B, 1, T)
    parts = {"mel": mel_loss(y[:, 0], x[:, 0]), "waveform": F.l1_loss(y, x)}
    if not decoder_only:
        parts.update(commitment=qz.commitment, codebook=qz.codebook)
    total = sum(getattr(weights, k) * v for k, v in parts.items())
    return total, parts, qz, y


class DeadCodes:
    """Counts code use per quantizer; every `every` steps re-draws the codes nobody used from a buffer of
    recent encoder outputs (the usual remedy for codebook collapse; SoundStream, EnCodec)."""

    def __init__(self, rvq, every: int, buffer: int = 8192):
        self.rvq, self.every, self.size = rvq, every, buffer
        n = rvq.codebook_size
        self.counts = [torch.zeros(n, dtype=torch.long) for _ in rvq.quantizers]
        self.buffers: list[torch.Tensor | None] = [None for _ in rvq.quantizers]

    def observe(self, qz: Quantized) -> None:
        for i, (idx, lat) in enumerate(zip(qz.codes, qz.latents)):
            self.counts[i] += torch.bincount(idx.reshape(-1), minlength=self.rvq.codebook_size)
            b = lat if self.buffers[i] is None else torch.cat([lat, self.buffers[i]])
            self.buffers[i] = b[:self.size]

    def maybe_reset(self, step: int, gen: torch.Generator) -> list[int]:
        """At multiples of `every` (and early, at every/8, every/4, every/2, when the random initial codebook
        has just collapsed onto a few codes): re-draw dead codes; returns how many per quantizer (else [])."""
        if not self.every or (step % self.every and step not in (self.every // 8, self.every // 4, self.every // 2)):
            return []
        replaced = []
        with torch.no_grad():
            for i, q in enumerate(self.rvq.quantizers):
                dead = (self.counts[i] == 0).nonzero().reshape(-1)
                buf = self.buffers[i]
                if len(dead) and buf is not None and len(buf):
                    pick = torch.randint(len(buf), (len(dead),), generator=gen)
                    noise = 0.01 * buf.std() * torch.randn(len(dead), buf.shape[1], generator=gen)
                    q.codebook.weight[dead] = buf[pick] + noise
                replaced.append(int(len(dead)))
                self.counts[i].zero_()
        return replaced


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

@dataclass
class Utterance:
    wav: np.ndarray                   # float32, 24 kHz
    text: str | None = None
    group: str = "train"              # eval groups: "model_voice", "held_out_voices", "files"
    path: str | None = None


def _audio_files(entries: Sequence[str]) -> list[tuple[str, str | None]]:
    """Files, folders (every *.wav / *.flac, recursively) and JSONL manifests -> [(path, text)]."""
    out = []
    for e in entries:
        p = Path(e).expanduser()
        if p.is_dir():
            out += [(str(f), None) for f in sorted(p.rglob("*")) if f.suffix.lower() in (".wav", ".flac")]
        elif p.suffix == ".jsonl" and p.is_file():
            for n, line in enumerate(p.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    path = Path(r["audio"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise CodecConfigError(f"{p}:{n}: expected a JSON object with 'audio' (and optional "
                                           f"'text'): {err}") from None
                out.append((str(path if path.is_absolute() else p.parent / path), r.get("text")))
        elif p.is_file():
            out.append((str(p), None))
        else:
            raise CodecConfigError(f"codec data: {e!r} is neither an audio file, a folder nor a .jsonl manifest")
    return out


def load_files(entries: Sequence[str], group: str) -> list[Utterance]:
    from omnitalk.train.data import load_wav

    return [Utterance(load_wav(path, SAMPLE_RATE).astype(np.float32), text, group, path)
            for path, text in _audio_files(entries)]


def world_texts(seed: int, fraction: float) -> tuple[list[str], list[str]]:
    """(training, held-out) sentences of the small world for the codec: statements, questions, answer
    words, and (training side) the interruption command, its near misses and other speech."""
    from omnitalk.train.interrupt import DEFAULT_CONFUSERS, DEFAULT_OTHER_SENTENCES
    from omnitalk.train.world import world_sentences

    train, held = world_sentences(seed, fraction)
    return train + ["stop omni"] + list(DEFAULT_CONFUSERS) + list(DEFAULT_OTHER_SENTENCES), held


def synthesise_world(data: CodecDataSection, out_dir: Path, synth=None, progress: bool = True
                     ) -> tuple[list[Utterance], list[Utterance]]:
    """The world's speech for the codec, cached as WAV files + manifest.jsonl under out_dir (reused when
    the same settings made it). Returns (training, evaluation) utterances."""
    import soundfile as sf
    from tqdm.auto import tqdm

    from omnitalk.train.tts import MODEL_VOICE_ESPEAK, MODEL_VOICE_PIPER, EspeakSynth, PiperSynth, VoiceSpace, synth_to
    from omnitalk.train.world import answer_words, with_prefix

    settings = {"version": 2, "n_train": data.n_train, "n_eval": data.n_eval, "model_voice_share": data.model_voice_share,
                "held_out_fraction": data.held_out_fraction, "seed": data.seed}
    if data.synth != "espeak":  # caches made before the setting existed stay valid
        settings["synth"] = data.synth
    if data.answer_share:
        settings["answers"] = [data.answer_prefix or "", data.answer_share]
    piper = data.synth == "piper"
    model_voice = MODEL_VOICE_PIPER if piper else MODEL_VOICE_ESPEAK
    manifest, info = out_dir / "manifest.jsonl", out_dir / "settings.json"
    if not (manifest.is_file() and info.is_file() and json.loads(info.read_text()) == settings):
        synth = synth or (PiperSynth() if piper else EspeakSynth())
        train_texts, held_texts = world_texts(data.seed, data.held_out_fraction)
        train_voices, held_voices = (VoiceSpace.piper() if piper else VoiceSpace.espeak()).split()
        answers = [with_prefix(w, data.answer_prefix or "") for w in answer_words()]
        rng = random.Random(data.seed)
        plan = []  # (group, text, voice)
        for _ in range(data.n_train):
            voice = model_voice if rng.random() < data.model_voice_share else train_voices.sample(rng)
            plan.append(("train", rng.choice(train_texts), voice))
        if data.answer_share:  # replaces that share of the sentences, keeping the draw of the others
            for i in random.Random(f"{data.seed}:answers").sample(range(data.n_train),
                                                                   round(data.answer_share * data.n_train)):
                plan[i] = ("train", answers[i % len(answers)], model_voice)
        for i in range(data.n_eval):
            plan.append(("model_voice", rng.choice(held_texts), model_voice))
            plan.append(("held_out_voices", rng.choice(held_texts), held_voices.sample(rng)))
        if data.answer_share:
            plan += [("answers", text, model_voice) for text in answers]
        shutil.rmtree(out_dir, ignore_errors=True)
        (out_dir / "wav").mkdir(parents=True)
        rows = []
        for n, (group, text, voice) in enumerate(tqdm(plan, desc="codec speech", unit="utt", disable=not progress)):
            wav = synth_to(synth, text, voice, SAMPLE_RATE)
            path = out_dir / "wav" / f"{n:05d}.wav"
            sf.write(path, wav, SAMPLE_RATE, subtype="FLOAT")
            rows.append({"audio": f"wav/{path.name}", "text": text, "group": group, "voice": voice.to_dict()})
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        info.write_text(json.dumps(settings))
    train, evals = [], []
    for r in (json.loads(line) for line in manifest.read_text().splitlines()):
        wav, _ = sf.read(out_dir / r["audio"], dtype="float32")
        (train if r["group"] == "train" else evals).append(Utterance(wav, r["text"], r["group"], r["audio"]))
    return train, evals


class SegmentSampler:
    """Random training segments (B, 1, T) from a list of waveforms: an utterance drawn in proportion to
    its length, a random window of it (zero-padded when shorter), a random gain. Seeded; state() /
    set_state() make a resumed run draw the same segments as an uninterrupted one."""

    def __init__(self, wavs: Sequence[np.ndarray], length: int, seed: int, gain=(0.3, 1.0)):
        self.wavs = [w for w in wavs if len(w)]
        if not self.wavs:
            raise CodecConfigError("no training audio (every file was empty)")
        sizes = np.array([max(len(w), length) for w in self.wavs], dtype=np.float64)
        self.p = sizes / sizes.sum()
        self.length, self.gain = length, gain
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int) -> torch.Tensor:
        out = np.zeros((n, 1, self.length), dtype=np.float32)
        for b in range(n):
            w = self.wavs[self.rng.choice(len(self.wavs), p=self.p)]
            if len(w) > self.length:
                o = self.rng.integers(0, len(w) - self.length + 1)
                out[b, 0] = w[o:o + self.length]
            else:
                o = self.rng.integers(0, self.length - len(w) + 1)
                out[b, 0, o:o + len(w)] = w
            out[b] *= self.rng.uniform(*self.gain)
        return torch.from_numpy(out)

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, s: dict) -> None:
        self.rng.bit_generator.state = s


# ---------------------------------------------------------------------------------------------
# checkpoints and export
# ---------------------------------------------------------------------------------------------

def _checkpoints(out_dir: Path) -> list[Path]:
    ck = out_dir / "checkpoints"
    return sorted(p for p in ck.glob("step-*") if (p / "state.pt").is_file()) if ck.is_dir() else []


def save_codec_checkpoint(out_dir: Path, snac, opt, step: int, sampler: SegmentSampler, dead: DeadCodes,
                          gen: torch.Generator, cfg: CodecTrainConfig, disc=None, opt_d=None) -> Path:
    ck = out_dir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    name, tmp = f"step-{step:07d}", ck / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({"model": snac.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "sampler": sampler.state(), "dead_counts": dead.counts, "dead_buffers": dead.buffers,
                "rng": {"torch": torch.get_rng_state(), "gen": gen.get_state()},
                "config": cfg.to_dict(), "snac_config": cfg.snac_config,
                "discriminator": disc.state_dict() if disc is not None else None,
                "disc_optimizer": opt_d.state_dict() if opt_d is not None else None}, tmp / "state.pt")
    shutil.rmtree(ck / name, ignore_errors=True)
    tmp.replace(ck / name)
    for old in _checkpoints(out_dir)[:-max(1, cfg.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)
    return ck / name


def export_codec(snac, folder: Path, config: dict) -> Path:
    """A SNAC folder: config.json (`config`, the SNAC arguments), model.safetensors (omnitalk) and
    pytorch_model.bin (the snac package's loader)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in snac.state_dict().items()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(sd, str(folder / "model.safetensors"))
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

def codebook_use(frames: np.ndarray) -> dict:
    """Frames (n, 7) -> per codebook: distinct codes used and perplexity (exp of the code entropy)."""
    from omnitalk.codec import frames_to_codes

    out = {}
    for i, c in enumerate(frames_to_codes(frames)):
        counts = np.bincount(c.reshape(-1).numpy(), minlength=LAYOUT["codebook_size"]).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        out[f"c{i}"] = {"used": int((counts > 0).sum()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))}
    return out


def evaluate_codec(codec, items: Sequence[Utterance], recognizer=None, mel_loss: MultiScaleMelLoss | None = None,
                   out_wav_dir: Path | None = None) -> dict:
    """Encode + decode (noise off) every item; per group: multi-scale mel distance, and with a recogniser
    the WER of its transcripts of the decoded and of the original audio against the item's text."""
    import soundfile as sf

    from omnitalk.eval.metrics import corpus_wer

    mel_loss = mel_loss or MultiScaleMelLoss()
    if out_wav_dir is not None:
        out_wav_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict] = {}
    all_frames = []
    for n, it in enumerate(items):
        wav = np.pad(it.wav, (0, (-len(it.wav)) % FRAME))
        frames = codec.encode(wav)                                     # (n, 7)
        y = codec.decode(frames, noise=False)[:len(it.wav)]
        all_frames.append(frames)
        g = groups.setdefault(it.group, {"mel": [], "refs": [], "orig": [], "coded": []})
        x = torch.from_numpy(it.wav)[None]
        g["mel"].append(float(mel_loss(y[None], x)))
        if out_wav_dir is not None:
            sf.write(out_wav_dir / f"{n:04d}-{it.group}.wav", y.numpy(), SAMPLE_RATE)
        if recognizer is not None and it.text:
            g["refs"].append(it.text)
            g["orig"].append(recognizer.transcribe(it.wav, sr=SAMPLE_RATE))
            g["coded"].append(recognizer.transcribe(y.numpy(), sr=SAMPLE_RATE))
    report = {"items": len(items), "codebooks": codebook_use(np.concatenate(all_frames)) if all_frames else {}}
    for name, g in groups.items():
        r = {"items": len(g["mel"]), "mel_distance": float(np.mean(g["mel"]))}
        if g["refs"]:
            orig = corpus_wer(g["refs"], g["orig"])
            r["wer_original"], r["wer_decoded"] = orig.wer, corpus_wer(g["refs"], g["coded"]).wer
            r["words"] = orig.ref_words
            r["examples"] = [{"text": t, "original": o, "decoded": c}
                             for t, o, c in list(zip(g["refs"], g["orig"], g["coded"]))[:5]]
        report[name] = r
    return report


def _recognizer(cfg: CodecTrainConfig):
    if not cfg.recognizer:
        return None
    try:
        from omnitalk.eval.metrics import IndependentRecognizer
        return IndependentRecognizer()
    except (ImportError, FileNotFoundError) as e:
        log.warning("no independent recogniser (%s): the codec's WER is not measured", e)
        return None


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

@dataclass
class CodecRunResult:
    path: Path              # final/ (a SNAC folder) or the checkpoint written when stopped
    step: int
    stopped: bool           # stopped by a signal before the end
    report: dict | None = None


def load_data(cfg: CodecTrainConfig, synth=None) -> tuple[list[Utterance], list[Utterance]]:
    train, evals = [], []
    if cfg.data.world:
        train, evals = synthesise_world(cfg.data, Path(cfg.out_dir) / "data", synth=synth, progress=cfg.progress)
    train += load_files(cfg.data.audio, "train")
    evals += load_files(cfg.data.eval_audio, "files")
    return train, evals


def train_codec(cfg: CodecTrainConfig, *, resume: bool = False, data=None, synth=None,
                callbacks: Sequence = ()) -> CodecRunResult:
    """Train per cfg (see the module docstring); `data` = (train, eval) utterances instead of cfg.data;
    each callback is called as callback(step, losses) after every step."""
    from tqdm.auto import tqdm

    from omnitalk.codec import Codec
    from omnitalk.train.loop import StopFlag, latest_checkpoint
    from omnitalk.train.metrics import MetricsWriter
    from omnitalk.train.stage0 import cosine_lr

    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_items, eval_items = data if data is not None else load_data(cfg, synth)
    torch.manual_seed(cfg.seed)
    snac = build_snac(cfg.model).train()
    if cfg.init:
        load_init(snac, cfg)
    decoder_only = cfg.train_part == "decoder"
    if decoder_only:  # the codes of every audio stay what they were: an LLM trained on them keeps working
        snac.encoder.requires_grad_(False)
        snac.quantizer.requires_grad_(False)
    params = [p for p in snac.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    disc = opt_d = None
    if cfg.loss.adversarial > 0:
        from omnitalk.train.discriminators import CodecDiscriminator
        disc = CodecDiscriminator().train()
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=cfg.betas)
    sampler = SegmentSampler([u.wav for u in train_items], cfg.segment_frames * FRAME, cfg.seed, cfg.gain)
    dead = DeadCodes(snac.quantizer, 0 if decoder_only else cfg.dead_code_every)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    mel_loss = MultiScaleMelLoss(SAMPLE_RATE, cfg.loss.mel_windows, cfg.loss.mel_bins)
    # torch.compile (inductor) fuses the Snake activations' elementwise chains: ~1.6x faster steps on a
    # CPU, after a one-off compilation of a few minutes (cached under the inductor cache dir)
    step_losses = torch.compile(forward_losses) if cfg.compile else forward_losses
    step = 0
    path = latest_checkpoint(out) if resume else None
    if path is not None:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        if state["snac_config"] != cfg.snac_config:
            raise CodecConfigError(f"{path} was written with another model config ({state['snac_config']}); "
                                   "use another out_dir or the same model settings")
        snac.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            if state.get("discriminator") is None:
                raise CodecConfigError(f"{path} was written without a discriminator; resume with loss.adversarial: 0 "
                                       "or start a new out_dir")
            disc.load_state_dict(state["discriminator"])
            opt_d.load_state_dict(state["disc_optimizer"])
        sampler.set_state(state["sampler"])
        dead.counts, dead.buffers = state["dead_counts"], state["dead_buffers"]
        torch.set_rng_state(state["rng"]["torch"])
        gen.set_state(state["rng"]["gen"])
        step = state["step"]
        log.info("resumed from %s (step %d)", path, step)
    metrics = MetricsWriter(out)
    metrics.truncate_after(step)
    (out / "config.yaml").write_text(json.dumps(cfg.to_dict(), indent=2))  # JSON is YAML
    t0, seen, stopped = time.perf_counter(), 0, False
    with StopFlag() as stop, tqdm(total=cfg.steps, initial=step, desc="codec", unit="step",
                                  disable=not cfg.progress) as bar:
        while step < cfg.steps:
            if cfg.max_minutes and time.perf_counter() - t0 > cfg.max_minutes * 60:
                log.warning("codec: %.1f-minute budget reached at step %d of %d; exporting, and saving a checkpoint "
                            "that --resume continues from (with a new budget)", cfg.max_minutes, step, cfg.steps)
                if step % cfg.checkpoint_every != 0:
                    save_codec_checkpoint(out, snac, opt, step, sampler, dead, gen, cfg, disc, opt_d)
                break
            lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            x = sampler.batch(cfg.batch_size)
            loss, parts, qz, y = step_losses(snac, x, mel_loss, cfg.loss, decoder_only)
            if disc is not None:
                loss = loss + adversarial_step(disc, opt_d, x, y, parts, cfg, lr / cfg.lr)
            parts = {k: float(v.detach()) for k, v in parts.items()}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            dead.observe(qz)
            step += 1
            seen += x.numel()
            replaced = dead.maybe_reset(step, gen)
            if step % cfg.log_every == 0 or step == cfg.steps or replaced:
                row = {"step": step, "loss": float(loss.detach()), **parts, "lr": lr, "grad_norm": float(gnorm),
                       "audio_s_per_s": seen / SAMPLE_RATE / (time.perf_counter() - t0)}
                if replaced:
                    row["dead_codes"] = sum(replaced)
                metrics.log(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", mel=f"{parts['mel']:.3f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and eval_items:
                metrics.log({"step": step, **_quick_eval(snac, eval_items, mel_loss)})
            bar.update(1)
            for cb in callbacks:
                cb(step, parts)
            if stop.set:
                stopped = True
                break
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_codec_checkpoint(out, snac, opt, step, sampler, dead, gen, cfg, disc, opt_d)
    if stopped:
        path = save_codec_checkpoint(out, snac, opt, step, sampler, dead, gen, cfg, disc, opt_d)
        return CodecRunResult(path, step, True)
    snac.eval()
    final = export_codec(snac, out / "final", cfg.snac_config)
    report = {"steps": step, "train_seconds": time.perf_counter() - t0,
              "params": sum(p.numel() for p in snac.parameters()), "train_utterances": len(train_items)}
    if eval_items:
        codec = Codec.from_pretrained(final)
        report.update(evaluate_codec(codec, eval_items, _recognizer(cfg), mel_loss, out / "eval_wav"))
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    return CodecRunResult(final, step, False, report)


def load_init(snac, cfg: CodecTrainConfig) -> None:
    """Load `cfg.init` (a codec folder) into snac; its SNAC config must be the run's."""
    from safetensors.torch import load_file

    folder = Path(cfg.init)
    config = json.loads((folder / "config.json").read_text())
    if config != cfg.snac_config:
        diff = sorted(k for k in set(config) | set(cfg.snac_config) if config.get(k) != cfg.snac_config.get(k))
        raise CodecConfigError(f"init: {folder} is a codec with other settings ({', '.join(f'{k}={config.get(k)!r}' for k in diff)}); "
                               f"set model: to match it")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CodecConfigError(f"init: {folder} has no model.safetensors (an `omnitalk train-codec` final/ folder has one)")
    snac.load_state_dict(load_file(str(weights)))


def adversarial_step(disc, opt_d, x: torch.Tensor, y: torch.Tensor, parts: dict, cfg: CodecTrainConfig,
                     lr_scale: float) -> torch.Tensor:
    """One discriminator update on (x real, y fake), then the codec's adversarial + feature-matching
    terms against the updated discriminator (added to `parts`; returns their weighted sum)."""
    from omnitalk.train.discriminators import discriminator_loss, generator_losses

    for g in opt_d.param_groups:
        g["lr"] = (cfg.disc_lr or cfg.lr) * lr_scale
    real, _ = disc(x)
    fake, _ = disc(y.detach())
    loss_d = discriminator_loss(real, fake)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
    opt_d.step()
    disc.requires_grad_(False)  # the codec's terms reach the codec only
    with torch.no_grad():
        _, real_feats = disc(x)
    fake, fake_feats = disc(y)
    disc.requires_grad_(True)
    adversarial, feature = generator_losses(fake, fake_feats, real_feats)
    parts.update(disc=loss_d.detach(), adversarial=adversarial, feature=feature)
    return cfg.loss.adversarial * adversarial + cfg.loss.feature * feature


def evaluate_trained(cfg: CodecTrainConfig, folder: Path, synth=None) -> dict:
    """Evaluate a trained codec folder on the config's held-out speech; writes OUT/eval.json."""
    from omnitalk.codec import Codec

    _, eval_items = load_data(cfg, synth)
    if not eval_items:
        raise CodecConfigError("no held-out speech: set data.world: true or list files in data.eval_audio")
    codec = Codec.from_pretrained(folder)
    report = {"codec": str(folder), "params": sum(p.numel() for p in codec.model.parameters()),
              **evaluate_codec(codec, eval_items, _recognizer(cfg), out_wav_dir=Path(cfg.out_dir) / "eval_wav")}
    (Path(cfg.out_dir) / "eval.json").write_text(json.dumps(report, indent=2))
    return report


def summary(report: dict | None) -> dict:
    """The report without its transcript examples (what the CLI prints)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "examples"} if isinstance(v, dict) else v)
            for k, v in (report or {}).items()}


def _quick_eval(snac, items: Sequence[Utterance], mel_loss: MultiScaleMelLoss, n: int = 8) -> dict:
    """Held-out multi-scale mel distance of the first n items (noise on, training mode off)."""
    snac.eval()
    with torch.no_grad():
        d = []
        for it in items[:n]:
            x = torch.from_numpy(np.pad(it.wav, (0, (-len(it.wav)) % FRAME)))[None, None]
            y, _ = snac(x)
            d.append(float(mel_loss(y[:, 0], x[:, 0])))
    snac.train()
    return {"eval_mel": float(np.mean(d))}
