"""The loop: it learns in every stage, freezes what the stage freezes, resumes exactly after SIGTERM,
reads YAML configs and manifests, writes metrics and plots."""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitalk.train.config import STAGE_LR, TrainConfig, TrainConfigError
from omnitalk.train.loop import BatchPlan, build_model, load_sources, lr_at, model_config, run
from omnitalk.train.metrics import read_jsonl
from test_train_sequences import MODEL_OVERRIDES, synthetic, train_config

REPO = Path(__file__).resolve().parents[2]
UNTIED = dict(MODEL_OVERRIDES, tie_word_embeddings=False)  # the tiny model with an output head of its own


def _state(path: Path) -> dict:
    return torch.load(path / "lit_model.pth", map_location="cpu", weights_only=True)


def _initial(cfg) -> dict:
    torch.manual_seed(cfg.seed)
    lm = build_model(cfg, model_config(cfg))
    return {k: v.clone() for k, v in lm.state_dict().items()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_falls_and_stage_freezing(tmp_path, stage):
    # stage 1 trains only the adapters, on speech/image questions; through a frozen *random* LLM that only
    # works when the LLM passes signal along (larger init), as a pre-trained one does
    tasks = ("asr", "image") if stage == 1 else ("qa_speech", "asr", "image", "interrupt", "text")
    recs, feats = synthetic(2, tasks=tasks)
    cfg = train_config(tmp_path, stage=stage, optim=dict(lr=1e-2, warmup_steps=3, steps=30, weight_decay=0.0),
                       batch=dict(batch_size=len(recs)), model=dict(init_std=0.3 if stage == 1 else 0.02))
    res = run(cfg, records=recs, features=feats)
    assert not res.stopped and res.step == 30 and res.path == tmp_path / "final"
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.75 * losses[0], losses
    before, after = _initial(cfg), _state(res.path)
    changed = {k for k in before if k != "lm_head.weight" and not torch.equal(before[k], after[k])}
    adapters = {k for k in before if "adapter" in k}
    llm = {k for k in before if k.startswith("transformer.")}
    if stage == 1:
        assert changed == adapters  # the LLM (and its tied head) stays exactly as it was
    elif stage == 2:
        assert changed == llm  # adapters frozen
        assert rows[0]["audio"] == 0  # stage 2 answers in text only
    else:
        assert changed == adapters | llm
        assert rows[0]["audio"] > 0
    assert torch.equal(after["lm_head.weight"], after["transformer.wte.weight"])
    # a model trained on the interruption task says so in its exported config (servers use its head)
    import yaml
    flag = yaml.safe_load((res.path / "model_config.yaml").read_text()).get("interrupt_trained", False)
    if stage in (1, 3):
        assert flag is (stage == 3)


def _random_start(cfg):
    """A freshly initialised model, its embedding table, the 7 `_pad_a` rows and a mask of the other rows."""
    from omnitalk.tokens import TokenLayout

    torch.manual_seed(0)
    lm = build_model(cfg, model_config(cfg))
    c = lm.cfg
    wte = lm.transformer.wte.weight.detach()
    pad_rows = [c.text_vocab_size + j * c.audio_vocab_size + TokenLayout.from_config(c).pad_a
                for j in range(c.n_audio_layers)]
    others = torch.ones(wte.shape[0], dtype=torch.bool)
    others[pad_rows] = False
    return lm, wte, pad_rows, others


def test_random_init_scales_the_embedding_table_and_zeroes_the_audio_pad_rows(tmp_path):
    lm, wte, pad_rows, others = _random_start(train_config(tmp_path, model=dict(init_std=0.02)))
    c = lm.cfg
    assert all(float(wte[r].abs().max()) == 0.0 for r in pad_rows)
    # the input is the mean of 8 streams: the table is drawn 8x wider than the matrices
    assert float(wte[others].std()) == pytest.approx(0.02 * (c.n_audio_layers + 1), rel=0.05)
    assert float(lm.transformer.h[0].attn.attn.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert lm.lm_head.weight is lm.transformer.wte.weight  # tied
    cfg2 = train_config(tmp_path, model=dict(init_std=0.02, embedding_init_std=0.05, zero_audio_pad=False))
    wte2 = build_model(cfg2, model_config(cfg2)).transformer.wte.weight.detach()
    assert float(wte2.std()) == pytest.approx(0.05, rel=0.05) and all(float(wte2[r].abs().max()) > 0 for r in pad_rows)


def test_pytorch_init_style_starts_every_module_as_pytorch_does(tmp_path):
    lm, wte, pad_rows, others = _random_start(train_config(tmp_path, model=dict(init_style="pytorch",
                                                                             config=dict(UNTIED))))
    assert all(float(wte[r].abs().max()) == 0.0 for r in pad_rows)  # zero_audio_pad still applies
    assert float(wte[others].std()) == pytest.approx(1.0, rel=0.05)  # nn.Embedding: N(0, 1)
    for w in (lm.transformer.h[0].attn.attn.weight, lm.transformer.h[1].mlp.proj.weight, lm.lm_head.weight):
        w = w.detach()
        bound = 1 / math.sqrt(w.shape[1])  # nn.Linear: uniform +-1/sqrt(fan_in)
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.95 * bound
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert lm.lm_head.weight is not lm.transformer.wte.weight  # the untied head: a matrix of its own
    with pytest.raises(TrainConfigError, match="model.init_style must be 'gpt' .* or 'pytorch' .*, got 'xavier'"):
        TrainConfig.from_dict(dict(model=dict(init_style="xavier")))


@pytest.mark.parametrize("stage", [1, 2])
def test_untied_head_trains_with_the_llm_and_exports_its_own_matrix(tmp_path, stage):
    import yaml

    from omnitalk import checkpoint as ck
    from omnitalk.config import Config

    tasks = ("asr", "image") if stage == 1 else ("qa_speech", "asr", "text")
    recs, feats = synthetic(2, tasks=tasks)
    cfg = train_config(tmp_path, stage=stage, optim=dict(lr=1e-2, warmup_steps=1, steps=4),
                       batch=dict(batch_size=len(recs)), model=dict(init_style="pytorch", config=dict(UNTIED)))
    res = run(cfg, records=recs, features=feats)
    before, after = _initial(cfg), _state(res.path)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert ("lm_head.weight" in changed) is (stage == 2)  # trains with the LLM, frozen in stage 1
    assert not torch.equal(after["lm_head.weight"], after["transformer.wte.weight"])
    assert yaml.safe_load((res.path / "model_config.yaml").read_text())["tie_word_embeddings"] is False
    mcfg = Config.from_file(res.path / "model_config.yaml")
    lm = ck.load_llm(res.path, mcfg)
    assert lm.lm_head.weight is not lm.transformer.wte.weight
    assert torch.equal(lm.lm_head.weight, after["lm_head.weight"])
    h = torch.randn(3, mcfg.n_embd)
    assert torch.allclose(lm.text_logits(h), h @ after["lm_head.weight"][:mcfg.text_vocab_size].T, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_sigterm_checkpoint_and_exact_resume(tmp_path, tied):
    recs, feats = synthetic(2, seed=1)
    over = dict(optim=dict(lr=5e-3, warmup_steps=2, steps=9), batch=dict(batch_tokens=256, grad_accum=2),
                checkpoint_every=4, keep_checkpoints=2)
    if not tied:  # the untied head is saved, resumed and exported as its own tensor
        over["model"] = dict(init_style="pytorch", config=dict(UNTIED))
    straight = run(train_config(tmp_path / "a", **over), records=recs, features=feats)

    def kill_at_5(step, row):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag

    cfg = train_config(tmp_path / "b", **over)
    stopped = run(cfg, records=recs, features=feats, callbacks=[kill_at_5])
    assert stopped.stopped and stopped.step == 5 and stopped.path.name == "step-0000005"
    assert (stopped.path / "state.pt").is_file() and not (tmp_path / "b" / "final").exists()
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-0000005"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    resumed = run(cfg, resume=True, records=recs, features=feats)
    assert not resumed.stopped and resumed.step == 9
    a, b = _state(straight.path), _state(resumed.path)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["lm_head.weight"], a["transformer.wte.weight"]) is tied
    ra = [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")]
    rb = [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert ra == rb  # the metrics file has each step once, with the same numbers
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*"))
    assert kept == ["step-0000008", "step-0000009"]


def test_schedule_warmup_and_cosine():
    cfg = TrainConfig.from_dict(dict(stage=1, optim=dict(warmup_steps=10, steps=110)))
    assert (cfg.lr, cfg.min_lr) == STAGE_LR[1] == (1e-3, 4e-6)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx((1e-3 + 4e-6) / 2)
    assert lr_at(110, cfg) == pytest.approx(4e-6)
    assert TrainConfig.from_dict(dict(stage=2)).lr == 4e-4


def test_batch_plan_is_deterministic_and_weighted():
    cfg = TrainConfig.from_dict(dict(batch=dict(batch_size=3), seed=5))
    plan = BatchPlan([1.0, 2.0, 0.0, 1.0, 1.0, 1.0], [10] * 6, cfg)
    e0 = plan.epoch(0)
    assert e0 == BatchPlan([1.0, 2.0, 0.0, 1.0, 1.0, 1.0], [10] * 6, cfg).epoch(0)
    flat = [i for b in e0 for i in b]
    assert flat.count(1) == 2 and 2 not in flat and len(flat) == 6
    assert plan.epoch(1) != e0


def test_batch_plan_caps_token_buckets_at_max_batch():
    lengths = [16] * 40 + [200] * 8          # many short records, a few long ones
    plain = BatchPlan([1.0] * 48, lengths, TrainConfig.from_dict(dict(batch=dict(batch_tokens=640), seed=1)))
    capped = BatchPlan([1.0] * 48, lengths,
                       TrainConfig.from_dict(dict(batch=dict(batch_tokens=640, max_batch=8), seed=1)))
    assert max(len(b) for b in plain.epoch(0)) == 40                      # 40 x 16 = 640 tokens
    sizes = sorted(len(b) for b in capped.epoch(0))
    assert max(sizes) == 8 and sum(sizes) == 48 and sizes.count(8) == 5   # the short ones: 5 steps, not 1
    assert sorted(i for b in capped.epoch(0) for i in b) == list(range(48))
    with pytest.raises(TrainConfigError, match="batch.max_batch must be >= 1"):
        TrainConfig.from_dict(dict(batch=dict(batch_tokens=640, max_batch=0)))


def test_config_errors_name_the_key():
    with pytest.raises(TrainConfigError, match="unknown key"):
        TrainConfig.from_dict(dict(optim=dict(learning_rate=1)))
    with pytest.raises(TrainConfigError, match="stage"):
        TrainConfig.from_dict(dict(stage=4))
    with pytest.raises(TrainConfigError, match=r"model.dropout must be in \[0, 1\), got 1.5"):
        TrainConfig.from_dict(dict(model=dict(dropout=1.5)))


def test_follow_text_copies_join_the_speech_stage_only(tmp_path):
    recs = [dict(id=f"r{i}", task="qa", question_text="q", answer_text=f"a{i % 2}", speak=True,
                 answer_snac=[[1] * 7]) for i in range(40)]
    entries = [{"records": recs, "weight": 2.0}]
    cfg3 = train_config(tmp_path, data={"follow_text": 0.5})
    out, weights = load_sources(entries, cfg3)
    copies = [r for r in out if r["id"].endswith("-ft")]
    assert out[:40] == recs and 10 <= len(copies) == len(out) - 40 <= 30 and weights == [2.0] * len(out)
    assert all(r["text_loss"] is False for r in copies)
    # each copy is weighed as its own original, also when two sources hold the same ids
    out, weights = load_sources([{"records": recs, "weight": 2.0}, {"records": recs, "weight": 3.0}], cfg3)
    weight_of_copy = [w for r, w in zip(out, weights) if r["id"].endswith("-ft")]
    assert weight_of_copy == [2.0] * len(copies) + [3.0] * len(copies)
    out2, _ = load_sources(entries, train_config(tmp_path, stage=2, data={"follow_text": 0.5}))
    assert len(out2) == 40 and not any(r["speak"] for r in out2)  # stage 2: text answers, no copies
    with pytest.raises(TrainConfigError, match="data.follow_text is a share in"):
        train_config(tmp_path, data={"follow_text": 2})


def test_dropout_reaches_the_trained_model(tmp_path):
    """model.dropout is applied in the training forward: same seed and data, a different first loss;
    without it the run is the plain one (the same first loss twice)."""
    recs, feats = synthetic(2, tasks=("text", "qa_speech"))
    first = {}
    for name, p in (("a", 0.0), ("b", 0.0), ("c", 0.3)):
        run(train_config(tmp_path / name, model=dict(dropout=p), optim=dict(steps=2)), records=recs, features=feats)
        rows = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
        assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
        first[name] = rows[0]["loss"]
    assert first["a"] == first["b"] and first["c"] != first["a"]


@pytest.mark.parametrize("name", ["mini-omni2-stage1", "mini-omni2-stage2", "mini-omni2-stage3",
                                  "finetune-voice", "small-cpu"])
def test_shipped_configs_parse(name):
    cfg = TrainConfig.from_yaml(REPO / "configs" / f"{name}.yaml")
    if cfg.model.init == "random":
        m = model_config(cfg)
        assert m.padded_vocab_size == m.text_vocab_size + 7 * m.audio_vocab_size
    if name == "small-cpu":
        m = model_config(cfg)
        assert (m.n_layer, m.n_embd, m.n_head, m.n_query_groups) == (4, 256, 4, 2)
        assert all(str(e["path"] if isinstance(e, dict) else e).startswith("runs/small-world/")
                   for e in cfg.data.train)


def _manifest(tmp_path: Path, tasks=("asr", "qa_speech", "image")) -> Path:
    """A JSONL manifest whose question_audio / question_image point at saved features (.npy)."""
    recs, feats = synthetic(1, tasks=tasks)
    lines = []
    for r in recs:
        r = dict(r)
        for key, get in (("question_audio", feats.audio), ("question_image", feats.image)):
            if r.get(key):
                f = tmp_path / f"{r[key]}.npy"
                np.save(f, get(r[key]).numpy())
                r[key] = f.name  # relative to the manifest's folder
        lines.append(json.dumps(r))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.jsonl"


def test_cli_on_a_manifest_with_saved_features_and_plot(tmp_path, capsys):
    from omnitalk.train.cli import main

    _manifest(tmp_path)
    cfg = train_config(tmp_path / "run", optim=dict(steps=100),
                       data=dict(train=[{"path": str(tmp_path / "train.jsonl"), "weight": 2.0}],
                                 eval=[str(tmp_path / "train.jsonl")]), eval_every=2)
    cfg.to_yaml(tmp_path / "train.yaml")
    assert main(["train", str(tmp_path / "train.yaml"), "--max-steps", "3", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    rows = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert any("eval_loss" in r for r in rows)
    header = (tmp_path / "out" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "text", "audio", "lr", "tokens_per_s", "eval_loss"} <= set(header)
    assert main(["export", str(tmp_path / "out"), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "lit_model.pth").is_file() and (tmp_path / "exp" / "model_config.yaml").is_file()
    png = tmp_path / "loss.png"
    assert main(["plot-metrics", str(tmp_path / "out" / "metrics.jsonl"), "--out", str(png)]) == 0
    from PIL import Image
    with Image.open(png) as im:
        assert im.size[0] >= 400 and im.format == "PNG"
        assert len(im.convert("RGB").getcolors(1 << 20)) > 5  # something was drawn


def test_pillow_plot_without_matplotlib(tmp_path):
    from omnitalk.train.metrics import MetricsWriter, plot_metrics

    w = MetricsWriter(tmp_path)
    for s in range(1, 50):
        w.log({"step": s, "loss": 10 / s, "text": 6 / s, "audio": 4 / s})
    w.log({"step": 49, "eval_loss": 0.3})
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "p.png", backend="pillow")
    assert out.stat().st_size > 1000


HOOK_CALLS = []


def eval_hook(model, step, cfg):
    HOOK_CALLS.append(step)
    return {"eval_custom": float(step)}


def test_bf16_autocast_eval_hook_and_chunked_head(tmp_path):
    recs, feats = synthetic(1)
    cfg = train_config(tmp_path, dtype="bf16", optim=dict(steps=4), batch=dict(batch_size=3, head_chunk=5),
                       eval_every=2, eval_hook="test_train_loop:eval_hook")
    res = run(cfg, records=recs, eval_records=recs[:3], features=feats)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [r["eval_custom"] for r in rows if "eval_custom" in r] == [2.0, 4.0] == HOOK_CALLS
    assert all(math.isfinite(r["eval_loss"]) for r in rows if "eval_loss" in r)
    w = torch.load(res.path / "lit_model.pth", weights_only=True)
    assert all(v.dtype == torch.float32 for v in w.values())  # master weights stay fp32


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_and_exits_0(tmp_path):
    """The real thing: `torchrun --nproc_per_node 2 -m omnitalk.train.cli train`; SIGTERM reaches the
    workers (as a scheduler's preemption notice does), the ranks agree on a step, save one checkpoint
    and exit 0, so torchrun exits 0. (SIGTERM sent to torchrun itself is forwarded the same way, but
    torchrun then reports its own signal with exit code 1 whatever the workers did.)"""
    import subprocess
    import sys
    import time

    from omnitalk.train.dist import free_port

    manifest = _manifest(tmp_path)
    cfg = train_config(tmp_path / "run", optim=dict(steps=100000, warmup_steps=2), batch=dict(batch_size=2),
                       data=dict(train=[str(manifest)]), log_every=1)
    cfg.to_yaml(tmp_path / "train.yaml")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "omnitalk.train.cli", "train", str(tmp_path / "train.yaml"),
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(read_jsonl(metrics)) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    workers = [int(d) for d in os.listdir("/proc") if d.isdigit() and _ppid(int(d)) == proc.pid]
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out
    ck = tmp_path / "run" / "checkpoints"
    name = (ck / "latest").read_text()
    assert (ck / name / "state.pt").is_file()
    step = int(name.split("-")[1])
    assert step >= 2 and max(r["step"] for r in read_jsonl(metrics)) == step


def test_sample_builder_pools_audio_like_the_engine():
    """With Config.audio_pool = k the cached Whisper frames are averaged k at a time before the adapter,
    so a training sample has the prompt the engine builds: ceil(L / k) audio positions."""
    from omnitalk.model.whisper import pool_frames
    from omnitalk.train.loop import SampleBuilder
    from test_train_sequences import LAYOUT, TOK

    recs, feats = synthetic(3, tasks=("qa_speech", "asr"))
    plain, pooled = SampleBuilder(recs, LAYOUT, TOK, feats), SampleBuilder(recs, LAYOUT, TOK, feats, audio_pool=2)
    for i, r in enumerate(recs):
        L = feats.audio(r["question_audio"]).shape[0]
        a, b = plain(i), pooled(i)
        assert a.length - b.length == L - math.ceil(L / 2)
        assert torch.equal(b.slots[0].feats, pool_frames(feats.audio(r["question_audio"]), 2))


def test_sample_builder_merges_audio_by_ctc_like_the_engine():
    """With Config.audio_compress = 'ctc' the cached frames are merged by the feature source's encoder's
    CTC head (omnitalk.model.whisper.speech_positions, as the engine does); without a head it says so."""
    from types import SimpleNamespace

    from omnitalk.errors import CheckpointError
    from omnitalk.model.whisper import ctc_compress
    from omnitalk.train.loop import SampleBuilder
    from test_train_sequences import D_AUDIO, LAYOUT, TOK

    recs, feats = synthetic(3, tasks=("qa_speech", "asr"))
    torch.manual_seed(0)
    head = torch.nn.Linear(D_AUDIO, 3)
    feats.model = SimpleNamespace(whisper=SimpleNamespace(ctc_head=head))
    plain, merged = SampleBuilder(recs, LAYOUT, TOK, feats), SampleBuilder(recs, LAYOUT, TOK, feats, audio_compress="ctc")
    for i, r in enumerate(recs):
        x = feats.audio(r["question_audio"])
        want = ctc_compress(x, head(x).argmax(-1))
        a, b = plain(i), merged(i)
        assert a.length - b.length == x.shape[0] - want.shape[0]
        assert torch.equal(b.slots[0].feats, want)
    del feats.model
    with pytest.raises(CheckpointError, match="no 'ctc_head'"):
        SampleBuilder(recs, LAYOUT, TOK, feats, audio_compress="ctc")(0)


def test_lr_scale_gives_matching_parameters_their_own_lr(tmp_path, monkeypatch):
    from omnitalk.train.loop import TrainModule, make_optimizer

    cfg = train_config(tmp_path, optim=dict(lr_scale={"vision_adapter.": 10.0}))
    lm = build_model(cfg, model_config(cfg))
    opt = make_optimizer(TrainModule(lm, cfg.loss), cfg)
    by_scale = {g["lr_scale"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_scale) == {1.0, 10.0}
    assert by_scale[10.0] == {id(p) for p in lm.vision_adapter.parameters()}
    # a run schedules every group at its multiple of the lr
    seen, step = [], torch.optim.AdamW.step

    def record(self, *a, **k):
        seen.append(sorted((g["lr_scale"], g["lr"]) for g in self.param_groups))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    recs, feats = synthetic(2, tasks=("image",))
    rc = train_config(tmp_path / "r", optim=dict(lr_scale={"vision_adapter.": 10.0}, steps=2, warmup_steps=0))
    assert run(rc, records=recs, features=feats).step == 2
    first = {k: lr for k, lr in seen[0]}
    assert first[1.0] == pytest.approx(lr_at(0, rc)) and first[10.0] == pytest.approx(10 * lr_at(0, rc))
    with pytest.raises(ValueError, match=r"lr_scale: no trainable parameter starts with \['visual_adapter.'\]"):
        make_optimizer(TrainModule(lm, cfg.loss), train_config(tmp_path, optim=dict(lr_scale={"visual_adapter.": 2})))
