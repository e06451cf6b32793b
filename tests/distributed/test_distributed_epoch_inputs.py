"""Per-epoch inputs under DDP (2 gloo processes): each rank validates its own shard, so MSLR's
``val_acc`` differs between ranks; ``set_epoch`` agrees them (their mean on every rank) and the
replicas stay bit-identical. Ranks passing different inputs, or none on one rank, are refused
on every rank (no hang)."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import mmmod
import _dist_utils as du
from _models import TwoEncoder

pytestmark = [
    pytest.mark.filterwarnings("ignore:mmmod. no fused backend"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo over tcp on 127.0.0.1"),
]


def _acc(rank, t):
    return {"audio": 0.5 + 0.1 * rank + 0.02 * t, "visual": 0.45 - 0.05 * rank}


def epoch_inputs_worker(rank: int, world: int, port: int, out_dir: str, seed: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    du.init(rank, world, port)
    try:
        torch.manual_seed(seed)
        model = TwoEncoder()
        ddp = DDP(model)
        opt = mmmod.ModulatedOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.05),
                                       {"audio": model.encoders[0], "visual": model.encoders[1]},
                                       method="mslr", backend="torch", seed=seed)
        for t in range(8):
            opt.set_epoch(t, val_acc=_acc(rank, t))  # this rank's own shard's accuracy
            xs, y = du.global_batch(t, seed, 4 * world)
            mine = slice(rank * 4, (rank + 1) * 4)
            opt.zero_grad()
            out, feats = ddp([x[mine] for x in xs])
            opt.observe(mmmod.fusion.concat_logits(model.head, feats), y[mine])
            nn.functional.cross_entropy(out, y[mine]).backward()
            opt.step()
        errors = []
        for bad in ({"val_acc": _acc(0, 0)} if rank == 0 else {}, "epoch"):
            try:
                if bad == "epoch":
                    opt.set_epoch(20 + rank, val_acc=_acc(0, 0))
                else:
                    opt.set_epoch(9 + len(errors), **bad)
            except ValueError as e:
                errors.append(str(e))
        torch.save({"params": du.flat_params(model).clone(),
                    "state": {k: v.clone() for k, v in opt._method_state.items()},
                    "errors": errors}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_epoch_inputs(tmp_path):
    seed = int.from_bytes(os.urandom(3), "little")
    du.spawn(epoch_inputs_worker, 2, str(tmp_path), seed)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["params"], r1["params"])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # the history holds the ranks' mean accuracy of each epoch
    want = torch.tensor([[(_acc(0, t)[n] + _acc(1, t)[n]) / 2 for n in ("audio", "visual")]
                         for t in range(1, 8)], dtype=torch.float64)
    assert torch.allclose(r0["state"]["history"][-7:], want, rtol=0, atol=1e-12)
    for r in (r0, r1):
        assert len(r["errors"]) == 2 and all("ranks passed different" in e for e in r["errors"])
