"""`POST /chat`: the official Mini-Omni2 HTTP protocol, so existing Mini-Omni2 clients work unchanged.

Request: JSON {"audio": base64 of a WAV (or FLAC/OGG/MP3) file, "image": optional base64 JPEG/PNG,
"stream_stride": SNAC frames per streamed chunk (default 4), "max_tokens": default 2048}.
Response: `multipart/x-mixed-replace; boundary=frame`; per chunk two parts, exactly as the release sends
them: `\\r\\n--frame\\r\\nContent-Type: audio/wav\\r\\n\\r\\n` + raw int16 PCM at 24 kHz (no WAV header)
and `\\r\\n--frame\\r\\nContent-Type: text/plain\\r\\n\\r\\n` + the UTF-8 text that arrived with it.

Differences from the release: requests run concurrently (one Scheduler session each; over the limit ->
HTTP 503), the last partial chunk is sent instead of dropped, text deltas never split a UTF-8 character,
bad input gets HTTP 400 with a JSON reason (the release answers 500 "An error occurred"), and with an
API key the request needs `Authorization: Bearer KEY`. Nothing is written to disk.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from omnitalk.codec import SAMPLES_PER_FRAME
from omnitalk.errors import OmnitalkError

log = logging.getLogger("omnitalk.server")

BOUNDARY = b"frame"
AUDIO_HEAD = b"\r\n--frame\r\nContent-Type: audio/wav\r\n\r\n"
TEXT_HEAD = b"\r\n--frame\r\nContent-Type: text/plain\r\n\r\n"
MEDIA_TYPE = "multipart/x-mixed-replace; boundary=frame"


def _b64(v, what: str) -> bytes:
    if not isinstance(v, str) or not v:
        raise ValueError(f"`{what}` must be a non-empty base64 string")
    if v.startswith("data:"):
        v = v.partition(",")[2]
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"`{what}` is not valid base64") from None


def _int(v, what: str, lo: int, hi: int, default: int) -> int:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or not lo <= int(v) <= hi:
        raise ValueError(f"`{what}` must be an integer from {lo} to {hi}")
    return int(v)


class Rechunker:
    """Regroups streamed PCM into parts of `stride` SNAC frames; each part carries the text since the last."""

    def __init__(self, stride: int):
        self.size = stride * SAMPLES_PER_FRAME
        self.pcm = np.zeros(0, np.int16)
        self.text = ""

    def push(self, audio: np.ndarray, text: str) -> list[tuple[bytes, str]]:
        self.text += text
        if len(audio):
            self.pcm = np.concatenate([self.pcm, np.asarray(audio, np.int16)])
        out = []
        while len(self.pcm) >= self.size:
            out.append((self.pcm[:self.size].astype("<i2").tobytes(), self.text))
            self.pcm, self.text = self.pcm[self.size:], ""
        return out

    def flush(self) -> list[tuple[bytes, str]]:
        if not len(self.pcm) and not self.text:
            return []
        out = [(self.pcm.astype("<i2").tobytes(), self.text)]
        self.pcm, self.text = np.zeros(0, np.int16), ""
        return out


def encode_parts(pcm: bytes, text: str) -> bytes:
    return AUDIO_HEAD + pcm + TEXT_HEAD + text.encode("utf-8")


def parse_stream(data: bytes) -> list[tuple[str, bytes]]:
    """Split a /chat response body into (content type, payload) parts (for clients and tests)."""
    parts = []
    marker = b"\r\n--frame\r\n"
    for raw in data.split(marker)[1:]:
        head, sep, payload = raw.partition(b"\r\n\r\n")
        if not sep:
            continue
        ctype = head.decode("latin-1").split(":", 1)[1].strip() if b":" in head else ""
        parts.append((ctype, payload))
    return parts


def install(app, ctx) -> None:
    from omnitalk.session import CapacityError
    from omnitalk.server.realtime import safe_message

    def fail(status: int, message: str):
        return JSONResponse({"error": {"message": message}}, status_code=status)

    @app.post("/chat")
    async def chat(request: Request):
        if ctx.api_key is not None:
            auth = request.headers.get("authorization", "")
            if not (auth[:7].lower() == "bearer " and ctx.check_key(auth[7:].strip())):
                return fail(401, "missing or wrong API key: send `Authorization: Bearer KEY`")
        body = await request.body()
        if len(body) > ctx.limits.max_message_bytes * 2:
            return fail(413, f"request larger than {ctx.limits.max_message_bytes * 2} bytes")
        try:
            import json
            req = json.loads(body)
            if not isinstance(req, dict):
                raise ValueError("the body must be a JSON object")
            audio = _b64(req.get("audio"), "audio")
            image = _b64(req["image"], "image") if req.get("image") else None
            stride = _int(req.get("stream_stride"), "stream_stride", 1, 64, 4)
            max_tokens = _int(req.get("max_tokens"), "max_tokens", 1, ctx.limits.max_output_tokens, 2048)
        except ValueError as e:
            return fail(400, safe_message(e))
        try:
            from omnitalk.audio import load_audio
            x = await asyncio.to_thread(load_audio, audio)
        except OmnitalkError as e:
            return fail(400, safe_message(e))
        try:
            conv = ctx.scheduler.open()
        except CapacityError:
            return fail(503, f"the server is at its limit of {ctx.scheduler.max_sessions} sessions; try again later")
        try:
            resp = await asyncio.to_thread(conv.respond, audio=x, image=image, reply="speech", max_tokens=max_tokens)
        except OmnitalkError as e:
            await asyncio.to_thread(conv.close)
            return fail(400, safe_message(e))
        except Exception:
            log.exception("/chat failed to start")
            await asyncio.to_thread(conv.close)
            return fail(500, "An error occurred")

        async def body_iter():
            rc = Rechunker(stride)
            try:
                async for chunk in resp:
                    for pcm, text in rc.push(chunk.audio, chunk.text):
                        yield encode_parts(pcm, text)
                for pcm, text in rc.flush():
                    yield encode_parts(pcm, text)
            except OmnitalkError as e:  # mid-stream: nothing more to send; the client sees the end
                log.warning("/chat generation failed: %s", safe_message(e))
            finally:  # also when the client vanished and this task is being cancelled: never await here
                conv.close(wait=False)

        return StreamingResponse(body_iter(), media_type=MEDIA_TYPE)
