"""`omnitalk serve`: load the model once, warm it up, serve the realtime API, /chat and the web page.

    omnitalk serve --checkpoint checkpoint --host 127.0.0.1 --port 8000 [--api-key KEY] [--max-sessions 8]
    omnitalk serve --random-weights tiny          # no files: a small random model (demos of the plumbing)

Wired into the main CLI with `register(subparsers)`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("omnitalk.server")


def register(subparsers) -> argparse.ArgumentParser:
    from omnitalk.cli import add_whisper_window_arg

    p = subparsers.add_parser(
        "serve", help="serve the OpenAI-Realtime-compatible API, the official /chat endpoint and a web page",
        description="Loads the model once and serves ws://HOST:PORT/v1/realtime (OpenAI Realtime API), "
                    "POST /chat (the official Mini-Omni2 protocol) and the web page at http://HOST:PORT/.")
    p.add_argument("--checkpoint", default=os.environ.get("OMNITALK_CHECKPOINT") or "checkpoint",
                   metavar="DIR_OR_REPO", help="checkpoint directory, hub repo id, or 'demo' (the embedded demo "
                                                 "model; also used when an empty checkpoint cannot be downloaded). "
                                                 "Default: $OMNITALK_CHECKPOINT or ./checkpoint")
    p.add_argument("--random-weights", metavar="PRESET", choices=("tiny", "mini-omni2"), default=None,
                   help="serve a random-weight model of this preset instead of a checkpoint (tests, demos)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    p.add_argument("--mode", choices=("fp32", "bf16", "int8"), default="fp32", help="weight precision")
    p.add_argument("--no-download", action="store_true", help="never fetch missing checkpoint files")
    add_whisper_window_arg(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; browsers grant the microphone only on "
                        "localhost or https)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("OMNITALK_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $OMNITALK_API_KEY; none = open)")
    p.add_argument("--max-sessions", type=int, default=8, help="concurrent conversations (default 8)")
    p.add_argument("--stop-phrase", action="append", dest="stop_phrases", metavar="PHRASE",
                   help='spoken command that stops an answer (repeatable; default "stop omni", "omni stop")')
    p.add_argument("--stop-detector", choices=("auto", "asr", "listening"), default="auto",
                   help="how the stop command is heard while the model talks: listening = the model's own "
                        "listening item (interruption-trained checkpoints), asr = its ASR matched against the "
                        "stop phrases; auto (default): the checkpoint's stop_detector setting, else listening "
                        "when the model has that head, else asr")
    p.add_argument("--no-vad", action="store_true", help="sessions start without server VAD (clients may "
                                                         "still enable it)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up answer at startup")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(message)s")
    if args.max_sessions < 1:
        print("omnitalk serve: --max-sessions must be at least 1", file=sys.stderr)
        return 2
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        print("omnitalk serve needs fastapi and uvicorn: pip install fastapi 'uvicorn[standard]'", file=sys.stderr)
        return 2
    from omnitalk.engine import OmniModel
    from omnitalk.server.app import DEFAULT_STOP_PHRASES, Limits, create_app, uvicorn_config

    if args.random_weights:
        log.info("building a random-weight %r model", args.random_weights)
        model = OmniModel.from_random(args.random_weights, device=args.device, mode=args.mode)
        name = f"random-{args.random_weights}"
    else:
        from omnitalk import demo

        log.info("loading %s", args.checkpoint)
        model, used = demo.load_model(args.checkpoint, device=args.device, mode=args.mode,
                                      download=not args.no_download, say=log.warning)
        name = "omnitalk-demo" if used != args.checkpoint else None
    if args.whisper_window:
        model.whisper_window = args.whisper_window
    limits = Limits()
    app = create_app(model, api_key=args.api_key, limits=limits, max_sessions=args.max_sessions,
                     stop_phrases=tuple(args.stop_phrases or DEFAULT_STOP_PHRASES), server_vad=not args.no_vad,
                     warmup=not args.no_warmup, model_name=name, stop_detector=args.stop_detector)
    host = args.host
    shown = f"[{host}]" if ":" in host else host
    log.info("omnitalk is serving on http://%s:%d/  (realtime: ws://%s:%d/v1/realtime, /chat)%s",
             shown, args.port, shown, args.port, "  [API key required]" if args.api_key else "")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: browsers allow the microphone only on localhost or https", host)
    uvicorn.Server(uvicorn_config(app, host, args.port, limits, log_level=args.log_level)).run()
    return 0


def main(argv=None) -> int:  # `python -m omnitalk.server.cli serve ...` before the main CLI wires it in
    parser = argparse.ArgumentParser(prog="omnitalk")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
