"""`omnitalk train` and `omnitalk plot-metrics` (argument parsing and printing only).

    omnitalk train configs/small-cpu.yaml [--stage 2] [--resume] [--max-steps N] [--out DIR]
    torchrun --nproc_per_node 2 -m omnitalk.train.cli train configs/mini-omni2-stage3.yaml
    omnitalk plot-metrics runs/small/metrics.jsonl --out loss.png
    omnitalk export runs/small --out DIR [--assets CHECKPOINT_DIR] [--safetensors DIR]
    omnitalk train-codec configs/codec-small.yaml [--resume] [--steps N] [--out DIR] [--eval-only]

The main CLI calls `register(subparsers)`; `python -m omnitalk.train.cli` runs these two alone.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model from a YAML config (see configs/)",
                       description="Train per CONFIG (configs/*.yaml). SIGTERM saves a checkpoint at the next "
                                   "step and exits 0; --resume continues from the latest checkpoint exactly. "
                                   "Runs under torchrun for several processes/GPUs (strategy ddp or fsdp).")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), help="override the config's stage (and its default lr)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    p.add_argument("--max-steps", type=int, metavar="N", help="override optim.steps (the schedule's length)")
    p.add_argument("--out", metavar="DIR", help="override out_dir")
    p.add_argument("--device", help="override device (cpu, cuda, cuda:N)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    from omnitalk.train.config import TrainConfig
    from omnitalk.train.loop import run

    cfg = TrainConfig.from_yaml(args.config)
    if args.stage is not None:
        cfg.stage = args.stage
    if args.max_steps is not None:
        cfg.optim.steps = args.max_steps
    if args.out:
        cfg.out_dir = args.out
    if args.device:
        cfg.device = args.device
    if args.no_progress:
        cfg.progress = False
    cfg.validate()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = run(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
        return 0
    if res.stopped:
        print(f"stopped at step {res.step}; checkpoint {res.path} (continue with --resume)")
    else:
        loss = f", last loss {res.last_loss:.4f}" if res.last_loss is not None else ""
        print(f"done: {res.step} steps{loss}; model in {res.path}")
    return 0


def add_train_codec(sub) -> None:
    p = sub.add_parser("train-codec", help="train a SNAC codec (the LLM's speech tokens) from a YAML config",
                       description="Train a SNAC-architecture codec with the LLM's token layout (24 kHz, hop 512, "
                                   "3 codebooks of 4096 at strides 4/2/1) per CONFIG (configs/codec-small.yaml). "
                                   "Writes OUT/final/ (config.json, model.safetensors, pytorch_model.bin) and "
                                   "OUT/eval.json. SIGTERM saves a checkpoint; --resume continues exactly.")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    p.add_argument("--steps", type=int, metavar="N", help="override steps (the schedule's length)")
    p.add_argument("--out", metavar="DIR", help="override out_dir")
    p.add_argument("--eval-only", metavar="CODEC_DIR", nargs="?", const="",
                   help="only evaluate a trained codec folder (default: OUT/final) on the config's held-out speech")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_train_codec)


def run_train_codec(args) -> int:
    import json
    from pathlib import Path

    from omnitalk.train import codec as C

    cfg = C.CodecTrainConfig.from_yaml(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.out:
        cfg.out_dir = args.out
    if args.no_progress:
        cfg.progress = False
    cfg.validate()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.eval_only is not None:
        report = C.evaluate_trained(cfg, Path(args.eval_only or Path(cfg.out_dir) / "final"))
        print(json.dumps(C.summary(report), indent=2))
        return 0
    res = C.train_codec(cfg, resume=args.resume)
    if res.stopped:
        print(f"stopped at step {res.step}; checkpoint {res.path} (continue with --resume)")
        return 0
    print(json.dumps(C.summary(res.report), indent=2))
    print(f"done: {res.step} steps; codec in {res.path}; report in {Path(cfg.out_dir) / 'eval.json'}")
    return 0


def add_plot_metrics(sub) -> None:
    p = sub.add_parser("plot-metrics", help="draw loss curves from a metrics.jsonl as a PNG")
    p.add_argument("metrics", metavar="METRICS.jsonl")
    p.add_argument("--out", default="loss.png", metavar="PNG")
    p.add_argument("--keys", nargs="+", help="which columns to draw (default: loss, text, audio, eval_*)")
    p.add_argument("--title")
    p.set_defaults(run=run_plot_metrics)


def run_plot_metrics(args) -> int:
    from omnitalk.train.metrics import CURVES, plot_metrics

    out = plot_metrics(args.metrics, args.out, keys=tuple(args.keys) if args.keys else CURVES, title=args.title)
    print(out)
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a training checkpoint to the official lit_model.pth layout",
                       description="RUN is a training output dir (its latest checkpoint) or one checkpoint dir "
                                   "(state.pt). Writes lit_model.pth + model_config.yaml; --assets copies "
                                   "tokenizer.json, small.pt, ViT-B-32.* and snac/ so the result is a complete "
                                   "checkpoint; --safetensors also writes our layout.")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--assets", metavar="DIR", help="checkpoint dir to copy tokenizer/encoders/codec from")
    p.add_argument("--safetensors", metavar="DIR", help="also convert to omnitalk.safetensors in DIR")
    p.set_defaults(run=run_export)


def run_export(args) -> int:
    from pathlib import Path

    from omnitalk.train.export import export_checkpoint, export_safetensors
    from omnitalk.train.loop import latest_checkpoint

    src = Path(args.run_dir)
    ckpt = src if (src / "state.pt").is_file() else latest_checkpoint(src)
    if ckpt is None:
        raise FileNotFoundError(f"no training checkpoint (state.pt) in {src} or {src / 'checkpoints'}")
    out = export_checkpoint(ckpt, args.out, assets=args.assets)
    print(out)
    if args.safetensors:
        print(export_safetensors(out, args.safetensors))
    return 0


def register(subparsers) -> None:
    """Add `train`, `plot-metrics` and `export` to an argparse subparsers object (a name the caller
    already has is left alone)."""
    have = set(getattr(subparsers, "choices", {}) or {})
    for name, add in (("train", add_train), ("train-codec", add_train_codec), ("plot-metrics", add_plot_metrics),
                      ("export", add_export)):
        if name not in have:
            add(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnitalk", description="omnitalk training commands")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    from omnitalk.errors import OmnitalkError

    try:
        return args.run(args)
    except (OmnitalkError, ValueError, FileNotFoundError) as e:  # config / data problems: one line
        print(f"omnitalk: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
