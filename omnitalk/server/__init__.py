"""omnitalk's server: an OpenAI-Realtime-compatible WebSocket API, the official Mini-Omni2 `/chat`
endpoint and a web page, all in front of one shared `Scheduler`.

    omnitalk serve --checkpoint checkpoint --host 127.0.0.1 --port 8000 [--api-key KEY] [--max-sessions 8]

Realtime: `ws://HOST:PORT/v1/realtime`; the official `openai` client works with
`OpenAI(base_url="http://HOST:PORT/v1", websocket_base_url="ws://HOST:PORT/v1", api_key=KEY or "none")`
and `client.realtime.connect(model="mini-omni2")` (GA events) or `client.beta.realtime.connect(...)`
(beta events). Images go in as a user content part {"type": "input_image",
"image_url": "data:image/png;base64,..."}. Details: realtime.py (protocol), vad.py (turn detection and
the "stop omni" command), chat.py (/chat), app.py (limits, embedding).
"""
__all__ = ["BackgroundServer", "Limits", "create_app"]


def __getattr__(name):  # lazy: `omnitalk --help` must not import torch and the web stack
    if name in __all__:
        from omnitalk.server import app
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
