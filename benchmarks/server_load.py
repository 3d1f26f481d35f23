"""Many users at once: N concurrent realtime sessions asking and listening for a while.

    python benchmarks/server_load.py                           # 8 sessions, 60 s, small random model
    python benchmarks/server_load.py --sessions 8 --duration 60 --json benchmarks/server_load.json

Each session (its own WebSocket, one shared Scheduler) asks in turns, alternating the spoken question
(input_audio) and a text prompt, with spoken answers of at most --max-tokens steps, and plays the answer
in its head: playback starts 50 ms after the first chunk (as the web page does) and runs back to back.

Reported: time to first audio (request sent -> first audio delta) p50/p90; lost chunks (audio deltas the
server sent minus those received: must be 0); late chunks (a chunk that arrives after the simulated
playback needed it, i.e. an audible gap) and the total gap time; the process RSS before (model loaded,
warmed up) and after each round (every session closed, garbage collected; --rounds 2 or more shows
whether memory keeps growing), and the sessions/threads left.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnitalk.audio import load_audio, resample  # noqa: E402

LONG = "Tell me a long story about a cat."
LEAD_S = 0.05


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pct(xs, q):
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def session(url: str, deadline: float, max_tokens: int, question_b64: str, out: dict, idx: int) -> None:
    import websockets
    ttfa, late, gap_s, received, turns, statuses = [], 0, 0.0, 0, 0, {}
    async with websockets.connect(url, max_size=None) as ws:
        async def recv():
            return json.loads(await ws.recv())

        ev = await recv()
        assert ev["type"] == "session.created", ev
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "max_output_tokens": max_tokens, "audio": {"input": {"turn_detection": None}}}}))
        while time.perf_counter() < deadline:
            content = ({"type": "input_audio", "audio": question_b64} if (turns + idx) % 2 == 0
                       else {"type": "input_text", "text": LONG})
            await ws.send(json.dumps({"type": "conversation.item.create",
                                      "item": {"type": "message", "role": "user", "content": [content]}}))
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "response.create"}))
            t_first = None
            play_at = 0.0          # simulated playback clock: when the queued audio runs out
            while True:
                ev = await recv()
                now = time.perf_counter()
                if ev["type"] == "response.output_audio.delta":
                    dur = len(base64.b64decode(ev["delta"])) / 2 / 24000
                    received += 1
                    if t_first is None:
                        t_first = now
                        ttfa.append((now - t0) * 1000)
                        play_at = now + LEAD_S
                    elif now > play_at:        # the player ran dry before this chunk came
                        late += 1
                        gap_s += now - play_at
                        play_at = now
                    play_at += dur
                elif ev["type"] == "response.done":
                    st = ev["response"]["status"]
                    statuses[st] = statuses.get(st, 0) + 1
                    break
                elif ev["type"] == "error":
                    statuses["error:" + ev["error"]["code"]] = statuses.get("error:" + ev["error"]["code"], 0) + 1
                    break
            turns += 1
            # the user listens to the end of the answer before asking again
            wait = max(0.0, play_at - time.perf_counter())
            if time.perf_counter() + wait < deadline:
                await asyncio.sleep(wait)
    out[idx] = dict(ttfa=ttfa, late=late, gap_s=gap_s, received=received, turns=turns, statuses=statuses)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of asking (the last answers finish after)")
    ap.add_argument("--max-tokens", type=int, default=150, help="answer length cap (150 steps = 12 s of speech)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole load (RSS after each: a leak grows)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = run(args.sessions, args.duration, args.max_tokens, args.preset, args.checkpoint, args.device,
                  args.rounds)
    print(json.dumps({k: v for k, v in results.items() if k != "per_session"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if results["lost_chunks"] == 0 and results["sessions_left"] == 0 else 1


def run(sessions: int = 8, duration: float = 60.0, max_tokens: int = 150, preset: str = "tiny",
        checkpoint: str | None = None, device: str | None = None, rounds: int = 1) -> dict:
    from omnitalk.engine import OmniModel
    from omnitalk.server.app import BackgroundServer, create_app
    from omnitalk.session import Scheduler

    model = (OmniModel.from_pretrained(checkpoint, device=device) if checkpoint
             else OmniModel.from_random(preset, device=device))
    question = load_audio(ROOT / "examples" / "question.wav")
    q24 = (np.clip(resample(question, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()
    question_b64 = base64.b64encode(q24).decode()
    sched = Scheduler(model, max_sessions=sessions).start()
    app = create_app(sched, warmup=True)
    ctx = app.state.ctx
    rounds_rss = []
    with BackgroundServer(app) as srv:
        gc.collect()
        rss0, threads0 = rss_mb(), threading.active_count()
        results: list[dict] = []
        t0 = time.perf_counter()
        for _ in range(rounds):
            out: dict = {}

            async def all_sessions():
                deadline = time.perf_counter() + duration
                await asyncio.gather(*[session(srv.ws_url, deadline, max_tokens, question_b64, out, i)
                                       for i in range(sessions)])

            asyncio.run(all_sessions())
            results.append(out)
            end = time.monotonic() + 10
            while (sched.sessions or ctx.connections) and time.monotonic() < end:
                time.sleep(0.05)
            gc.collect()
            rounds_rss.append(round(rss_mb(), 1))
        wall = time.perf_counter() - t0
        rss1, threads1 = rss_mb(), threading.active_count()
        sent = ctx.stats["audio_deltas_sent"]
    sched.stop()
    allout = [s for out in results for s in out.values()]
    ttfa = [x for s in allout for x in s["ttfa"]]
    received = sum(s["received"] for s in allout)
    statuses: dict = {}
    for s in allout:
        for k, v in s["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    out = {i: s for i, s in enumerate(allout)}
    return {
        "model": checkpoint or f"random-{preset}", "sessions": sessions, "duration_s": duration,
        "wall_s": round(wall, 1), "max_tokens": max_tokens, "cpu_threads": __import__("torch").get_num_threads(),
        "rounds": rounds, "turns": sum(s["turns"] for s in allout), "statuses": statuses,
        "ttfa_ms_p50": round(statistics.median(ttfa), 1) if ttfa else None,
        "ttfa_ms_p90": round(pct(ttfa, 0.9), 1) if ttfa else None,
        "ttfa_ms_max": round(max(ttfa), 1) if ttfa else None,
        "chunks_sent": sent, "chunks_received": received, "lost_chunks": sent - received,
        "late_chunks": sum(s["late"] for s in allout),
        "gap_s_total": round(sum(s["gap_s"] for s in allout), 2),
        "rss_mb_before": round(rss0, 1), "rss_mb_after": round(rss1, 1), "rss_mb_after_each_round": rounds_rss,
        "threads_before": threads0, "threads_after": threads1,
        "sessions_left": sched.sessions, "dropped_slow_clients": ctx.stats["dropped_slow"],
        "per_session": out,
    }


if __name__ == "__main__":
    sys.exit(main())
