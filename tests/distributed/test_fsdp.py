"""FSDP2 (``fully_shard``, DTensor parameters) on CPU: 2 gloo ranks sharding two or three
encoders whose tensors' first dims (5, 3, 1) do not divide evenly, and 4 ranks on a 2x2
replicate x shard mesh. Each run is compared with the same model trained unsharded in one
process from the same seed, whose gradient is computed as FSDP computes it (each rank's
micro-batch gradient, added in the order the reduce-scatter adds them, divided by the world
size), so the comparison isolates what mmmod does with the shards.

What is checked, per method and setting (OGM-GE with SGD and AdamW, raw and scaled noise,
apply_to="update", gradient accumulation under FSDP's no-sync; OGM, MLB, AGM, MSLR; three
modalities; the hybrid mesh; a torch.distributed.checkpoint save and restore mid-run):
coefficients and scores bit-identical to the unsharded run at every step, and the final
parameters too (see ``_params_match`` for the only rounding that may differ).
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

import _dist_utils as du

pytestmark = [
    pytest.mark.filterwarnings("ignore:mmmod. no fused backend"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo over tcp on 127.0.0.1"),
]

CONFIGS = list(du.FSDP_CONFIGS)
HYBRID = list(du.FSDP_HYBRID)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    seed = int.from_bytes(os.urandom(3), "little")
    print(f"seed={seed}")
    du.spawn(du.fsdp_worker, 2, str(out), du.FSDP_CONFIGS, seed, (2,))
    res = {name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(2)] for name in CONFIGS}
    res["refusals"] = [torch.load(out / f"refusals.rank{r}.pt") for r in range(2)]
    return seed, res


@pytest.fixture(scope="module")
def hybrid_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp")
    seed = int.from_bytes(os.urandom(3), "little")
    print(f"seed={seed}")
    du.spawn(du.fsdp_worker, 4, str(out), du.FSDP_HYBRID, seed, (2, 2))
    return seed, {name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(4)]
                  for name in HYBRID}


def _reference(name, seed, world, shard_size=None):
    with du.one_thread():
        return du.fsdp_run(du.FSDP_CONFIGS[name], seed, world, None, shard_size=shard_size)


def same_bits(a, b):
    """Equal bit for bit, NaN (a skipped step's coefficients) included."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _params_match(got: dict, want: dict) -> bool:
    """Bit-identical, up to one float32 rounding of a sigma.

    Every element-wise step is the same arithmetic on the same bits, so only OGM-GE's sigma
    can differ: the float64 std of a sharded tensor comes from a merge of per-shard moments,
    the unsharded run's from one pass, and the two float64 values differ by a few ulp
    (relative ~1e-15 here). Rounded to float32 they agree unless the float64 value lies within
    those ulps of a float32 rounding boundary (probability ~1e-8 per tensor and step); if it
    does, sigma moves by one float32 ulp (6e-8 relative) and so does the noise of that tensor,
    which the later steps carry as an ordinary perturbation: allowed 1e-5 relative."""
    assert got.keys() == want.keys()
    exact = all(torch.equal(got[n], want[n]) for n in got)
    if not exact:
        for n in got:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
    print(f"parameters bit-identical: {exact}")
    return exact


@pytest.mark.parametrize("name", CONFIGS)
def test_sharded_run_equals_unsharded_run(runs, name):
    seed, res = runs
    r0, r1 = res[name]
    for key in ("coeffs", "scores"):
        same_bits(r0[key], r1[key])
    for n in r0["params"]:  # every rank ends with the same full parameters
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    ref = _reference(name, seed, 2)
    cfg = du.FSDP_CONFIGS[name]
    if cfg.get("bad_step"):  # the reference observed a valid label where rank 1 saw -100
        keep = torch.arange(du.FSDP_STEPS) != du.FSDP_BAD_STEP
        assert torch.isnan(r0["scores"][du.FSDP_BAD_STEP]).all()
        r0 = dict(r0, scores=r0["scores"][keep])
        ref = dict(ref, scores=ref["scores"][keep])
    if cfg.get("micro", 1) == 1:  # the same additions in the same order: the same bits
        same_bits(r0["scores"], ref["scores"])
        same_bits(r0["coeffs"], ref["coeffs"])
    else:  # observe() adds micro-batches in rank-major order, the ranks add local sums
        torch.testing.assert_close(r0["scores"], ref["scores"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r0["coeffs"], ref["coeffs"], rtol=1e-5, atol=1e-6)
    _params_match(r0["params"], ref["params"])
    if cfg["method"] == "inforeg":  # k is 1: the method acts through beta and the snapshot
        _inforeg_matches(r0, r1, ref)
    else:  # the modulation changed something: the coefficients are not all 1
        assert not torch.equal(r0["coeffs"], torch.ones_like(r0["coeffs"]))
    # a step GradScaler skips (an inf in one rank's shard) never reaches step() on any rank
    steps = du.FSDP_STEPS - (1 if cfg.get("scaler") else 0)
    assert r0["step_count"] == r1["step_count"] == ref["step_count"] == steps
    if cfg.get("scaler"):
        assert r0["scale"] == r1["scale"] == ref["scale"] == 2.0 ** 9


def _inforeg_matches(r0, r1, ref):
    """InfoReg under FSDP2: the betas bit-identical to the unsharded run's (and some step
    pulled), the Fisher accumulator and epoch traces equal on every rank and within float
    rounding of the unsharded run's (its terms are added in another order: float32 means
    there, float64 shard sums gathered here; docs/semantics.md section 10), the windows the
    same. (Each rank's own shard means, what the op returns for a shard, differ between the
    ranks: the rank-equality check fails without the gather.)"""
    same_bits(r0["betas"], ref["betas"])
    assert (r0["betas"] > 0).any()
    for key in ("fisher", "traces", "window"):
        assert torch.equal(r0["method_state"][key], r1["method_state"][key]), key
        torch.testing.assert_close(r0["method_state"][key], ref["method_state"][key],
                                   rtol=1e-6, atol=0)
    assert r0["method_state"]["traces"].shape[0] == (du.FSDP_STEPS - 1) // du.INFOREG_EPOCH_STEPS
    # some Fisher mass accumulated (a modality's can be exactly 0 for some seeds: its small
    # encoder's gradients all vanish; seen once in ~40 runs, sharded and unsharded alike)
    assert (r0["method_state"]["fisher"] > 0).any()


def test_noise_needs_the_shard_offsets_and_global_sigma(runs):
    """Guard that the comparison can fail: the unsharded run with noise off differs."""
    seed, res = runs
    cfg = dict(du.FSDP_CONFIGS["ogm_ge-sgd"], method="ogm")
    du.FSDP_CONFIGS["_ogm_probe"] = cfg
    try:
        ref = _reference("_ogm_probe", seed, 2)
    finally:
        del du.FSDP_CONFIGS["_ogm_probe"]
    got = res["ogm_ge-sgd"][0]["params"]
    assert any(not torch.allclose(got[n], ref["params"][n], rtol=1e-4, atol=1e-6) for n in got)


def test_one_collective_for_the_stds_per_step(runs):
    """OGM-GE's step under FSDP: the scores' all-gather and one all-gather of the per-shard
    moments of every sharded tensor of every modality, nothing per tensor."""
    _, res = runs
    for name in ("ogm_ge-sgd", "ogm_ge-adamw", "ogm_ge-3mod-scaled-update", "ogm_ge-sgd-fused"):
        assert [r["collectives"] for r in res[name]] == [2, 2], name


def test_fused_update_on_shards_is_used_and_agrees_with_the_unfused_run(runs):
    """fused=True on FSDP2 shards (the CPU kernel when built) really ran fused; its bit-for-bit
    equality with the unsharded fused run is test_sharded_run_equals_unsharded_run's. Against
    the unfused sharded run (backend "torch", whose score sums may differ in the last bit from
    the CPU kernel's): equal to float rounding."""
    _, res = runs
    for r in res["ogm_ge-sgd-fused"] + res["ogm_ge-3mod-adamw-fused-update"]:
        assert r["fused"]
    for r, u in zip(res["ogm_ge-sgd-fused"], res["ogm_ge-sgd"]):
        torch.testing.assert_close(r["coeffs"], u["coeffs"], rtol=1e-6, atol=1e-6)
        for n in r["params"]:
            torch.testing.assert_close(r["params"][n], u["params"][n], rtol=1e-4, atol=1e-6)


def test_bad_batch_on_one_rank_skips_every_rank_together(runs):
    """Rank 1's batch at step FSDP_BAD_STEP has an ignored label and a NaN unimodal logit:
    both ranks skip that step's modulation (no hang), count it, and stay equal to the
    unsharded run that skipped the same step."""
    _, res = runs
    r0, r1 = res["ogm_ge-skip"]
    assert r0["skipped"] == r1["skipped"] == 1
    assert torch.isnan(r0["coeffs"][du.FSDP_BAD_STEP]).all()
    assert torch.isfinite(r0["coeffs"][du.FSDP_BAD_STEP + 1:]).all()


def test_layouts_without_a_contiguous_range_are_refused(runs):
    _, res = runs
    for r in res["refusals"]:
        assert "contiguous range" in r["shard1"] and "modality 'audio'" in r["shard1"], r
        assert "sharded on" in r["slice"] or "the dim its DTensor is sharded" in r["slice"], r


@pytest.mark.parametrize("name", HYBRID)
def test_hybrid_mesh_equals_unsharded_run(hybrid_runs, name):
    """2x2 mesh (replicate x shard), 4 ranks: the stds are gathered over the shard dim only
    (the replicas hold the same shards), the scores over all 4 ranks."""
    seed, res = hybrid_runs
    for r in res[name][1:]:
        assert torch.equal(r["coeffs"], res[name][0]["coeffs"])
        for n in r["params"]:
            assert torch.equal(r["params"][n], res[name][0]["params"][n]), n
    ref = _reference(name, seed, 4, shard_size=2)
    same_bits(res[name][0]["coeffs"], ref["coeffs"])
    _params_match(res[name][0]["params"], ref["params"])


# ---- single process: the pieces, on random inputs ---------------------------------------
@pytest.mark.parametrize("rows,world", [(5, 2), (1, 2), (7, 4), (3, 4), (64, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shards_with_merged_std_equal_the_whole_tensor(rows, world, dtype):
    """Shard a random gradient as FSDP2 does (torch.chunk rows, empty shards included), merge
    the shards' moments as the ranks do, and modulate each shard with the merged std at its
    stream offset: the result equals modulating the whole tensor, bit for bit (the std to
    within a few float64 ulps, the same float32 sigma)."""
    from mmmod import reference
    from mmmod.optim.sharding import merged_std
    g = torch.Generator().manual_seed(rows * 31 + world)
    whole = (torch.randn(rows, 3, 3, generator=g) * 0.1 + 0.02).to(dtype)
    shards = list(whole.clone().chunk(world))
    shards += [whole.new_empty(0, 3, 3)] * (world - len(shards))
    table = []
    for s in shards:
        x = s.reshape(-1).double()
        mean = x.mean() if x.numel() else torch.zeros((), dtype=torch.float64)
        table.append(torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), mean,
                                  (x - mean).square().sum()]))
    std = merged_std(torch.stack(table)[:, None, :])[0]
    want_std = reference.modulate.tensor_std(whole)
    torch.testing.assert_close(std, want_std, rtol=1e-14, atol=0)
    k, gate, base = torch.tensor(0.7), torch.tensor(1.0), 11  # base: tensors before this one
    expect = whole.clone()
    reference.modulate_bucket_([expect], [base], k, gate, noise=True, noise_std="raw", seed=5,
                               step=3, modality=1)
    start = 0
    for s in shards:
        reference.modulate_bucket_([s], [base + start], k, gate, noise=True, noise_std="raw",
                                   seed=5, step=3, modality=1, stds=[std])
        start += s.numel()
    assert torch.equal(torch.cat([s.reshape(-1) for s in shards]), expect.reshape(-1))


def test_given_std_is_the_same_path_as_the_own_std():
    from mmmod import reference
    g = torch.randn(1001)
    a, b = g.clone(), g.clone()
    args = dict(noise=True, noise_std="scaled", seed=1, step=2, modality=0)
    reference.modulate_bucket_([a], [3], torch.tensor(-0.4), torch.tensor(1.0), **args)
    reference.modulate_bucket_([b], [3], torch.tensor(-0.4), torch.tensor(1.0),
                               stds=[reference.modulate.tensor_std(g)], **args)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one std per tensor"):
        reference.modulate_bucket_([b], [3], torch.tensor(1.0), None, stds=[], **args)
