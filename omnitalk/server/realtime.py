"""`/v1/realtime`: the OpenAI Realtime API over WebSocket, translated into Conversation calls.

One connection = one `Conversation` of the shared `Scheduler` (its multi-turn history, its cache rows).
Events follow the public API reference; what omnitalk does with each:

client events
  session.update             voice (any name is accepted; the model has one voice), instructions (stored,
                             not applied: Mini-Omni2 has no system prompt), modalities / output_modalities,
                             audio formats (PCM16 24 kHz only; anything else -> error event), turn_detection
                             (server_vad with threshold / prefix_padding_ms / silence_duration_ms /
                             create_response / interrupt_response, or null; semantic_vad is approximated by
                             server_vad), input transcription (the model's own ASR), temperature,
                             max_response_output_tokens / max_output_tokens, and the omnitalk extension
                             `stop_phrases` (list of strings) for the spoken stop command.
  input_audio_buffer.append / commit / clear     PCM16 mono 24 kHz, base64; resampled to 16 kHz.
  conversation.item.create   a user message whose content parts are any of
                               {"type": "input_text", "text": "..."}
                               {"type": "input_audio", "audio": "<base64 PCM16 24 kHz>"}
                               {"type": "input_image", "image_url": "data:image/png;base64,..."}  (GA form;
                               JPEG/PNG/WebP...; one image per turn, the latest one counts)
                             Items wait until the next response.create; everything pending then forms one
                             user turn (texts joined, audio concatenated).
  conversation.item.delete   items not yet answered.
  conversation.item.truncate cut an answer at audio_end_ms: the conversation keeps only what was heard.
  response.create            modalities ["text"] or ["text", "audio"] (beta) / output_modalities ["text"] or
                             ["audio"] (GA); max tokens; temperature.
  response.cancel            stops the answer at the next decoding step; a response.create sent right after
                             it starts once the cancelled answer has stopped (no error).
  output_audio_buffer.clear  drops the audio deltas not yet sent.

server events: session.created / updated, input_audio_buffer.speech_started / speech_stopped /
committed / cleared, conversation.item.created (beta) or conversation.item.added + .done (GA),
conversation.item.input_audio_transcription.completed, conversation.item.truncated / deleted,
response.created, response.output_item.added / done, response.content_part.added / done, the audio,
transcript and text deltas and their `.done`, response.done (status, status_details, usage),
output_audio_buffer.cleared (after an interruption), error.

Beta or GA event names, per connection:
  1. `?api=beta` or `?api=ga` in the URL decides;
  2. else the header `OpenAI-Beta: realtime=v1` (sent by `client.beta.realtime.connect`) or the browser
     subprotocol `openai-beta.realtime-v1` selects beta;
  3. else the first session.update decides by its shape (beta: top-level modalities / input_audio_format /
     turn_detection / voice; GA: session.type "realtime", audio {...}, output_modalities);
  4. else GA (what OpenAI itself speaks today; `client.realtime.connect` is GA).
  Beta: response.audio.delta, response.audio_transcript.delta, response.text.delta, conversation.item.created.
  GA: response.output_audio.delta, response.output_audio_transcript.delta, response.output_text.delta,
      conversation.item.added / conversation.item.done.

Authentication (when the server has an API key): `Authorization: Bearer KEY`, or for browsers the
subprotocol `openai-insecure-api-key.KEY` (next to `realtime`). A wrong key is refused at the handshake
(HTTP 401).

Duplex. Client events are read all the time, also while an answer streams. Barge-in: with server VAD
(and interrupt_response, the default) speech_started during an answer cancels it (response.done status
"cancelled", reason "turn_detected"), audio deltas not yet sent are dropped and output_audio_buffer.cleared
tells the client to flush what it queued; the client then sends conversation.item.truncate with what it
played. Stop command: while the model speaks the recent user audio is transcribed (vad.py) and "stop omni"
cancels the same way even with turn detection off or under continuing speech; the command's own audio is
discarded (input_audio_buffer.cleared), not answered. Audio is sent up to Limits.audio_lead_s (2 s) ahead
of the client's playback and then at real-time pace, so little is in flight when an answer is cut.

Many users: one Scheduler for all connections; over its limit a new connection gets an `error` event
(code "session_limit") and is closed (1013). Each connection has a bounded send queue: a client that does
not read (or a send that blocks for Limits.send_timeout_s) is dropped (1008) alone, and its conversation is
closed at once, which frees its cache rows.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from fastapi import WebSocket

from omnitalk.errors import OmnitalkError
from omnitalk.generate import Sampling
from omnitalk.server.vad import (CommandDetector, TurnDetector, VADSettings, VADStream, normalize)

log = logging.getLogger("omnitalk.server")

IN_RATE = 24000      # PCM16 in and out
MODEL_RATE = 16000   # what the encoder hears
MIN_COMMIT_MS = 100
YIELD_LEAD_S = 0.5   # audio ahead of playback that lets the answer wait for a stop-command check


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


_PATH = re.compile(r"(?:[A-Za-z]:\\|/)(?:[^\s'\"]+[/\\])+[^\s'\",;)]*")


def safe_message(e: BaseException, limit: int = 300) -> str:
    """An exception's message fit for a client: no file paths, no stack trace, bounded length."""
    msg = str(e).strip() or type(e).__name__
    msg = _PATH.sub("<path>", msg).replace("\n", " ")
    return msg[:limit]


class ClientError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.message, self.param, self.type = code, message, param, type


class Bucket:
    """Token bucket: `rate` per second, at most `burst`; starts full."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.level, self.t = rate, burst, burst, time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.t) * self.rate)
        self.t = now
        if self.level >= n:
            self.level -= n
            return True
        return False


class AudioBuffer:
    """The input audio buffer at 16 kHz on the session's timeline (samples since the first append)."""

    def __init__(self):
        self.chunks: collections.deque[np.ndarray] = collections.deque()
        self.start = 0   # timeline sample of the first buffered sample
        self.end = 0     # timeline sample after the last one

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, x: np.ndarray, at: int | None = None) -> None:
        """Add samples that start at timeline sample `at` (default: right after the last ones). After a
        gap (audio that was not buffered) the buffered samples move up to stay contiguous."""
        if at is not None and at != self.end:
            self.start += at - self.end
            self.end = at
        if len(x):
            self.chunks.append(x)
            self.end += len(x)

    def take(self, a: int, b: int) -> np.ndarray:
        """Samples [a, b) of the timeline (clamped to what is buffered); drops everything before b."""
        a, b = max(a, self.start), min(b, self.end)
        data = np.concatenate(list(self.chunks)) if self.chunks else np.zeros(0, np.float32)
        out = data[a - self.start:b - self.start] if b > a else np.zeros(0, np.float32)
        self.chunks.clear()
        rest = data[max(b, self.start) - self.start:]
        self.start = max(b, self.start)
        if len(rest):
            self.chunks.append(rest)
        return out

    def trim(self, keep: int) -> None:
        """Keep only the last `keep` samples."""
        while self.chunks and len(self) - len(self.chunks[0]) >= keep:
            self.start += len(self.chunks.popleft())

    def clear(self) -> None:
        self.chunks.clear()
        self.start = self.end


def b64_pcm16(data, what: str = "audio") -> np.ndarray:
    """base64 PCM16 -> float32 samples."""
    if not isinstance(data, str):
        raise ClientError("invalid_value", f"{what} must be a base64 string of PCM16 samples", what)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError("invalid_value", f"{what} is not valid base64", what) from None
    if len(raw) % 2:
        raise ClientError("invalid_value", f"{what} has an odd number of bytes; PCM16 samples are 2 bytes", what)
    return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0


def pcm16_b64(x: np.ndarray) -> str:
    return base64.b64encode(np.asarray(x, "<i2").tobytes()).decode("ascii")


def decode_data_url(url) -> bytes:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ClientError("invalid_value", "image_url must be a data URL (data:image/png;base64,...); "
                          "the server fetches no remote URLs", "image_url")
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise ClientError("invalid_value", "image_url must be base64-encoded (data:image/...;base64,...)", "image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError("invalid_value", "image_url holds invalid base64", "image_url") from None


@dataclass
class Pending:
    """A user item waiting for the next response."""
    id: str
    audio: np.ndarray | None = None   # 16 kHz
    text: str | None = None
    image: bytes | None = None


@dataclass
class SessionConfig:
    modalities: list = field(default_factory=lambda: ["text", "audio"])
    instructions: str = ""
    voice: str = "default"
    vad: VADSettings | None = None
    vad_type: str = "server_vad"
    transcription: dict | None = None
    temperature: float | None = None
    max_tokens: int | str = "inf"


def _resampler():
    import soxr
    return soxr.ResampleStream(IN_RATE, MODEL_RATE, 1, dtype="float32", quality="HQ")


# ---------------------------------------------------------------------------------------------
# The endpoint
# ---------------------------------------------------------------------------------------------

def install(app, ctx) -> None:
    @app.websocket("/v1/realtime")
    async def realtime_endpoint(ws: WebSocket):
        await handle(ws, ctx)


def _protocols(ws) -> list[str]:
    return [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]


async def _deny(ws, status: int, code: str, message: str) -> None:
    from starlette.responses import JSONResponse
    body = {"error": {"type": "invalid_request_error", "code": code, "message": message}}
    try:
        await ws.send_denial_response(JSONResponse(body, status_code=status))
    except Exception:  # a server without the denial-response extension: plain refusal (HTTP 403)
        await ws.close(code=1008)


async def handle(ws, ctx) -> None:
    from omnitalk.session import CapacityError

    protocols = _protocols(ws)
    token = None
    auth = ws.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        token = auth[7:].strip()
    for p in protocols:
        if p.startswith("openai-insecure-api-key."):
            token = token or p[len("openai-insecure-api-key."):]
    if not ctx.check_key(token):
        await _deny(ws, 401, "invalid_api_key", "missing or wrong API key: send `Authorization: Bearer KEY` "
                    "(or the subprotocol openai-insecure-api-key.KEY from a browser)")
        return
    api = ws.query_params.get("api", "").lower()
    beta_hdr = "realtime=v1" in ws.headers.get("openai-beta", "").lower() or "openai-beta.realtime-v1" in protocols
    if api in ("beta", "ga"):
        flavor, pinned = api, True
    elif beta_hdr:
        flavor, pinned = "beta", True
    else:
        flavor, pinned = "ga", False
    sub = "realtime" if "realtime" in protocols else None
    await ws.accept(subprotocol=sub)
    try:
        conv = ctx.scheduler.open()
    except CapacityError:
        ev = {"type": "error", "event_id": new_id("event"),
              "error": {"type": "invalid_request_error", "code": "session_limit",
                        "message": f"the server is at its limit of {ctx.scheduler.max_sessions} sessions; "
                                   "try again later", "param": None, "event_id": None}}
        try:
            await ws.send_text(json.dumps(ev))
            await ws.close(code=1013, reason="session limit reached")
        except Exception:
            pass
        return
    conn = Connection(ws, ctx, conv, flavor, pinned)
    ctx.connections.add(conn)
    try:
        await conn.run()
    finally:
        ctx.connections.discard(conn)


# ---------------------------------------------------------------------------------------------
# One connection
# ---------------------------------------------------------------------------------------------

class _Out:
    __slots__ = ("data", "size", "response_id", "audio", "t_queued")

    def __init__(self, data: str, response_id: str | None, audio: bool):
        self.data, self.size, self.response_id, self.audio = data, len(data), response_id, audio
        self.t_queued = time.monotonic()


class Connection:
    def __init__(self, ws, ctx, conv, flavor: str, pinned: bool):
        self.ws, self.ctx, self.conv = ws, ctx, conv
        self.flavor, self.pinned = flavor, pinned
        self.limits = ctx.limits
        self.session_id = new_id("sess")
        self.conversation_id = new_id("conv")
        self.cfg = SessionConfig(vad=VADSettings() if ctx.default_vad else None)
        self.msg_bucket = Bucket(self.limits.messages_per_s, self.limits.message_burst)
        self.audio_bucket = Bucket(self.limits.audio_rate, self.limits.audio_burst_s)
        # output
        self._out: collections.deque[_Out] = collections.deque()
        self._out_bytes = 0
        self._out_event = asyncio.Event()
        self._stop = asyncio.Event()
        self.close_code, self.close_reason = 1000, ""
        self.closing = False
        # input audio
        self.resampler = _resampler()
        self.buffer = AudioBuffer()
        self.t_in = 0                                # 16-kHz samples received (the session's timeline)
        self.vad_fed_until = 0                       # where the VAD stream's input ends on it
        self.buffer_full_reported = False
        self.vad_stream = VADStream(ctx.vad_model) if ctx.vad_model is not None else None
        self.detector = TurnDetector(self.cfg.vad or VADSettings())
        self.speech_item: str | None = None
        self.segment_interrupting = False   # the current speech began while an answer was playing
        self.segment_is_command = False
        self.command = CommandDetector(ctx.command_transcriber, ctx.stop_phrases, detect=ctx.command_detect)
        # conversation
        self.items: list[str] = []                   # item ids in order
        self.pending: list[Pending] = []
        self.assistant: dict[str, "Relay"] = {}      # assistant item id -> its relay
        self.relay: Relay | None = None              # the response in progress (or the last one)
        self.auto_response = False                   # a VAD turn waits for the current answer to end
        self.queued_response: dict | None = None     # response.create sent while the last one was cancelling
        self.conv_lock = asyncio.Lock()
        self.play_until = 0.0                        # when the client will have played what we sent
        self.tasks: set[asyncio.Task] = set()
        self.last_cleared_response: str | None = None

    # ---- plumbing -------------------------------------------------------------------------
    def spawn(self, coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    def emit(self, event: dict, *, response_id: str | None = None, audio: bool = False) -> None:
        if self.closing:
            return
        event = {"type": event["type"], "event_id": new_id("event"), **{k: v for k, v in event.items() if k != "type"}}
        item = _Out(json.dumps(event, separators=(",", ":")), response_id, audio)
        self._out.append(item)
        self._out_bytes += item.size
        if len(self._out) > self.limits.send_queue_events or self._out_bytes > self.limits.send_queue_bytes:
            self.drop(1008, "client too slow: its send queue overflowed")
            return
        self._out_event.set()

    def error(self, code: str, message: str, *, type: str = "invalid_request_error", event_id=None, param=None):
        self.emit({"type": "error", "error": {"type": type, "code": code, "message": message, "param": param,
                                              "event_id": event_id}})

    def drop(self, code: int, reason: str) -> None:
        """Close this connection (only this one): its conversation is freed in cleanup."""
        if not self.closing:
            log.info("dropping realtime connection %s: %s", self.session_id, reason)
            if code == 1008:
                self.ctx.stats["dropped_slow"] += 1
            self.close_code, self.close_reason, self.closing = code, reason, True
            self._out.clear()
            self._out_bytes = 0
        self._stop.set()

    def shutdown(self) -> None:
        self.drop(1001, "server shutting down")

    def purge_audio(self, response_id: str | None) -> int:
        """Drop queued audio deltas (of one response, or all) that have not left yet."""
        keep, n = collections.deque(), 0
        for it in self._out:
            if it.audio and (response_id is None or it.response_id == response_id):
                self._out_bytes -= it.size
                n += 1
            else:
                keep.append(it)
        self._out = keep
        self.ctx.stats["audio_deltas_purged"] += n
        return n

    async def _sender(self) -> None:
        while True:
            await self._out_event.wait()
            self._out_event.clear()
            while self._out:
                it = self._out.popleft()
                self._out_bytes -= it.size
                try:
                    await asyncio.wait_for(self.ws.send_text(it.data), self.limits.send_timeout_s)
                    if it.audio:
                        self.ctx.stats["audio_deltas_sent"] += 1
                except asyncio.TimeoutError:
                    self.drop(1008, "client too slow: a send blocked too long")
                    return
                except Exception:  # the client is gone
                    self._stop.set()
                    return

    async def run(self) -> None:
        self.ctx.stats["connections"] += 1
        self.emit({"type": "session.created", "session": self.session_object()})
        reader = self.spawn(self._reader())
        sender = self.spawn(self._sender())
        stop = self.spawn(self._stop.wait())
        try:
            await asyncio.wait({reader, sender, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._cleanup()

    async def _cleanup(self) -> None:
        self.closing = True
        if self.relay is not None:
            self.relay.cancel("client_cancelled")
        for t in list(self.tasks):
            t.cancel()
        conv = self.conv
        try:  # frees its cache rows at once (cancels an answer in progress)
            await asyncio.shield(asyncio.to_thread(conv.close))
        except Exception:
            log.exception("closing a conversation failed")
        try:
            await self.ws.close(code=self.close_code, reason=self.close_reason[:120])
        except Exception:
            pass

    async def _reader(self) -> None:
        while True:
            try:
                msg = await self.ws.receive()
            except Exception:  # a broken socket reads as a disconnect
                return
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is None:
                self.error("invalid_event", "binary frames are not supported; send JSON text events")
                continue
            if len(text) > self.limits.max_message_bytes:
                self.error("message_too_large", f"event of {len(text)} bytes is over the limit of "
                           f"{self.limits.max_message_bytes} bytes")
                continue
            if not self.msg_bucket.take(1):
                self.error("rate_limit_exceeded", "too many events per second; slow down")
                continue
            try:
                ev = json.loads(text)
            except (ValueError, RecursionError):
                self.error("invalid_json", "the event is not valid JSON")
                continue
            if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
                self.error("invalid_event", "an event must be a JSON object with a string `type`")
                continue
            event_id = ev.get("event_id") if isinstance(ev.get("event_id"), str) else None
            handler = HANDLERS.get(ev["type"])
            if handler is None:
                self.error("unknown_event", f"unknown or unsupported event type {ev['type'][:80]!r}",
                           event_id=event_id, param="type")
                continue
            try:
                handler(self, ev)
            except ClientError as e:
                self.error(e.code, e.message, type=e.type, event_id=event_id, param=e.param)
            except Exception:
                log.exception("handling %s failed", ev["type"])
                self.error("server_error", "the server failed to handle this event", type="server_error",
                           event_id=event_id)

    # ---- session ------------------------------------------------------------------------
    def turn_detection_object(self):
        v = self.cfg.vad
        if v is None:
            return None
        return {"type": self.cfg.vad_type, "threshold": v.threshold, "prefix_padding_ms": v.prefix_padding_ms,
                "silence_duration_ms": v.silence_duration_ms, "create_response": v.create_response,
                "interrupt_response": v.interrupt_response}

    def session_object(self) -> dict:
        c = self.cfg
        speak = "audio" in c.modalities
        common = {"id": self.session_id, "object": "realtime.session", "model": self.ctx.model_name,
                  "instructions": c.instructions, "tools": [], "tool_choice": "auto",
                  "stop_phrases": list(self.command.phrases),
                  "stop_detector": "listening_head" if self.command.detect is not None else "asr"}
        if self.flavor == "beta":
            return {**common, "modalities": ["text", "audio"] if speak else ["text"], "voice": c.voice,
                    "input_audio_format": "pcm16", "output_audio_format": "pcm16",
                    "input_audio_transcription": c.transcription, "turn_detection": self.turn_detection_object(),
                    "temperature": c.temperature, "max_response_output_tokens": c.max_tokens}
        fmt = {"type": "audio/pcm", "rate": IN_RATE}
        return {"type": "realtime", **common, "output_modalities": ["audio"] if speak else ["text"],
                "audio": {"input": {"format": fmt, "transcription": c.transcription, "noise_reduction": None,
                                    "turn_detection": self.turn_detection_object()},
                          "output": {"format": fmt, "voice": c.voice, "speed": 1.0}},
                "max_output_tokens": c.max_tokens}

    def on_session_update(self, ev: dict) -> None:
        s = ev.get("session")
        if not isinstance(s, dict):
            raise ClientError("invalid_value", "session.update needs a `session` object", "session")
        ga = s.get("type") == "realtime" or isinstance(s.get("audio"), dict) or "output_modalities" in s
        beta = any(k in s for k in ("modalities", "input_audio_format", "output_audio_format",
                                    "input_audio_transcription", "max_response_output_tokens")) or \
            (not ga and any(k in s for k in ("turn_detection", "voice")))
        if not self.pinned and (ga or beta):
            self.flavor, self.pinned = ("ga" if ga else "beta"), True
        if s.get("type") not in (None, "realtime"):
            raise ClientError("unsupported_feature", f"session type {s.get('type')!r} is not supported; use "
                              "'realtime'", "session.type")
        c = SessionConfig(**vars(self.cfg))
        vad_type = c.vad_type
        mods = s.get("output_modalities", s.get("modalities"))
        if mods is not None:
            c.modalities = _modalities(mods, "session.modalities")
        if "instructions" in s:
            if not isinstance(s["instructions"], (str, type(None))):
                raise ClientError("invalid_value", "instructions must be a string", "session.instructions")
            c.instructions = s["instructions"] or ""
        audio = s.get("audio") or {}
        if not isinstance(audio, dict):
            raise ClientError("invalid_value", "session.audio must be an object", "session.audio")
        ain, aout = audio.get("input") or {}, audio.get("output") or {}
        for fmt, where in ((s.get("input_audio_format"), "session.input_audio_format"),
                           (s.get("output_audio_format"), "session.output_audio_format"),
                           (ain.get("format"), "session.audio.input.format"),
                           (aout.get("format"), "session.audio.output.format")):
            _check_format(fmt, where)
        voice = aout.get("voice", s.get("voice"))
        if voice is not None:
            if isinstance(voice, dict):
                voice = voice.get("id")
            if not isinstance(voice, str) or not voice or len(voice) > 64:
                raise ClientError("invalid_value", "voice must be a non-empty name", "session.voice")
            c.voice = voice
        td_given = "turn_detection" in ain or "turn_detection" in s
        if td_given:
            td = ain["turn_detection"] if "turn_detection" in ain else s["turn_detection"]
            c.vad, vad_type = self._parse_turn_detection(td)
        if "transcription" in ain or "input_audio_transcription" in s:
            tr = ain.get("transcription") if "transcription" in ain else s.get("input_audio_transcription")
            if tr is not None and not isinstance(tr, dict):
                raise ClientError("invalid_value", "transcription must be an object or null", "session.transcription")
            c.transcription = None if tr is None else {"model": str(tr.get("model") or self.ctx.model_name)}
        if "temperature" in s:
            t = s["temperature"]
            if t is not None and (not isinstance(t, (int, float)) or not 0 <= t <= 2):
                raise ClientError("invalid_value", "temperature must be between 0 and 2", "session.temperature")
            c.temperature = t
        for key in ("max_response_output_tokens", "max_output_tokens"):
            if key in s:
                c.max_tokens = _max_tokens(s[key], f"session.{key}")
        phrases = s.get("stop_phrases")
        if phrases is not None:
            if not isinstance(phrases, list) or not all(isinstance(p, str) and len(p) < 100 for p in phrases) \
                    or len(phrases) > 20:
                raise ClientError("invalid_value", "stop_phrases must be a list of up to 20 short strings",
                                  "session.stop_phrases")
        # valid: apply
        c.vad_type = vad_type
        vad_changed = td_given and (c.vad is None) != (self.cfg.vad is None)
        self.cfg = c
        if c.vad is not None:
            self.detector.settings = c.vad
        if vad_changed:
            self.detector.reset()
            self.speech_item = None
        if phrases is not None:
            self.command.phrases = [p for p in (normalize(x) for x in phrases) if p]
        self.emit({"type": "session.updated", "session": self.session_object()})

    def _parse_turn_detection(self, td):
        if td is None:
            return None, "server_vad"
        if not isinstance(td, dict):
            raise ClientError("invalid_value", "turn_detection must be an object or null", "turn_detection")
        kind = td.get("type", "server_vad")
        if kind not in ("server_vad", "semantic_vad"):
            raise ClientError("invalid_value", f"turn_detection.type {kind!r} is not supported; use server_vad "
                              "or null", "turn_detection.type")
        if self.ctx.vad_model is None:
            raise ClientError("vad_unavailable", "server VAD is not available on this server (silero-vad is not "
                              "installed); use turn_detection null and commit the buffer yourself",
                              "turn_detection")
        base = VADSettings()
        if kind == "semantic_vad":  # approximated: eagerness sets how long a pause ends the turn
            base.silence_duration_ms = {"low": 1000, "high": 250}.get(td.get("eagerness"), 500)
        try:
            v = VADSettings(
                threshold=float(td.get("threshold", base.threshold) if td.get("threshold") is not None else base.threshold),
                prefix_padding_ms=int(td.get("prefix_padding_ms") if td.get("prefix_padding_ms") is not None
                                      else base.prefix_padding_ms),
                silence_duration_ms=int(td.get("silence_duration_ms") if td.get("silence_duration_ms") is not None
                                        else base.silence_duration_ms),
                create_response=bool(td.get("create_response", True) if td.get("create_response") is not None else True),
                interrupt_response=bool(td.get("interrupt_response", True)
                                        if td.get("interrupt_response") is not None else True),
            ).validate()
        except (TypeError, ValueError) as e:
            raise ClientError("invalid_value", safe_message(e), "turn_detection") from None
        return v, kind

    # ---- input audio --------------------------------------------------------------------
    def on_append(self, ev: dict) -> None:
        x24 = b64_pcm16(ev.get("audio"))
        secs = len(x24) / IN_RATE
        if not self.audio_bucket.take(secs):
            raise ClientError("rate_limit_exceeded", f"audio is appended faster than {self.limits.audio_rate:g}x "
                              "real time; this chunk was dropped")
        if not len(x24):
            return
        x16 = self.resampler.resample_chunk(x24)
        self.ingest(x16)

    def ingest(self, x16: np.ndarray) -> None:
        vad = self.cfg.vad
        t0 = self.t_in                 # timeline: 16-kHz samples received since the session began
        self.t_in += len(x16)
        max_samples = int(self.limits.max_buffer_s * MODEL_RATE)
        if vad is None and len(self.buffer) + len(x16) > max_samples:
            if not self.buffer_full_reported:
                self.buffer_full_reported = True
                self.error("input_audio_buffer_full", f"the input audio buffer holds at most "
                           f"{self.limits.max_buffer_s:g} s; commit or clear it (audio dropped)")
        else:
            self.buffer.append(x16, at=t0)
        listening = self.listening()
        probs = []
        if self.vad_stream is not None and (vad is not None or listening):
            if self.vad_fed_until != t0:  # the VAD skipped some audio: restart it on the timeline
                self.vad_stream.reset()
                self.detector.reset(now_ms=t0 * 1000 / MODEL_RATE)
                self.speech_item = None
            probs = self.vad_stream.feed(x16)
            self.vad_fed_until = self.t_in
        if vad is not None:
            floor_ms = self.buffer.start * 1000 / MODEL_RATE
            for e in self.detector.push(probs, floor_ms):
                if e.kind == "start":
                    self.on_speech_started(e.ms)
                else:
                    self.on_speech_stopped(e.ms)
            if not self.detector.speaking:
                self.buffer.trim(int((vad.prefix_padding_ms + 200) * MODEL_RATE / 1000))
            elif len(self.buffer) >= max_samples:  # a turn may not outgrow the encoder's window
                self.detector.reset()
                self.on_speech_stopped(self.buffer.end * 1000 / MODEL_RATE)
        if listening:
            self.command.feed(x16, max(probs) if probs else None)
            if self.command.ready():
                self.spawn(self._check_command())
        else:
            self.command.reset()

    def listening(self) -> bool:
        """Is the model speaking (generating, or its audio still playing at the client)?"""
        return bool(self.command.phrases) and (
            (self.relay is not None and not self.relay.finished) or time.monotonic() < self.play_until + 0.5
            or (self.detector.speaking and self.segment_interrupting))

    async def _check_command(self) -> None:
        gen, window = self.command.take()
        phrase, t0 = None, time.perf_counter()
        try:
            phrase = await asyncio.to_thread(self.command.check, window)
        except Exception:
            log.exception("stop-command transcription failed")
        fired = self.command.done(gen, phrase)
        log.debug("stop-command look: %.0f ms of audio, %.0f ms, %s", len(window) / 16,
                  (time.perf_counter() - t0) * 1000, phrase or "-")
        if self.closing:
            return
        if fired:
            self.interrupt("turn_detected", command=phrase)
        elif self.listening() and self.command.ready():  # audio came in meanwhile: look again at once
            self.spawn(self._check_command())

    def interrupt(self, reason: str, command: str | None = None) -> None:
        """Stop the answer now: cancel generation, drop unsent audio, tell the client to flush."""
        relay = self.relay
        rid = relay.response_id if relay is not None else None
        playing = relay is not None and (not relay.finished or time.monotonic() < self.play_until + 0.5)
        if relay is not None and not relay.finished:
            relay.cancel(reason)
            self.ctx.stats["interruptions"] += 1
        if command is not None:
            self.ctx.stats["stop_commands"] += 1
            log.info("stop command %r heard on %s", command, self.session_id)
            if self.detector.speaking:
                self.segment_is_command = True  # its words are not a question to answer
            else:
                self._clear_buffer(emit=True)
        if playing and rid is not None:
            self.purge_audio(rid)
            self.play_until = 0.0
            if self.last_cleared_response != rid:
                self.last_cleared_response = rid
                self.emit({"type": "output_audio_buffer.cleared", "response_id": rid})

    def on_speech_started(self, ms: float) -> None:
        self.speech_item = new_id("item")
        playing = (self.relay is not None and not self.relay.finished) or time.monotonic() < self.play_until
        self.segment_interrupting, self.segment_is_command = playing, False
        self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": int(ms),
                   "item_id": self.speech_item})
        if self.cfg.vad is not None and self.cfg.vad.interrupt_response and playing:
            self.interrupt("turn_detected")

    def on_speech_stopped(self, ms: float) -> None:
        item_id = self.speech_item or new_id("item")
        self.speech_item = None
        start = int(self.detector.start_ms * MODEL_RATE / 1000)
        audio = self.buffer.take(start, int(ms * MODEL_RATE / 1000))
        self.emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": int(ms), "item_id": item_id})
        if self.segment_is_command:
            self.segment_is_command = self.segment_interrupting = False
            self.emit({"type": "input_audio_buffer.cleared"})
            return
        if len(audio) < MIN_COMMIT_MS * MODEL_RATE / 1000:
            return
        if self.segment_interrupting and self.command.phrases:
            # the speech that interrupted an answer may be the stop command: look before answering it
            self.segment_interrupting = False
            self.spawn(self._finish_interrupting_turn(audio, item_id))
            return
        self.commit(audio, item_id)
        self._vad_response()

    async def _finish_interrupting_turn(self, audio: np.ndarray, item_id: str) -> None:
        window = audio[-self.command.window:]
        phrase = None
        try:
            phrase = await asyncio.to_thread(self.command.match_window, window)
        except Exception:
            log.exception("stop-command transcription failed")
        if phrase:
            self.command.reset()
            self.emit({"type": "input_audio_buffer.cleared"})
            return
        self.commit(audio, item_id)
        self._vad_response()

    def _vad_response(self) -> None:
        vad = self.cfg.vad
        if vad is None or not vad.create_response:
            return
        if self.relay is not None and not self.relay.finished:
            self.auto_response = True  # answered once the current response has ended
            return
        self.start_response({})

    def commit(self, audio: np.ndarray, item_id: str | None = None) -> None:
        item_id = item_id or new_id("item")
        prev = self.items[-1] if self.items else None
        self.emit({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": prev})
        self.pending.append(Pending(item_id, audio=audio))
        self.item_created({"id": item_id, "object": "realtime.item", "type": "message", "status": "completed",
                           "role": "user", "content": [{"type": "input_audio", "transcript": None}]}, done=True)
        if self.cfg.transcription is not None:
            self.spawn(self._transcribe_item(item_id, audio))

    async def _transcribe_item(self, item_id: str, audio: np.ndarray) -> None:
        try:
            text = await asyncio.to_thread(self.ctx.transcriber, audio[-30 * MODEL_RATE:])
        except Exception as e:
            self.emit({"type": "conversation.item.input_audio_transcription.failed", "item_id": item_id,
                       "content_index": 0, "error": {"type": "server_error", "code": "transcription_failed",
                                                     "message": safe_message(e)}})
            return
        self.emit({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                   "content_index": 0, "transcript": text})

    def item_created(self, item: dict, done: bool) -> None:
        prev = self.items[-1] if self.items else None
        self.items.append(item["id"])
        if self.flavor == "beta":
            self.emit({"type": "conversation.item.created", "previous_item_id": prev, "item": item})
        else:
            self.emit({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
            if done:
                self.emit({"type": "conversation.item.done", "previous_item_id": prev, "item": item})

    def on_commit(self, ev: dict) -> None:
        if len(self.buffer) < MIN_COMMIT_MS * MODEL_RATE / 1000:
            raise ClientError("input_audio_buffer_commit_empty", f"the buffer holds less than {MIN_COMMIT_MS} ms of "
                              "audio; append audio before committing")
        audio = self.buffer.take(self.buffer.start, self.buffer.end)
        self.buffer_full_reported = False
        item_id = self.speech_item
        self.speech_item = None
        self.detector.reset()
        self.commit(audio, item_id)

    def _clear_buffer(self, emit: bool) -> None:
        self.buffer.clear()
        self.buffer_full_reported = False
        self.detector.reset()
        self.speech_item = None
        if emit:
            self.emit({"type": "input_audio_buffer.cleared"})

    def on_clear(self, ev: dict) -> None:
        self._clear_buffer(emit=True)

    # ---- items --------------------------------------------------------------------------
    def on_item_create(self, ev: dict) -> None:
        item = ev.get("item")
        if not isinstance(item, dict):
            raise ClientError("invalid_value", "conversation.item.create needs an `item` object", "item")
        if item.get("type", "message") != "message":
            raise ClientError("unsupported_item", f"item type {str(item.get('type'))[:40]!r} is not supported; "
                              "send a user message", "item.type")
        role = item.get("role")
        if role not in ("user", "system"):
            raise ClientError("unsupported_item", "only user (and system) messages can be added; the model "
                              "writes its own answers", "item.role")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise ClientError("invalid_value", "item.content must be a non-empty list of content parts", "item.content")
        item_id = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else new_id("item")
        if item_id in self.items:
            raise ClientError("invalid_value", f"an item with id {item_id[:64]!r} already exists", "item.id")
        texts, audios, image, echo = [], [], None, []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "text"):
                t = part.get("text")
                if not isinstance(t, str):
                    raise ClientError("invalid_value", "input_text needs a `text` string", f"item.content[{i}].text")
                texts.append(t)
                echo.append({"type": "input_text", "text": t})
            elif kind == "input_audio":
                x = b64_pcm16(part.get("audio"), f"item.content[{i}].audio")
                if len(x):
                    audios.append(_resample(x))
                echo.append({"type": "input_audio", "transcript": part.get("transcript")})
            elif kind == "input_image":
                url = part.get("image_url", part.get("image"))
                if isinstance(url, dict):
                    url = url.get("url")
                data = decode_data_url(url)
                _check_image(data)
                image = data
                echo.append({"type": "input_image", "detail": part.get("detail", "auto")})
            else:
                raise ClientError("invalid_value", f"content part type {str(kind)[:40]!r} is not supported; use "
                                  "input_text, input_audio or input_image", f"item.content[{i}].type")
        text = "\n".join(texts)
        if len(text) > self.limits.max_text_chars:
            raise ClientError("invalid_value", f"text longer than {self.limits.max_text_chars} characters", "item.content")
        audio = np.concatenate(audios) if audios else None
        if audio is not None and len(audio) > self.limits.max_buffer_s * MODEL_RATE:
            raise ClientError("invalid_value", f"audio longer than {self.limits.max_buffer_s:g} s", "item.content")
        if role == "user":
            self.pending.append(Pending(item_id, audio=audio, text=text or None, image=image))
        elif text:
            self.cfg.instructions = text  # stored; Mini-Omni2 has no system prompt
        self.item_created({"id": item_id, "object": "realtime.item", "type": "message", "status": "completed",
                           "role": role, "content": echo}, done=True)

    def on_item_delete(self, ev: dict) -> None:
        item_id = ev.get("item_id")
        p = next((p for p in self.pending if p.id == item_id), None)
        if p is None:
            raise ClientError("item_not_found", "only items not yet answered can be deleted; no such pending item",
                              "item_id")
        self.pending.remove(p)
        self.items.remove(p.id)
        self.emit({"type": "conversation.item.deleted", "item_id": item_id})

    def on_item_truncate(self, ev: dict) -> None:
        item_id, ms = ev.get("item_id"), ev.get("audio_end_ms")
        relay = self.assistant.get(item_id) if isinstance(item_id, str) else None
        if relay is None:
            raise ClientError("item_not_found", "item_id names no assistant item of this conversation", "item_id")
        if not isinstance(ms, (int, float)) or isinstance(ms, bool) or ms < 0:
            raise ClientError("invalid_value", "audio_end_ms must be a non-negative number", "audio_end_ms")
        if ev.get("content_index", 0) != 0:
            raise ClientError("invalid_value", "content_index must be 0", "content_index")
        self.spawn(self._truncate(relay, item_id, int(ms)))

    async def _truncate(self, relay: "Relay", item_id: str, ms: int) -> None:
        async with self.conv_lock:  # after any answer already asked for, before any asked for later
            await relay.finished_event.wait()
            if relay.response_id is None:
                return
            ms = min(ms, int(relay.audio_ms_sent))
            try:
                await asyncio.to_thread(self.conv.truncate, relay.response_id, ms)
            except OmnitalkError as e:
                self.error("invalid_value", safe_message(e), param="item_id")
                return
        self.emit({"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0, "audio_end_ms": ms})

    # ---- responses ----------------------------------------------------------------------
    def on_response_create(self, ev: dict) -> None:
        r = ev.get("response") or {}
        if not isinstance(r, dict):
            raise ClientError("invalid_value", "response must be an object", "response")
        cancelling = self.relay is not None and not self.relay.finished and self.relay.cancel_reason is not None
        if self.relay is not None and not self.relay.finished and not cancelling:
            raise ClientError("conversation_already_has_active_response", "a response is in progress; cancel it "
                              "or wait for response.done")
        if r.get("conversation") not in (None, "auto"):
            raise ClientError("unsupported_feature", "only responses in the default conversation are supported",
                              "response.conversation")
        if r.get("input"):
            raise ClientError("unsupported_feature", "response.input is not supported; add items with "
                              "conversation.item.create", "response.input")
        if cancelling:  # asked right after response.cancel: starts as soon as the old one has stopped
            self.queued_response = r
            return
        self.start_response(r)

    def start_response(self, r: dict) -> None:
        mods = r.get("output_modalities", r.get("modalities"))
        mods = _modalities(mods, "response.modalities") if mods is not None else self.cfg.modalities
        max_tokens = self.cfg.max_tokens
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if key in r:
                max_tokens = _max_tokens(r[key], f"response.{key}")
        temperature = r.get("temperature", self.cfg.temperature)
        if temperature is not None and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
            raise ClientError("invalid_value", "temperature must be between 0 and 2", "response.temperature")
        voice = r.get("voice") or ((r.get("audio") or {}).get("output") or {}).get("voice") or self.cfg.voice
        limit = self.limits.max_output_tokens
        n = limit if max_tokens == "inf" else min(int(max_tokens), limit)
        sampling = Sampling() if not temperature else Sampling(temperature=float(temperature))
        self.auto_response = False
        self.relay = Relay(self, list(self.pending), "audio" in mods, n, sampling, voice if isinstance(voice, str) else self.cfg.voice)
        self.relay.task = self.spawn(self.relay.run())

    def on_response_cancel(self, ev: dict) -> None:
        relay = self.relay
        rid = ev.get("response_id")
        if relay is None or relay.finished or (rid and relay.response_id and rid != relay.response_id):
            raise ClientError("response_cancel_not_active", "there is no response in progress to cancel")
        relay.cancel("client_cancelled")
        self.purge_audio(relay.response_id)
        self.play_until = 0.0

    def on_output_audio_clear(self, ev: dict) -> None:
        rid = self.relay.response_id if self.relay is not None else None
        self.purge_audio(None)
        self.play_until = 0.0
        self.emit({"type": "output_audio_buffer.cleared", "response_id": rid})

    def response_finished(self, relay: "Relay") -> None:
        if self.closing:
            return
        queued, self.queued_response = self.queued_response, None
        if queued is not None:
            try:
                self.start_response(queued)
            except ClientError as e:
                self.error(e.code, e.message, type=e.type, param=e.param)
        elif self.auto_response and self.pending:
            self.start_response({})


def _resample(x24: np.ndarray) -> np.ndarray:
    from omnitalk.audio import resample
    return resample(x24, IN_RATE, MODEL_RATE)


def _check_image(data: bytes) -> None:
    from omnitalk.vision import load_image
    try:
        load_image(data)
    except Exception as e:
        raise ClientError("invalid_image", safe_message(e), "image_url") from None


def _modalities(mods, where: str) -> list:
    if not isinstance(mods, list) or not mods or not all(m in ("text", "audio") for m in mods):
        raise ClientError("invalid_value", 'modalities must be ["text"], ["audio"] or ["text", "audio"]', where)
    return ["text", "audio"] if "audio" in mods else ["text"]


def _max_tokens(v, where: str):
    if v == "inf" or v is None:
        return "inf"
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ClientError("invalid_value", 'max output tokens must be a positive integer or "inf"', where)
    return v


def _check_format(fmt, where: str) -> None:
    if fmt is None or fmt == "pcm16":
        return
    if isinstance(fmt, dict) and fmt.get("type", "audio/pcm") == "audio/pcm" and fmt.get("rate", IN_RATE) == IN_RATE:
        return
    shown = fmt if isinstance(fmt, str) else json.dumps(fmt)[:80]
    raise ClientError("unsupported_audio_format", f"audio format {shown} is not supported; only PCM16 mono "
                      "24 kHz (beta 'pcm16', GA {\"type\": \"audio/pcm\", \"rate\": 24000})", where)


# ---------------------------------------------------------------------------------------------
# One response: Conversation.respond -> server events
# ---------------------------------------------------------------------------------------------

class Relay:
    def __init__(self, conn: Connection, inputs: list[Pending], speak: bool, max_tokens: int,
                 sampling: Sampling, voice: str):
        self.conn, self.inputs, self.speak = conn, inputs, speak
        self.max_tokens, self.sampling, self.voice = max_tokens, sampling, voice
        self.item_id = new_id("item")
        self.response_id: str | None = None
        self.resp = None
        self.task: asyncio.Task | None = None
        self.cancel_reason: str | None = None
        self.finished = False
        self.finished_event = asyncio.Event()
        self.transcript: list[str] = []
        self.audio_samples = 0
        self.audio_ms_sent = 0.0
        self.t_start = time.monotonic()
        self.t_first_audio: float | None = None

    def cancel(self, reason: str) -> None:
        if self.finished or self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        if self.resp is not None:
            self.resp.cancel()

    def _inputs(self) -> dict:
        audio = [p.audio for p in self.inputs if p.audio is not None]
        texts = [p.text for p in self.inputs if p.text]
        images = [p.image for p in self.inputs if p.image is not None]
        out = {}
        if audio:
            x = np.concatenate(audio)
            out["audio"] = x[-int(self.conn.limits.max_buffer_s * MODEL_RATE):]
        if texts:
            out["text"] = "\n".join(texts)
        if images:
            out["image"] = images[-1]
        return out

    def response_object(self, status: str, details=None, usage=None, output=None) -> dict:
        c = self.conn
        obj = {"object": "realtime.response", "id": self.response_id, "status": status, "status_details": details,
               "output": output or [], "conversation_id": c.conversation_id, "usage": usage,
               "max_output_tokens": self.max_tokens, "metadata": None}
        if c.flavor == "beta":
            obj.update(modalities=["text", "audio"] if self.speak else ["text"], voice=self.voice,
                       output_audio_format="pcm16", temperature=self.sampling.temperature)
        else:
            obj.update(output_modalities=["audio"] if self.speak else ["text"],
                       audio={"output": {"format": {"type": "audio/pcm", "rate": IN_RATE}, "voice": self.voice}})
        return obj

    def names(self) -> dict:
        beta = self.conn.flavor == "beta"
        if self.speak:
            return {"delta": "response.audio_transcript.delta" if beta else "response.output_audio_transcript.delta",
                    "done": "response.audio_transcript.done" if beta else "response.output_audio_transcript.done",
                    "audio_delta": "response.audio.delta" if beta else "response.output_audio.delta",
                    "audio_done": "response.audio.done" if beta else "response.output_audio.done"}
        return {"delta": "response.text.delta" if beta else "response.output_text.delta",
                "done": "response.text.done" if beta else "response.output_text.done"}

    def part(self, text: str) -> dict:
        return {"type": "audio", "transcript": text} if self.speak else {"type": "text", "text": text}

    def item(self, status: str, text: str | None) -> dict:
        beta = self.conn.flavor == "beta"
        if self.speak:
            content = [{"type": "audio" if beta else "output_audio", "transcript": text}]
        else:
            content = [{"type": "text" if beta else "output_text", "text": text}]
        return {"id": self.item_id, "object": "realtime.item", "type": "message", "status": status,
                "role": "assistant", "content": content if text is not None else []}

    async def run(self) -> None:
        c = self.conn
        try:
            await self._run()
        except asyncio.CancelledError:
            if self.resp is not None:
                self.resp.cancel()
            raise
        finally:
            self.finished = True
            self.finished_event.set()
            if not c.closing:
                c.response_finished(self)

    async def _run(self) -> None:
        c = self.conn
        inputs = self._inputs()
        async with c.conv_lock:
            try:
                resp = await asyncio.to_thread(c.conv.respond, reply="speech" if self.speak else "text",
                                               max_tokens=self.max_tokens, sampling=self.sampling, **inputs)
            except OmnitalkError as e:
                code = "capacity" if type(e).__name__ == "CapacityError" else "invalid_request"
                c.error(code, safe_message(e))
                return
            except Exception:
                log.exception("starting a response failed")
                c.error("server_error", "the server failed to start the response", type="server_error")
                return
        self.resp, self.response_id = resp, resp.id
        c.ctx.stats["responses"] += 1
        used = {p.id for p in self.inputs}
        c.pending = [p for p in c.pending if p.id not in used]
        if self.cancel_reason is not None:
            resp.cancel()
        rid = self.response_id
        names = self.names()
        c.assistant[self.item_id] = self
        c.emit({"type": "response.created", "response": self.response_object("in_progress")})
        c.emit({"type": "response.output_item.added", "response_id": rid, "output_index": 0,
                "item": self.item("in_progress", None)})
        c.item_created(self.item("in_progress", None), done=False)
        where = {"response_id": rid, "item_id": self.item_id, "output_index": 0, "content_index": 0}
        c.emit({"type": "response.content_part.added", **where, "part": self.part("")})
        error = None
        try:
            async for chunk in resp:
                if self.cancel_reason is not None:
                    break
                # while the user may be saying the stop command, let its transcription have the CPU
                # (SNAC-decode the next chunk only when the client's playback would otherwise run short)
                while c.command.inflight and c.play_until - time.monotonic() > YIELD_LEAD_S \
                        and self.cancel_reason is None and not c.closing:
                    await asyncio.sleep(0.01)
                if self.cancel_reason is not None:
                    break
                if chunk.text:
                    self.transcript.append(chunk.text)
                    c.emit({"type": names["delta"], **where, "delta": chunk.text})
                if self.speak and chunk.audio.size:
                    self._audio(chunk.audio, names["audio_delta"], where)
                    lead = c.limits.audio_lead_s
                    if lead is not None:  # far enough ahead of playback: pace (saves CPU for the others)
                        ahead = c.play_until - time.monotonic()
                        while ahead > lead and self.cancel_reason is None and not c.closing:
                            await asyncio.sleep(min(ahead - lead, 0.1))
                            ahead = c.play_until - time.monotonic()
        except OmnitalkError as e:
            error = e
        except Exception as e:
            log.exception("response %s failed", rid)
            error = e
        if self.cancel_reason is not None:
            t0 = time.monotonic()  # the scheduler stops it at its next step
            while resp.status == "in_progress" and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.005)
        status = "cancelled" if self.cancel_reason is not None else resp.status
        if error is not None and status not in ("cancelled",):
            status = "failed"
        if status == "in_progress":
            status = "completed"
        text = "".join(self.transcript)
        details = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": self.cancel_reason or "client_cancelled"}
        elif status == "incomplete":
            details = {"type": "incomplete", "reason": "max_output_tokens"}
        elif status == "failed":
            details = {"type": "failed", "error": {"type": "server_error", "code": "generation_failed",
                                                   "message": safe_message(error) if error else "generation failed"}}
        if self.speak:
            c.emit({"type": names["audio_done"], **where})
            c.emit({"type": names["done"], **where, "transcript": text})
        else:
            c.emit({"type": names["done"], **where, "text": text})
        c.emit({"type": "response.content_part.done", **where, "part": self.part(text)})
        item = self.item("completed" if status == "completed" else "incomplete", text)
        c.emit({"type": "response.output_item.done", "response_id": rid, "output_index": 0, "item": item})
        if c.flavor == "ga":
            c.emit({"type": "conversation.item.done", "previous_item_id": None, "item": item})
        u = dict(resp.usage)
        usage = {"total_tokens": int(u.get("input_tokens", 0)) + int(u.get("output_tokens", 0)),
                 "input_tokens": int(u.get("input_tokens", 0)), "output_tokens": int(u.get("output_tokens", 0))}
        c.emit({"type": "response.done", "response": self.response_object(status, details, usage, [item])})

    def _audio(self, pcm: np.ndarray, name: str, where: dict) -> None:
        c = self.conn
        now = time.monotonic()
        if self.t_first_audio is None:
            self.t_first_audio = now
        dur = len(pcm) / IN_RATE
        c.play_until = max(c.play_until, now) + dur
        self.audio_samples += len(pcm)
        self.audio_ms_sent = self.audio_samples * 1000 / IN_RATE
        c.emit({"type": name, **where, "delta": pcm16_b64(pcm)}, response_id=self.response_id, audio=True)


HANDLERS = {
    "session.update": Connection.on_session_update,
    "input_audio_buffer.append": Connection.on_append,
    "input_audio_buffer.commit": Connection.on_commit,
    "input_audio_buffer.clear": Connection.on_clear,
    "conversation.item.create": Connection.on_item_create,
    "conversation.item.delete": Connection.on_item_delete,
    "conversation.item.truncate": Connection.on_item_truncate,
    "response.create": Connection.on_response_create,
    "response.cancel": Connection.on_response_cancel,
    "output_audio_buffer.clear": Connection.on_output_audio_clear,
}
