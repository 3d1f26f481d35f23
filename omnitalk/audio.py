"""Audio front end: loading, resampling, PCM helpers and Whisper's log-mel spectrogram.

Numerically equal to the official path (ffmpeg -> mono 16 kHz s16le -> /32768, then openai-whisper's
`log_mel_spectrogram(pad_or_trim(audio))`), written with numpy/torch/soundfile/soxr only.
"""
from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from omnitalk.errors import InputError

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in a 30-s window
N_FRAMES = N_SAMPLES // HOP  # 3000 mel frames
N_AUDIO_CTX = N_FRAMES // 2  # 1500 Whisper encoder frames (20 ms each)
MAX_AUDIO_SECONDS = 30.0

_CONVERT_HINT = (
    "expected a WAV/FLAC/OGG/MP3 file that soundfile (libsndfile) can read; convert it first, e.g. "
    "`ffmpeg -i INPUT -ac 1 -ar 16000 out.wav`"
)


class AudioError(InputError):
    """Audio input that cannot be used (missing, unreadable, empty, non-finite, too long)."""


# ----------------------------------------------------------------------------- PCM / resampling


def pcm16_bytes_to_float(b: bytes) -> np.ndarray:
    """Raw little-endian int16 PCM -> float32 samples in [-1, 1) (int16 / 32768)."""
    if len(b) % 2:
        raise AudioError(f"PCM16 data must have an even number of bytes, got {len(b)}; "
                         "send whole 16-bit samples (little-endian int16)")
    return np.frombuffer(b, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(x) -> bytes:
    """Float samples -> raw little-endian int16 PCM bytes (x * 32768, rounded, clipped to int16)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2").tobytes()


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample a 1-D signal with soxr (HQ); returns float32."""
    x = np.asarray(x, dtype=np.float32)
    if sr_in <= 0 or sr_out <= 0:
        raise AudioError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if int(sr_in) == int(sr_out):
        return x
    return soxr.resample(x, int(sr_in), int(sr_out), quality="HQ").astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- loading


def _read(source) -> tuple[np.ndarray, int]:
    """Decode a path or file bytes with soundfile -> (frames, channels) float32, sample rate."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise AudioError(f"audio file not found: {path}")
        if not path.is_file():
            raise AudioError(f"audio path is not a file: {path}")
        name, opener = str(path), (lambda: str(path))
    else:
        data = bytes(source)
        if not data:
            raise AudioError(f"audio data is empty (0 bytes); {_CONVERT_HINT}")
        name, opener = "<bytes>", (lambda: io.BytesIO(data))
    try:
        info = sf.info(opener())
        # PCM16 is read as int16 so that int16 / 32768 is exactly what ffmpeg's s16le path gives.
        if info.subtype == "PCM_16":
            x = sf.read(opener(), dtype="int16", always_2d=True)[0].astype(np.float32) / 32768.0
        else:
            x = sf.read(opener(), dtype="float32", always_2d=True)[0]
    except (RuntimeError, TypeError, ValueError) as e:  # sf.SoundFileError is a RuntimeError
        why = getattr(e, "error_string", None) or str(e)
        raise AudioError(f"cannot read audio {name}: {why.rstrip('.')}; {_CONVERT_HINT}") from e
    return x, int(info.samplerate)


def load_audio(source, sr: int | None = None) -> np.ndarray:
    """Load audio as float32 mono at 16 kHz.

    `source`: a path, the bytes of an audio file, or a numpy array/tensor of samples (then `sr` is
    required; shape (n,) or (n, channels); int16 arrays are scaled by 1/32768). Channels are averaged,
    other rates are resampled with soxr. Raises AudioError for missing/unreadable/empty/non-finite input.
    """
    if isinstance(source, (np.ndarray, torch.Tensor)):
        if sr is None:
            raise AudioError("load_audio(array) needs its sample rate: pass sr=, e.g. sr=16000")
        x = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        if x.ndim == 2 and x.shape[1] > 16:
            raise AudioError(f"audio array of shape {x.shape} looks like (channels, frames); "
                             "pass (frames,) or (frames, channels), e.g. x.T")
        if x.ndim not in (1, 2):
            raise AudioError(f"audio array must be 1-D or (frames, channels), got shape {x.shape}")
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        elif not np.issubdtype(x.dtype, np.floating):
            raise AudioError(f"audio array must be float or int16, got {x.dtype}")
        x = (x[:, None] if x.ndim == 1 else x).astype(np.float32, copy=False)
        name = "audio array"
    elif isinstance(source, (str, Path, bytes, bytearray, memoryview)):
        x, sr = _read(source)
        name = str(source) if isinstance(source, (str, Path)) else "audio data"
    else:
        raise AudioError(f"unsupported audio source {type(source).__name__}; "
                         "pass a file path, the file's bytes, or a numpy array with sr=")
    if x.shape[0] == 0 or x.size == 0:
        raise AudioError(f"{name} contains no samples (0 frames); record or pass non-empty audio")
    if not np.isfinite(x).all():
        raise AudioError(f"{name} contains NaN or infinite samples; clean the signal before passing it")
    x = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float64).astype(np.float32)
    return resample(x, sr, SAMPLE_RATE)


# ----------------------------------------------------------------------------- length rules


def _num_samples(audio) -> int:
    return int(audio) if isinstance(audio, (int, np.integer)) else int(audio.shape[-1])


def check_duration(audio) -> None:
    """Refuse audio longer than MAX_AUDIO_SECONDS (Whisper sees one 30-s window; the official code
    silently truncated it). `audio`: samples at 16 kHz (array/tensor) or a sample count."""
    n = _num_samples(audio)
    if n > MAX_AUDIO_SECONDS * SAMPLE_RATE:
        raise AudioError(f"audio is {n / SAMPLE_RATE:.2f} s long, the limit is {MAX_AUDIO_SECONDS:g} s "
                         f"(one Whisper window); split it into shorter pieces or trim it")


def num_whisper_frames(num_samples: int) -> int:
    """Number of Whisper frames the LLM uses: L = int(duration_ms / 20) + 1 (official rule).

    Capped at 1500: at exactly 30 s the official rule gives 1501, one more than the encoder makes.
    Raises AudioError above 30 s.
    """
    check_duration(num_samples)
    duration_ms = (num_samples / SAMPLE_RATE) * 1000
    return min(int(duration_ms / 20) + 1, N_AUDIO_CTX)


# ----------------------------------------------------------------------------- log-mel


def _hz_to_mel(f):
    """Slaney mel scale (librosa htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    mels = f / f_sp
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filters(n_mels: int = 80, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """(n_mels, n_fft//2+1) float32 filterbank = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)
    (Slaney mel scale, Slaney area normalisation) — what whisper's mel_filters.npz stores."""
    fftfreqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    weights = np.zeros((n_mels, len(fftfreqs)), dtype=np.float32)
    for i in range(n_mels):  # triangles, stored float32 then scaled, exactly like librosa
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1]))
    enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, None]
    return weights


@lru_cache(maxsize=None)
def _mel_filters_torch(n_mels: int) -> torch.Tensor:
    return torch.from_numpy(mel_filters(n_mels))


def log_mel_spectrogram(audio, n_mels: int = 80, padding_to: int | None = N_SAMPLES) -> torch.Tensor:
    """Whisper log-mel of 16-kHz samples: (n_mels, 3000) for one signal, (B, n_mels, 3000) for (B, n).

    Equals openai-whisper's `log_mel_spectrogram(pad_or_trim(audio))`: zero-pad to `padding_to` samples
    (None: no padding), centred reflect-padded STFT (n_fft 400, hop 160, periodic Hann), last frame
    dropped, |.|^2, mel filterbank, log10(max(., 1e-10)), floor at max - 8 (per signal), (x + 4) / 4.
    Audio longer than `padding_to` raises AudioError instead of being truncated.
    """
    x = torch.as_tensor(audio).to(torch.float32)
    if padding_to is not None:
        if x.shape[-1] > padding_to:
            raise AudioError(f"audio has {x.shape[-1]} samples ({x.shape[-1] / SAMPLE_RATE:.2f} s), more than "
                             f"the {padding_to} samples ({padding_to / SAMPLE_RATE:g} s) of one Whisper window; "
                             "split it into shorter pieces or trim it")
        x = torch.nn.functional.pad(x, (0, padding_to - x.shape[-1]))
    window = torch.hann_window(N_FFT, device=x.device)
    stft = torch.stft(x, N_FFT, HOP, window=window, center=True, pad_mode="reflect", return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2  # (..., 201, frames)
    filters = _mel_filters_torch(n_mels).to(x.device)
    log_spec = torch.clamp(filters @ magnitudes, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0
