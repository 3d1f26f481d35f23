"""Load: 8 concurrent realtime sessions on one shared small model (benchmarks/server_load.py, shortened):
no audio chunk is lost, every session is freed, and memory does not keep growing from round to round."""
from __future__ import annotations

from pathlib import Path

import pytest

from omnitalk.testing import load_script

pytest.importorskip("fastapi")
pytest.importorskip("websockets")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    return load_script(ROOT / "benchmarks" / "server_load.py")


def test_eight_sessions_lose_nothing_and_leave_nothing():
    r = _bench().run(sessions=8, duration=12.0, max_tokens=60, rounds=2)
    assert r["turns"] >= 16 and r["chunks_sent"] > 0
    assert r["lost_chunks"] == 0, r
    assert r["sessions_left"] == 0 and r["dropped_slow_clients"] == 0
    assert not any(k.startswith("error") or k == "failed" for k in r["statuses"]), r["statuses"]
    first, second = r["rss_mb_after_each_round"]
    assert second - first < 100, r["rss_mb_after_each_round"]   # a second round must not add as much again
