"""Listening while the model speaks: server VAD (silero-vad) and the "stop omni" command detector.

Server VAD (`TurnDetector`) follows the OpenAI Realtime `server_vad` settings:

- `threshold` (0..1, default 0.5): a 32-ms window whose silero speech probability reaches it is speech;
  speech ends once the probability stays below `threshold - 0.15` (silero's own hysteresis);
- `prefix_padding_ms` (default 300): audio kept before the first speech window, so the committed turn
  starts a little before the speech did (`speech_started.audio_start_ms` includes it);
- `silence_duration_ms` (default 500): how long the probability must stay low before the turn ends
  (`speech_stopped.audio_end_ms` includes that silence, as OpenAI's does).

silero-vad ships its ONNX model inside the wheel. We read that file through `importlib` without
importing the `silero_vad` package (whose import calls `torch.set_num_threads(1)` and would slow the
LLM down) and run it with onnxruntime, one small session shared by all connections, each connection
keeping its own recurrent state. Without onnxruntime the TorchScript model of the same wheel is used.

Command-based interruption (`CommandDetector`): while an answer is playing, the recent user audio
(a sliding window: 1 s, or everything since the previous look plus 0.9 s, at most 2.5 s) is transcribed with the model's own speech recognition
(`Scheduler.transcribe`, batched with the other sessions' decoding) whenever new non-silent audio has
arrived, one transcription at a time per connection; when the normalised transcript contains one of
the configured phrases ("stop omni", "omni stop" by default) the answer is cancelled, even with turn
detection off or while other speech goes on. Two transcriptions may overlap (started >= 120 ms apart),
so a command is caught about one transcription time after it ends. A checkpoint trained on the
interruption task (`OmniModel.has_listening_head`) is asked directly instead: `detect(audio_16k)` runs
the model's listening item over the window (SNAC tokens on the audio streams, one irq / n_irq status
per frame, `Scheduler.listen`) and reports the command when any frame says irq - the paper's design,
one forward pass per look instead of a decoded transcript.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger("omnitalk.server")

SAMPLE_RATE = 16000
WINDOW = 512            # silero's window at 16 kHz (32 ms)
CONTEXT = 64            # samples of the previous window that silero sees in front of each window
WINDOW_MS = WINDOW * 1000 / SAMPLE_RATE

DEFAULT_STOP_PHRASES = ("stop omni", "omni stop")


def command_tokens(n_samples: int) -> int:
    """The token budget of one stop-command look at `n_samples` of 16 kHz audio: 4 + 4 a second (a 1-s
    window gets 8 tokens, 2.5 s get 14 - a few words a second; each token is a decoding step, ~10 ms with
    the small model, so short budgets keep the look quick)."""
    return 4 + int(4 * n_samples / SAMPLE_RATE)


class VADUnavailable(RuntimeError):
    """silero-vad (or a runtime for its model) is not installed."""


def _silero_data_dir() -> Path:
    spec = importlib.util.find_spec("silero_vad")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise VADUnavailable("silero-vad is not installed; `pip install --no-deps silero-vad` "
                             "(and onnxruntime) to enable server VAD")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


class SileroModel:
    """The silero-vad network, shared (thread-safe); state lives in each `VADStream`."""

    def __init__(self, path: str | Path | None = None):
        data = None if path is not None else _silero_data_dir()
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is not None:
            file = Path(path) if path is not None else data / "silero_vad.onnx"
            opts = ort.SessionOptions()
            opts.inter_op_num_threads = 1
            opts.intra_op_num_threads = 1
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(str(file), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
            self._jit = None
        else:  # the TorchScript model keeps its state inside: one copy per stream
            self._session = None
            self._jit_file = Path(path) if path is not None else data / "silero_vad.jit"
            self._jit_load()
        self.backend = "onnxruntime" if self._session is not None else "torchscript"

    def _jit_load(self):
        import torch
        return torch.jit.load(str(self._jit_file), map_location="cpu").eval()

    def new_state(self):
        return np.zeros((2, 1, 128), np.float32) if self._session is not None else self._jit_load()

    def run(self, x: np.ndarray, state) -> tuple[float, object]:
        """x: (CONTEXT + WINDOW,) float32 and a stream's state -> (speech probability, new state)."""
        if self._session is not None:
            out, state = self._session.run(None, {"input": x[None].astype(np.float32, copy=False),
                                                  "state": state, "sr": np.array(SAMPLE_RATE, dtype=np.int64)})
            return float(out.reshape(-1)[0]), state
        import torch
        with torch.inference_mode():
            p = state(torch.from_numpy(x[CONTEXT:][None].copy()), SAMPLE_RATE)
        return float(p.reshape(-1)[0]), state


_shared: SileroModel | None = None
_shared_lock = threading.Lock()


def load_silero() -> SileroModel:
    """The process-wide silero model (loaded once). Raises VADUnavailable when it cannot be loaded."""
    global _shared
    with _shared_lock:
        if _shared is None:
            try:
                _shared = SileroModel()
            except VADUnavailable:
                raise
            except Exception as e:  # a broken install: say so, once, without a stack trace
                raise VADUnavailable(f"silero-vad could not be loaded ({type(e).__name__}: {e})") from None
        return _shared


class VADStream:
    """Speech probabilities of a 16-kHz stream, one per 32-ms window, for one connection."""

    def __init__(self, model: SileroModel):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self._state = self.model.new_state()
        self._context = np.zeros(CONTEXT, np.float32)
        self._rest = np.zeros(0, np.float32)

    def feed(self, x16: np.ndarray) -> list[float]:
        x = np.concatenate([self._rest, np.asarray(x16, np.float32)])
        n = len(x) // WINDOW
        probs = []
        for i in range(n):
            w = x[i * WINDOW:(i + 1) * WINDOW]
            p, self._state = self.model.run(np.concatenate([self._context, w]), self._state)
            self._context = w[-CONTEXT:]
            probs.append(p)
        self._rest = x[n * WINDOW:]
        return probs


@dataclass
class VADSettings:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    def validate(self) -> "VADSettings":
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("turn_detection.threshold must be between 0 and 1")
        if not 0 <= self.prefix_padding_ms <= 5000:
            raise ValueError("turn_detection.prefix_padding_ms must be between 0 and 5000")
        if not 0 <= self.silence_duration_ms <= 10000:
            raise ValueError("turn_detection.silence_duration_ms must be between 0 and 10000")
        return self


@dataclass
class VADEvent:
    kind: str       # "start" or "stop"
    ms: float       # audio_start_ms (prefix padding included) or audio_end_ms (silence included)


class TurnDetector:
    """The server_vad state machine over speech probabilities; times are ms of audio since the start."""

    def __init__(self, settings: VADSettings):
        self.settings = settings
        self.speaking = False
        self.start_ms = 0.0
        self._silence_from: float | None = None
        self.t_ms = 0.0  # end of the last window seen

    def reset(self, now_ms: float | None = None) -> None:
        self.speaking, self._silence_from = False, None
        if now_ms is not None:
            self.t_ms = now_ms

    def push(self, probs: Iterable[float], floor_ms: float = 0.0) -> list[VADEvent]:
        """Advance by one window per probability. `floor_ms`: the earliest audio still buffered."""
        s, out = self.settings, []
        off = max(s.threshold - 0.15, 0.01)
        for p in probs:
            w0, self.t_ms = self.t_ms, self.t_ms + WINDOW_MS
            if not self.speaking:
                if p >= s.threshold:
                    self.speaking, self._silence_from = True, None
                    self.start_ms = max(floor_ms, w0 - s.prefix_padding_ms)
                    out.append(VADEvent("start", self.start_ms))
            elif p >= off:
                self._silence_from = None
            else:
                if self._silence_from is None:
                    self._silence_from = w0
                if self.t_ms - self._silence_from >= s.silence_duration_ms:
                    self.speaking, self._silence_from = False, None
                    out.append(VADEvent("stop", self.t_ms))
        return out


# ---------------------------------------------------------------------------------------------
# "stop omni"
# ---------------------------------------------------------------------------------------------

def normalize(text: str) -> str:
    """Lower case, accents and punctuation removed, single spaces: 'Stop, Omni!' -> 'stop omni'."""
    t = unicodedata.normalize("NFKD", text)
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    t = re.sub(r"[^\w\s]|_", " ", t)
    return " ".join(t.split())


class CommandDetector:
    """Watches a sliding window of recent user audio for a spoken stop command.

    `transcribe(audio_16k) -> str` is called from worker threads; `feed()`, `ready()`, `take()` and
    `done()` from the event loop. Up to `max_inflight` transcriptions overlap, started at least
    `min_gap_ms` apart, so a command is caught about one transcription time after it ends instead of
    up to two.
    """

    def __init__(self, transcribe: Callable[[np.ndarray], str], phrases: Iterable[str] = DEFAULT_STOP_PHRASES,
                 window_ms: int = 1000, command_ms: int = 900, max_window_ms: int = 2500, min_new_ms: int = 40,
                 min_gap_ms: int = 120, max_inflight: int = 2, silence_dbfs: float = -45.0,
                 detect: Callable[[np.ndarray], str | None] | None = None):
        self.transcribe = transcribe
        self.detect = detect  # a trained listening head: window -> the command heard, or None
        self.phrases = [p for p in (normalize(x) for x in phrases) if p]
        self.window = int(window_ms * SAMPLE_RATE / 1000)        # the shortest look
        self.command = int(command_ms * SAMPLE_RATE / 1000)      # the longest command to catch whole
        self.max_window = max(int(max_window_ms * SAMPLE_RATE / 1000), self.window)
        self.min_new = int(min_new_ms * SAMPLE_RATE / 1000)
        self.min_gap = min_gap_ms / 1000
        self.max_inflight = max_inflight
        self.silence = 10 ** (silence_dbfs / 20)
        self.inflight = 0
        self.generation = 0     # bumped when a command fired: older windows no longer count
        self.checks = 0
        self.last_text = ""
        self._last_start = -1e9
        self.reset()

    @property
    def busy(self) -> bool:
        return self.inflight >= self.max_inflight

    def reset(self) -> None:
        self._buf = np.zeros(0, np.float32)
        self._new = 0
        self._since_take = 0
        self._speech_seen = False

    def feed(self, x16: np.ndarray, speech_prob: float | None = None) -> None:
        x16 = np.asarray(x16, np.float32)
        self._buf = np.concatenate([self._buf, x16])[-self.max_window:]
        self._new += len(x16)
        self._since_take += len(x16)
        loud = len(x16) > 0 and float(np.sqrt(np.mean(x16.astype(np.float64) ** 2))) > self.silence
        self._speech_seen = self._speech_seen or loud or (speech_prob is not None and speech_prob >= 0.3)

    def ready(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return (bool(self.phrases) or self.detect is not None) and self.inflight < self.max_inflight \
            and self._speech_seen \
            and self._new >= self.min_new and now - self._last_start >= self.min_gap

    def match(self, text: str) -> str | None:
        t = f" {normalize(text)} "
        return next((p for p in self.phrases if f" {p} " in t), None)

    def take(self, now: float | None = None) -> tuple[int, np.ndarray]:
        """The window to transcribe now, with its generation; call `done()` with the outcome.

        The window reaches back over everything since the previous look plus the length of a command,
        so a command that ended while the looks were busy is still whole in the next one. `now` (as
        in ready()) lets an offline replay run on the audio's own clock."""
        self.inflight += 1
        self._last_start = time.monotonic() if now is None else now
        n = min(self.max_window, max(self.window, self._since_take + self.command))
        self._since_take = 0
        # the next look needs new sound: words that arrive after this point (the end of a command, say)
        # set it again in feed(), even when silence follows them
        self._new, self._speech_seen = 0, False
        return self.generation, self._buf[-n:].copy()

    def check(self, window: np.ndarray) -> str | None:
        """Transcribe a window (blocking) and return the phrase found, if any."""
        self.checks += 1
        if self.detect is not None:
            found = self.detect(window)
            self.last_text = found or ""
            return found
        text = self.transcribe(window)
        self.last_text = text
        return self.match(text)

    def match_window(self, window: np.ndarray) -> str | None:
        """check() without touching the detector's state (a one-off look at a finished turn)."""
        if self.detect is not None:
            return self.detect(window)
        return self.match(self.transcribe(window))

    def done(self, generation: int, phrase: str | None) -> bool:
        """Record a finished check; True when it fired (and no earlier one already did)."""
        self.inflight -= 1
        if phrase is None or generation != self.generation:
            return False
        self.generation += 1
        self.reset()  # the same words must not stop the next answer too
        return True
