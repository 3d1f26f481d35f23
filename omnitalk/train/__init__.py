"""Training: sequences and batching, losses, the loop, distributed launch, export, metrics.

Modules (import them directly; this package imports nothing heavy on its own):

    sequences  record -> TrainSample (8 input streams, next-step targets, feature slots); collate; buckets
    losses     omni_loss (text CE + mean of the 7 audio-layer CEs), the gathered-head training forward
    config     TrainConfig (YAML), stage -> trainable parameters, schedules per stage
    loop       train(cfg): AdamW, cosine + warm-up, accumulation, clipping, checkpoints, SIGTERM, resume
    dist       torchrun / DDP / FSDP helpers (the loop calls them; same entry point)
    export     the official lit_model.pth layout, our safetensors layout
    metrics    metrics.jsonl + metrics.csv writer, loss-curve PNG
    cli        `omnitalk train` and `omnitalk plot-metrics`
"""
