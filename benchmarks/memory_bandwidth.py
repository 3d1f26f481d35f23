"""Measure this machine's memory bandwidth the way `omnitalk bench` does (best of N, 1 GiB float32).

    python benchmarks/memory_bandwidth.py [--threads N] [--gib 1] [--repeats 5] [--device cpu|cuda]
"""
import argparse

import torch

from omnitalk.bench import measure_bandwidth, physical_cores

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=physical_cores())
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    bw = measure_bandwidth(a.device, a.gib, a.repeats)
    print(f"read {bw.read_gbs:.1f} GB/s (sum), copy {bw.copy_gbs:.1f} GB/s (read + write), "
          f"{a.threads} threads, best of {a.repeats} over {a.gib:g} GiB on {a.device}")
