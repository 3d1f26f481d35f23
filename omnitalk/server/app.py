"""The FastAPI application: realtime WebSocket, the official /chat endpoint, the web page.

    from omnitalk.engine import OmniModel
    from omnitalk.server.app import create_app
    app = create_app(OmniModel.from_pretrained("checkpoint"), api_key=None)   # uvicorn app:app

    with BackgroundServer(create_app(OmniModel.from_random("tiny"))) as srv:   # tests, notebooks
        print(srv.url)                                                           # http://127.0.0.1:PORT

Routes: `GET /` (web page), `GET /static/*`, `GET /healthz`, `WS /v1/realtime` (OpenAI Realtime API,
see realtime.py), `POST /chat` (the official Mini-Omni2 protocol, see chat.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Iterable

import numpy as np

from omnitalk.engine import OmniModel
from omnitalk.server.vad import DEFAULT_STOP_PHRASES, SileroModel, VADUnavailable, command_tokens, load_silero

log = logging.getLogger("omnitalk.server")

MiB = 1024 * 1024


@dataclass
class Limits:
    """What one client may do. Every limit answers with an `error` event; the connection stays open
    except where noted."""
    max_message_bytes: int = 8 * MiB      # one client event (an image data URL fits); bigger -> error
    hard_message_bytes: int = 32 * MiB    # the WebSocket layer closes the connection (1009) above this
    messages_per_s: float = 200.0         # sustained client events per second ...
    message_burst: int = 400              # ... with this burst
    audio_rate: float = 4.0               # seconds of appended audio per second of wall time ...
    audio_burst_s: float = 60.0           # ... with this burst (the bucket starts full)
    max_buffer_s: float = 30.0            # input audio buffer (the encoder hears 30 s at most)
    max_output_tokens: int = 2048         # per response
    audio_lead_s: float | None = 2.0      # audio sent ahead of the client's playback; beyond it the
                                          # answer is read (and SNAC-decoded) at real-time pace. None: no pacing
    send_queue_events: int = 4096         # events waiting to be sent to one client; past either bound
    send_queue_bytes: int = 16 * MiB      # the client is too slow: its connection is dropped (1008)
    send_timeout_s: float = 15.0          # one send blocking longer than this drops the connection too
    max_text_chars: int = 8000            # user text in one item


@dataclass
class ServerContext:
    """What every connection shares: the scheduler, settings, and the VAD model."""
    scheduler: object
    api_key: str | None
    limits: Limits
    model_name: str
    stop_phrases: tuple[str, ...]
    transcriber: Callable[[np.ndarray], str]           # user turns -> text (input transcription)
    command_transcriber: Callable[[np.ndarray], str]   # the stop-command look (short windows)
    vad_model: SileroModel | None
    vad_error: str | None
    default_vad: bool = True
    command_detect: Callable[[np.ndarray], str | None] | None = None  # a trained listening head, if any
    connections: set = field(default_factory=set)
    stats: dict = field(default_factory=lambda: {"connections": 0, "dropped_slow": 0, "audio_deltas_sent": 0,
                                                 "audio_deltas_purged": 0, "responses": 0, "interruptions": 0,
                                                 "stop_commands": 0})
    created: float = field(default_factory=time.time)

    def check_key(self, token: str | None) -> bool:
        if self.api_key is None:
            return True
        return token is not None and hmac.compare_digest(token.encode(), self.api_key.encode())


def _model_name(model: OmniModel) -> str:
    if getattr(model, "path", None) is not None:
        return model.path.name
    return "mini-omni2"


def create_app(scheduler_or_model, api_key: str | None = None, limits: Limits | None = None, *,
               max_sessions: int = 8, stop_phrases: Iterable[str] = DEFAULT_STOP_PHRASES,
               transcriber: Callable[[np.ndarray], str] | None = None, server_vad: bool = True,
               warmup: bool = False, model_name: str | None = None, stop_detector: str = "auto"):
    """Build the app around a `Scheduler` (shared, caller-owned) or an `OmniModel` (the app creates a
    Scheduler with `max_sessions`, starts it on startup and stops it on shutdown).

    transcriber: `audio_16k -> text` used for the stop command and input transcription (default: the
    scheduler's own ASR, at most 10 tokens for a stop-command window and 128 for a user turn). server_vad: default turn detection of new sessions (silero-vad; clients can
    still switch it with session.update). warmup: run one short answer at startup. stop_detector: how
    the stop command is heard while the model talks: 'listening' (the model's own listening item; needs
    a checkpoint trained on the interruption task), 'asr' (the model's ASR over the window, matched
    against `stop_phrases`), or 'auto' (the checkpoint's `stop_detector` setting in model_config.yaml if
    it has one, else 'listening' when the model has a listening head, else 'asr').
    """
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    from omnitalk.session import Scheduler
    from omnitalk.server import chat, realtime

    limits = limits or Limits()
    own = isinstance(scheduler_or_model, OmniModel)
    scheduler = Scheduler(scheduler_or_model, max_sessions=max_sessions) if own else scheduler_or_model
    model = scheduler.model
    try:
        vad_model, vad_error = load_silero(), None
    except VADUnavailable as e:
        vad_model, vad_error = None, str(e)
        log.warning("server VAD disabled: %s", e)

    detector = resolve_stop_detector(model, stop_detector) if transcriber is None else "asr"
    ctx = ServerContext(scheduler=scheduler, api_key=api_key, limits=limits,
                        model_name=model_name or _model_name(model), stop_phrases=tuple(stop_phrases),
                        transcriber=transcriber or asr(scheduler, 128),
                        command_transcriber=transcriber or command_asr(scheduler),
                        command_detect=listening_head(scheduler) if detector == "listening" else None,
                        vad_model=vad_model, vad_error=vad_error, default_vad=server_vad and vad_model is not None)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Blocking session calls (respond, truncate, close), SNAC decoding of streamed chunks and the
        # transcriptions run in the loop's default executor; give it room for every session at once.
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=4 * scheduler.max_sessions + 16, thread_name_prefix="omnitalk-io")
        loop.set_default_executor(executor)
        if own:
            scheduler.start()
        if warmup:
            await asyncio.to_thread(_warmup, scheduler)
        try:
            yield
        finally:
            for conn in list(ctx.connections):
                conn.shutdown()
            if own:
                await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="omnitalk", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    static_dir = resources.files("omnitalk.server") / "static"

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(str(static_dir / "index.html"), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(static_dir)), name="static")

    @app.get("/healthz")
    async def healthz():
        return JSONResponse({"status": "ok", "model": ctx.model_name, "sessions": scheduler.sessions,
                             "max_sessions": scheduler.max_sessions, "server_vad": vad_model is not None,
                             "auth": api_key is not None})

    realtime.install(app, ctx)
    chat.install(app, ctx)
    return app


def asr(scheduler, max_tokens: int) -> Callable[[np.ndarray], str]:
    """The scheduler's own speech recognition as `audio_16k -> text`, at most `max_tokens` tokens."""
    def run(x: np.ndarray) -> str:
        try:
            return scheduler.transcribe(x, max_tokens=max_tokens)
        except TypeError:  # a scheduler whose transcribe takes the audio alone
            return scheduler.transcribe(x)
    return run


def command_asr(scheduler) -> Callable[[np.ndarray], str]:
    """What the stop-command detector runs on each window: the model's ASR with a token budget that
    fits the window (vad.command_tokens)."""
    def run(x: np.ndarray) -> str:
        return asr(scheduler, command_tokens(len(x)))(x)
    return run


STOP_DETECTORS = ("auto", "asr", "listening")


def resolve_stop_detector(model: OmniModel, choice: str = "auto") -> str:
    """'asr' or 'listening' for `model` (see create_app's stop_detector)."""
    if choice not in STOP_DETECTORS:
        raise ValueError(f"stop_detector must be one of {', '.join(STOP_DETECTORS)}; got {choice!r}")
    if choice == "auto":
        choice = model.cfg.extra.get("stop_detector") or ("listening" if model.has_listening_head else "asr")
        if choice not in STOP_DETECTORS[1:]:
            raise ValueError(f"model_config.yaml: stop_detector must be 'asr' or 'listening'; got {choice!r}")
    if choice == "listening" and not model.has_listening_head:
        raise ValueError("stop_detector 'listening' needs a checkpoint trained on the interruption task "
                         "(model_config.yaml: interrupt_trained: true); use 'asr'")
    return choice


def listening_head(scheduler, command: str = "stop omni") -> Callable[[np.ndarray], str | None]:
    """The stop-command look of a checkpoint trained on the interruption task: the model's listening
    item over the window (Scheduler.listen, between decode steps); the command counts as heard when any
    frame's status is irq. Such a head knows the command it was trained on, not the configured phrases."""
    def run(x: np.ndarray) -> str | None:
        return command if any(scheduler.listen(x)) else None
    return run


def _warmup(scheduler) -> None:
    t = time.perf_counter()
    conv = scheduler.open()
    try:
        conv.respond(text="Hello.", reply="speech", max_tokens=16).wait()
    finally:
        conv.close()
    log.info("warm-up answer took %.2f s", time.perf_counter() - t)


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
                   log_level: str = "warning"):
    """A uvicorn Config with the WebSocket frame cap matched to `limits` (an event above
    `max_message_bytes` gets an error event; above `hard_message_bytes` the socket is closed)."""
    import uvicorn
    limits = limits or Limits()
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="websockets-sansio",
                          ws_max_size=limits.hard_message_bytes, ws_ping_interval=20.0, ws_ping_timeout=20.0,
                          timeout_graceful_shutdown=3, lifespan="on")


class BackgroundServer:
    """Run an app with uvicorn in a thread on 127.0.0.1 (port 0 = a free port); `stop()` ends it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, limits: Limits | None = None,
                 log_level: str = "warning"):
        import uvicorn
        self.config = uvicorn_config(app, host, port, limits, log_level)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="omnitalk-uvicorn", daemon=True)
        self.host, self.port = host, port

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start")
            if time.time() - t0 > timeout:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/realtime"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
