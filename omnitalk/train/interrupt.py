"""The interruption ("Stop Omni") data of the paper: streaming user audio with frame-level irq labels.

Each clip is what the listening item hears while the model talks: 24 kHz user audio, encoded with SNAC
into frames of 2048 samples (85.33 ms) that enter the 7 audio streams (reference §12). A positive clip
holds the command ("stop omni", or any of `InterruptConfig.phrases`) said at a random time by a
random voice, among other sentences by the same speaker; a negative clip holds only other speech,
sometimes a near miss ("stop the music", "hey omni"). Most clips get noise at a random SNR: white,
pink, or babble made of other synthesised sentences in other voices (MUSAN, which the paper's summary
names, is not available offline; babble is the closest stand-in we can make).

Labels (one per SNAC frame): 0 (n_irq) until the command has ended, then 1 (irq) to the end of the
clip. With e = the frame holding the command's last audible sample (-40 dB below the command's peak
after trimming), labels[f] = 1 for f >= e + tolerance_frames (default 1: the model has heard the whole
frame in which the command ends plus one more before it is asked to stop). Negative clips are all 0.
Status tokens on the text stream: irq = text_vocab_size - 64 + 5 (151941 in the released
vocabulary), n_irq = text_vocab_size - 64 + 6 (151942); see omnitalk.tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from omnitalk.eval.metrics import FRAME_MS, InterruptionMetrics, first_irq  # noqa: F401  (re-exported)
from omnitalk.train.data import encode_audio_file, make_record
from omnitalk.train.tts import Synth, VoiceSpace, synth_to, trim_silence

SAMPLE_RATE = 24000
SAMPLES_PER_FRAME = 2048

DEFAULT_OTHER_SENTENCES = (
    "what is the weather like today", "tell me a story about a dog", "i think it is going to rain",
    "can you help me with my homework", "the meeting starts at nine", "please turn on the lights",
    "how far is the moon", "my favorite color is blue", "let us go for a walk", "what time is it now",
    "the train was late again", "i would like a cup of tea", "play some music please", "that sounds great",
)
DEFAULT_CONFUSERS = ("stop", "omni", "hey omni", "please stop the music", "omni is great", "do not stop",
                     "stop it", "the bus stop", "go on omni")


@dataclass
class InterruptConfig:
    phrases: tuple = ("stop omni",)
    confusers: tuple = DEFAULT_CONFUSERS
    confuser_prob: float = 0.35          # share of clips (either kind) holding a near miss
    positive_fraction: float = 0.5
    clip_seconds: tuple = (2.5, 5.0)     # target length (longer when the speech needs it)
    max_seconds: float = 8.0
    after_seconds: tuple = (0.5, 1.5)    # audio after the command (positives)
    other_speech: tuple = (0, 2)         # other sentences of the same speaker per clip (min, max)
    gap_seconds: tuple = (0.1, 0.6)
    noise_types: tuple = ("white", "pink", "babble")
    noise_prob: float = 0.8
    snr_db: tuple = (0.0, 20.0)
    tolerance_frames: int = 1
    babble_voices: tuple = (3, 5)

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def labels_for(n_frames: int, command_end_sample: int | None, tolerance_frames: int = 1,
               samples_per_frame: int = SAMPLES_PER_FRAME) -> list[int]:
    """Per-frame labels: 1 from frame (last command sample's frame + tolerance_frames) on, else 0.
    command_end_sample is exclusive (one past the last sample); None = a negative clip (all 0)."""
    if command_end_sample is None:
        return [0] * n_frames
    end_frame = (int(command_end_sample) - 1) // samples_per_frame
    onset = end_frame + tolerance_frames
    return [int(f >= onset) for f in range(n_frames)]


# ---------------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------------

def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f power spectrum: white noise shaped in the frequency domain (amplitude ~ 1/sqrt(f))."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.shape[0], dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spec / np.sqrt(f), n)
    return (x / (x.std() + 1e-12)).astype(np.float32)


def babble_noise(n: int, rng: np.random.Generator, pyrng: random.Random, synth: Synth, voices: VoiceSpace,
                 sentences: Sequence[str], n_voices: tuple = (3, 5), cache: dict | None = None) -> np.ndarray:
    """Several other synthesised sentences in other voices, each looped over the clip from a random
    offset, summed (a crowd talking)."""
    out = np.zeros(n, np.float64)
    for _ in range(pyrng.randint(*n_voices)):
        text, voice = pyrng.choice(list(sentences)), voices.sample(pyrng)
        key = (text, voice)
        if cache is not None and key in cache:
            x = cache[key]
        else:
            x = synth_to(synth, text, voice, SAMPLE_RATE)
            if cache is not None:
                cache[key] = x
        if x.size == 0:
            continue
        reps = int(np.ceil((n + x.size) / x.size)) + 1
        loop = np.tile(np.concatenate([x, np.zeros(int(0.2 * SAMPLE_RATE), np.float32)]), reps)
        start = int(rng.integers(0, x.size))
        out += loop[start:start + n] * rng.uniform(0.5, 1.0)
    return (out / (out.std() + 1e-12)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# one clip
# ---------------------------------------------------------------------------------------------

@dataclass
class Clip:
    wav: np.ndarray                 # float32, 24 kHz, length = n_frames * 2048
    labels: list[int]
    command: str | None
    command_start_sample: int | None
    command_end_sample: int | None
    meta: dict = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return len(self.wav) // SAMPLES_PER_FRAME


def make_clip(synth: Synth, voices: VoiceSpace, sentences: Sequence[str], positive: bool,
              config: InterruptConfig | None = None, seed: int = 0, babble_cache: dict | None = None) -> Clip:
    """One streaming user clip (see the module docstring). Deterministic for a given seed."""
    cfg = config or InterruptConfig()
    pyrng, rng = random.Random(seed), np.random.default_rng(seed)
    sr = SAMPLE_RATE
    speaker = voices.sample(pyrng)

    def say(text: str) -> np.ndarray:
        x = synth_to(synth, text, speaker, sr, trim=False, peak=None)
        return trim_silence(x, sr, threshold_db=-40.0, pad_ms=0.0)

    segs: list[tuple[str, str, np.ndarray]] = []  # (kind, text, wav)
    for _ in range(pyrng.randint(*cfg.other_speech) if positive else max(1, pyrng.randint(*cfg.other_speech))):
        t = pyrng.choice(list(sentences))
        segs.append(("other", t, say(t)))
    confuser = None
    if cfg.confusers and pyrng.random() < cfg.confuser_prob:
        confuser = pyrng.choice(list(cfg.confusers))
        segs.insert(pyrng.randint(0, len(segs)), ("confuser", confuser, say(confuser)))
    command = None
    if positive:
        command = pyrng.choice(list(cfg.phrases))
        segs.insert(pyrng.randint(0, len(segs)), ("command", command, say(command)))

    # lay the segments out in time; drop other speech that would make the clip too long
    max_len = int(cfg.max_seconds * sr)
    while True:
        lead = int(pyrng.uniform(0.1, 0.8) * sr)
        gaps = [int(pyrng.uniform(*cfg.gap_seconds) * sr) for _ in segs]
        starts, t = [], lead
        for (kind, _, x), g in zip(segs, gaps):
            starts.append(t)
            t += x.size + g
        need = t
        if positive:
            k = next(i for i, s in enumerate(segs) if s[0] == "command")
            cmd_end = starts[k] + segs[k][2].size
            last_frame = (cmd_end - 1) // SAMPLES_PER_FRAME  # at least 2 irq frames after the onset
            need = max(need, cmd_end + int(pyrng.uniform(*cfg.after_seconds) * sr),
                       (last_frame + cfg.tolerance_frames + 2) * SAMPLES_PER_FRAME)
        total = max(need, int(pyrng.uniform(*cfg.clip_seconds) * sr))
        others = [i for i, s in enumerate(segs) if s[0] == "other"]
        removable = others if positive else others[1:]  # a negative clip keeps one sentence
        if total <= max_len or not removable:
            break
        segs.pop(removable[-1])
    total = int(np.ceil(total / SAMPLES_PER_FRAME)) * SAMPLES_PER_FRAME

    speech = np.zeros(total, np.float32)
    active = np.zeros(total, bool)
    cmd_start = cmd_end = None
    for (kind, text, x), s in zip(segs, starts):
        x = x[: max(0, total - s)]
        gain = 10 ** (pyrng.uniform(-6.0, 0.0) / 20) if kind != "command" else 10 ** (pyrng.uniform(-3.0, 0.0) / 20)
        peak = np.abs(x).max() if x.size else 1.0
        speech[s:s + x.size] += x / (peak + 1e-9) * gain
        active[s:s + x.size] = True
        if kind == "command":
            cmd_start, cmd_end = s, s + x.size

    noise_type, snr = None, None
    wav = speech
    if cfg.noise_types and pyrng.random() < cfg.noise_prob:
        noise_type = pyrng.choice(list(cfg.noise_types))
        snr = pyrng.uniform(*cfg.snr_db)
        if noise_type == "white":
            noise = white_noise(total, rng)
        elif noise_type == "pink":
            noise = pink_noise(total, rng)
        elif noise_type == "babble":
            noise = babble_noise(total, rng, pyrng, synth, voices, sentences, cfg.babble_voices, babble_cache)
        else:
            raise ValueError(f"unknown noise type {noise_type!r}; use white, pink or babble")
        p_speech = float((speech[active] ** 2).mean()) if active.any() else 1e-4
        p_noise = float((noise ** 2).mean()) + 1e-12
        wav = speech + noise * np.sqrt(p_speech / (p_noise * 10 ** (snr / 10)))
    peak = np.abs(wav).max()
    wav = (wav / (peak + 1e-9) * pyrng.uniform(0.3, 0.95)).astype(np.float32)
    n_frames = total // SAMPLES_PER_FRAME
    labels = labels_for(n_frames, cmd_end, cfg.tolerance_frames)
    meta = {"voice": speaker.name, "noise": noise_type, "snr_db": None if snr is None else round(snr, 2),
            "confuser": confuser, "other_speech": [t for k, t, _ in segs if k == "other"]}
    return Clip(wav, labels, command, cmd_start, cmd_end, meta)


# ---------------------------------------------------------------------------------------------
# a set of clips -> records
# ---------------------------------------------------------------------------------------------

def build_interrupt_set(out_dir, n: int, synth: Synth, voices: VoiceSpace, sentences: Sequence[str] | None = None,
                        codec=None, config: InterruptConfig | None = None, seed: int = 0, prefix: str = "irq",
                        progress: bool = True) -> list[dict]:
    """n clips (positive_fraction of them with the command) -> 'interrupt' records.

    The wavs go to <out_dir>/interrupt/<id>.wav (24 kHz PCM16, the field `listen_audio`); with a codec
    the SNAC frames are filled in (`listen_frames`), else `omnitalk data prepare` encodes them later.
    Extra fields: command, command_start_ms, command_end_ms, noise, snr_db, confuser, voice.
    """
    import soundfile as sf
    from tqdm.auto import tqdm

    cfg = config or InterruptConfig()
    sentences = list(sentences or DEFAULT_OTHER_SENTENCES)
    folder = Path(out_dir) / "interrupt"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_pos = int(round(n * cfg.positive_fraction))
    kinds = [True] * n_pos + [False] * (n - n_pos)
    rng.shuffle(kinds)
    babble_cache: dict = {}
    records = []
    for i, positive in enumerate(tqdm(kinds, desc=f"interrupt clips ({prefix})", unit="clip", disable=not progress)):
        clip = make_clip(synth, voices, sentences, positive, cfg, seed=rng.randrange(2**31), babble_cache=babble_cache)
        rid = f"{prefix}-{i:06d}"
        path = folder / f"{rid}.wav"
        sf.write(str(path), clip.wav, SAMPLE_RATE, subtype="PCM_16")
        frames = None
        if codec is not None:
            frames = encode_audio_file(path, codec)
            if len(frames) != clip.n_frames:
                raise RuntimeError(f"{rid}: the codec made {len(frames)} frames for {clip.n_frames} frames of audio")
            frames = frames.tolist()
        ms = lambda s: None if s is None else round(s / SAMPLE_RATE * 1000, 2)
        records.append(make_record(rid, "interrupt", listen_audio=str(path.resolve()), listen_frames=frames,
                                   labels=clip.labels, command=clip.command,
                                   command_start_ms=ms(clip.command_start_sample),
                                   command_end_ms=ms(clip.command_end_sample),
                                   tolerance_frames=cfg.tolerance_frames, **clip.meta))
    return records
