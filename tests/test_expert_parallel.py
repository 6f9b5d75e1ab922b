"""Expert parallelism: 2 gloo ranks holding 2 experts each compute what one process holding all 4 does, pads
never reach an expert, full checkpoints round-trip exactly, and `wudao train` under torchrun with
`train.expert_parallel=2` matches one process and resumes across expert-parallel sizes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from tests.test_train import WUDAO, _env, _ingest
from wudao.model.moe import MoE
from wudao.train import expert_parallel as ep
from wudao.train.expert_parallel import ExpertGroups

WORLD, D, E = 2, 16, 4


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = MoE(d_model=D, hidden=32, n_experts=E, top_k=2)


def _data(seed: int = 0):
    """Per rank: input (2, 10, D) with padding at the row ends, a weight for the loss."""
    g = torch.Generator().manual_seed(seed)
    x_RBTD = torch.randn(WORLD, 2, 10, D, generator=g)
    real_RBT = torch.arange(10).expand(WORLD, 2, 10) < torch.tensor([[7, 10], [4, 9]])[..., None]
    w_RBTD = torch.randn(WORLD, 2, 10, D, generator=g)
    return x_RBTD, real_RBT, w_RBTD


def _loss(layer: Layer, x_BTD, real_BT, w_BTD):
    y_BTD, stats = layer.moe(x_BTD, real_BT)
    return (y_BTD * w_BTD).sum() + stats.load_balance_loss + stats.z_loss, y_BTD, stats


def _reference() -> dict:
    """One process, all experts: each rank's chunk is a micro-batch; gradients of the mean of their losses."""
    torch.manual_seed(0)
    layer = Layer()
    with torch.no_grad():
        layer.moe.router.weight.normal_(std=1.0)
    x_RBTD, real_RBT, w_RBTD = _data()
    x_RBTD.requires_grad_(True)
    ys, losses, total = [], [], 0.0
    for r in range(WORLD):
        loss, y, _ = _loss(layer, x_RBTD[r], real_RBT[r], w_RBTD[r])
        ys.append(y.detach())
        losses.append(loss.detach())
        total = total + loss / WORLD
    total.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    opt.step()
    return {
        "y": torch.stack(ys),
        "loss": losses,
        "grads": grads,
        "x_grad": x_RBTD.grad,
        "after": {n: p.detach().clone() for n, p in layer.named_parameters()},
    }


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        layer = Layer()
        with torch.no_grad():
            layer.moe.router.weight.normal_(std=1.0)
        full_before = {n: p.detach().clone() for n, p in layer.named_parameters()}
        groups = ep.make_groups(WORLD)
        local_names = ep.shard_experts(layer, groups)
        received = []
        send = layer.moe.exchange.send

        def counting_send(x_AD, counts_E):
            out = send(x_AD, counts_E)
            received.append(int(out[1].sum()))  # rows this rank's experts computed
            return out

        layer.moe.exchange.send = counting_send
        x_RBTD, real_RBT, w_RBTD = _data()
        x_BTD = x_RBTD[rank].clone().requires_grad_(True)
        loss, y_BTD, stats = _loss(layer, x_BTD, real_RBT[rank], w_RBTD[rank])
        loss.backward()
        ep.reduce_expert_grads(layer, groups)
        torch_dist.all_reduce(layer.moe.router.weight.grad)  # what DDP does for the replicated parameters
        layer.moe.router.weight.grad.div_(WORLD)
        gathered = ep.gather_full(dict(layer.state_dict()), layer, groups)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        opt.step()
        after = ep.gather_full({}, layer, groups)
        full_opt = ep.gather_full_optimizer({"state": {n: {} for n in local_names}}, layer, opt, groups)
        back = ep.local_optimizer_state(full_opt, layer, groups)
        roundtrip = all(
            torch.equal(back["state"][n]["exp_avg"], opt.state[p]["exp_avg"])
            for n, p in layer.named_parameters()
            if n in local_names
        )
        # The reference differentiates the mean of the ranks' losses: its input gradients carry a 1/WORLD.
        torch.save(
            {
                "y": y_BTD.detach(),
                "loss": loss.detach(),
                "x_grad": x_BTD.grad / WORLD,
                "grads": grads,
                "local_names": local_names,
                "received": received,
                "gathered": gathered,
                "full_before": full_before,
                "after": after,
                "opt_roundtrip": roundtrip,
                "routed": int(stats.routed_tokens),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        torch_dist.destroy_process_group()


def test_two_expert_parallel_ranks_equal_one_process(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ref = _reference()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    _, real_RBT, _ = _data()
    for r, out in enumerate(ranks):
        torch.testing.assert_close(out["loss"], ref["loss"][r], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["y"], ref["y"][r], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["x_grad"], ref["x_grad"][r], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            out["grads"]["moe.router.weight"], ref["grads"]["moe.router.weight"], atol=1e-5, rtol=1e-5
        )
        for name in ("moe.w_in_EDH", "moe.w_out_EHD"):
            block = slice(r * E // WORLD, (r + 1) * E // WORLD)
            assert out["grads"][name].shape[0] == E // WORLD, "each rank holds half the experts"
            torch.testing.assert_close(out["grads"][name], ref["grads"][name][block], atol=1e-5, rtol=1e-5)
            # Checkpoints are full: gathering the shards gives back exactly the experts of one process.
            assert torch.equal(out["gathered"][name], out["full_before"][name])
            torch.testing.assert_close(out["after"][name], ref["after"][name], atol=1e-5, rtol=1e-5)
        assert out["opt_roundtrip"], "full optimizer moments cut back to this rank's experts exactly"
        assert out["routed"] == int(real_RBT[r].sum())
    # Pads never reach an expert: the experts of both ranks together computed top-2 rows per real token.
    assert sum(sum(out["received"]) for out in ranks) == 2 * int(real_RBT.sum())


def test_settings_that_cannot_run_say_why():
    assert ep.check(1, 1, 4, 0, "ddp") is None
    assert ep.check(2, 2, 4, 2, "ddp") is None
    assert "divide the 3 processes" in ep.check(2, 3, 4, 2, "ddp")
    assert "model.n_experts=6" in ep.check(4, 4, 6, 2, "ddp")
    assert "needs MoE layers" in ep.check(2, 2, 4, 0, "ddp")
    assert "train.parallel=ddp" in ep.check(2, 2, 4, 2, "fsdp")
    assert ExpertGroups(2, 1, 4, None, None).block(8) == slice(4, 8)


TORCHRUN = str(Path(sys.executable).parent / "torchrun")
STEPS = dict(steps=4, batch_size=8, micro_batch_size=4, checkpoint_every=2, keep_last=3)


def _train(env: dict[str, str], nproc: int, expert_parallel: int) -> dict:
    env = {**env, "WUDAO_TRAIN__EXPERT_PARALLEL": str(expert_parallel), "OMP_NUM_THREADS": "1"}
    cmd = [WUDAO, "train", "--from", "scratch", "--json"]
    if nproc > 1:
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), *cmd]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _weights(result: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(result["checkpoint_uri"]) / "model.safetensors")


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.slow
def test_torchrun_expert_parallel_matches_one_process_and_resumes_across_sizes(tmp_path, demo_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    env1 = {**_ingest(one, demo_dir), **_env(one, **STEPS)}
    env2 = {**_ingest(two, demo_dir), **_env(two, **STEPS)}
    r1 = _train(env1, 1, 1)
    r2 = _train(env2, 2, 2)
    assert r2["run_id"] == r1["run_id"], "expert parallelism is not part of the run's identity"
    full = _weights(r2)
    assert full["blocks.1.ffn.w_in_EDH"].shape[0] == 4, "the checkpoint holds all experts"
    _assert_close(_weights(r1), full)

    # Drop the last checkpoint of each run and resume it at the other expert-parallel size.
    for home in (one, two):
        shutil.rmtree(home / "objects" / "checkpoints" / r1["run_id"] / "step-00000004")
    resumed_at_1 = _train(env2, 1, 1)  # saved at EP=2, resumed by one process
    resumed_at_2 = _train(env1, 2, 2)  # saved by one process, resumed at EP=2
    for resumed in (resumed_at_1, resumed_at_2):
        assert resumed["restarted_at_step"] == 2
        _assert_close(_weights(resumed), full)


def test_expert_parallel_refuses_a_world_it_does_not_divide(tmp_path, demo_dir):
    env = {**_ingest(tmp_path, demo_dir), **_env(tmp_path, steps=1, batch_size=4, micro_batch_size=4)}
    p = subprocess.run(
        [WUDAO, "train", "--from", "scratch"],
        env={**env, "WUDAO_TRAIN__EXPERT_PARALLEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode != 0 and "train.expert_parallel=2 must divide the 1 processes" in p.stderr
    assert "Traceback" not in p.stderr
