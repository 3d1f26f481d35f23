"""Probe: which part of the small LLM keeps it from reading a picture (docs/training.md)?

The visual questions of the small world ("what color is the star", "the red one is what shape") are a
lookup: find the patch that shows the asked shape (colour) and name its colour (shape). This probe trains
a model on that alone — the recipe tower's frozen patch features of freshly drawn scenes in the world's
layout, an adapter, a question in words, one answer word — and scores held-out scenes asked in held-out
phrasings every `--eval-every` steps. Two bodies, both 4 layers wide 128 by default:

  --body gpt     a nanoGPT block (LayerNorm, GELU MLP, learned positions, multi-head attention)
  --body omni    the recipe's own OmniLM blocks (RMSNorm, SwiGLU, RoPE, grouped keys/values) with its init
                 (loop.init_weights)

and the knobs that separate them: --heads / --groups (omni: query heads / key-value groups), --adapter
linear | gated (nn.Linear, or the release's gated-MLP adapter), --adapter-lr-scale (the adapter's lr as a
multiple of --lr), --streams-mean (omni: scale the inputs as the model's mean over its 8 streams does —
words / 8, pictures x 7/8), --init recipe | torch (omni: the recipe's init or PyTorch's defaults;
--init-std, --embedding-std and --final-norm-init change the recipe's), --mlp swiglu | gelu (omni: the
blocks' MLP), --norm rmsnorm | layernorm (omni: the blocks' norm), --positions rope | learned, --head
tied | untied (omni).

    python scripts/probe_lookup.py --run runs/long --body omni --heads 4 --groups 4 --adapter gated \\
        --streams-mean --adapter-lr-scale 10 --out runs/probe-lookup/h4-gated-lr10.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_visual import picture_questions, vit_features  # noqa: E402  (scripts/ is not a package)

FAMILIES = ("color", "shape")


class GPTBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
                   for t in self.qkv(self.ln_1(x)).split(D, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln_2(x))


class GPTBody(nn.Module):
    def __init__(self, d: int, n_layer: int, n_head: int, max_len: int = 96):
        super().__init__()
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(GPTBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        x = x + self.pos(torch.arange(x.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x)


class Reader(nn.Module):
    """[first word] [adapter(picture features)] [question words] -> logits of the answer word at the end."""

    def __init__(self, a, vocab: int, feat_dim: int):
        super().__init__()
        self.streams_mean = a.streams_mean
        if a.body == "gpt":
            d = a.width
            self.body, self.wte = GPTBody(d, a.layers, a.heads), nn.Embedding(vocab, d)
            self.head = nn.Linear(d, vocab, bias=False)
            adapter = nn.Linear(feat_dim, d)
            if a.adapter == "gated":
                from omnitalk.model.llm import GatedMLP
                adapter = GatedMLP(feat_dim, 4 * d, d)
        else:
            from omnitalk.config import preset
            from omnitalk.model.llm import OmniLM
            from omnitalk.train.loop import init_weights
            from omnitalk.train.world import text_vocab_size

            text_vocab = text_vocab_size(vocab)
            cfg = preset("mini-omni2", n_layer=a.layers, n_embd=a.width, n_head=a.heads,
                         n_query_groups=a.groups or a.heads, head_size=a.width // a.heads,
                         intermediate_size=4 * a.width, text_vocab_size=text_vocab, audio_vocab_size=4160,
                         padded_vocab_size=text_vocab + 7 * 4160,
                         whisper_adapter_dim=feat_dim, vision_adapter_dim=feat_dim, block_size=128)
            self.lm = OmniLM(cfg)
            if a.mlp == "gelu":  # the nanoGPT body's MLP (with biases) in the OmniLM blocks, before the init
                for block in self.lm.transformer.h:
                    block.mlp = nn.Sequential(nn.Linear(a.width, 4 * a.width), nn.GELU(),
                                              nn.Linear(4 * a.width, a.width))
            if a.init == "recipe":
                init_weights(self.lm, a.init_std, a.embedding_std, zero_audio_pad=True)
            else:  # PyTorch's defaults, as the nanoGPT body starts (nn.Linear: uniform +-1/sqrt(fan_in); table N(0, 1))
                init_weights(self.lm, a.init_std, style="pytorch")
            if a.final_norm_init != 1.0:  # the final norm's start: scales the tied head's first logits
                nn.init.constant_(self.lm.transformer.ln_f.weight, a.final_norm_init)
            if a.norm == "layernorm":  # the nanoGPT body's norm in the OmniLM blocks
                for block in self.lm.transformer.h:
                    block.norm_1, block.norm_2 = nn.LayerNorm(a.width), nn.LayerNorm(a.width)
                self.lm.transformer.ln_f = nn.LayerNorm(a.width)
            self.head = nn.Linear(a.width, vocab, bias=False) if a.head == "untied" else None
            self.pos = None
            if a.positions == "learned":  # no rotation; the nanoGPT body's learned positions instead
                self.lm.rope_cos.fill_(1.0)
                self.lm.rope_sin.zero_()
                self.pos = nn.Embedding(96, a.width)
            self.wte = self.lm.transformer.wte
            adapter = self.lm.vision_adapter if a.adapter == "gated" else nn.Linear(feat_dim, a.width)
        self.adapter = adapter

    def forward(self, feats, first, question):  # (B, P, F), (B, 1), (B, Q) -> (B, vocab)
        words, pic = 1.0, 1.0
        if self.streams_mean:  # a word fills 1 of the 8 streams; a picture position 7 (the audio rows)
            words, pic = 1 / 8, 7 / 8
        x = torch.cat([self.wte(first) * words, self.adapter(feats) * pic, self.wte(question) * words], 1)
        if hasattr(self, "lm"):
            if self.pos is not None:
                x = x + self.pos(torch.arange(x.shape[1]))
            h = self.lm.forward_hidden(x, 0)
            return (self.lm.text_logits(h) if self.head is None else self.head(h))[:, -1]
        return self.head(self.body(x))[:, -1]


def questions(world: dict, n: int, held: bool, tag: str, vit, vocab: dict) -> list:
    """n colour/shape questions on freshly drawn scenes: (features (P, F), question ids, answer id)."""
    out, k = [], 0
    while len(out) < n:
        batch = picture_questions(world, 2 * (n - len(out)) + 8, held, f"{tag}{k}", families=FAMILIES)[:n - len(out)]
        k += 1
        feats = vit_features(vit, [im for _, im in batch])
        for (r, _), f in zip(batch, feats):
            q = [vocab.setdefault(w, len(vocab)) for w in r["question_text"].split()] + [vocab["<answer>"]]
            out.append((f.float(), q, vocab.setdefault(r["answer_text"], len(vocab)), r["family"]))
    return out


def stack(items: list, vocab: dict):
    """Left-pad the questions so that every answer is read at the last position."""
    L = max(len(q) for _, q, _, _ in items)
    question = torch.tensor([[vocab["<pad>"]] * (L - len(q)) + q for _, q, _, _ in items])
    first = torch.full((len(items), 1), vocab["<bos>"])
    return torch.stack([f for f, *_ in items]), first, question, torch.tensor([y for _, _, y, _ in items])


@torch.no_grad()
def accuracy(model, items: list, vocab: dict) -> dict:
    feats, first, question, y = stack(items, vocab)
    ok = model(feats, first, question).argmax(-1) == y
    res = {f: float(ok[[i for i, it in enumerate(items) if it[3] == f]].float().mean()) for f in FAMILIES}
    res["all"] = float(ok.float().mean())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--run", default="runs/small", help="a recipe run folder (world/world.json, assets/ViT-B-32.pt)")
    ap.add_argument("--out", required=True, help="the curve as JSON")
    ap.add_argument("--body", choices=("gpt", "omni"), default="omni")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--groups", type=int, default=None, help="omni: key/value groups (default: --heads)")
    ap.add_argument("--adapter", choices=("linear", "gated"), default="linear")
    ap.add_argument("--adapter-lr-scale", type=float, default=1.0)
    ap.add_argument("--streams-mean", action="store_true")
    ap.add_argument("--init", choices=("recipe", "torch"), default="recipe",
                    help="omni: loop.init_weights (the recipe's) or PyTorch's default initialisation")
    ap.add_argument("--init-std", type=float, default=0.02, help="omni, --init recipe: the matrices' std")
    ap.add_argument("--embedding-std", type=float, default=None,
                    help="omni, --init recipe: the embedding table's std (default: 8 x --init-std, as the recipe)")
    ap.add_argument("--final-norm-init", type=float, default=1.0,
                    help="omni: the final RMSNorm's initial weight (with a wide --embedding-std, 1/8 keeps the "
                         "tied head's first logits at the recipe's scale)")
    ap.add_argument("--mlp", choices=("swiglu", "gelu"), default="swiglu",
                    help="omni: the blocks' MLP (the release's SwiGLU without biases, or nanoGPT's GELU with them)")
    ap.add_argument("--norm", choices=("rmsnorm", "layernorm"), default="rmsnorm", help="omni: the blocks' norm")
    ap.add_argument("--positions", choices=("rope", "learned"), default="rope",
                    help="omni: rotary positions (the release's) or learned absolute ones")
    ap.add_argument("--head", choices=("tied", "untied"), default="tied",
                    help="omni: answer logits from the embedding table (the release's) or an own linear head")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-eval", type=int, default=600)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    drawn = a.init_std != 0.02 or a.embedding_std is not None or a.final_norm_init != 1.0
    if a.body == "gpt" and (a.groups is not None or a.streams_mean or a.init != "recipe" or drawn or a.mlp != "swiglu"
                           or a.norm != "rmsnorm" or a.positions != "rope" or a.head != "tied"):
        ap.error("--groups, --streams-mean, --init, --init-std, --embedding-std, --final-norm-init, --mlp, --norm, "
                 "--positions and --head are knobs of --body omni")
    if a.init == "torch" and drawn:
        ap.error("--init-std, --embedding-std and --final-norm-init set the recipe's init: use them with --init recipe")
    if a.width % a.heads or (a.groups and a.heads % a.groups):
        ap.error(f"--width {a.width} must split into --heads {a.heads}, and the heads into --groups {a.groups}")
    run = Path(a.run)
    for f in (run / "world" / "world.json", run / "assets" / "ViT-B-32.pt"):
        if not f.is_file():
            ap.error(f"{f} is missing: --run takes a folder that scripts/train_small.py wrote")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from omnitalk.train.loop import _encoders_from_dir

    world = json.loads((run / "world" / "world.json").read_text())
    vit = _encoders_from_dir(run / "assets").clip.eval()
    vocab = {"<pad>": 0, "<bos>": 1, "<answer>": 2}
    t0 = time.time()
    train = questions(world, a.n_train, False, "lookup-train", vit, vocab)
    held = questions(world, a.n_eval, True, "lookup-eval", vit, vocab)
    print(f"drew {len(train)} + {len(held)} scenes in {time.time() - t0:.0f} s", flush=True)
    model = Reader(a, len(vocab), train[0][0].shape[-1])
    ad = {id(p) for p in model.adapter.parameters()}
    params = list({id(p): p for p in model.parameters()}.values())
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in ad]},
                             {"params": [p for p in params if id(p) in ad], "lr": a.lr * a.adapter_lr_scale}],
                            lr=a.lr, weight_decay=0.1)
    rng = random.Random(a.seed)
    curve, losses = [], []
    for step in range(a.steps + 1):
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            row = {"step": step, **{f"heldout_{k}": round(v, 4) for k, v in accuracy(model, held, vocab).items()}}
            if losses:  # the mean training loss since the last row
                row["train_loss"] = round(sum(losses) / len(losses), 4)
                losses = []
            model.train()
            curve.append(row)
            print(json.dumps(row), flush=True)
        if step == a.steps:
            break
        feats, first, question, y = stack(rng.sample(train, a.batch_size), vocab)
        loss = F.cross_entropy(model(feats, first, question), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "curve": curve, "seconds": round(time.time() - t0, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
