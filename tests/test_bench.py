"""Smoke tests of the benchmark harness (omnitalk.bench): tiny preset, a few repetitions, no timing asserts."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from omnitalk import bench
from omnitalk.bench_cli import add_arguments, register
from omnitalk.errors import InputError

FAST = ["--preset", "tiny", "--random-weights", "--repeats", "2", "--warmup", "0", "--rtf-repeats", "1",
        "--answer-seconds", "1", "--question-seconds", "1", "--threads", "1", "--bandwidth-gib", "0.02"]
BASELINE_TIMINGS = {"decode_step", "prefill_llm_speech", "prefill_llm_speech_image"}
CUDA_ONLY = {"cuda_peak_mb"}
COMPILE_ONLY = {"compile_s"}
# filled in by the parent from the other columns / the baseline
DERIVED_MODE_ONLY = {"speedup_vs_baseline", "prefill_speedup_vs_baseline"}
STREAM_VALUES = {k for k, _, _ in bench.VALUES if k.endswith(("_reference", "_context"))}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check_stat(s: dict) -> None:
    assert set(s) >= {"median", "p90", "min", "max", "n", "unit", "samples"}
    assert s["n"] == len(s["samples"]) >= 1
    assert _finite(s["median"]) and _finite(s["p90"]) and s["min"] <= s["median"] <= s["max"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    code = bench.main(FAST + ["--mode", "int8", "--baseline", "--quality", "--quality-steps", "3",
                              "--in-process", "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def test_json_has_machine_config_and_bandwidth(report):
    m = report["machine"]
    for key in ("cpu_model", "physical_cores", "logical_cpus", "torch_version", "date", "git_commit", "cpu_flags"):
        assert key in m
    assert m["physical_cores"] >= 1
    assert report["bandwidth"]["read_gbs"] > 0 and report["bandwidth"]["copy_gbs"] > 0
    assert report["config"]["modes"] == ["int8"] and report["config"]["threads"] == 1


def test_every_mode_metric_is_there(report):
    r = report["results"]["int8"]
    assert r["error"] is None
    for key, _, _ in bench.TIMINGS:
        _check_stat(r["timings"][key])
    for key, _, _ in bench.VALUES:
        if key in CUDA_ONLY | COMPILE_ONLY:
            continue
        assert key in r["values"], key
        assert _finite(r["values"][key]), (key, r["values"][key])
    assert r["values"]["audio_s_context"] > 0.9  # a 1-second answer really lasts about a second
    assert 0 < r["values"]["floor_over_achieved"]


def test_baseline_column(report):
    r = report["results"]["baseline"]
    assert r["error"] is None
    assert set(r["timings"]) == BASELINE_TIMINGS
    for key in BASELINE_TIMINGS:
        _check_stat(r["timings"][key])
    for key in ("rss_loaded_mb", "rss_peak_mb", "peak_rss_life_mb", "weight_mb_per_step", "kv_mb_per_step",
                "floor_ms", "floor_over_achieved", "step_realtime_x"):
        assert _finite(r["values"][key]), key
    ours = report["results"]["int8"]["values"]
    # the release caches 2048 slots of every expanded head: more KV traffic than ours; int8 reads fewer bytes
    assert r["values"]["kv_mb_per_step"] > ours["kv_mb_per_step"]
    assert ours["weight_mb_per_step"] < r["values"]["weight_mb_per_step"] / 2


def test_quality_rows(report):
    q = report["quality"]
    assert set(q) == {"fixture", "random-tiny"}
    for rows in q.values():
        assert set(rows) == {"int8"}
        row = rows["int8"]
        assert row["steps"] == 3
        for key, _, _ in bench.QUALITY:
            assert _finite(row[key]), key
        assert 0 <= row["agree_free"] <= 1 and 0 <= row["agree_teacher"] <= 1


def test_table_renders_every_column():
    rep = bench.Report(
        machine=bench.machine_info("cpu"), bandwidth=bench.Bandwidth(10.0, 9.0, 1.0, 5, "cpu"),
        config=bench.BenchConfig(modes=["int8"], random_weights=True),
        results={"int8": bench.ModeResult("int8", {"decode_step": bench.Stat.of([20.0, 22.0, 21.0])},
                                          {"weight_mb_per_step": 520.0}),
                 "baseline": bench.ModeResult("baseline", {"decode_step": bench.Stat.of([100.0, 110.0])},
                                              {"weight_mb_per_step": 2000.0})})
    bench.add_derived(rep.results, rep.bandwidth)
    assert rep.results["int8"].values["speedup_vs_baseline"] == pytest.approx(105.0 / 21.0)
    assert rep.results["int8"].values["floor_ms"] == pytest.approx(52.0)
    text = bench.render(rep)
    header = next(line for line in text.splitlines() if line.startswith("metric"))
    assert header.split()[-2:] == ["int8", "baseline"]
    assert "21.0 / 21.8" in text


def test_worker_runs_in_a_fresh_process():
    cfg = bench.BenchConfig(random_weights=True, preset="tiny", threads=1, bandwidth_gib=0.01)
    bw = bench.run_isolated("bandwidth", cfg)
    assert bw["read_gbs"] > 0 and bw["gib"] == 0.01


def test_cli_arguments():
    parser = argparse.ArgumentParser(prog="omnitalk")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--random-weights", "--mode", "all", "--baseline"])
    assert args.mode == ["fp32", "bf16", "int8"] and args.baseline and args.run is not None
    cfg = bench.BenchConfig.from_args(args)
    assert cfg.preset == "mini-omni2" and cfg.threads == bench.physical_cores() and cfg.repeats == 10
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--mode", "int8,fp32"]).mode == ["int8", "fp32"]
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "fp16"])
    with pytest.raises(InputError, match="--random-weights"):
        bench.BenchConfig.from_args(p.parse_args([]))


@pytest.mark.slow
def test_compiled_decode_step(tmp_path, monkeypatch, capsys):
    """--compile: the measured decode steps run through the compiled static step; its compile time is reported."""
    from omnitalk.model.llm import StaticStep
    calls = []
    call = StaticStep.__call__
    monkeypatch.setattr(StaticStep, "__call__", lambda self, ids, pos: calls.append(pos) or call(self, ids, pos))
    out = tmp_path / "bench.json"
    assert bench.main(FAST + ["--mode", "fp32", "--compile", "--only", "decode", "--in-process", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["compile"] is True
    r = report["results"]["fp32"]
    assert r["values"]["compile_s"] > 0
    _check_stat(r["timings"]["decode_step"])
    assert len(calls) >= 2 + 2  # the warm-up's two batch sizes, then the timed steps
    assert "decode step torch.compile-d" in capsys.readouterr().out
