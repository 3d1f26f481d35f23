"""Audio front end: loading, resampling, length rules and the Whisper log-mel against the parity fixture."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnitalk import audio as A
from omnitalk.audio import AudioError
from omnitalk.errors import InputError

FIX = Path(__file__).resolve().parents[0] / "fixtures" / "parity"
WAV = FIX / "inputs" / "question.wav"


def test_question_wav_is_exact_int16_over_32768():
    x = A.load_audio(WAV)
    ref = sf.read(WAV, dtype="int16")[0].astype(np.float32) / 32768.0
    assert x.dtype == np.float32 and x.shape == (47554,)
    np.testing.assert_array_equal(x, ref)
    np.testing.assert_array_equal(A.load_audio(WAV.read_bytes()), x)  # bytes of the file
    np.testing.assert_array_equal(A.load_audio(str(WAV)), x)


def test_mel_matches_fixture():
    mel = A.log_mel_spectrogram(A.load_audio(WAV))
    expected = np.load(FIX / "expected" / "mel.npy")
    assert mel.shape == (80, 3000) and mel.dtype == torch.float32
    assert np.abs(mel.numpy() - expected).max() < 1e-4


def test_whisper_length_matches_fixture():
    meta = json.loads((FIX / "expected" / "audio_len.json").read_text())
    n = len(A.load_audio(WAV))
    assert n == meta["num_samples"]
    assert A.num_whisper_frames(n) == meta["L"] == 149
    assert A.num_whisper_frames(48000) == 151  # 3.00 s, the reference's example
    assert A.num_whisper_frames(A.N_SAMPLES) == 1500  # official rule would say 1501


def test_batched_mel_equals_single():
    x = A.load_audio(WAV)
    batch = A.log_mel_spectrogram(np.stack([x, 0.5 * x]))
    assert batch.shape == (2, 80, 3000)
    torch.testing.assert_close(batch[0], A.log_mel_spectrogram(x))
    torch.testing.assert_close(batch[1], A.log_mel_spectrogram(0.5 * x))


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="audio file not found"):
        A.load_audio(tmp_path / "nope.wav")


def test_text_file_renamed_wav(tmp_path):
    p = tmp_path / "fake.wav"
    p.write_text("this is not audio\n")
    with pytest.raises(AudioError, match="ffmpeg") as e:
        A.load_audio(p)
    assert "WAV/FLAC/OGG/MP3" in str(e.value)
    with pytest.raises(AudioError):
        A.load_audio(b"not audio at all")
    assert isinstance(e.value, InputError) and isinstance(e.value, ValueError)


def test_empty_inputs(tmp_path):
    p = tmp_path / "empty.wav"
    sf.write(p, np.zeros(0, dtype=np.int16), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match="no samples"):
        A.load_audio(p)
    with pytest.raises(AudioError, match="empty"):
        A.load_audio(b"")
    with pytest.raises(AudioError, match="no samples"):
        A.load_audio(np.zeros(0, np.float32), sr=16000)


def test_array_inputs():
    with pytest.raises(AudioError, match="sr="):
        A.load_audio(np.zeros(100, np.float32))
    with pytest.raises(AudioError, match="NaN"):
        A.load_audio(np.array([0.0, np.nan], np.float32), sr=16000)
    with pytest.raises(AudioError, match="NaN or infinite"):
        A.load_audio(np.array([0.0, np.inf]), sr=16000)
    with pytest.raises(AudioError, match="channels"):
        A.load_audio(np.zeros((2, 16000), np.float32), sr=16000)
    i16 = np.array([-32768, 0, 16384], np.int16)
    np.testing.assert_array_equal(A.load_audio(i16, sr=16000), [-1.0, 0.0, 0.5])
    np.testing.assert_array_equal(A.load_audio(torch.tensor([0.25, -0.5]), sr=16000), [0.25, -0.5])


def test_stereo_is_channel_mean(tmp_path):
    rng = np.random.default_rng(0)
    st = rng.integers(-20000, 20000, size=(8000, 2)).astype(np.int16)
    p = tmp_path / "stereo.wav"
    sf.write(p, st, 16000, subtype="PCM_16")
    expected = (st.astype(np.float64) / 32768.0).mean(axis=1)
    np.testing.assert_allclose(A.load_audio(p), expected, atol=1e-7)


@pytest.mark.parametrize("sr", [8000, 24000, 44100, 48000])
def test_resampled_rates_keep_length_and_frequency(tmp_path, sr):
    n, f0 = sr * 2, 440.0
    t = np.arange(n) / sr
    p = tmp_path / f"sine_{sr}.wav"
    sf.write(p, 0.5 * np.sin(2 * np.pi * f0 * t), sr, subtype="PCM_16")
    x = A.load_audio(p)
    assert abs(len(x) - round(n * 16000 / sr)) <= 1
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    peak = np.fft.rfftfreq(len(x), 1 / 16000)[spec.argmax()]
    assert abs(peak - f0) <= 1.0
    assert abs(np.abs(x).max() - 0.5) < 0.01  # amplitude kept


def test_flac_and_float_wav(tmp_path):
    x = A.load_audio(WAV)
    sf.write(tmp_path / "q.flac", x, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(A.load_audio(tmp_path / "q.flac"), x)
    sf.write(tmp_path / "q32.wav", x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(A.load_audio(tmp_path / "q32.wav"), x)


def test_over_30_seconds_refused():
    long = np.zeros(A.N_SAMPLES + 1, np.float32)
    for fn in (A.check_duration, A.num_whisper_frames, A.log_mel_spectrogram):
        with pytest.raises(AudioError, match="30"):
            fn(long if fn is not A.num_whisper_frames else len(long))
    A.check_duration(np.zeros(A.N_SAMPLES, np.float32))  # exactly 30 s is fine
    assert A.MAX_AUDIO_SECONDS == 30.0


def test_silence_gives_finite_mel():
    mel = A.log_mel_spectrogram(A.load_audio(np.zeros(16000, np.float32), sr=16000))
    assert mel.shape == (80, 3000) and torch.isfinite(mel).all()


def test_pcm16_helpers():
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.5, 0.99999, 1.0, 2.0])
    b = A.float_to_pcm16(x)
    assert len(b) == 2 * len(x)
    np.testing.assert_array_equal(np.frombuffer(b, "<i2"), [-32768, -32768, -16384, 0, 16384, 32767, 32767, 32767])
    y = A.pcm16_bytes_to_float(b)
    assert y.dtype == np.float32 and y[2] == -0.5
    with pytest.raises(AudioError, match="even"):
        A.pcm16_bytes_to_float(b"\x00\x01\x02")
    np.testing.assert_array_equal(A.resample(y, 16000, 16000), y)


def test_mel_filters_are_slaney():
    w = A.mel_filters(80)
    assert w.shape == (80, 201) and w.dtype == np.float32
    # Slaney area normalisation: each triangle's peak = 2 / (bandwidth in Hz), so sums are ~constant
    # in the linear region; first filter starts at 0 Hz and the last one ends at Nyquist.
    assert w[0, 0] == 0 and w[0, 1] > 0 and w[-1, -1] == 0 and w[-1, -2] > 0
    assert (w >= 0).all() and (w.sum(axis=1) > 0).all()
