"""Stage 0: pre-train the small model's own encoders on the same world.

The released model reads speech through Whisper-small and images through CLIP ViT-B/32, both trained on
the open web and frozen in every Mini-Omni2 stage. A small model trained from nothing has no such
encoders (their real weights cannot be downloaded everywhere, and are far larger than the model), so
the small recipe first trains a narrow encoder of each official architecture on the world it will be
asked about, then freezes it for stages 1-3 exactly as the paper freezes Whisper and CLIP:

- audio: the Whisper `AudioEncoder` + a linear CTC head over the world's words, on the training
  questions' audio (speed, gain and noise augmentation, so that it carries over to unseen voices).
  The encoder is trained on *trimmed* windows (only the frames the utterance covers, not the padded
  30-s window), and is saved with `window: "trimmed"` so the engine and the feature cache run it the
  same way (omnitalk.model.whisper.features).
- vision: the CLIP `VisionTransformer` + linear heads on the mean of its 50 output tokens, predicting
  how many of each shape a freshly drawn scene holds and which (shape, colour) pairs it shows.

The vision heads are thrown away. The CTC head is returned with the encoder: a model whose config says
`audio_compress: ctc` uses it to merge the encoder's frames into one position per run of equal CTC
labels (omnitalk.model.whisper.ctc_compress), and `save_audio_encoder` stores it in `small.pt`.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from omnitalk import audio as audio_io
from omnitalk.model.whisper import trimmed_mel
from omnitalk.train.export import save_replacing

log = logging.getLogger(__name__)


def cosine_lr(step: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class Stage0Result:
    steps: int
    seconds: float
    losses: list          # (step, loss) every log_every steps
    metrics: dict         # held-out measurements of the head (frame/word accuracy)
    head: nn.Module | None = None  # the trained head (the CTC head of the audio encoder)


def fit(encoder: nn.Module, head: nn.Module, batch_loss: Callable[[], torch.Tensor], *, steps: int, lr: float,
        min_lr: float, warmup: int, max_minutes: float | None, log_every: int, progress: bool,
        name: str) -> tuple[int, float, list]:
    """Train encoder + head together (AdamW, cosine schedule, gradient clipping at 1) for `steps` calls
    of `batch_loss()`, or until `max_minutes`; then freeze the encoder (eval mode, no gradients).
    Returns (steps done, seconds, [(step, loss)] every log_every steps)."""
    from tqdm.auto import tqdm

    params = list(encoder.parameters()) + list(head.parameters())
    encoder.train()
    for p in encoder.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    losses, t0, done = [], time.perf_counter(), 0
    with tqdm(total=steps, desc=f"stage 0 {name}", unit="step", disable=not progress) as bar:
        for step in range(steps):
            if max_minutes and time.perf_counter() - t0 > max_minutes * 60:
                log.warning("stage 0 %s: %.1f-minute budget reached at step %d", name, max_minutes, step)
                break
            loss = batch_loss()
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, steps, lr, min_lr, warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            done = step + 1
            if step % log_every == 0 or step == steps - 1:
                losses.append((step, float(loss.detach())))
                bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
            bar.update(1)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return done, time.perf_counter() - t0, losses


# ---------------------------------------------------------------------------------------------
# audio: CTC over the world's words
# ---------------------------------------------------------------------------------------------

def transcribed_audio(records: Sequence[dict]) -> list[tuple[str, str]]:
    """(question_audio path, transcript) for every record whose question is speech with a known
    transcript: `question_transcript`, or the answer of an ASR record."""
    out = []
    for r in records:
        if not r.get("question_audio"):
            continue
        text = r.get("question_transcript") or (r.get("answer_text") if r.get("task") == "asr" else None)
        if text:
            out.append((r["question_audio"], text))
    return list(dict.fromkeys(out))


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    spec /= np.sqrt(np.maximum(np.arange(len(spec)), 1))
    x = np.fft.irfft(spec, n)
    return x / (np.std(x) + 1e-9)


def augment(x: np.ndarray, rng: np.random.Generator, speed=(0.9, 1.1), noise_prob: float = 0.5,
            snr_db=(5.0, 30.0), gain=(0.3, 0.95)) -> np.ndarray:
    """Speed (resampling: tempo and pitch together), peak gain, white or pink noise at a random SNR."""
    f = rng.uniform(*speed)
    n = max(160, int(len(x) / f))
    x = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype(np.float32)
    if rng.random() < noise_prob:
        noise = rng.standard_normal(n) if rng.random() < 0.5 else _pink(n, rng)
        p = float(np.mean(x ** 2)) + 1e-12
        snr = rng.uniform(*snr_db)
        x = x + (noise * math.sqrt(p / 10 ** (snr / 10))).astype(np.float32)
    peak = float(np.abs(x).max()) + 1e-9
    return (x * (rng.uniform(*gain) / peak)).astype(np.float32)


def spec_augment(mel: torch.Tensor, rng: np.random.Generator, freq_masks: int = 2, freq_width: int = 10,
                 time_masks: int = 2, time_width: int = 12) -> torch.Tensor:
    """SpecAugment (Park et al. 2019) on one log-mel (n_mels, T): `freq_masks` bands of up to
    `freq_width` mel bins and `time_masks` spans of up to `time_width` frames (at most a tenth of the
    utterance each) set to the utterance's mean."""
    m = mel.clone()
    n_mels, T = m.shape
    fill = float(m.mean())
    for _ in range(freq_masks):
        w = int(rng.integers(0, freq_width + 1))
        f0 = int(rng.integers(0, max(1, n_mels - w)))
        m[f0:f0 + w] = fill
    for _ in range(time_masks):
        w = int(rng.integers(0, min(time_width, T // 10) + 1))
        t0 = int(rng.integers(0, max(1, T - w)))
        m[:, t0:t0 + w] = fill
    return m


class CTCHead(nn.Module):
    def __init__(self, width: int, n_words: int):
        super().__init__()
        self.proj = nn.Linear(width, n_words + 1)  # the last class is the CTC blank
        self.blank = n_words

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, L, V+1) log-probs
        return self.proj(h).log_softmax(-1)


def ctc_greedy(logp: torch.Tensor, blank: int) -> list[int]:
    """Best-path decoding of (L, V+1) log-probs: collapse repeats, drop blanks."""
    best = logp.argmax(-1).tolist()
    out, prev = [], None
    for t in best:
        if t != prev and t != blank:
            out.append(t)
        prev = t
    return out


def pretrain_audio_encoder(encoder, items: Sequence[tuple[str, str]], encode_text: Callable[[str], list[int]],
                           n_words: int, *, steps: int = 1000, batch_size: int = 16, lr: float = 2e-3,
                           min_lr: float = 1e-4, warmup: int = 50, seed: int = 0, max_minutes: float | None = None,
                           held_out: Sequence[tuple[str, str]] = (), log_every: int = 25,
                           progress: bool = True, spec_augment_prob: float = 0.0,
                           speed=(0.9, 1.1)) -> Stage0Result:
    """CTC-train `encoder` (an omnitalk AudioEncoder, trimmed windows) in place on (audio path, text).
    Every example is augmented (speed, gain, noise: `augment`) and, with `spec_augment_prob`, masked
    (`spec_augment`)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    wavs = [audio_io.load_audio(p) for p, _ in items]
    labels = [encode_text(t) for _, t in items]
    order = np.argsort([len(w) for w in wavs])  # batches of neighbours in length: little padding
    head = CTCHead(encoder.dims.n_audio_state, n_words)

    def batch_loss() -> torch.Tensor:
        start = int(rng.integers(0, max(1, len(order) - batch_size + 1)))
        idx = order[start:start + batch_size]
        mels = [trimmed_mel(augment(wavs[i], rng, speed=speed)) for i in idx]
        mels = [spec_augment(m, rng) if rng.random() < spec_augment_prob else m for m in mels]
        T = max(m.shape[-1] for m in mels)
        batch = torch.stack([F.pad(m, (0, T - m.shape[-1]), value=float(m.min())) for m in mels])
        lens = torch.tensor([m.shape[-1] // 2 for m in mels])
        logp = head(encoder(batch))                                   # (B, T/2, V+1)
        tgt = [torch.tensor(labels[i]) for i in idx]
        return F.ctc_loss(logp.transpose(0, 1), torch.cat(tgt), lens, torch.tensor([len(t) for t in tgt]),
                          blank=head.blank, zero_infinity=True)

    done, seconds, losses = fit(encoder, head, batch_loss, steps=steps, lr=lr, min_lr=min_lr, warmup=warmup,
                                max_minutes=max_minutes, log_every=log_every, progress=progress, name="audio (CTC)")
    metrics = ctc_word_error(encoder, head, held_out, encode_text) if held_out else {}
    if held_out:  # the same on as many training utterances, unaugmented: fitting vs generalising
        metrics["train"] = ctc_word_error(encoder, head, items[:len(held_out)], encode_text)
    return Stage0Result(done, seconds, losses, metrics, head.eval().requires_grad_(False))


def save_audio_encoder(path, encoder, head: CTCHead | None = None) -> None:
    """Write a stage-0 audio encoder in OpenAI's small.pt layout ({"dims", "model_state_dict"}) with
    omnitalk's two top-level additions, which OpenAI's loader ignores: `"window": "trimmed"` (how it was
    trained to run) and, with `head`, `"ctc_head": {"weight" (V+1, d), "bias" (V+1,)}` (the last class is
    the blank), which omnitalk.model.whisper.load_whisper_encoder attaches as `encoder.ctc_head`.
    Written through `omnitalk.train.export.save_replacing`."""
    import dataclasses

    obj = {"dims": dataclasses.asdict(encoder.dims), "window": "trimmed",
           "model_state_dict": {f"encoder.{k}": v.detach().clone() for k, v in encoder.state_dict().items()}}
    if head is not None:
        obj["ctc_head"] = {"weight": head.proj.weight.detach().clone(), "bias": head.proj.bias.detach().clone()}
    save_replacing(path, obj)


@torch.no_grad()
def ctc_word_error(encoder, head: CTCHead, items: Sequence[tuple[str, str]], encode_text) -> dict:
    """Word error rate of the CTC head's best path on (audio, text) pairs (word ids compared)."""
    from omnitalk.eval.metrics import edit_ops

    errs = words = 0
    for path, text in items:
        logp = head(encoder(trimmed_mel(audio_io.load_audio(path))[None]))[0]
        ref = encode_text(text)
        _, sub, dele, ins = edit_ops(ref, ctc_greedy(logp, head.blank))
        errs += sub + dele + ins
        words += len(ref)
    return {"ctc_wer": errs / max(1, words), "n": len(items), "words": words}


# ---------------------------------------------------------------------------------------------
# vision: what a drawn scene holds
# ---------------------------------------------------------------------------------------------

MAX_COUNT = 9  # counts 0..8 per shape


def random_scene(rng: random.Random, size: int, patch: int = 32, layout: str = "free"):
    """A scene like the world's questions draw: either one shape repeated 1..6 times among 0..3 others,
    or 1..3 different shapes in different colours. Returns (PIL image, labels) where labels holds
    `counts` (4,) and `pairs` (4, 6) for the whole image, and per patch of the ViT grid (raster order)
    `cover_shape` / `cover_color` (0 = background, else 1 + index of the item covering most of the
    patch, if it covers at least 10 %) and `centre` (0, or 1 + shape index of an item centred there).
    `layout`: the world's image layout (`world.place`; `grid` puts each shape in its own patch)."""
    from PIL import Image

    from omnitalk.train.world import COLORS, SHAPES, Scene, draw_scene, place

    colors = list(COLORS)
    if rng.random() < 0.5:
        key = rng.choice(SHAPES)
        shapes = [(key, rng.choice(colors)) for _ in range(rng.randint(1, 6))]
        shapes += [(rng.choice([s for s in SHAPES if s != key]), rng.choice(colors)) for _ in range(rng.randint(0, 3))]
    else:
        k = rng.randint(1, 3)
        shapes = list(zip(rng.sample(SHAPES, k), rng.sample(colors, k)))
    rng.shuffle(shapes)
    scene = place(Scene(), shapes, size, rng, layout, cells=size // patch)
    lab = Image.new("L", (size, size), 0)
    img = draw_scene(scene, size, rng, label_map=lab)
    counts = np.zeros(len(SHAPES), np.int64)
    pairs = np.zeros((len(SHAPES), len(colors)), np.float32)
    for s, c, *_ in scene.items:
        counts[SHAPES.index(s)] += 1
        pairs[SHAPES.index(s), colors.index(c)] = 1
    g = size // patch
    m = np.asarray(lab)[: g * patch, : g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    cover_shape = np.zeros(g * g, np.int64)
    cover_color = np.zeros(g * g, np.int64)
    n_items = len(scene.items)
    for k in range(g * g):
        hist = np.bincount(m[k], minlength=n_items + 1)
        hist[0] = 0
        if hist.max() >= 0.1 * patch * patch:
            s, c = scene.items[int(hist.argmax()) - 1][:2]
            cover_shape[k], cover_color[k] = 1 + SHAPES.index(s), 1 + colors.index(c)
    centre = np.zeros(g * g, np.int64)
    for s, c, cx, cy, r in scene.items:
        centre[min(g - 1, int(cy // patch)) * g + min(g - 1, int(cx // patch))] = 1 + SHAPES.index(s)
    labels = {"counts": np.minimum(counts, MAX_COUNT - 1), "pairs": pairs, "cover_shape": cover_shape,
              "cover_color": cover_color, "centre": centre}
    return img, labels


class SceneHead(nn.Module):
    """Class token -> counts per shape and (shape, colour) pairs; each patch token -> the shape and colour
    covering it and the shape centred in it (dense targets: a narrow ViT learns in minutes)."""

    def __init__(self, width: int, n_shapes: int = 4, n_colors: int = 6):
        super().__init__()
        self.n_shapes, self.n_colors = n_shapes, n_colors
        self.count = nn.Linear(width, n_shapes * MAX_COUNT)
        self.pairs = nn.Linear(width, n_shapes * n_colors)
        self.patch = nn.Linear(width, 2 * (n_shapes + 1) + n_colors + 1)

    def forward(self, tokens: torch.Tensor) -> dict:  # tokens (B, 1 + G, d)
        cls, patches = tokens[:, 0], tokens[:, 1:]
        S, C = self.n_shapes + 1, self.n_colors + 1
        p = self.patch(patches)                                        # (B, G, 2S + C)
        return {"counts": self.count(cls).view(-1, self.n_shapes, MAX_COUNT),
                "pairs": self.pairs(cls).view(-1, self.n_shapes, self.n_colors),
                "cover_shape": p[..., :S], "cover_color": p[..., S:S + C], "centre": p[..., S + C:]}

    @staticmethod
    def loss(out: dict, y: dict) -> torch.Tensor:
        ce = lambda logits, t: F.cross_entropy(logits.flatten(0, -2), t.flatten())
        return (ce(out["counts"], y["counts"]) + F.binary_cross_entropy_with_logits(out["pairs"], y["pairs"])
                + ce(out["cover_shape"], y["cover_shape"]) + ce(out["cover_color"], y["cover_color"])
                + ce(out["centre"], y["centre"]))


def make_scenes(n: int, seed: int | random.Random, size: int = 224, patch: int = 32, progress: bool = False,
                layout: str = "free"):
    """n drawn scenes -> (preprocessed images (n, 3, size, size), {label name: stacked labels}).
    `seed`: an int, or a random.Random to draw from (and advance); `layout` as `random_scene`'s."""
    from tqdm.auto import tqdm

    from omnitalk import vision

    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    imgs, labels = [], []
    for _ in tqdm(range(n), desc="scenes", disable=not progress):
        img, lab = random_scene(rng, size, patch, layout)
        imgs.append(vision.preprocess_image(img, size=size))
        labels.append(lab)
    return torch.stack(imgs), {k: torch.from_numpy(np.stack([lab[k] for lab in labels])) for k in labels[0]}


def pretrain_vision_encoder(vit, *, steps: int = 400, batch_size: int = 32, n_images: int | None = 2000,
                            n_held_out: int = 200, lr: float = 1e-3, min_lr: float = 5e-5, warmup: int = 30,
                            seed: int = 0, max_minutes: float | None = None, log_every: int = 25,
                            progress: bool = True, layout: str = "free") -> Stage0Result:
    """Train `vit` (an omnitalk VisionTransformer) in place on drawn scenes: `n_images` drawn once and
    sampled from, or with `n_images` None / 0 new scenes for every batch (nothing to memorise; drawing
    costs a few ms a scene). The held-out scenes are drawn from another seed either way. `layout`: the
    world's image layout (`world.place`), so the tower learns the pictures it will be asked about."""
    torch.manual_seed(seed)
    size, patch = vit.dims.image_resolution, vit.dims.patch_size
    fresh = not n_images
    X, Y = (None, None) if fresh else make_scenes(n_images, seed, size, patch, progress, layout)
    Xh, Yh = make_scenes(n_held_out, seed + 10_000, size, patch, layout=layout)
    head = SceneHead(vit.dims.output_dim)
    g, scene_rng = torch.Generator().manual_seed(seed), random.Random(seed)

    def batch_loss() -> torch.Tensor:
        if fresh:
            x, y = make_scenes(batch_size, scene_rng, size, patch, layout=layout)
            return SceneHead.loss(head(vit(x)), y)
        idx = torch.randint(0, len(X), (batch_size,), generator=g)
        return SceneHead.loss(head(vit(X[idx])), {k: v[idx] for k, v in Y.items()})

    done, seconds, losses = fit(vit, head, batch_loss, steps=steps, lr=lr, min_lr=min_lr, warmup=warmup,
                                max_minutes=max_minutes, log_every=log_every, progress=progress, name="vision")
    with torch.no_grad():
        out = head(vit(Xh))
    acc = lambda k: float((out[k].argmax(-1) == Yh[k]).float().mean())
    metrics = {"count_accuracy": acc("counts"),
               "scene_count_exact": float((out["counts"].argmax(-1) == Yh["counts"]).all(-1).float().mean()),
               "pair_accuracy": float(((out["pairs"] > 0).float() == Yh["pairs"]).float().mean()),
               "patch_shape_accuracy": acc("cover_shape"), "patch_color_accuracy": acc("cover_color"),
               "centre_accuracy": acc("centre"), "n": int(len(Xh)), "layout": layout}
    fg = Yh["cover_shape"] > 0  # the patches that show a shape: the trivial "background" answer scores 0 here
    metrics["shape_patch_accuracy"] = float((out["cover_shape"].argmax(-1) == Yh["cover_shape"])[fg].float().mean())
    return Stage0Result(done, seconds, losses, metrics)
