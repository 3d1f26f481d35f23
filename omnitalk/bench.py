"""Speed, memory and quality measurements behind `omnitalk bench` (issue 5).

Every timing is taken after warm-up with `time.perf_counter` under `torch.inference_mode` (CUDA is
synchronised around each timed call) and reported as median and p90 over the repetitions. Each mode
(and the `--baseline`) runs in a fresh subprocess so that peak memory never mixes across modes; the
machine's memory bandwidth is measured by the parent in the same run.

What is measured (keys of `ModeResult.timings` / `.values`, also the table's rows):

* decode_step: one step of the batch-parallel pair (B=2: item 0 speaks, item 1 leads the text) as the
  engine runs it (`OmniModel.steps`): the time between two consecutive recorded steps, i.e. one forward
  pass, the heads each item needs, sampling and the host sync of the sampled ids;
* prefill_llm_*: LLM prefill of the pair for a 3-second spoken question, without / with an image, from
  ready adapter features (`OmniModel.prefill_logits`); prefill_e2e_*: the same from raw samples (and a
  PIL image): log-mel, Whisper, CLIP, adapters, prompt and prefill;
* whisper / clip: `OmniModel.audio_features` / `.image_features` (the encoders plus their adapter);
* snac_chunk4 / snac_stream4: `Codec.decode` of one 4-frame chunk (reference stream) and the incremental
  decoding of the next 4 frames of a context-mode stream (`omnitalk.snac_stream`, each frame decoded once);
* ttfa_*: time to first audio, raw question samples -> first PCM chunk of `OmniModel.stream`, in both
  stream modes, without / with an image;
* rtf_*: real-time factor of a 20-second spoken answer (235 SNAC frames = 242 pair steps), end to end
  (front end, prefill, decoding, streaming SNAC): wall time / seconds of audio emitted. The same runs give
  the chunk inter-arrival times (p50/p90/max, against the 341 ms a 4-frame chunk lasts), the playback stall
  a listener would hear if playback started at the first chunk, and the share of the stream's wall time
  spent in SNAC;
* memory: RSS after loading (heap trimmed), peak RSS sampled during the measurements, and the peak over
  the process's life (VmHWM; includes building, e.g. the fp32 weights a random int8 model is quantised
  from), plus getrusage's ru_maxrss (which on Linux also carries the parent's peak across fork + exec);
* the floor: bytes of weights one pair step must read (every block tensor, the final norm, the head rows
  of the 152000 text + 7 x 4160 audio logits each read once, the 16 embedding rows; the adapters are not
  used in decode), the KV-cache bytes read at the measured position (reported, not in the floor), the
  floor time = weight bytes / measured read bandwidth, and floor / achieved.

With random weights the rows of the audio specials (`_eoa`, `_pad_a`, ...) of the tied head are zeroed
before quantisation, so the random model never ends its answer or emits an undecodable frame: a 20-second
answer really lasts 20 seconds. (Their input embeddings become zero, which random weights do not mind.)

`--quality` compares each mode with fp32: prefill logit error (max abs and relative L2 over both items'
text + audio logits) and greedy agreement over N steps of a raw pair loop (argmax, no stop or forcing
rules): free-running (fraction of the 8 x N tokens equal, first differing step) and teacher-forced (each
step fed the fp32 tokens; fraction of argmaxes equal).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from omnitalk import kernels
from omnitalk.codec import frames_to_codes
from omnitalk.snac_stream import IncrementalDecoder

SR = 16000                       # question sample rate (Whisper)
SNAC_RATE = 24000
SAMPLES_PER_FRAME = 2048
STRIDE = 4                       # frames per streamed chunk
CHUNK_MS = STRIDE * SAMPLES_PER_FRAME / SNAC_RATE * 1000   # 341.3 ms
STEP_AUDIO_MS = SAMPLES_PER_FRAME / SNAC_RATE * 1000       # 85.3 ms of speech per decode step
DELAY = 7                        # the delay pattern: frame f completes at step f + 7
STREAM_MODES = ("reference", "context")
REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "parity"

# (key, label, unit) - the table's rows, in order
TIMINGS: list[tuple[str, str, str]] = [
    ("decode_step", "decode step (pair, B=2)", "ms"),
    ("prefill_llm_speech", "prefill LLM, 3 s speech", "ms"),
    ("prefill_llm_speech_image", "prefill LLM, speech + image", "ms"),
    ("prefill_e2e_speech", "prefill e2e, speech", "ms"),
    ("prefill_e2e_speech_image", "prefill e2e, speech + image", "ms"),
    ("whisper", "Whisper (mel+enc+adapter)", "ms"),
    ("clip", "CLIP (prep+enc+adapter)", "ms"),
    ("snac_chunk4", "SNAC decode, 4 frames", "ms"),
    ("snac_stream4", "SNAC incremental, 4 frames", "ms"),
    ("ttfa_reference", "first audio, reference", "ms"),
    ("ttfa_context", "first audio, context", "ms"),
    ("ttfa_image_reference", "first audio +image, reference", "ms"),
    ("ttfa_image_context", "first audio +image, context", "ms"),
    ("rtf_reference", "RTF spoken answer, reference", "x"),
    ("rtf_context", "RTF spoken answer, context", "x"),
]
VALUES: list[tuple[str, str, str]] = [
    ("step_realtime_x", "speech per step / step time", "x"),
    ("speedup_vs_baseline", "decode speed-up vs baseline", "x"),
    ("prefill_speedup_vs_baseline", "prefill speed-up vs baseline", "x"),
    ("audio_s_reference", "answer audio, reference", "s"),
    ("audio_s_context", "answer audio, context", "s"),
    ("chunk_gap_p50_reference", "chunk gap p50, reference", "ms"),
    ("chunk_gap_p90_reference", "chunk gap p90, reference", "ms"),
    ("chunk_gap_max_reference", "chunk gap max, reference", "ms"),
    ("chunk_gap_p50_context", "chunk gap p50, context", "ms"),
    ("chunk_gap_p90_context", "chunk gap p90, context", "ms"),
    ("chunk_gap_max_context", "chunk gap max, context", "ms"),
    ("playback_stall_reference", "playback stall, reference", "ms"),
    ("playback_stall_context", "playback stall, context", "ms"),
    ("snac_share_reference", "SNAC share of stream, ref.", "%"),
    ("snac_share_context", "SNAC share of stream, context", "%"),
    ("snac_ms_per_chunk_reference", "SNAC per chunk, reference", "ms"),
    ("snac_ms_per_chunk_context", "SNAC per chunk, context", "ms"),
    ("rss_loaded_mb", "RSS after load", "MB"),
    ("rss_peak_mb", "peak RSS, sampled", "MB"),
    ("peak_rss_life_mb", "peak RSS incl. build (VmHWM)", "MB"),
    ("ru_maxrss_mb", "ru_maxrss", "MB"),
    ("cuda_peak_mb", "CUDA peak allocated", "MB"),
    ("weight_mb_per_step", "weights read per step", "MB"),
    ("kv_mb_per_step", "KV cache read per step", "MB"),
    ("floor_ms", "floor = weights / bandwidth", "ms"),
    ("floor_over_achieved", "floor / achieved", "ratio"),
    ("build_s", "build / load time", "s"),
    ("compile_s", "compile + warm-up of the step (--compile)", "s"),
]
QUALITY: list[tuple[str, str, str]] = [
    ("logit_max_abs", "prefill logits max |err|", ""),
    ("logit_rel_l2", "prefill logits rel. L2 err", ""),
    ("agree_free", "greedy agreement, free-running", "%"),
    ("first_divergence", "first differing step, free", "step"),
    ("agree_teacher", "greedy agreement, teacher-forced", "%"),
]


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class Stat:
    """One timed metric over its repetitions (unit 'ms' or 'x' for ratios)."""
    median: float
    p90: float
    min: float
    max: float
    n: int
    unit: str = "ms"
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: list[float], unit: str = "ms") -> "Stat":
        a = np.asarray(samples, dtype=np.float64)
        return cls(float(np.median(a)), float(np.percentile(a, 90)), float(a.min()), float(a.max()),
                   len(samples), unit, [float(x) for x in samples])


@dataclass
class ModeResult:
    name: str                                     # fp32 / bf16 / int8 / baseline
    timings: dict[str, Stat] = field(default_factory=dict)
    values: dict[str, float | None] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)   # positions, step counts, shapes
    profile: str | None = None
    error: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "ModeResult":
        return cls(d["name"], {k: Stat(**v) for k, v in d["timings"].items()}, d["values"], d["info"],
                   d.get("profile"), d.get("error"))


@dataclass
class QualityRow:
    logit_max_abs: float
    logit_rel_l2: float
    agree_free: float        # fraction of the 8 x steps tokens equal to fp32's, free-running
    first_divergence: int    # first step whose 8 tokens differ (== steps when none does)
    agree_teacher: float     # fraction equal when every step is fed fp32's tokens
    steps: int


@dataclass
class Bandwidth:
    read_gbs: float          # best of: sum over a `gib` GiB fp32 tensor (bytes read / s)
    copy_gbs: float          # best of: copy (bytes read + written / s)
    gib: float
    repeats: int
    device: str


@dataclass
class Machine:
    cpu_model: str
    physical_cores: int
    logical_cpus: int
    mem_total_gb: float
    cpu_capability: str
    cpu_flags: list[str]
    gpu: str | None
    torch_version: str
    numpy_version: str
    python: str
    platform: str
    date: str
    git_commit: str | None
    git_dirty: bool | None
    kernels: str = ""


@dataclass
class BenchConfig:
    checkpoint: str | None = None
    random_weights: bool = False
    preset: str = "mini-omni2"
    modes: list[str] = field(default_factory=lambda: ["fp32", "bf16", "int8"])
    baseline: bool = False
    quality: bool = False
    quality_steps: int = 200
    quality_random_preset: str | None = None
    only: list[str] = field(default_factory=lambda: ["decode", "prefill", "encoders", "snac", "ttfa", "rtf"])
    profile: bool = False
    repeats: int = 10
    warmup: int = 2
    rtf_repeats: int = 3
    answer_seconds: float = 20.0
    question_seconds: float = 3.0
    audio: str | None = None
    image: str | None = None
    whisper_window: str | None = None
    threads: int = 1
    device: str = "cpu"
    compile: bool = False
    seed: int = 0
    bandwidth_gib: float = 1.0
    in_process: bool = False
    json: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchConfig":
        from omnitalk.errors import InputError
        if not args.checkpoint and not args.random_weights:
            raise InputError("say which weights to measure: --random-weights (with --preset) or --checkpoint DIR")
        if args.checkpoint and args.random_weights:
            raise InputError("--checkpoint and --random-weights exclude each other")
        if args.checkpoint and not Path(args.checkpoint).is_dir():
            raise InputError(f"checkpoint directory not found: {args.checkpoint}")
        for what in ("audio", "image"):
            path = getattr(args, what)
            if path and not Path(path).is_file():
                raise InputError(f"{what} file not found: {path}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda asked for, but this PyTorch build sees no CUDA GPU")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in vars(args).items() if k in names and k != "threads"}
        return cls(**kw, modes=args.mode, threads=args.threads or physical_cores())

    @property
    def quality_preset(self) -> str:
        if self.quality_random_preset:
            return self.quality_random_preset
        return self.preset if self.random_weights else "mini-omni2"


@dataclass
class Report:
    machine: Machine
    bandwidth: Bandwidth
    config: BenchConfig
    results: dict[str, ModeResult]
    quality: dict[str, dict[str, QualityRow]] | None = None
    wall_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# Machine, memory, bandwidth
# ---------------------------------------------------------------------------------------------
def _cpuinfo() -> list[dict[str, str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    cpus = []
    for block in text.strip().split("\n\n"):
        d = {}
        for line in block.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                d[k.strip()] = v.strip()
        cpus.append(d)
    return cpus


def logical_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Usable physical cores: usable logical CPUs / hardware threads per core."""
    cpus = _cpuinfo()
    per_core = 1
    if cpus and "siblings" in cpus[0] and "cpu cores" in cpus[0]:
        per_core = max(1, int(cpus[0]["siblings"]) // max(1, int(cpus[0]["cpu cores"])))
    return max(1, logical_cpus() // per_core)


def _git(*args: str) -> str | None:
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str) -> Machine:
    cpus = _cpuinfo()
    model = cpus[0].get("model name", "") if cpus else ""
    flags = set(cpus[0].get("flags", "").split()) if cpus else set()
    interesting = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8"]
    mem = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 1e6
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return Machine(
        cpu_model=model or platform.processor() or platform.machine(), physical_cores=physical_cores(),
        logical_cpus=logical_cpus(), mem_total_gb=round(mem, 1),
        cpu_capability=str(torch.backends.cpu.get_cpu_capability()),
        cpu_flags=[f for f in interesting if f in flags], gpu=gpu, torch_version=torch.__version__,
        numpy_version=np.__version__, python=platform.python_version(), platform=platform.platform(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=_git("rev-parse", "HEAD"), git_dirty=None if status is None else bool(status),
        kernels=kernels.info())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: str = "cpu", gib: float = 1.0, repeats: int = 5) -> Bandwidth:
    """Best-of-`repeats` read (sum) and copy bandwidth over a `gib` GiB float32 tensor, in GB/s (1e9)."""
    n = int(gib * 2**30) // 4
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    read = copy = math.inf
    with torch.inference_mode():
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            x.sum()
            _sync(device)
            read = min(read, time.perf_counter() - t)
            t = time.perf_counter()
            y.copy_(x)
            _sync(device)
            copy = min(copy, time.perf_counter() - t)
    del x, y
    return Bandwidth(4 * n / read / 1e9, 8 * n / copy / 1e9, gib, repeats, device)


def rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def ru_maxrss_bytes() -> int:
    """getrusage's ru_maxrss. On Linux it carries the peak of the process image *before* execve (for a
    child started by fork + exec: the parent's peak), so `peak_rss_bytes` prefers VmHWM."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def peak_rss_bytes() -> int:
    """This process's peak RSS since it started (Linux VmHWM; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return ru_maxrss_bytes()


def trim_heap() -> None:
    """Give freed heap back to the OS (glibc keeps freed blocks < 32 MB, e.g. the fp32 weights of a
    model just quantised), so the RSS after loading shows what the model holds."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Samples this process's RSS every `interval` seconds in a background thread; `peak` in bytes."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes() or 0)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() or 0)


def _mb(n: float | None) -> float | None:
    return None if n is None else n / 1e6


# ---------------------------------------------------------------------------------------------
# Inputs and models
# ---------------------------------------------------------------------------------------------
def make_question(seconds: float, seed: int = 0) -> np.ndarray:
    """A speech-like 16 kHz signal: a gliding harmonic voice with a syllable envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voice = sum(np.sin(k * phase) / k for k in range(1, 9)) * (0.55 + 0.45 * np.sin(2 * np.pi * 3.1 * t))
    return (0.1 * voice + 0.005 * rng.standard_normal(t.size)).astype(np.float32)


def make_image(seed: int = 0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))


@dataclass
class Inputs:
    question: np.ndarray     # float32 samples at 16 kHz
    image: object            # PIL image


def load_inputs(cfg: BenchConfig) -> Inputs:
    from omnitalk import audio as audio_io
    from omnitalk import vision
    question = audio_io.load_audio(cfg.audio) if cfg.audio else make_question(cfg.question_seconds, cfg.seed)
    image = vision.load_image(cfg.image, convert_rgb=False) if cfg.image else make_image(cfg.seed)
    return Inputs(question, image)


def silence_audio_specials(model) -> None:
    """Zero the tied-head rows of every audio layer's special ids (fp32, before quantisation)."""
    L, wte = model.layout, model.lm.transformer.wte.weight
    n = L.audio_vocab_size - L.codebook_size
    with torch.no_grad():
        for j in range(L.n_audio_layers):
            start = L.audio_offset(j) + L.codebook_size
            wte[start:start + n] = 0


def build_random(preset: str, mode: str, seed: int, device: str):
    """Random weights of `preset`'s shapes in `mode`; returns (model, {phase: seconds})."""
    from omnitalk.engine import OmniModel, encoder_dtype
    from omnitalk.quant import quantize_lm
    t0 = time.perf_counter()
    model = OmniModel.from_random(preset, seed=seed, device=device, mode="fp32")
    t1 = time.perf_counter()
    silence_audio_specials(model)
    model.lm = quantize_lm(model.lm, mode)
    model.set_encoder_dtype(encoder_dtype(mode, model.device))
    t2 = time.perf_counter()
    return model, {"build_random_fp32_s": t1 - t0, "quantize_s": t2 - t1}


def build_model(cfg: BenchConfig, mode: str):
    if cfg.checkpoint:
        from omnitalk.engine import OmniModel
        t0 = time.perf_counter()
        model = OmniModel.from_pretrained(cfg.checkpoint, device=cfg.device, mode=mode, download=False)
        times = {"load_s": time.perf_counter() - t0}
    else:
        model, times = build_random(cfg.preset, mode, cfg.seed, cfg.device)
    if cfg.whisper_window:
        model.whisper_window = cfg.whisper_window
    return model, times


def _log(name: str, msg: str) -> None:
    print(f"[bench {name}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------
def repeat(run_once: Callable[[], float], repeats: int, warmup: int, unit: str = "ms") -> Stat:
    """`run_once` returns one measurement in seconds (or a ratio for unit 'x')."""
    for _ in range(warmup):
        run_once()
    scale = 1000.0 if unit == "ms" else 1.0
    return Stat.of([run_once() * scale for _ in range(repeats)], unit)


def timer(fn: Callable[[], object], device: str) -> Callable[[], float]:
    def run_once() -> float:
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t
    return run_once


class CodecTimer:
    """Adds up the wall time spent decoding SNAC while active: `codec.decode` (reference stream, or a
    codec without an incremental form) and `IncrementalDecoder.feed` (context stream)."""

    def __init__(self, codec, device: str):
        self.codec, self.device, self.seconds, self.calls = codec, device, 0.0, 0

    def _timed(self, fn):
        def wrapped(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                _sync(self.device)
                self.seconds += time.perf_counter() - t
                self.calls += 1
        return wrapped

    def __enter__(self) -> "CodecTimer":
        self.codec.decode = self._timed(self.codec.decode)
        self.feed = IncrementalDecoder.feed
        IncrementalDecoder.feed = self._timed(self.feed)
        return self

    def __exit__(self, *exc) -> None:
        del self.codec.decode
        IncrementalDecoder.feed = self.feed


# ---------------------------------------------------------------------------------------------
# Measurements of our engine
# ---------------------------------------------------------------------------------------------
def decode_step_times(model, req, n: int, device: str) -> tuple[list[float], list[int]]:
    """Seconds between consecutive recorded steps of the engine's pair loop, n of them, and the
    position each step's forward pass ran at. Restarts the request if an answer ends early."""
    T = req.prompts[0].length
    times, positions = [], []
    while len(times) < n:
        gen = model.steps(req, max_tokens=n - len(times) + 1)
        next(gen)  # step 0 comes from the prefill
        t, k = time.perf_counter(), 0
        for _ in gen:
            _sync(device)
            now = time.perf_counter()
            times.append(now - t)
            positions.append(T + k)
            t, k = now, k + 1
        gen.close()
    return times[:n], positions[:n]


@dataclass
class StreamRun:
    total_s: float                 # raw samples in -> stream exhausted (or first audio, if stopped there)
    arrivals: list[float]          # seconds after the start, one per chunk carrying audio
    durations: list[float]         # seconds of audio in each of those chunks
    snac_s: float
    snac_calls: int

    @property
    def audio_s(self) -> float:
        return sum(self.durations)

    def gaps_ms(self) -> list[float]:
        return [(b - a) * 1000 for a, b in zip(self.arrivals, self.arrivals[1:])]

    def stall_ms(self) -> float:
        """Silence a listener hears if playback starts at the first chunk and plays chunks back to back."""
        if not self.arrivals:
            return 0.0
        play_end, stall = self.arrivals[0], 0.0
        for arrival, dur in zip(self.arrivals, self.durations):
            if arrival > play_end:
                stall += arrival - play_end
                play_end = arrival
            play_end += dur
        return stall * 1000


def run_stream(model, inputs: Inputs, stream_mode: str, max_tokens: int, image: bool = False,
               first_only: bool = False, device: str = "cpu") -> StreamRun:
    arrivals, durations = [], []
    with CodecTimer(model.codec, device) as snac:
        _sync(device)
        t0 = time.perf_counter()
        gen = model.stream(audio=inputs.question, sr=SR, image=inputs.image if image else None,
                           stream_mode=stream_mode, max_tokens=max_tokens, stride=STRIDE)
        for chunk in gen:
            if chunk.audio.size:
                arrivals.append(time.perf_counter() - t0)
                durations.append(chunk.audio.size / SNAC_RATE)
                if first_only:
                    break
        gen.close()
        total = time.perf_counter() - t0
    return StreamRun(total, arrivals, durations, snac.seconds, snac.calls)


def answer_steps(seconds: float) -> int:
    """Pair steps that produce `seconds` of speech: ceil(seconds / 85.3 ms) frames + the 7-step delay."""
    return math.ceil(seconds * SNAC_RATE / SAMPLES_PER_FRAME) + DELAY


def measure_decode(model, cfg: BenchConfig, inputs: Inputs, res: ModeResult) -> None:
    req = model.request(audio=inputs.question, sr=SR)
    times, positions = decode_step_times(model, req, cfg.warmup + cfg.repeats, cfg.device)
    res.timings["decode_step"] = Stat.of([t * 1000 for t in times[cfg.warmup:]])
    res.info["prompt_length"] = req.prompts[0].length
    res.info["decode_positions"] = [positions[cfg.warmup], positions[-1]]


def measure_prefill(model, cfg: BenchConfig, inputs: Inputs, res: ModeResult) -> None:
    q, img, dev = inputs.question, inputs.image, cfg.device
    req_s = model.request(audio=q, sr=SR)
    req_si = model.request(audio=q, sr=SR, image=img)
    res.info["prompt_length_image"] = req_si.prompts[0].length
    rep = dict(repeats=cfg.repeats, warmup=cfg.warmup)
    res.timings["prefill_llm_speech"] = repeat(timer(lambda: model.prefill_logits(req_s), dev), **rep)
    res.timings["prefill_llm_speech_image"] = repeat(timer(lambda: model.prefill_logits(req_si), dev), **rep)
    res.timings["prefill_e2e_speech"] = repeat(
        timer(lambda: model.prefill_logits(model.request(audio=q, sr=SR)), dev), **rep)
    res.timings["prefill_e2e_speech_image"] = repeat(
        timer(lambda: model.prefill_logits(model.request(audio=q, sr=SR, image=img)), dev), **rep)
    model.lm.clear_cache()


def measure_encoders(model, cfg: BenchConfig, inputs: Inputs, res: ModeResult) -> None:
    rep = dict(repeats=cfg.repeats, warmup=cfg.warmup)
    res.timings["whisper"] = repeat(timer(lambda: model.audio_features(inputs.question, sr=SR), cfg.device), **rep)
    res.timings["clip"] = repeat(timer(lambda: model.image_features(inputs.image), cfg.device), **rep)


def measure_snac(model, cfg: BenchConfig, inputs: Inputs, res: ModeResult) -> None:
    rng = np.random.default_rng(cfg.seed)
    rep = dict(repeats=cfg.repeats, warmup=cfg.warmup)
    frames = rng.integers(0, 4096, (4, 7))
    res.timings["snac_chunk4"] = repeat(timer(lambda: model.codec.decode(frames), cfg.device), **rep)
    if model.codec.incremental_ok:
        stream, codes = IncrementalDecoder(model.codec.model), frames_to_codes(frames)
        stream.feed(codes)  # the first call only fills the convolutions' left context
        res.timings["snac_stream4"] = repeat(timer(lambda: stream.feed(codes), cfg.device), **rep)


def measure_ttfa(model, cfg: BenchConfig, inputs: Inputs, res: ModeResult) -> None:
    steps = answer_steps(2 * CHUNK_MS / 1000)  # enough for the first chunk in either stream mode
    for image in (False, True):
        for sm in STREAM_MODES:
            def once() -> float:
                run = run_stream(model, inputs, sm, steps, image=image, first_only=True, device=cfg.device)
                return run.arrivals[0] if run.arrivals else math.nan
            key = f"ttfa_image_{sm}" if image else f"ttfa_{sm}"
            res.timings[key] = repeat(once, cfg.repeats, cfg.warmup)


def measure_rtf(model, cfg: BenchConfig, inputs: Inputs, res: ModeResult) -> None:
    steps = answer_steps(cfg.answer_seconds)
    res.info["answer_steps"] = steps
    for sm in STREAM_MODES:
        runs = [run_stream(model, inputs, sm, steps, device=cfg.device) for _ in range(cfg.rtf_repeats)]
        res.timings[f"rtf_{sm}"] = Stat.of([r.total_s / r.audio_s if r.audio_s else math.nan for r in runs], "x")
        gaps = [g for r in runs for g in r.gaps_ms()]
        if gaps:
            res.values[f"chunk_gap_p50_{sm}"] = float(np.percentile(gaps, 50))
            res.values[f"chunk_gap_p90_{sm}"] = float(np.percentile(gaps, 90))
            res.values[f"chunk_gap_max_{sm}"] = float(np.max(gaps))
        res.values[f"playback_stall_{sm}"] = float(np.median([r.stall_ms() for r in runs]))
        res.values[f"audio_s_{sm}"] = float(np.median([r.audio_s for r in runs]))
        res.values[f"snac_share_{sm}"] = 100 * sum(r.snac_s for r in runs) / sum(r.total_s for r in runs)
        calls = sum(r.snac_calls for r in runs)
        res.values[f"snac_ms_per_chunk_{sm}"] = 1000 * sum(r.snac_s for r in runs) / calls if calls else None
        res.info[f"stream_total_s_{sm}"] = [r.total_s for r in runs]
        res.info[f"snac_total_s_{sm}"] = [r.snac_s for r in runs]


GROUP_FUNCS: dict[str, Callable] = {
    "decode": measure_decode, "prefill": measure_prefill, "encoders": measure_encoders,
    "snac": measure_snac, "ttfa": measure_ttfa, "rtf": measure_rtf,
}


def decode_weight_bytes(lm) -> int:
    """Bytes of weights one pair step reads: every block tensor (int8 weights and their scales, biases,
    norms), the final norm, every head row once (text rows for item 1, audio rows for item 0: together the
    whole tied table, with its scales) and the 16 embedding rows looked up. Adapters are not read."""
    blocks = lm.transformer.h
    n = sum(t.nbytes for name, t in [*blocks.named_parameters(), *blocks.named_buffers()]
            if "kv_cache" not in name)
    n += lm.transformer.ln_f.weight.nbytes
    wte = lm.transformer.wte
    table = wte.weight.nbytes + (wte.scales.nbytes if hasattr(wte, "scales") else 0)
    row = table // wte.weight.size(0)
    return n + table + 2 * lm.cfg.n_streams * row


def kv_read_bytes(n_layer: int, batch: int, heads: int, positions: int, head_size: int, elem: int) -> int:
    return n_layer * 2 * batch * heads * positions * head_size * elem


def profile_decode(model, req, steps: int, device: str) -> str:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    gen = model.steps(req, max_tokens=steps + 3)
    next(gen), next(gen)
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            next(gen)
    gen.close()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=25, max_name_column_width=40,
                                                              max_shapes_column_width=60)


def run_mode(cfg: BenchConfig, mode: str) -> ModeResult:
    """Everything for one mode, in this process (call it in a fresh one for clean memory numbers)."""
    torch.set_num_threads(cfg.threads)
    res = ModeResult(mode)
    _log(mode, "building the model")
    t0 = time.perf_counter()
    model, phases = build_model(cfg, mode)
    res.values["build_s"] = time.perf_counter() - t0
    res.info.update(phases)
    if cfg.compile:
        _log(mode, "compiling the decode step")
        t0 = time.perf_counter()
        model.lm.compile_decode()
        res.values["compile_s"] = time.perf_counter() - t0
    inputs = load_inputs(cfg)
    trim_heap()
    with torch.inference_mode():
        model.generate(audio=inputs.question, sr=SR, image=inputs.image, max_tokens=DELAY + STRIDE + 1)
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res.values["rss_loaded_mb"] = _mb(rss_bytes())
    with RssSampler() as rss, torch.inference_mode():
        for group in cfg.only:
            _log(mode, f"measuring {group}")
            t = time.perf_counter()
            GROUP_FUNCS[group](model, cfg, inputs, res)
            res.info[f"group_{group}_s"] = time.perf_counter() - t
    res.values["rss_peak_mb"] = _mb(rss.peak)
    res.values["peak_rss_life_mb"] = _mb(peak_rss_bytes())
    res.values["ru_maxrss_mb"] = _mb(ru_maxrss_bytes())
    if cfg.device == "cuda":
        res.values["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 1e6
    lm, c = model.lm, model.cfg
    res.values["weight_mb_per_step"] = _mb(decode_weight_bytes(lm))
    positions = res.info.get("decode_positions") or [model.request(audio=inputs.question, sr=SR).prompts[0].length]
    S = int(np.mean(positions)) + 1  # keys visible at the middle measured step
    elem = torch.empty(0, dtype=lm.act_dtype).element_size()
    res.values["kv_mb_per_step"] = _mb(kv_read_bytes(c.n_layer, 2, c.n_query_groups, S, c.head_size, elem))
    if cfg.profile:
        _log(mode, "profiling the decode step")
        with torch.inference_mode():
            res.profile = profile_decode(model, model.request(audio=inputs.question, sr=SR), cfg.repeats, cfg.device)
    return res


# ---------------------------------------------------------------------------------------------
# The baseline: the same decode-step workload the way the release runs it
# ---------------------------------------------------------------------------------------------
def reference_llm(model):
    """omnitalk.testing.reference.ReferenceLLM over `model`'s fp32 LLM tensors (shared, not copied)."""
    from omnitalk.testing.reference import ReferenceLLM
    lm = model.lm
    if lm.act_dtype != torch.float32:
        raise ValueError("the baseline runs on fp32 weights")
    weights = {k: v for k, v in lm.state_dict(keep_vars=False).items()}
    return ReferenceLLM(model.cfg.to_dict(), weights, model.device)


@dataclass
class ReferenceInputs:
    ids: list[torch.Tensor]               # 8 rows (B=2, T), the release's prompt
    whisper: torch.Tensor                 # (2, L, d) raw Whisper features
    lens: list[int]
    labels: list[str]
    clip: torch.Tensor | None = None      # (2, 50, d) raw CLIP features


def reference_inputs(model, inputs: Inputs, image: bool) -> ReferenceInputs:
    from omnitalk import audio as audio_io
    from omnitalk import vision
    from omnitalk.model.whisper import encode as whisper_encode
    from omnitalk.testing import reference as ref
    L = audio_io.num_whisper_frames(len(inputs.question))
    w = whisper_encode(model.whisper, audio_io.log_mel_spectrogram(inputs.question))[0, :L]
    pair = torch.stack([w, w])
    if not image:
        ids = ref.prompt_speech_pair(L)
        return ReferenceInputs(ids, pair, [ids[0].size(1) - 3] * 2, ["A1T2", "A1T2"])
    x = vision.preprocess_image(inputs.image, size=model.clip.dims.image_resolution)[None].to(model.device)
    c = model.clip(x)[0]
    return ReferenceInputs(ref.prompt_image_speech_pair(L), pair, [L, L], ["ImageQA_A", "ImageQA_AT"],
                           torch.stack([c, c]))


def reference_prefill(llm, ri: ReferenceInputs):
    llm.set_kv_cache(2)
    T = ri.ids[0].size(1)
    return llm.forward(ri.ids, torch.arange(0, T), ri.whisper, ri.clip, ri.lens, ri.labels)


def reference_pair_steps(llm, ri: ReferenceInputs, n: int) -> Iterator[None]:
    """Prefill, then n decode steps exactly as the release's batch stream loop does them (feed rows built
    with torch.tensor, full forward with the masked 2048-slot cache, all logits of both items, the
    release's sampling per row); yields after each step."""
    from omnitalk.testing import reference as ref
    s = ref.Sampling()
    logits_a, logit_t = reference_prefill(llm, ri)
    audio = [ref.sample(la[0, -1], s) for la in logits_a]
    text = ref.sample(logit_t[1, -1], s)
    pos = ri.ids[0].size(1)
    for _ in range(n):
        feed = [torch.tensor([[ref.layershift(audio[i], i)], [ref.layershift(ref.PAD_A, i)]])
                for i in range(ref.N_AUDIO)] + [torch.tensor([[text], [text]])]
        logits_a, logit_t = llm.forward(feed, torch.tensor([pos]))
        audio = [ref.sample(la[0, -1], s) for la in logits_a]
        text = ref.sample(logit_t[1, -1], s)
        pos += 1
        yield
    llm.clear_kv_cache()


def run_baseline(cfg: BenchConfig) -> ModeResult:
    torch.set_num_threads(cfg.threads)
    res = ModeResult("baseline")
    _log("baseline", "building the model (fp32)")
    t0 = time.perf_counter()
    model, phases = build_model(cfg, "fp32")
    llm = reference_llm(model)
    res.values["build_s"] = time.perf_counter() - t0
    res.info.update(phases)
    inputs = load_inputs(cfg)
    trim_heap()
    dev = cfg.device
    with torch.inference_mode():
        ri_s, ri_si = reference_inputs(model, inputs, False), reference_inputs(model, inputs, True)
        for _ in reference_pair_steps(llm, ri_s, 2):  # warm-up
            pass
    res.values["rss_loaded_mb"] = _mb(rss_bytes())
    T = ri_s.ids[0].size(1)
    with RssSampler() as rss, torch.inference_mode():
        if "decode" in cfg.only:
            _log("baseline", "measuring decode")
            n = 1 + cfg.warmup + cfg.repeats  # the first interval holds the prefill
            times, t = [], time.perf_counter()
            for _ in reference_pair_steps(llm, ri_s, n):
                _sync(dev)
                now = time.perf_counter()
                times.append((now - t) * 1000)
                t = now
            res.timings["decode_step"] = Stat.of(times[1 + cfg.warmup:])
            res.info["decode_positions"] = [T + 1 + cfg.warmup, T + n - 1]
        if "prefill" in cfg.only:
            _log("baseline", "measuring prefill")
            rep = dict(repeats=cfg.repeats, warmup=cfg.warmup)
            res.timings["prefill_llm_speech"] = repeat(timer(lambda: reference_prefill(llm, ri_s), dev), **rep)
            res.timings["prefill_llm_speech_image"] = repeat(timer(lambda: reference_prefill(llm, ri_si), dev), **rep)
            llm.clear_kv_cache()
    res.values["rss_peak_mb"] = _mb(rss.peak)
    res.values["peak_rss_life_mb"] = _mb(peak_rss_bytes())
    res.values["ru_maxrss_mb"] = _mb(ru_maxrss_bytes())
    # the same weights as fp32 (blocks, final norm, the whole tied table once, 16 embedding rows) ...
    res.values["weight_mb_per_step"] = _mb(decode_weight_bytes(model.lm))
    # ... and all 2048 slots of every expanded head, for both items, every step
    c = model.cfg
    heads = 1 if c.n_query_groups == 1 else c.n_head
    res.values["kv_mb_per_step"] = _mb(kv_read_bytes(c.n_layer, 2, heads, c.block_size, c.head_size, 4))
    res.info["prompt_length"] = T
    return res


# ---------------------------------------------------------------------------------------------
# Quality against fp32
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def greedy_pair(model, req, steps: int, forced: np.ndarray | None = None) -> np.ndarray:
    """A raw greedy pair loop (no stop or forcing rules): (steps, 8) int64, 7 audio ids of item 0 (local)
    and item 1's text id per step. `forced` (steps, 8): feed these tokens instead of the loop's own."""
    lm, L = model.lm, model.layout
    dev = model.device
    T = req.prompts[0].length
    steps = min(steps, lm.cfg.block_size - T)
    lm.setup_cache(2, T + steps)
    ids = torch.as_tensor(np.stack([p.ids for p in req.prompts]), device=dev)
    feats = [(p, f.to(dev).expand(2, -1, -1)) for p, f in req.features]
    h = lm.forward_hidden(lm.embed(ids, feats), 0)[:, -1]
    offsets = torch.tensor([L.audio_offset(j) for j in range(L.n_audio_layers)], device=dev)
    nxt = torch.empty(2, L.n_streams, 1, dtype=torch.long, device=dev)
    nxt[1, :L.n_audio_layers, 0] = offsets + L.pad_a
    out = np.zeros((steps, L.n_streams), dtype=np.int64)
    for k in range(steps):
        audio = lm.audio_logits(h[0]).argmax(-1)
        text = lm.text_logits(h[1]).argmax(-1)
        out[k, :-1], out[k, -1] = audio.cpu().numpy(), int(text)
        if k == steps - 1:
            break
        feed = torch.as_tensor(forced[k], device=dev) if forced is not None else torch.as_tensor(out[k], device=dev)
        nxt[0, :L.n_audio_layers, 0] = feed[:-1] + offsets
        nxt[:, L.n_audio_layers, 0] = feed[-1]
        h = lm.forward_hidden(lm.embed(nxt), T + k)[:, -1]
    lm.clear_cache()
    return out


def _prefill_vector(model, req) -> torch.Tensor:
    t, a = model.prefill_logits(req)
    return torch.cat([t.reshape(-1), a.reshape(-1)]).double()


def quality_against_fp32(build: Callable[[str], object], question: np.ndarray, modes: list[str],
                         steps: int, name: str) -> dict[str, QualityRow]:
    _log("quality", f"{name}: fp32 reference")
    ref_model = build("fp32")
    req = ref_model.request(audio=question, sr=SR)
    ref_logits = _prefill_vector(ref_model, req)
    ref_tokens = greedy_pair(ref_model, req, steps)
    del ref_model, req
    trim_heap()
    rows = {}
    for mode in modes:
        if mode == "fp32":
            continue
        _log("quality", f"{name}: {mode}")
        m = build(mode)
        req = m.request(audio=question, sr=SR)
        diff = _prefill_vector(m, req) - ref_logits
        free = greedy_pair(m, req, steps)
        teacher = greedy_pair(m, req, steps, forced=ref_tokens)
        n = min(len(free), len(ref_tokens))
        differ = np.flatnonzero((free[:n] != ref_tokens[:n]).any(axis=1))
        rows[mode] = QualityRow(
            logit_max_abs=float(diff.abs().max()),
            logit_rel_l2=float(diff.norm() / ref_logits.norm().clamp(min=1e-30)),
            agree_free=float((free[:n] == ref_tokens[:n]).mean()),
            first_divergence=int(differ[0]) if differ.size else n,
            agree_teacher=float((teacher[:n] == ref_tokens[:n]).mean()), steps=n)
        del m, req
        trim_heap()
    return rows


def run_quality(cfg: BenchConfig, fixture: Path = FIXTURE) -> dict[str, dict[str, QualityRow]]:
    from omnitalk import audio as audio_io
    from omnitalk.engine import OmniModel
    torch.set_num_threads(cfg.threads)
    out = {}
    ckpt = fixture / "checkpoint"
    if ckpt.is_dir():
        question = audio_io.load_audio(fixture / "inputs" / "question.wav")
        out["fixture"] = quality_against_fp32(
            lambda mode: OmniModel.from_pretrained(ckpt, device=cfg.device, mode=mode, download=False),
            question, cfg.modes, cfg.quality_steps, "fixture")
    else:
        _log("quality", f"no parity fixture at {fixture}; skipped")
    preset = cfg.quality_preset
    out[f"random-{preset}"] = quality_against_fp32(
        lambda mode: build_random(preset, mode, cfg.seed, cfg.device)[0],
        make_question(cfg.question_seconds, cfg.seed), cfg.modes, cfg.quality_steps, f"random-{preset}")
    return out


# ---------------------------------------------------------------------------------------------
# Orchestration: one fresh process per mode
# ---------------------------------------------------------------------------------------------
def _run_task(task: str, cfg: BenchConfig):
    if task == "bandwidth":
        torch.set_num_threads(cfg.threads)
        return asdict(measure_bandwidth(cfg.device, cfg.bandwidth_gib))
    if task == "quality":
        return {k: {m: asdict(r) for m, r in rows.items()} for k, rows in run_quality(cfg).items()}
    if task == "baseline":
        return asdict(run_baseline(cfg))
    return asdict(run_mode(cfg, task))


def run_isolated(task: str, cfg: BenchConfig):
    """Run one task (a mode, 'baseline', 'quality' or 'bandwidth') in a fresh Python process (so its
    memory peaks are its own and the next one starts clean); its JSON result."""
    if cfg.in_process:
        try:
            return _run_task(task, cfg)
        finally:
            trim_heap()
    with tempfile.TemporaryDirectory(prefix="omnitalk-bench-") as d:
        job, out = Path(d) / "job.json", Path(d) / "out.json"
        job.write_text(json.dumps({"task": task, "config": asdict(cfg)}))
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
        proc = subprocess.run([sys.executable, "-m", "omnitalk.bench", "--worker", str(job), str(out)], env=env)
        if out.is_file():
            return json.loads(out.read_text())
        return {"error": f"worker for {task!r} exited with code {proc.returncode} and wrote no result"}


def _worker_main(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    cfg = BenchConfig(**job["config"])
    try:
        result = _run_task(job["task"], cfg)
        code = 0
    except Exception:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        result, code = {"error": tb.strip().splitlines()[-1], "traceback": tb}, 1
    Path(out_path).write_text(json.dumps(result))
    return code


def _as_mode_result(task: str, d: dict) -> ModeResult:
    if "name" in d:
        return ModeResult.from_dict(d)
    return ModeResult(task, error=d.get("error", "unknown error"))


def add_derived(results: dict[str, ModeResult], bw: Bandwidth) -> None:
    base = results.get("baseline")
    for r in results.values():
        step = r.timings.get("decode_step")
        if step:
            r.values["step_realtime_x"] = STEP_AUDIO_MS / step.median
        w = r.values.get("weight_mb_per_step")
        if w:
            r.values["floor_ms"] = w * 1e6 / (bw.read_gbs * 1e9) * 1000
            if step:
                r.values["floor_over_achieved"] = r.values["floor_ms"] / step.median
        if base and r is not base:
            pairs = (("decode_step", "speedup_vs_baseline"), ("prefill_llm_speech", "prefill_speedup_vs_baseline"))
            for key, out in pairs:
                if key in r.timings and key in base.timings:
                    r.values[out] = base.timings[key].median / r.timings[key].median


def run(cfg: BenchConfig) -> Report:
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    machine = machine_info(cfg.device)
    _log("main", f"{machine.cpu_model}, {machine.physical_cores} cores, torch {machine.torch_version}, "
                 f"{cfg.threads} threads; measuring memory bandwidth")
    bw = run_isolated("bandwidth", cfg)
    if "error" in bw:
        raise RuntimeError(f"measuring the memory bandwidth failed: {bw['error']}")
    bw = Bandwidth(**bw)
    _log("main", f"read {bw.read_gbs:.1f} GB/s, copy {bw.copy_gbs:.1f} GB/s")
    results = {}
    for task in cfg.modes + (["baseline"] if cfg.baseline else []):
        results[task] = _as_mode_result(task, run_isolated(task, cfg))
    quality = None
    if cfg.quality:
        q = run_isolated("quality", cfg)
        if "error" in q:
            _log("quality", f"failed: {q['error']}")
            quality = {}
        else:
            quality = {src: {m: QualityRow(**r) for m, r in rows.items()} for src, rows in q.items()}
    add_derived(results, bw)
    return Report(machine, bw, cfg, results, quality, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _fmt(x: float | None, unit: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if unit in ("x", "ratio"):
        return f"{x:.3f}" if x < 10 else f"{x:.1f}"
    if unit == "%":
        return f"{x:.1f}"
    if unit in ("step", ""):
        return f"{x:.3g}" if isinstance(x, float) else str(x)
    return f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}"


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    cols = list(report.results)
    rows = []
    for key, label, unit in TIMINGS:
        stats = [report.results[c].timings.get(key) for c in cols]
        if any(stats):
            rows.append([label, f"{unit} med/p90"] + [f"{_fmt(s.median, unit)} / {_fmt(s.p90, unit)}" if s else "-"
                                                     for s in stats])
    for key, label, unit in VALUES:
        vals = [report.results[c].values.get(key) for c in cols]
        if any(v is not None for v in vals):
            rows.append([label, unit] + [_fmt(v, unit) for v in vals])
    for source, qrows in (report.quality or {}).items():
        for key, label, unit in QUALITY:
            vals = []
            for c in cols:
                q = qrows.get(c)
                v = None if q is None else getattr(q, key)
                vals.append(("ref" if c == "fp32" else "-") if q is None else
                            _fmt(100 * v if unit == "%" else v, unit))
            rows.append([f"{label} [{source}]", unit] + vals)
    errors = [f"{c}: {r.error}" for c, r in report.results.items() if r.error]
    if errors:
        rows.append(["error", ""] + [("yes" if report.results[c].error else "") for c in cols])
    return ["metric", "unit"] + cols, rows


def render(report: Report) -> str:
    m, bw, cfg = report.machine, report.bandwidth, report.config
    weights = (cfg.checkpoint or f"random {cfg.preset}") + \
        (f", Whisper window {cfg.whisper_window}" if cfg.whisper_window else "")
    lines = [
        f"omnitalk bench - {m.date} - commit {(m.git_commit or 'unknown')[:10]}{' (dirty)' if m.git_dirty else ''}",
        f"machine: {m.cpu_model}, {m.physical_cores} physical cores / {m.logical_cpus} logical, "
        f"{m.mem_total_gb} GB, {m.cpu_capability} {' '.join(m.cpu_flags)}" + (f", GPU {m.gpu}" if m.gpu else ""),
        f"torch {m.torch_version}, {cfg.threads} threads, device {cfg.device}"
        f"{', decode step torch.compile-d' if cfg.compile else ''}; weights: {weights}; "
        f"repeats {cfg.repeats} (+{cfg.warmup} warm-up), RTF repeats {cfg.rtf_repeats}; {m.kernels}",
        f"memory bandwidth: read {bw.read_gbs:.1f} GB/s, copy {bw.copy_gbs:.1f} GB/s (best of {bw.repeats}, "
        f"{bw.gib:g} GiB); a step is {STEP_AUDIO_MS:.1f} ms of speech, a chunk {CHUNK_MS:.1f} ms",
        "",
    ]
    header, rows = table_rows(report)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines.append(fmt_row(header))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt_row(r) for r in rows]
    for name, r in report.results.items():
        if r.error:
            lines.append(f"{name} failed: {r.error}")
        if r.profile:
            lines += ["", f"decode-step profile, {name}:", r.profile]
    lines.append(f"\n(total {report.wall_s:.0f} s)")
    return "\n".join(lines)


def report_dict(report: Report) -> dict:
    return asdict(report)


def run_from_args(args: argparse.Namespace) -> int:
    cfg = BenchConfig.from_args(args)
    report = run(cfg)
    print(render(report), flush=True)
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report_dict(report), indent=1))
        print(f"wrote {cfg.json}")
    return 1 if any(r.error for r in report.results.values()) else 0


def main(argv: list[str] | None = None) -> int:
    from omnitalk.bench_cli import add_arguments
    from omnitalk.errors import OmnitalkError
    parser = argparse.ArgumentParser(prog="omnitalk bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except OmnitalkError as e:
        print(f"omnitalk bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
