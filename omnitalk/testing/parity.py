"""Parity checker: recompute a fixture's expected/ from its checkpoint/ and inputs/ and compare.

    python -m omnitalk.testing.parity tests/fixtures/parity [--manifests DIR]

The fixture layout is that of the official Mini-Omni2 parity fixture (checkpoint/, inputs/, expected/).
Everything is recomputed through the public engine API; expected/ is only read to compare. One line per
item; exit status 0 only when every item is within the tolerances of the fixture README (§8).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from omnitalk import audio as audio_io
from omnitalk import vision
from omnitalk.engine import ChunkAssembler, OmniModel, Request
from omnitalk.generate import Sampling
from omnitalk.model.whisper import encode as whisper_encode

# task folder -> how the official loops were asked (inputs and decoding strategy)
TASKS = {
    "T1T2": dict(text=True, reply="text"),
    "T1A2": dict(text=True, reply="speech", strategy="single"),
    "A1T2": dict(audio=True, reply="text"),
    "ASR": dict(audio=True, task="asr", reply="text"),
    "A1A2": dict(audio=True, reply="speech", strategy="single"),
    "AA_AT_batch": dict(audio=True, reply="speech", strategy="pair"),
    "ImageQA_batch": dict(audio=True, image=True, reply="speech", strategy="pair"),
}


@dataclass
class Item:
    name: str
    ok: bool
    detail: str


def rel_diff(got, exp) -> float:
    got, exp = np.asarray(got, np.float64), np.asarray(exp, np.float64)
    if got.shape != exp.shape:
        return float("inf")
    return float(np.abs(got - exp).max() / max(np.abs(exp).max(), 1e-30))


def abs_diff(got, exp) -> float:
    got, exp = np.asarray(got, np.float64), np.asarray(exp, np.float64)
    return float("inf") if got.shape != exp.shape else float(np.abs(got - exp).max())


def close(name, got, exp, tol, relative=False) -> Item:
    d = (rel_diff if relative else abs_diff)(got, exp)
    if d == float("inf"):
        return Item(name, False, f"shape {np.shape(got)} != expected {np.shape(exp)}")
    return Item(name, d <= tol, f"max {'rel' if relative else 'abs'} diff {d:.3g} (tol {tol:g})")


def tokens_equal(name, got, exp) -> Item:
    got, exp = np.asarray(got), np.asarray(exp)
    if got.shape == exp.shape and np.array_equal(got, exp):
        return Item(name, True, f"exact, shape {tuple(exp.shape)}")
    n = min(got.shape[-1], exp.shape[-1]) if got.ndim == exp.ndim and got.shape[:-1] == exp.shape[:-1] else 0
    diff = [k for k in range(n) if not np.array_equal(got[..., k], exp[..., k])]
    first = diff[0] if diff else n
    return Item(name, False, f"shape {tuple(got.shape)} vs {tuple(exp.shape)}, first mismatching step {first}")


def equal(name, got, exp) -> Item:
    return Item(name, got == exp, "exact" if got == exp else f"got {got!r}, expected {exp!r}")


def check(root: Path, max_tokens: int = 48, stride: int = 4, snac_seed: int = 1234,
          compile: bool = False) -> list[Item]:
    """Recompute and compare every expected file. The decoding settings are the caller's (defaults: the
    official fixture's 48-step budget, stride 4, SNAC seed 1234): expected/ is only read to compare.
    `compile`: decode through the compiled static step (`OmniLM.compile_decode`)."""
    root = Path(root)
    exp_dir, inp = root / "expected", root / "inputs"
    model = OmniModel.from_pretrained(root / "checkpoint", device="cpu", download=False)
    if compile:
        model.lm.compile_decode()
    wav, image = inp / "question.wav", inp / "image.png"
    prompt = (inp / "prompt.txt").read_text(encoding="utf-8")
    items: list[Item] = []

    def have(rel: str) -> Path | None:
        p = exp_dir / rel
        if not p.exists():
            items.append(Item(rel, False, "expected file missing"))
            return None
        return p

    # ---- front ends -----------------------------------------------------------------------------
    samples = audio_io.load_audio(wav)
    mel = audio_io.log_mel_spectrogram(samples)
    if p := have("mel.npy"):
        items.append(close("mel.npy", mel.numpy(), np.load(p), 1e-4))
    if p := have("audio_len.json"):
        e = json.loads(p.read_text())
        got = dict(num_samples=len(samples), duration_ms=len(samples) / 16000 * 1000,
                   L=audio_io.num_whisper_frames(len(samples)))
        items.append(equal("audio_len.json", {k: got[k] for k in got if k in e}, {k: e[k] for k in got if k in e}))
    if p := have("whisper_features.npy"):
        items.append(close("whisper_features.npy", whisper_encode(model.whisper, mel)[0].numpy(), np.load(p),
                           1e-4, relative=True))
    clip_in = vision.preprocess_image(vision.load_image(image, convert_rgb=False),
                                      size=model.clip.dims.image_resolution)
    if p := have("clip_input.npy"):
        items.append(close("clip_input.npy", clip_in.numpy(), np.load(p), 1e-6))
    if p := have("clip_features.npy"):
        with torch.inference_mode():
            items.append(close("clip_features.npy", model.clip(clip_in[None])[0].numpy(), np.load(p), 1e-4,
                               relative=True))

    # ---- tasks ----------------------------------------------------------------------------------
    unknown = sorted(d.name for d in exp_dir.iterdir() if d.is_dir() and d.name not in TASKS)
    for name in unknown:
        items.append(Item(name, False, "unknown task folder: the checker does not know how to recompute it"))
    for name, how in TASKS.items():
        if not (exp_dir / name).is_dir():
            continue
        req = model.request(audio=wav if how.get("audio") else None, image=image if how.get("image") else None,
                            text=prompt if how.get("text") else None, reply=how["reply"],
                            task=how.get("task", "qa"), strategy=how.get("strategy", "pair"))
        task_items: list[Item] = []
        try:
            check_task(model, req, exp_dir / name, name, max_tokens, stride, snac_seed, out=task_items)
        except Exception as e:  # an engine error is a failed item (after those already compared)
            task_items.append(Item(name, False, f"recomputing raised {type(e).__name__}: {str(e)[:300]}"))
        items += task_items
    return items


def check_task(model: OmniModel, req: Request, d: Path, name: str, max_tokens: int, stride: int,
               snac_seed: int, out: list[Item] | None = None) -> list[Item]:
    """Compare one task folder; every expected file is required (the stream files for the batch tasks)."""
    out = [] if out is None else out
    streamed = req.mode == "pair"  # the release streams the batch-parallel tasks only

    def have(rel: str, required: bool = True) -> Path | None:
        p = d / rel
        if p.exists():
            return p
        if required:
            out.append(Item(f"{name}/{rel}", False, "expected file missing"))
        return None

    ids = np.stack([p.ids for p in req.prompts])
    if p := have("input_ids.npy"):
        out.append(tokens_equal(f"{name}/input_ids.npy", ids, np.load(p)))
    if p := have("prefill_logits.npz"):
        text, audio = model.prefill_logits(req)
        e = np.load(p)
        out.append(close(f"{name}/prefill_logits.npz[text]", text.numpy(), e["text"], 1e-4, relative=True))
        out.append(close(f"{name}/prefill_logits.npz[audio]", audio.numpy(), e["audio"], 1e-4, relative=True))
    steps = list(model.steps(req, max_tokens, Sampling(audio_grammar=False), margins=True))  # the release's loop
    if req.speaks:
        tokens = np.array([[s.audio[j] for s in steps] for j in range(7)] + [[s.text for s in steps]]).reshape(8, -1)
        margins = np.array([s.margins for s in steps], np.float32).T.reshape(8, -1)
    else:
        tokens = np.array([[s.text for s in steps]])
        margins = np.array([s.margins for s in steps], np.float32).T.reshape(1, -1)
    exp_tokens = None
    if p := have("tokens.npy"):
        exp_tokens = np.load(p)
        out.append(tokens_equal(f"{name}/tokens.npy", tokens, exp_tokens))
    if p := have("margins.npy"):
        e = np.load(p)
        if exp_tokens is not None and tokens.shape == exp_tokens.shape:
            # forced `_pad_t` entries describe the ignored model choice in both; compare every entry
            out.append(close(f"{name}/margins.npy", margins, e, 1e-3))
        else:
            out.append(Item(f"{name}/margins.npy", False, "not comparable: token streams differ"))
    meta: dict = {}
    eot = model.layout.eot
    texts = list(tokens[-1])
    if p := have("meta.json"):
        meta = json.loads(p.read_text())
        out.append(equal(f"{name}/meta.json[steps_recorded]", len(steps), meta.get("steps_recorded")))
        if "eot_step" in meta:
            out.append(equal(f"{name}/meta.json[eot_step]", texts.index(eot) if eot in texts else None,
                             meta["eot_step"]))
    if "decoded_text" in meta:
        # what the release's task functions return: text-only loops decode every recorded id (the
        # decoder skips `_eot`, which only a step-0 token can be); speech loops cut before `_eot`
        cut = texts.index(eot) if req.speaks and eot in texts else len(texts)
        out.append(equal(f"{name}/meta.json[decoded_text]", model.tokenizer.decode(texts[:cut]).strip(),
                         meta["decoded_text"]))
    if not req.speaks:
        return out
    # ---- speech: codes, streaming chunks, whole-answer decode --------------------------------------
    from omnitalk.codec import frames_from_layers, frames_to_codes

    frames = frames_from_layers(tokens[:7])
    codes = [c[0].tolist() for c in frames_to_codes(frames)]
    if p := have("snac_codes.json", streamed):
        out.append(equal(f"{name}/snac_codes.json", codes, json.loads(p.read_text())))
    if p := have("stream.json", streamed):
        spec = json.loads(p.read_text())
        # the reference stream of the steps already decoded (what OmniModel.stream does, without a second run)
        asm = ChunkAssembler(model, True, "reference", stride, snac_seed)
        chunks = [c for st in steps for c in asm.push(st)] + asm.finish()
        exp_chunks = spec["chunks"]
        out.append(equal(f"{name}/stream.json[num_chunks]", len(chunks), len(exp_chunks)))
        out.append(equal(f"{name}/stream.json[text_deltas]", [c.text for c in chunks],
                         [c["text_delta"] for c in exp_chunks]))
        got_codes = [[cc[0].tolist() for cc in frames_to_codes(frames[stride * i: stride * (i + 1)])]
                     for i in range(len(chunks))]
        out.append(equal(f"{name}/stream.json[codes]", got_codes, [c["codes"] for c in exp_chunks]))
        if "text_concat_of_deltas" in meta:
            out.append(equal(f"{name}/meta.json[text]", "".join(c.text for c in chunks), meta["text_concat_of_deltas"]))
        for i in range(len(exp_chunks)):
            if (p := have(f"stream/chunk_{i:02d}.npy")) and i < len(chunks):
                out.append(close(f"{name}/stream/{p.name}", chunks[i].audio, np.load(p), 1))
        listed = {f"chunk_{i:02d}.npy" for i in range(len(exp_chunks))}
        stray = sorted(f.name for f in (d / "stream").glob("*.npy") if f.name not in listed)
        if stray:
            out.append(Item(f"{name}/stream", False, f"chunk files not listed in stream.json: {stray}"))
    full_float, full_wav = have("full_float.npy", streamed), have("full.wav", streamed)
    if full_float or full_wav:
        full = model.codec.decode(frames, seed=snac_seed).numpy()
        if full_float:
            out.append(close(f"{name}/full_float.npy", full, np.load(full_float), 1e-4))
        if full_wav:
            buf = io.BytesIO()
            sf.write(buf, full, 24000, format="WAV", subtype="PCM_16")  # what the release saves
            got, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="int16")
            exp, _ = sf.read(full_wav, dtype="int16")
            out.append(close(f"{name}/full.wav", got, exp, 1))
    return out


def check_manifests(mdir: Path) -> list[Item]:
    """Full-size modules built from the presets have exactly the manifests' keys and shapes."""
    from omnitalk.config import Config
    from omnitalk.model.clip import VisionTransformer, clip_vit_b32_dims
    from omnitalk.model.llm import OmniLM
    from omnitalk.model.whisper import AudioEncoder, whisper_dims_small

    def compare(name, sd, manifest, prefix=""):
        exp = [(m["name"], tuple(m["shape"])) for m in manifest if m["name"].startswith(prefix)]
        got = [(prefix + k, tuple(v.shape)) for k, v in sd.items()]
        if got == exp:
            return Item(name, True, f"{len(exp)} tensors, same names, order and shapes")
        missing = sorted(set(exp) - set(got))[:3]
        extra = sorted(set(got) - set(exp))[:3]
        return Item(name, False, f"missing {missing}, unexpected {extra}" if missing or extra else "order differs")

    items = []
    with torch.device("meta"):
        cfg = Config.from_file(mdir / "model_config.yaml")
        lm = OmniLM(cfg)
        items.append(compare("manifests/lit_model.json", lm.state_dict(),
                             _tensors(json.loads((mdir / "lit_model.json").read_text()))))
        enc = AudioEncoder(whisper_dims_small())
        items.append(compare("manifests/whisper_small.json[encoder]", enc.state_dict(),
                             _tensors(json.loads((mdir / "whisper_small.json").read_text())), "encoder."))
        vit = VisionTransformer(clip_vit_b32_dims())
        items.append(compare("manifests/clip_vit_b_32.json[visual]", vit.state_dict(),
                             _tensors(json.loads((mdir / "clip_vit_b_32.json").read_text())), "visual."))
    snac_cfg = json.loads((mdir / "snac_24khz" / "config.json").read_text())
    from snac import SNAC
    with torch.device("meta"):
        snac = SNAC(**snac_cfg)
    items.append(compare("manifests/snac_24khz", snac.state_dict(),
                         _tensors(json.loads((mdir / "snac_24khz" / "pytorch_model.json").read_text()))))
    return items


def _tensors(m):
    return m["tensors"] if isinstance(m, dict) else m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omnitalk.testing.parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixture", type=Path, help="folder with checkpoint/, inputs/, expected/")
    ap.add_argument("--manifests", type=Path, help="also check full-size key/shape manifests in this folder")
    ap.add_argument("--max-tokens", type=int, default=48, help="recorded-step budget the fixture was made "
                    "with (default 48, the official fixture's)")
    ap.add_argument("--stride", type=int, default=4, help="streaming stride the fixture was made with (4)")
    ap.add_argument("--snac-seed", type=int, default=1234, help="torch seed set before every SNAC decode (1234)")
    ap.add_argument("--compile", action="store_true", help="decode through the torch.compile'd static step")
    a = ap.parse_args(argv)
    items = check(a.fixture, a.max_tokens, a.stride, a.snac_seed, a.compile)
    if a.manifests:
        items += check_manifests(a.manifests)
    width = max(len(i.name) for i in items)
    for i in items:
        print(f"{i.name:<{width}}  {'ok  ' if i.ok else 'FAIL'}  {i.detail}")
    bad = sum(not i.ok for i in items)
    print(f"{len(items) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
