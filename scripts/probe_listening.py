"""How much can the listening item's input tell? A probe of the interruption clips' SNAC frames.

    python scripts/probe_listening.py runs/small/world                  # the recipe's clips
    python scripts/probe_listening.py runs/small/world --n-train 400    # fewer training clips
    python scripts/probe_listening.py runs/small/world --input mel      # the clips' log-mel instead

The small recipe's model hears the user through SNAC frames (7 codes per 85.33 ms frame, the paper's
layout). This script asks whether those codes carry "stop omni" in a way that generalises to held-out
voices at all, independently of the LLM: a small dedicated detector (per-frame mean of 7 code embeddings,
a causal convolution, a GRU, one logit per frame) is trained on `interrupt_train.jsonl`'s frames and
labels and scored on `interrupt_eval.jsonl` with the metric the recipe reports
(`omnitalk.eval.metrics.InterruptionMetrics`: clip-level F1, false interruptions on negative clips,
median reaction delay). If the probe cannot reach the issue's targets either, the codec's codes (or
the number of voices), not the LLM's training, bound the listening item. `--input mel` gives the same
detector the clip audio's Whisper log-mel instead (80 bands averaged over each 85.33-ms frame, a linear
layer in place of the embeddings): the reference point of what these clips allow from the sound itself.
Prints a line per 300 steps and writes `probe_listening.json` beside the manifests (or to --out).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnitalk.config import Config  # noqa: E402
from omnitalk.eval.metrics import FRAME_MS, InterruptionMetrics  # noqa: E402
from omnitalk.train.data import read_manifest  # noqa: E402

N_CODES = Config().audio_vocab_size  # a SNAC layer's local ids: 4096 codes + the 64 audio specials


class Probe(nn.Module):
    def __init__(self, d: int = 64, n_mels: int = 0):
        super().__init__()
        self.emb = nn.ModuleList(nn.Embedding(N_CODES, d) for _ in range(7)) if not n_mels else None
        self.mel = nn.Linear(n_mels, d) if n_mels else None
        self.conv = nn.Conv1d(d, d, 3, padding=2)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.out = nn.Linear(d, 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # codes (B, T, 7) or mel (B, T, n_mels) -> (B, T)
        if self.mel is not None:
            x = self.mel(frames)                                                          # (B, T, d)
        else:
            x = sum(e(frames[..., j]) for j, e in enumerate(self.emb)) / 7                # (B, T, d)
        x = torch.relu(self.conv(x.transpose(1, 2))[..., : frames.shape[1]].transpose(1, 2))  # causal
        return self.out(self.gru(x)[0]).squeeze(-1)


def frame_mel(path: str, n_frames: int, n_mels: int = 80) -> torch.Tensor:
    """(n_frames, n_mels): the audio's Whisper log-mel averaged over each SNAC frame's 85.33 ms."""
    from omnitalk.audio import HOP, SAMPLE_RATE, load_audio, log_mel_spectrogram

    mel = log_mel_spectrogram(load_audio(path), n_mels, padding_to=None)  # (n_mels, 100 per second)
    edges = [round(f * FRAME_MS / 1000 * SAMPLE_RATE / HOP) for f in range(n_frames + 1)]
    return torch.stack([mel[:, a:max(b, a + 1)].mean(-1) for a, b in zip(edges, edges[1:])])


def with_inputs(clips: list[dict], input: str) -> list[dict]:
    """Each clip's detector input, made once: c["x"] = codes (T, 7) long or log-mel (T, 80); c["y"] (T,)."""
    for c in clips:
        T = len(c["labels"])
        c["x"] = frame_mel(c["listen_audio"], T) if input == "mel" else torch.tensor(c["listen_frames"])
        c["y"] = torch.tensor(c["labels"], dtype=torch.float32)
    return clips


def batch(clips: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips padded to the longest: inputs (B, T, ...) and labels (B, T), -1 where there is no frame."""
    T = max(len(c["y"]) for c in clips)
    X = clips[0]["x"].new_zeros((len(clips), T, *clips[0]["x"].shape[1:]))
    Y = torch.full((len(clips), T), -1.0)
    for i, c in enumerate(clips):
        X[i, : len(c["y"])], Y[i, : len(c["y"])] = c["x"], c["y"]
    return X, Y


@torch.no_grad()
def score(model: Probe, clips: list[dict]) -> dict:
    model.eval()
    m = InterruptionMetrics()
    for c in clips:
        X, _ = batch([c])
        statuses = (model(X)[0] > 0).int().tolist()
        m.add(statuses, labels=c["labels"], command_end_ms=c.get("command_end_ms"),
              command_start_ms=c.get("command_start_ms"), id=c["id"])
    model.train()
    return m.result()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("world", type=Path, help="a world folder with interrupt_train.jsonl / interrupt_eval.jsonl")
    ap.add_argument("--n-train", type=int, default=None, help="use only the first N training clips")
    ap.add_argument("--input", choices=("codes", "mel"), default="codes",
                    help="the clips' SNAC frames (what the model hears) or their audio's log-mel")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    for name in ("interrupt_train.jsonl", "interrupt_eval.jsonl"):
        if not (a.world / name).is_file():
            raise SystemExit(f"{a.world / name} not found: give a world folder made with interruption clips "
                             "(scripts/train_small.py writes runs/small/world)")
    # validated records, listen_audio resolved against the manifest's folder
    train = read_manifest(a.world / "interrupt_train.jsonl", check_files=a.input == "mel")[: a.n_train]
    held = read_manifest(a.world / "interrupt_eval.jsonl", check_files=a.input == "mel")
    if not train or not held:
        raise SystemExit(f"{a.world}: no interruption clips; make the world with n_interrupt_train/eval > 0")
    with_inputs(train + held, a.input)
    model = Probe(n_mels=80 if a.input == "mel" else 0)
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=0.05)
    rows, t0 = [], time.perf_counter()
    for step in range(1, a.steps + 1):
        X, Y = batch(rng.sample(train, min(a.batch_size, len(train))))
        logits, mask = model(X), Y >= 0
        loss = F.binary_cross_entropy_with_logits(logits[mask], Y[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 300 == 0 or step == a.steps:
            tr, ho = score(model, train[:200]), score(model, held)
            rows.append({"step": step, "loss": round(loss.item(), 4), "train": tr, "held_out": ho})
            print(f"step {step:5d}  loss {loss.item():.3f}  training clips F1 {tr['f1']:.2f} false "
                  f"{tr['false_interruption_rate']:.2f}  |  held-out F1 {ho['f1']:.2f} false "
                  f"{ho['false_interruption_rate']:.2f} median {ho['median_delay_ms']}", flush=True)
    res = {"world": str(a.world), "input": a.input, "n_train": len(train), "n_held_out": len(held), "steps": a.steps,
           "seconds": round(time.perf_counter() - t0, 1), "final": rows[-1], "curve": rows}
    out = a.out or a.world / "probe_listening.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
