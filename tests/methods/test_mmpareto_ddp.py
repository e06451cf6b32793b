"""MMPareto under DDP (2 gloo ranks): DDP averages the summed gradients in its backward, the
optimizer averages the fused objective's ones, so every rank combines the global batch's
gradients: the replicas stay bit-identical (parameters, weights) and match one process
trained on the global batch (the authors' single-process semantics), gradient accumulation
under ``no_sync`` included."""
import os

import pytest
import torch
import torch.distributed as dist

import mmmod
import _dist_utils as du
from _mmpareto_models import NAMES2, AVNet, losses_of, sgd

LOCAL_B, STEPS, ACC_STEP = 4, 6, 3  # step ACC_STEP accumulates two micro-batches


def global_data(t, seed, world):
    g = torch.Generator().manual_seed(seed * 1000 + t)
    xs = [torch.randn(LOCAL_B * world, 1 + i, 8, generator=g) for i in range(2)]
    return xs, torch.randint(0, 4, (LOCAL_B * world,), generator=g)


def opt_for(model, module_params):
    return mmmod.ModulatedOptimizer(sgd(module_params), {n: getattr(model, f"{n}_net")
                                                          for n in NAMES2},
                                    method="mmpareto", backend="torch")


def worker(rank, world, port, out_dir, seed):
    from torch.nn.parallel import DistributedDataParallel as DDP
    du.init(rank, world, port)
    try:
        torch.manual_seed(seed + 17 * rank)  # different inits: DDP broadcasts rank 0's
        model = AVNet()
        ddp = DDP(model)
        opt = opt_for(model, ddp)
        init = [p.detach().clone() for p in model.parameters()]
        weights = []
        for t in range(STEPS):
            xs, y = global_data(t, seed, world)
            opt.zero_grad()
            if t == ACC_STEP:  # two micro-batches: the first under no_sync
                half = LOCAL_B // 2
                for j, ctx in enumerate((ddp.no_sync(), torch.enable_grad())):
                    mine = slice(rank * LOCAL_B + j * half, rank * LOCAL_B + (j + 1) * half)
                    with ctx:
                        opt.backward(losses_of(ddp, [x[mine] for x in xs], y[mine], NAMES2,
                                               scale=0.5))
            else:
                mine = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
                opt.backward(losses_of(ddp, [x[mine] for x in xs], y[mine], NAMES2))
            opt.step()
            weights.append(opt._method_state["weights"].clone())
        torch.save({"params": [p.detach().clone() for p in model.parameters()],
                    "init": init, "weights": torch.stack(weights)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mmpareto_ddp")
    seed = int.from_bytes(os.urandom(3), "little")
    print(f"seed={seed}")
    du.spawn(worker, 2, str(out), seed)
    return seed, [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_replicas_stay_bit_identical(results):
    _, (r0, r1) = results
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)
    assert torch.equal(r0["weights"], r1["weights"])
    assert (r0["weights"] != 0.5).any()  # the min-norm branch ran


def test_ddp_equals_one_process_on_the_global_batch(results):
    seed, (r0, _) = results
    with du.one_thread():
        model = AVNet()
        with torch.no_grad():
            for p, q in zip(model.parameters(), r0["init"]):
                p.copy_(q)
        opt = opt_for(model, model)
        for t in range(STEPS):
            xs, y = global_data(t, seed, 2)
            opt.zero_grad()
            opt.backward(losses_of(model, xs, y, NAMES2))
            opt.step()
            torch.testing.assert_close(opt._method_state["weights"], r0["weights"][t],
                                       rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), r0["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=2e-5)
