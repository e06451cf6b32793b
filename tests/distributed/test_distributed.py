"""Data-parallel training: 2 gloo processes on 127.0.0.1 running DDP + ModulatedOptimizer.

One spawn runs every scenario (spawning costs seconds on a shared CPU); the tests below read
what each rank saved:
- OGM-GE with noise, 30 steps: parameters bit-identical on both ranks at the end; each step's
  scores are the all-reduce of the ranks' local sums and equal the single-process scores of the
  concatenated global batch, and so do the coefficients; a separate single-process run on the
  global batch gives the same coefficients (up to float rounding of the averaged gradients).
- Gradient accumulation with DDP ``no_sync``: the step scores all micro-batches of all ranks.
- Both ``gradient_as_bucket_view`` settings; one scenario passes an explicit ``process_group``.
- Rank 0's seed is agreed at construction, so both ranks draw the same noise.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

import mmmod
from mmmod import backends, functional

import _dist_utils as du

pytestmark = [
    pytest.mark.filterwarnings("ignore:mmmod. no fused backend"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo over tcp on 127.0.0.1"),
]

WORLD = 2
# the Triton interpreter is far too slow for 30 steps x 2 processes; CPU-side backends only
DDP_BACKENDS = [b for b in ("torch", "cpu") if backends.status(b)[0]]
SCENARIOS = [(f"{b}-view{int(v)}-group{int(g)}", v, b, g)
             for b in DDP_BACKENDS for v, g in ((True, True), (False, False))]
IDS = [s[0] for s in SCENARIOS]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    seed = int.from_bytes(os.urandom(3), "little")
    print(f"seed={seed}")
    du.spawn(du.ddp_worker, WORLD, str(out), SCENARIOS, seed)
    res = {}
    for name, *_ in SCENARIOS:
        res[name] = [torch.load(out / f"{name}.rank{r}.pt") for r in range(WORLD)]
    return seed, res


def _scenario(name):
    return next(s for s in SCENARIOS if s[0] == name)


@pytest.mark.parametrize("name", IDS)
def test_replicas_stay_bit_identical(ddp_results, name):
    _, res = ddp_results
    r0, r1 = res[name]
    assert not torch.equal(r0["init_local"], r1["init_local"])  # DDP had something to broadcast
    assert torch.equal(r0["init"], r1["init"]) and torch.equal(r1["init"], r0["init_local"])
    assert torch.equal(r0["params"], r1["params"])
    assert torch.equal(r0["acc_params"], r1["acc_params"])
    assert not torch.equal(r0["params"], r0["init"])


@pytest.mark.parametrize("name", IDS)
def test_seed_agreed_from_rank0(ddp_results, name):
    seed, res = ddp_results
    assert [r["seed"] for r in res[name]] == [seed, seed]  # rank r passed seed + r


@pytest.mark.parametrize("name", IDS)
def test_scores_and_coefficients_are_the_global_batch(ddp_results, name):
    _, res = ddp_results
    r0, r1 = res[name]
    for r in (r0, r1):
        assert r["step_count"] == du.STEPS and r["skipped"] == 0
        # the step's scores: the all-reduce of the M local sums (same bits on every rank) ...
        assert torch.equal(r["scores"], r0["all_local_sums"].sum(0))
        # ... which is the single-process score of the concatenated global batch
        torch.testing.assert_close(r["scores"], r["ref_scores"], rtol=1e-5, atol=1e-5)
        ref_k = torch.stack([functional.coefficients(s, "ogm_ge", alpha=du.ALPHA, backend="torch")
                             for s in r["ref_scores"]])
        torch.testing.assert_close(r["coeffs"], ref_k, rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["coeffs"], r1["coeffs"]) and torch.equal(r0["scores"], r1["scores"])
    # every step damped exactly one modality (M = 2 rule)
    assert ((r0["coeffs"] < 1).sum(1) == 1).all()


@pytest.mark.parametrize("name", IDS)
def test_matches_single_process_run_on_global_batch(ddp_results, name):
    """The same training without DDP on the concatenated batch: same coefficients each step.

    DDP averages two half-batch means instead of taking one full mean, so parameters differ in
    the last bits; coefficients are compared with a tolerance up to a near-tie of the scores
    (OGM's k jumps at rho = 1, where rounding may legitimately pick the other modality)."""
    seed, res = ddp_results
    _, _, backend, _ = _scenario(name)
    r0 = res[name][0]
    with du.one_thread():
        k_sp, s_sp, p_sp = du.single_process_run(r0["init"], seed, backend, WORLD)
    near_tie = ((s_sp[:, 1] / s_sp[:, 0] - 1).abs() < 1e-3).nonzero()
    upto = du.STEPS if near_tie.numel() == 0 else int(near_tie[0, 0])
    assert upto > 0 or pytest.skip("near-tie on the first step")
    torch.testing.assert_close(r0["coeffs"][:upto], k_sp[:upto], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r0["scores"][:upto], s_sp[:upto], rtol=1e-4, atol=1e-4)
    if upto == du.STEPS:
        torch.testing.assert_close(r0["params"], p_sp, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", IDS)
def test_no_sync_accumulation_scores_whole_global_batch(ddp_results, name):
    _, res = ddp_results
    r0, r1 = res[name]
    for r in (r0, r1):
        # local sums (both micro-batches of a rank) all-reduced over ranks ...
        assert torch.equal(r["acc_scores"], r0["acc_all_local"].sum(0))
        # ... are the scores of all WORLD * MICRO micro-batches together
        torch.testing.assert_close(r["acc_scores"], r["acc_ref"], rtol=1e-5, atol=1e-5)
    # and not just one rank's share
    assert (r0["acc_scores"] > r0["acc_all_local"][0] * 1.2).all()


def test_single_process_without_init_needs_no_group():
    from _models import TwoEncoder, batch, make, train_step
    assert not dist.is_initialized()
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), backend="torch", seed=5)
    assert opt._world() == 1 and opt.seed == 5
    train_step(model, opt, names, *batch())


_SHARDED_SCRIPT = r"""
import tempfile, torch, torch.distributed as dist
import mmmod
from torch.distributed.fsdp._flat_param import FlatParameter
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
mesh = init_device_mesh("cpu", (1,))
sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3, 3, 3), mesh, [Shard(0)]))
flat = FlatParameter(torch.zeros(4, 3, 3, 3), requires_grad=True)
plain = torch.nn.Parameter(torch.randn(4, 3, 3, 3))

def refused(bad, method, want, **kw):
    try:
        mmmod.ModulatedOptimizer(torch.optim.SGD([bad, plain], lr=0.1),
                                 {"audio": [bad], "visual": [plain]}, method=method, **kw)
    except ValueError as e:
        assert "modality 'audio'" in str(e) and all(w in str(e) for w in want), e
    else:
        raise SystemExit(f"{method} accepted {want}")

# OGM-GE on a DTensor: accepted (the shards gather the std); every element-wise method too
# InfoReg too (its Fisher sums are gathered across the shards)
for method in ("ogm_ge", "ogm", "mlb", "agm", "mslr", "inforeg"):
    mmmod.ModulatedOptimizer(torch.optim.SGD([sharded, plain], lr=0.1),
                             {"audio": [sharded], "visual": [plain]}, method=method)
# an FSDP1 FlatParameter mixes many tensors: no per-tensor std
refused(flat, "ogm_ge", ["FlatParameter", "fully_shard"])
mmmod.ModulatedOptimizer(torch.optim.SGD([flat, plain], lr=0.1),
                         {"audio": [flat], "visual": [plain]}, method="ogm")
# each rank's torch generator cannot draw a shard's part of one stream
refused(sharded, "ogm_ge", ["DTensor", "noise_rng='philox'"], noise_rng="torch")
# an FSDP1 FlatParameter has no per-tensor Fisher term either
refused(flat, "inforeg", ["FlatParameter", "'inforeg'", "fully_shard"])
dist.destroy_process_group()
print("ok")
"""


def test_sharded_parameters_accepted_or_refused_by_name(tmp_path):
    """DTensor parameters: every method accepts them; an FSDP1 FlatParameter under OGM-GE or
    InfoReg and noise_rng='torch' on a shard are refused at
    construction with the modality and parameter named (multi-rank behaviour:
    tests/distributed/test_fsdp.py)."""
    import subprocess
    r = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], capture_output=True, text=True,
                       timeout=240, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_ranks_resolving_different_backends_are_refused_at_construction(tmp_path):
    """Different kernels round differently and the replicas would drift apart: every rank
    raises at construction (one collective, shared with the seed agreement), none hangs. The
    same spawn checks a per-sample-mean method (AGM) over ranks with unequal batches."""
    live = [b for b in ("torch", "cpu", "triton") if backends.status(b)[0]]
    if len(live) < 2:
        pytest.skip(f"needs two live backends, have {live}")
    pair = live[:2]
    du.spawn(du.backend_agreement_worker, WORLD, str(tmp_path), pair, 41)
    res = [torch.load(tmp_path / f"agree.rank{r}.pt") for r in range(WORLD)]
    for r in res:
        assert "resolved the mmmod backend differently" in r["mixed"], r["mixed"]
        assert f"rank 0: ['{pair[0]}']" in r["mixed"] and f"rank 1: ['{pair[1]}']" in r["mixed"]
        assert r["agreed_seed"] == 41 and r["big_seed"] == 2 ** 64 - 1
    # AGM's per-sample means over the global batch of 3 + 5 samples, same on both ranks
    from _models import TwoEncoder
    agm = mmmod.methods.get("agm")
    torch.manual_seed(41)
    model = TwoEncoder()
    xs, y = du.global_batch(0, 41, 8)
    with torch.no_grad():
        sums = agm.batch_scores(mmmod.fusion.concat_logits(model.head, model(xs)[1]), y)
    want = functional.coefficients(sums / 8, "agm", backend="torch", state=agm.init_state(2))
    assert torch.equal(res[0]["mean_coeffs"], res[1]["mean_coeffs"])
    torch.testing.assert_close(res[0]["mean_scores"], sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res[0]["mean_coeffs"], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, functional.coefficients(
        sums / 3, "agm", backend="torch", state=agm.init_state(2)))  # the count matters
