"""Data parallelism: 2 CPU processes (gloo on 127.0.0.1) follow the 1-process loss trajectory.

Each rank takes items rank::2 of every global micro-batch (here 5 items: uneven shards), with gradient
accumulation; losses are normalised by global token counts, so the trajectories agree to float rounding.
Each spawned process pays the torch import, hence `slow`.
"""
from __future__ import annotations

import pytest
import torch

from omnitalk.train.dist import shard, DistInfo, spawn_train
from omnitalk.train.loop import run
from omnitalk.train.metrics import read_jsonl
from test_train_sequences import MODEL_OVERRIDES, synthetic, train_config


def _cfg(out, strategy):
    return train_config(out, strategy=strategy, optim=dict(lr=3e-3, warmup_steps=2, steps=5),
                        batch=dict(batch_size=5, grad_accum=2), eval_every=5)


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory(tmp_path):
    """DDP and FSDP (fully_shard per block + root), one pair of processes running both in turn."""
    recs, feats = synthetic(2, seed=4)
    run(_cfg(tmp_path / "one", "ddp"), records=recs, eval_records=recs[:7], features=feats)
    spawn_train([_cfg(tmp_path / s, s) for s in ("ddp", "fsdp")], 2, start_method="fork", records=recs,
                eval_records=recs[:7], features=feats)
    one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    wa = torch.load(tmp_path / "one" / "final" / "lit_model.pth", weights_only=True)
    for strategy in ("ddp", "fsdp"):
        two = read_jsonl(tmp_path / strategy / "metrics.jsonl")
        assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5, 5]  # + the eval row
        for a, b in zip(one, two):
            for k in ("loss", "text", "audio", "eval_loss", "eval_text", "eval_audio"):
                if k in a:
                    assert abs(a[k] - b[k]) <= 1e-5, (strategy, k, a[k], b[k])
            assert a.get("tokens") == b.get("tokens")
        wb = torch.load(tmp_path / strategy / "final" / "lit_model.pth", weights_only=True)
        for k in wa:
            if k.endswith("attn.attn.bias"):
                # The key bias shifts every score of a query by the same amount, which softmax ignores: its
                # gradient is zero in exact arithmetic, and Adam turns the rounding noise left there
                # (different in 1 and 2 processes) into steps of up to lr. Those rows may differ by
                # lr x steps; the query and value rows must agree like every other weight.
                keys = _key_rows(MODEL_OVERRIDES)
                assert torch.allclose(wa[k][~keys], wb[k][~keys], atol=1e-5), (strategy, k)
                assert float((wa[k][keys] - wb[k][keys]).abs().max()) <= 3e-3 * 5, (strategy, k)
            else:
                assert torch.allclose(wa[k], wb[k], atol=1e-5), (strategy, k)


def _key_rows(c: dict) -> torch.Tensor:
    """Rows of the fused qkv projection that hold key heads (litgpt's layout: per query group, its
    n_head / n_query_groups query heads, then one key head, then one value head)."""
    q_per_kv, hs = c["n_head"] // c["n_query_groups"], c["head_size"]
    role = torch.arange(q_per_kv + 2).repeat_interleave(hs).repeat(c["n_query_groups"])
    return role == q_per_kv


def test_shards_cover_the_global_batch():
    batch = [10, 11, 12, 13, 14]
    parts = [shard(batch, DistInfo(rank=r, world=2)) for r in range(2)]
    assert parts == [([10, 12, 14], 1.0), ([11, 13], 1.0)]
    # more ranks than items: idle ranks repeat item 0 with loss scale 0
    assert shard([7], DistInfo(rank=1, world=2)) == ([7], 0.0)
