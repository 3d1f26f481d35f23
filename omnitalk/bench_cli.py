"""`omnitalk bench`: the command-line face of omnitalk.bench (no torch import here, so `--help` is fast).

    omnitalk bench --preset mini-omni2 --random-weights --mode all --baseline --json bench.json
    omnitalk bench --checkpoint checkpoint/ --mode int8 --quality

Wiring: `omnitalk.cli` calls `register(subparsers)`; `benchmarks/bench.py` and
`python -m omnitalk.bench` use the same arguments through `add_arguments`.
"""
from __future__ import annotations

import argparse

MODE_CHOICES = ("fp32", "bf16", "int8", "all")
GROUPS = ("decode", "prefill", "encoders", "snac", "ttfa", "rtf")


def _modes(value: str) -> list[str]:
    """'all' or a comma-separated list of fp32/bf16/int8, in the order given."""
    modes = []
    for m in value.split(","):
        m = m.strip()
        if m not in MODE_CHOICES:
            raise argparse.ArgumentTypeError(f"unknown mode {m!r}; use fp32, bf16, int8, all or a comma list")
        modes += ["fp32", "bf16", "int8"] if m == "all" else [m]
    return list(dict.fromkeys(modes))


def _groups(value: str) -> list[str]:
    groups = [g.strip() for g in value.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown group(s) {bad}; choose from {','.join(GROUPS)}")
    return groups


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("weights (one of)")
    w.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory (official layout or ours); "
                   "nothing is downloaded")
    w.add_argument("--random-weights", action="store_true",
                   help="random weights of --preset's shapes (no files); audio special ids are made "
                        "unreachable so every answer runs to its full length")
    w.add_argument("--preset", default="mini-omni2", choices=("mini-omni2", "tiny"),
                   help="shapes for --random-weights (default: mini-omni2, the official ones)")
    r = p.add_argument_group("what to run")
    r.add_argument("--mode", type=_modes, default=["fp32", "bf16", "int8"], metavar="MODE",
                   help="fp32, bf16, int8, a comma list or all (default: all); each in a fresh process")
    r.add_argument("--baseline", action="store_true",
                   help="also run the official way (fp32, 2048-slot masked cache with 14 expanded KV heads, "
                        "full logits for both items) and print our speed-up beside it")
    r.add_argument("--quality", action="store_true",
                   help="logit error and greedy-token agreement of each mode against fp32 (parity fixture "
                        "and official-size random weights)")
    r.add_argument("--quality-steps", type=_positive, default=200, metavar="N",
                   help="greedy steps compared by --quality (default: 200)")
    r.add_argument("--quality-random-preset", default=None, choices=("mini-omni2", "tiny"),
                   help="shapes of the random-weight --quality model (default: mini-omni2)")
    r.add_argument("--only", type=_groups, default=list(GROUPS), metavar="GROUPS",
                   help=f"comma list of metric groups to time (default: all of {','.join(GROUPS)}); "
                        "memory and the bandwidth floor are always reported")
    r.add_argument("--profile", action="store_true",
                   help="also profile the decode step with torch.profiler and print the top operators")
    m = p.add_argument_group("measurement")
    m.add_argument("--repeats", type=_positive, default=10, metavar="N", help="timed repetitions (default: 10)")
    m.add_argument("--warmup", type=_non_negative, default=2, metavar="N", help="untimed repetitions first "
                   "(default: 2)")
    m.add_argument("--rtf-repeats", type=_positive, default=3, metavar="N",
                   help="repetitions of the 20-second answer (default: 3)")
    m.add_argument("--answer-seconds", type=float, default=20.0, metavar="S",
                   help="length of the spoken answer for the real-time factor (default: 20)")
    m.add_argument("--question-seconds", type=float, default=3.0, metavar="S",
                   help="length of the synthetic spoken question (default: 3; ignored with --audio)")
    m.add_argument("--whisper-window", choices=("exact", "trimmed"), default=None,
                   help="run Whisper over the padded 30-s window (exact, the release) or only the frames the "
                        "question covers (trimmed) in every mode (default: the encoder's own)")
    m.add_argument("--audio", metavar="WAV", help="use this spoken question instead of a synthetic one")
    m.add_argument("--image", metavar="IMG", help="use this image instead of a synthetic one")
    m.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="torch.set_num_threads (default: the number of physical cores)")
    m.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default: cpu")
    m.add_argument("--compile", action="store_true",
                   help="run the decode step through torch.compile (static caches; one CUDA graph per step "
                        "on a GPU); the baseline is never compiled")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    m.add_argument("--bandwidth-gib", type=float, default=1.0, metavar="GIB",
                   help="size of the tensor the memory bandwidth is measured on (default: 1)")
    m.add_argument("--in-process", action="store_true",
                   help="run every mode in this process (faster start, but peak memory mixes across modes)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="also write every number (and the machine) as JSON here")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="measure speed, memory and quality per mode (decode step, prefill, first audio, RTF)",
        description="Measures, after warm-up, medians and p90s of the speech+text decode step, prefill, "
                    "encoders, SNAC, time to first audio, real-time factor, chunk gaps, memory and the "
                    "memory-bandwidth floor; see docs/performance.md.")
    add_arguments(p)
    p.set_defaults(run=run_bench)


def run_bench(args) -> int:
    from omnitalk.bench import run_from_args
    return run_from_args(args)
