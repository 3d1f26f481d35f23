"""Probe: can the small LLM learn to answer picture questions about scenes it has never seen?

Trains a stage-2-like run on written picture questions alone (it2t: a scene drawn in the run's world
layout + a written question, text answer) from a recipe run's stage-1 export, and scores exact answers
(teacher-forced: every answer token is the argmax) on freshly drawn held-out scenes asked in held-out
phrasings, per question family, every `--eval-every` steps (and on the first 400 training questions).
The knobs vary what the LLM is given, to find what bounds the visual item (docs/training.md):

  --n-train N          distinct training scenes (40 000: 1000 steps of 48 see each about once)
  --reinit PREFIXES    draw these parameters anew first (e.g. vision_adapter.: the stage-1 adapter's outputs
                       are ~150x the text embeddings)       --train-params  what trains
  --adapter-rms R      RMS-normalise the vision adapter's output to R (a forward hook)
  --whiten             centre and PCA-whiten the tower's features (statistics of 2000 training scenes)
  --objects            keep the class token and only the patches that show a shape (from the pixels)
  --class-only         the image is its class token alone (one position)
  --label-features     each patch feature becomes two linear heads' log-probs of its shape and colour
  --text-scene         control without pictures: the scene as words before the question
                       ("red star blue circle what color is the star")
  --model JSON         model config overrides; the LLM then starts from random weights

    python scripts/probe_visual.py --run runs/grid-img --n-train 3000 --out runs/probe-vis/a
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omnitalk.tokens import TokenLayout
from omnitalk.train import world as W
from omnitalk.train.config import TrainConfig
from omnitalk.train.losses import embed_batch
from omnitalk.train.loop import MemoryFeatures, SampleBuilder, _encoders_from_dir, load_tokenizer, model_config, run
from omnitalk.train.sequences import IGNORE, collate

STATE: dict = {}


def scene_words(scene) -> str:
    """'red star blue circle': the scene's shapes in drawing order."""
    return " ".join(f"{c} {s}" for s, c, *_ in scene.items)


def picture_questions(world: dict, n: int, held: bool, tag: str, text_scene: bool = False,
                      families=None) -> list[tuple[dict, object]]:
    """n (record, PIL image) pairs drawn like the world's it2t records, from the training or held-out
    phrasings; with text_scene the record's question starts with the scene in words and has no image.
    With `families`, the records of other families among the n are left out (and not drawn)."""
    pool = W._Pools(world["seed"], world["held_out_fraction"], held).image
    size, layout = world["image_size"], world.get("image_layout", "free")
    out = []
    for i in range(n):
        rng = random.Random(f"probe:{tag}:{i}")
        family, key, question = rng.choice(pool)
        if families is not None and family not in families:
            continue
        scene, answer = W.question_scene(family, key, size, rng, layout)
        rec = {"id": f"{tag}-{i:06d}", "task": "qa", "question_text": question, "question_image": f"mem:{tag}:{i}",
               "answer_text": answer, "speak": False, "family": family}
        if text_scene:
            out.append((dict(rec, question_text=f"{scene_words(scene)} {question}", question_image=None), None))
        else:
            out.append((rec, W.draw_scene(scene, size, rng)))
    return out


@torch.no_grad()
def vit_features(vit, images, batch: int = 64) -> list[torch.Tensor]:
    from omnitalk.vision import preprocess_image

    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([preprocess_image(im, size=vit.dims.image_resolution) for im in images[i:i + batch]])
        out += list(vit(x).half())
    return out


def object_cells(im, patch: int = 32) -> list[int]:
    """Row-major indices of the patch cells where more than 3 % of the pixels differ from the background
    (the top-left pixel's colour)."""
    x = np.asarray(im.convert("RGB")).astype(np.int16)
    off = np.abs(x - x[0, 0]).sum(-1) > 30
    g = x.shape[0] // patch
    cells = off[:g * patch, :g * patch].reshape(g, patch, g, patch).mean((1, 3))
    return [int(i) for i in np.flatnonzero(cells.reshape(-1) > 0.03)]


def patch_heads(vit, layout: str, n: int = 2000, steps: int = 600) -> dict:
    """Linear heads (shape: 5 classes, colour: 7, 0 = background) on the frozen tower's patch tokens of n
    stage-0 scenes."""
    from omnitalk.train.stage0 import make_scenes

    x, y = make_scenes(n, 11, layout=layout)
    with torch.no_grad():
        f = torch.cat([vit(x[i:i + 64]) for i in range(0, n, 64)])[:, 1:]
    f = f.reshape(-1, f.shape[-1])
    g = torch.Generator().manual_seed(0)
    heads = {}
    for name, k in (("cover_shape", 5), ("cover_color", 7)):
        lin = torch.nn.Linear(f.shape[-1], k)
        opt = torch.optim.Adam(lin.parameters(), 1e-2)
        t = y[name].reshape(-1)
        for _ in range(steps):
            b = torch.randint(0, len(f), (4096,), generator=g)
            loss = F.cross_entropy(lin(f[b]), t[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        heads[name] = lin.requires_grad_(False)
    return heads


def label_features(heads: dict, v: torch.Tensor) -> torch.Tensor:
    """(50, d) tower output -> (50, d): patches [shape log-probs (5), colour log-probs (7), 0...], class token 0."""
    out = torch.zeros_like(v)
    lp = torch.cat([heads[n](v[1:]).log_softmax(-1) for n in ("cover_shape", "cover_color")], -1)
    out[1:, :lp.shape[1]] = lp
    return out


def whitener(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) features -> (mean, W) such that (x - mean) @ W has identity covariance (eigenvalues floored
    at 1e-4 of the largest)."""
    mean = x.mean(0)
    ev, U = torch.linalg.eigh(torch.cov((x - mean).T))
    return mean, U @ torch.diag((ev + 1e-4 * ev.max()).rsqrt()) @ U.T


def reinit_copy(src: Path, prefixes, dst: Path) -> str:
    """A copy of checkpoint folder `src` (other files linked) whose parameters under `prefixes` are drawn
    anew from N(0, 0.02)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "lit_model.pth" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    sd = torch.load(src / "lit_model.pth", map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if any(k.startswith(p) for p in prefixes if p):
            sd[k] = (torch.randn(v.shape, generator=g) * 0.02).to(v.dtype)
    torch.save(sd, dst / "lit_model.pth")
    return str(dst.resolve())


@torch.no_grad()
def exact(lm, builder: SampleBuilder, layout: TokenLayout, batch: int = 64) -> dict:
    """Teacher-forced exact answers (every text target token is the argmax), per family and over all."""
    cfg = lm.cfg
    right: dict = {}
    n = len(builder.records)
    for i in range(0, n, batch):
        idx = list(range(i, min(i + batch, n)))
        b = collate([builder(j) for j in idx], layout, 8, cfg.whisper_adapter_dim, cfg.vision_adapter_dim)
        h = lm.forward_hidden(embed_batch(lm, b.ids, b.audio_feats, b.audio_index, b.image_feats, b.image_index), 0)
        tt = b.targets[:, cfg.n_audio_layers]
        pred = lm.text_logits(h).argmax(-1)
        ok = ((pred == tt) | (tt == IGNORE)).all(-1)
        for j, k in enumerate(idx):
            right.setdefault(builder.records[k]["family"], []).append(bool(ok[j]))
    res = {f: sum(v) / len(v) for f, v in sorted(right.items())}
    res["all"] = sum(sum(v) for v in right.values()) / n
    return res


def hook(model, step, cfg):
    """loop.run's eval hook: exact answers on the held-out scenes and the first training ones."""
    r = {f"heldout_{k}": v for k, v in exact(model, STATE["eval"], STATE["layout"]).items()}
    r.update({f"train_{k}": v for k, v in exact(model, STATE["train_sub"], STATE["layout"]).items()})
    print(json.dumps({"step": step, **{k: round(v, 3) for k, v in r.items()}}), flush=True)
    STATE["curve"].append({"step": step, **r})
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--run", default="runs/small", help="a recipe run folder (world/, assets/, stage1/final, stage2.yaml)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-eval", type=int, default=400)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-params", default="transformer.", help="comma-separated parameter name prefixes")
    ap.add_argument("--init", default=None, help="checkpoint to start from (default: the run's stage1/final)")
    ap.add_argument("--reinit", default="")
    ap.add_argument("--adapter-rms", type=float, default=None)
    ap.add_argument("--whiten", action="store_true")
    ap.add_argument("--objects", action="store_true")
    ap.add_argument("--label-features", action="store_true")
    ap.add_argument("--class-only", action="store_true")
    ap.add_argument("--text-scene", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.class_only and a.objects:
        raise SystemExit("--class-only and --objects both choose the picture's positions: give one of them")

    t0 = time.time()
    torch.set_num_threads(a.threads)
    run_dir = Path(a.run)
    for need in ("world/world.json", "stage2.yaml"):
        if not (run_dir / need).is_file():
            raise SystemExit(f"{run_dir / need} not found: --run takes a folder of scripts/train_small.py "
                             "(make train-small) after its stage 1")
    world = json.loads((run_dir / "world" / "world.json").read_text())
    layout_name = world.get("image_layout", "free")
    cfg = TrainConfig.from_yaml(run_dir / "stage2.yaml")
    cfg.train_params = [p for p in a.train_params.split(",") if p]
    cfg.model.checkpoint = str(Path(a.init or run_dir / "stage1" / "final").resolve())
    if a.model:
        cfg.model.config = {**cfg.model.config, **json.loads(a.model)}
        cfg.model.init, cfg.model.checkpoint = "random", None
    elif a.reinit:
        cfg.model.checkpoint = reinit_copy(Path(cfg.model.checkpoint), a.reinit.split(","), Path(a.out) / "init")
    cfg.optim.steps, cfg.optim.lr, cfg.optim.min_lr = a.steps, a.lr, a.lr / 10
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(1, a.steps // 10))
    cfg.batch.batch_size = a.batch_size
    cfg.out_dir, cfg.threads, cfg.progress = a.out, a.threads, False
    cfg.eval_every, cfg.checkpoint_every, cfg.eval_batches = a.eval_every, 0, 4
    hook_module = types.ModuleType("_probe_visual_hook")  # loop.run calls its eval hook by module:function
    hook_module.hook = hook
    sys.modules[hook_module.__name__] = hook_module
    cfg.eval_hook = "_probe_visual_hook:hook"
    cfg.data.tasks = None

    train = picture_questions(world, a.n_train, False, "train", a.text_scene)
    held = picture_questions(world, a.n_eval, True, "eval", a.text_scene)
    feats = {}
    if not a.text_scene:
        vit = _encoders_from_dir(run_dir / "assets").clip.eval()
        for part in (train, held):
            for (rec, _), f in zip(part, vit_features(vit, [im for _, im in part])):
                feats[rec["question_image"]] = f
        if a.label_features:
            heads = patch_heads(vit, layout_name)
            feats = {k: label_features(heads, v.float()).half() for k, v in feats.items()}
        if a.whiten:
            mean, wh = whitener(torch.cat([feats[r["question_image"]].float() for r, _ in train[:2000]]))
            feats = {k: ((v.float() - mean) @ wh).half() for k, v in feats.items()}
        if a.class_only:
            feats = {k: v[:1] for k, v in feats.items()}
        if a.objects:
            for rec, im in train + held:
                feats[rec["question_image"]] = feats[rec["question_image"]][[0] + [1 + i for i in object_cells(im)]]
    print(f"drew {len(train)} + {len(held)} questions in {time.time() - t0:.0f} s", flush=True)

    features = MemoryFeatures(image=feats)
    layout = TokenLayout.from_config(model_config(cfg))
    tok = load_tokenizer(cfg)
    train_recs, held_recs = [r for r, _ in train], [r for r, _ in held]
    STATE.update(layout=layout, curve=[], eval=SampleBuilder(held_recs, layout, tok, features),
                 train_sub=SampleBuilder(train_recs[:400], layout, tok, features))
    import omnitalk.train.loop as L

    build = L.build_model
    if a.adapter_rms is not None:  # loop.run builds the model itself: wrap its builder for this run only
        def build_normed(cfg_, mcfg_):
            lm = build(cfg_, mcfg_)
            lm.vision_adapter.register_forward_hook(lambda m, i, o: F.rms_norm(o, (o.shape[-1],)) * a.adapter_rms)
            return lm

        L.build_model = build_normed
    try:
        res = run(cfg, records=train_recs, eval_records=held_recs, features=features)
    finally:
        L.build_model = build
    out = {"args": vars(a), "image_layout": layout_name, "curve": STATE["curve"],
           "final": STATE["curve"][-1] if STATE["curve"] else None, "seconds": round(time.time() - t0, 1),
           "checkpoint": str(res.path)}
    Path(a.out, "probe_visual.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
