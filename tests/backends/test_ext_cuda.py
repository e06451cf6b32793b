"""Parity of the compiled ``cuda`` backend with the reference (needs a GPU and the CUDA build).

Same tolerances as tests/backends/test_cpu_ext.py: OGM/MLB scaling bit-identical, noise within 1e-6
relative (absolute floor 1e-7) of the reference Philox, scores/coefficients within fp32 rounding.
Also: no host sync in modulate_/scores/coefficients, run-to-run bit identity, > 2^31 elements,
the capturable form (device step counter, cached device table) inside a captured CUDA graph, and
the per-call pinned upload refusing stream capture.
"""
import pytest
import torch

from mmmod import backends, reference
from mmmod.reference import philox
from mmmod.reference.native_rules import NativeRule

LIVE, WHY = backends.status("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not LIVE, reason=f"CUDA extension (backend 'cuda') not available: {WHY}")]

CHUNK = 1 << 16  # MMMOD_CUDA_CHUNK
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
       torch.float64: 2.0 ** -52}


@pytest.fixture
def cuda():
    return backends.get("cuda", "cuda")


def offsets_of(ts):
    out, run = [], 0
    for t in ts:
        out.append(run)
        run += t.numel()
    return out


def both(cuda, ts, *, noise, noise_std="raw", k=0.45, gate=1.0, seed=0, step=0, modality=0):
    offs = offsets_of(ts)
    a = [t.cuda() for t in ts]
    b = [t.clone() for t in ts]
    cuda.modulate_bucket_(a, offs, torch.tensor(k, device="cuda"), torch.tensor(gate, device="cuda"),
                          noise=noise, noise_std=noise_std, seed=seed, step=step, modality=modality)
    reference.modulate_bucket_(b, offs, torch.tensor(k), torch.tensor(gate), noise=noise,
                               noise_std=noise_std, seed=seed, step=step, modality=modality)
    return [x.cpu() for x in a], b, offs


@pytest.mark.parametrize("M", [2, 3, 4])
def test_scores_and_coefficients(cuda, seed, M):
    for B, C in ((1, 1), (7, 3), (513, 31)):
        logits = [(torch.randn(C, B) * 3).t().to(DTYPES[m % 4]) for m in range(M)]
        labels = torch.randint(0, C, (B,))
        labels[0] = C if M == 4 else labels[0]
        got = cuda.scores([z.cuda() for z in logits], labels.cuda()).cpu()
        torch.testing.assert_close(got, reference.scores(logits, labels), rtol=1e-5, atol=1e-6,
                                   equal_nan=True)
    for method in ("ogm", "mlb", "none"):
        for _ in range(20):
            s = torch.rand(M) * 50
            got = cuda.coefficients(s.cuda(), method, 0.8, 10.0).cpu()
            want = reference.coefficients(s, method, 0.8, 10.0)
            assert torch.equal(got == 1, want == 1)
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaling_bit_identical(cuda, seed, dtype):
    ts = [torch.randn(n).to(dtype) for n in (0, 1, 3, CHUNK + 5, 3 * CHUNK - 1)]
    a, b, _ = both(cuda, ts, noise=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("noise_std", ["raw", "scaled"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_matches_reference(cuda, seed, dtype, noise_std):
    ts = [torch.randn(n).to(dtype) for n in (0, 1, 5, CHUNK + 3, 2 * CHUNK + 7)]
    a, b, offs = both(cuda, ts, noise=True, noise_std=noise_std, seed=seed, step=9, modality=1)
    k = torch.tensor(0.45)
    for t, x, y, off in zip(ts, a, b, offs):
        if t.numel() == 0:
            continue
        sz = (reference.modulate.tensor_sigma(t, k, noise_std)
              * philox.philox_normal(seed, 9, 1, off, t.numel())).abs()
        tol = 1e-6 * sz + EPS[dtype] * y.float().abs() + torch.finfo(dtype).tiny * EPS[dtype]
        assert ((x.float() - y.float()).abs() <= tol).all()


def test_philox_normal_and_determinism(cuda, seed):
    for off in (0, 3, (1 << 34) + 1):
        out = torch.empty(CHUNK + 11, device="cuda")
        torch.ops.mmmod._philox_normal_(out, seed, 5, 2, off)
        want = philox.philox_normal(seed, 5, 2, off, out.numel())
        assert ((out.cpu() - want).abs() <= 1e-6 * want.abs() + 1e-7).all()
    g = torch.randn(5 * CHUNK + 3, device="cuda")
    runs = []
    for _ in range(2):
        x = g.clone()
        cuda.modulate_bucket_([x], [0], torch.tensor(0.3, device="cuda"), torch.tensor(1.0, device="cuda"),
                              noise=True, noise_std="raw", seed=seed, step=1, modality=0)
        runs.append((x, torch.ops.mmmod._bucket_std([g])))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][1].cpu(), reference.modulate.tensor_std(g.cpu()).reshape(1),
                               rtol=1e-10, atol=0)


def test_no_host_sync(cuda, seed):
    ts = [torch.randn(n, device="cuda") for n in (10, CHUNK + 1)]
    logits = [torch.randn(8, 3, device="cuda"), torch.randn(8, 3, device="cuda")]
    labels = torch.randint(0, 3, (8,), device="cuda")
    k, gate = torch.tensor(0.5, device="cuda"), torch.tensor(1.0, device="cuda")
    cuda.modulate_bucket_(ts, [0, 10], k, gate, noise=True, noise_std="raw", seed=seed, step=0, modality=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = cuda.scores(logits, labels)
        cuda.coefficients(s, "ogm", 0.8, 2.0)
        cuda.modulate_bucket_(ts, [0, 10], k, gate, noise=True, noise_std="raw", seed=seed, step=1,
                              modality=0)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_more_than_2_31_elements(cuda, seed):
    n = (1 << 31) + 1000
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2:
        pytest.skip("not enough GPU memory for a > 2^31-element fp16 tensor")
    g = torch.ones(n, dtype=torch.float16, device="cuda")
    g[-5:] = 2.0
    cuda.modulate_bucket_([g], [0], torch.tensor(0.5, device="cuda"), torch.tensor(1.0, device="cuda"),
                          noise=False, noise_std="raw", seed=seed, step=0, modality=0)
    assert g[-1].item() == 1.0 and g[0].item() == 0.5 and g[(1 << 31) + 3].item() == 0.5
    z = torch.empty(8, device="cuda")
    torch.ops.mmmod._philox_normal_(z, seed, 0, 0, (1 << 31) - 4)
    want = philox.philox_normal(seed, 0, 0, (1 << 31) - 4, 8)
    assert ((z.cpu() - want).abs() <= 1e-6 * want.abs() + 1e-7).all()
    del g


@pytest.mark.parametrize("dtype", DTYPES)
def test_device_step_is_bit_identical_to_int_step(cuda, seed, dtype):
    """The capturable path (step read from a device counter, cached table) gives the int path's
    bits, for any integer counter dtype, and builds each bucket's table once."""
    ts = [torch.randn(n, device="cuda").to(dtype) for n in (0, 3, CHUNK + 5, 2 * CHUNK - 1)]
    offs = offsets_of(ts)
    k, gate = torch.tensor(0.7, device="cuda"), torch.tensor(1.0, device="cuda")
    for step, step_dtype in ((0, torch.int64), (9, torch.int32), (2 ** 32 + 3, torch.int64)):
        a = [t.clone() for t in ts]
        b = [t.clone() for t in ts]
        cuda.modulate_bucket_(a, offs, k, gate, noise=True, noise_std="raw", seed=seed, step=step,
                              modality=1)
        cuda.modulate_bucket_(b, offs, k, gate, noise=True, noise_std="raw", seed=seed,
                              step=torch.tensor(step, dtype=step_dtype, device="cuda"), modality=1)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the same storages again: the table uploaded by the first call is reused
    x = [t.clone() for t in ts]
    cuda.modulate_bucket_(x, offs, k, gate, noise=True, noise_std="raw", seed=seed, step=0,
                          modality=0)
    builds = cuda.tables.builds
    for step in range(1, 4):
        cuda.modulate_bucket_(x, offs, k, gate, noise=False, noise_std="raw", seed=seed, step=step,
                              modality=0)
    assert cuda.tables.builds == builds


def test_noise_at_stream_offsets_beyond_2_31(cuda, seed):
    ts = [torch.randn(n) for n in (7, CHUNK + 1)]
    offs = [(1 << 33) + 1, (1 << 33) + 8]
    a = [t.cuda() for t in ts]
    b = [t.clone() for t in ts]
    k, gate = torch.tensor(0.5), torch.tensor(1.0)
    cuda.modulate_bucket_(a, offs, k.cuda(), gate.cuda(), noise=True, noise_std="raw", seed=seed,
                          step=3, modality=1)
    reference.modulate_bucket_(b, offs, k, gate, noise=True, noise_std="raw", seed=seed, step=3,
                               modality=1)
    for t, x, y, off in zip(ts, a, b, offs):
        sz = (reference.modulate.tensor_sigma(t, k, "raw")
              * philox.philox_normal(seed, 3, 1, off, t.numel())).abs()
        assert ((x.cpu() - y).abs() <= 1e-6 * sz + EPS[torch.float32] * y.abs()).all()


def test_cuda_graph_capture_replays_fresh_noise(cuda, seed):
    """modulate_bucket_ with a device counter, captured once: each replay reads the counter's
    current value (advanced inside the graph), so replay r gives the eager result at step r."""
    g0 = [torch.randn(n, device="cuda") for n in (5, CHUNK + 3, 1000)]
    offs = offsets_of(g0)
    bufs = [t.clone() for t in g0]
    k, gate = torch.tensor(0.6, device="cuda"), torch.tensor(1.0, device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")

    def body():
        cuda.modulate_bucket_(bufs, offs, k, gate, noise=True, noise_std="raw", seed=seed,
                              step=step, modality=1)
        step.add_(1)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()  # warm-up: uploads the table outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    builds = cuda.tables.builds
    for r in range(1, 4):
        for b, g in zip(bufs, g0):
            b.copy_(g)
        graph.replay()
        want = [t.clone() for t in g0]
        cuda.modulate_bucket_(want, offs, k, gate, noise=True, noise_std="raw", seed=seed,
                              step=r, modality=1)
        assert all(torch.equal(x, y) for x, y in zip(bufs, want)), f"replay {r}"
    assert int(step) == 4 and cuda.tables.builds == builds


def test_pinned_upload_paths_refuse_capture(seed):
    """The int-step op and bucket_std upload a table from pinned memory per call: a graph would
    replay a reused staging buffer, so they refuse capture with a clear error."""
    x = torch.randn(100, device="cuda")
    k, gate = torch.tensor(0.5, device="cuda"), torch.tensor(1.0, device="cuda")
    torch.cuda.synchronize()
    for call in (lambda: torch.ops.mmmod.modulate_([x], [0], k, gate, True, False, seed, 0, 0),
                 lambda: torch.ops.mmmod._bucket_std([x]),
                 lambda: torch.ops.mmmod.bucket_table([x], [0])):
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
            with torch.cuda.graph(graph):
                call()


def test_auto_picks_cuda_for_a_device_step():
    assert backends.get("auto", "cuda", device_step=True).name == "cuda"
    assert backends.get("auto", "cuda").name == "cuda"


def test_opcheck_cuda(seed):
    from torch.library import opcheck
    d = "cuda"
    opcheck(torch.ops.mmmod.scores.default, ([torch.randn(6, 4, device=d)] * 2, torch.randint(0, 4, (6,), device=d)))
    opcheck(torch.ops.mmmod.coefficients.default, (torch.rand(3, device=d) + 0.1, int(NativeRule.OGM), 0.8, 2.0))
    opcheck(torch.ops.mmmod.modulate_.default,
            ([torch.randn(5, device=d), torch.randn(3, 4, device=d)], [0, 5], torch.tensor(0.5, device=d),
             torch.tensor(1.0, device=d), True, False, seed, 3, 1))
    ts = [torch.randn(5, device=d), torch.randn(3, 4, device=d)]
    opcheck(torch.ops.mmmod.bucket_table.default, (ts, [0, 5]))
    table = torch.ops.mmmod.bucket_table(ts, [0, 5])
    opcheck(torch.ops.mmmod.modulate_.capturable,
            (ts, [0, 5], torch.tensor(0.5, device=d), torch.tensor(1.0, device=d), True, False, seed,
             0, 1, table, torch.tensor(3, device=d)))
    opcheck(torch.ops.mmmod._bucket_std.default, ([torch.randn(7, device=d)],))
    opcheck(torch.ops.mmmod._philox_normal_.default, (torch.empty(11, device=d), seed, 2, 0, 3))


# ------------------------------------------------------------- single-pass statistics, vectors
def test_bucket_std_is_the_single_pass_merge_order_bit_for_bit(seed):
    """The float64 std of the CUDA kernels equals the numpy replay of their merge order
    (tests/backends/test_byte_model.py cuda_std) bit for bit, for sizes around the tile (2048) and chunk
    (65536) boundaries and every dtype (the model's float32 sigma equals the reference's:
    tests/backends/test_byte_model.py)."""
    from test_byte_model import cuda_std
    g = torch.Generator().manual_seed(seed)
    for n in (1, 2, 9, 2047, 2049, 65536, 65537, 3 * 65536 + 5, 1_000_003):
        for dtype in DTYPES:
            x = (torch.randn(n, generator=g) * 0.01 + 0.3).to(dtype)
            got = torch.ops.mmmod._bucket_std([x.cuda()]).cpu()
            assert got.item() == cuda_std(x.double().numpy()), (n, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_and_scalar_paths_give_the_same_bits(cuda, dtype, seed):
    """Aligned chunks (16-byte pointer, stream offset % 4 == 0) take the vector accesses, the
    same data one element off takes the scalar ones: identical results, equal to the reference
    for the noise-free scaling, and every tensor size around the 4-element groups and tiles."""
    g = torch.Generator().manual_seed(seed)
    sizes = [4, 2048, 65536 + 8, 13, 2051]
    src = [(torch.randn(n, generator=g) * 0.2).to(dtype) for n in sizes]
    offs = offsets_of(src)
    for noise in (False, True):
        outs = []
        for shift in (0, 1):
            store = torch.empty(sum(sizes) + 16 * len(sizes) + 1, dtype=dtype, device="cuda")
            ts, pos = [], shift
            for x in src:
                t = store[pos:pos + x.numel()]
                t.copy_(x.cuda())
                ts.append(t)
                pos += -(-x.numel() // 16) * 16
            assert all((t.data_ptr() % 16 == 0) == (shift == 0) for t in ts)
            cuda.modulate_bucket_(ts, offs, torch.tensor(0.6, device="cuda"),
                                  torch.tensor(1.0, device="cuda"), noise=noise, noise_std="raw",
                                  seed=seed, step=4, modality=1)
            outs.append([t.cpu() for t in ts])
        for a, b in zip(*outs):
            assert torch.equal(a, b), (noise, dtype)
        if not noise:
            ref = [x.clone() for x in src]
            reference.modulate_bucket_(ref, offs, torch.tensor(0.6), torch.tensor(1.0),
                                       noise=False, noise_std="raw", seed=seed, step=4, modality=1)
            for a, r in zip(outs[0], ref):
                assert torch.equal(a, r)


def test_single_pass_reads_large_tensors_correctly(cuda):
    """Statistics over many chunks: one block per tensor merges them (chunks > 256 per tensor
    exercise the per-thread chunk loop); sigma equals the reference."""
    x = torch.randn(300 * 65536 + 17) * 0.05 + 1.0
    got = torch.ops.mmmod._bucket_std([x.cuda()]).cpu()
    from test_byte_model import cuda_std
    assert got.item() == cuda_std(x.double().numpy())
    torch.testing.assert_close(got[0], reference.tensor_std(x), rtol=1e-12, atol=0)


# --------------------------------------------------- scores: a warp per row, all modalities at once
def _mixed_logits(M, B, C, first_dtype=0):
    """M modalities of mixed dtypes and layouts: contiguous, transposed (s0 = 1, s1 = B) and
    every other column of a wider matrix (s1 = 2), on the GPU."""
    out = []
    for m in range(M):
        dtype = DTYPES[(first_dtype + m) % 4]
        layout = m % 3
        if layout == 0:
            z = (torch.randn(B, C, device="cuda") * 3).to(dtype)
        elif layout == 1:
            z = (torch.randn(C, B, device="cuda") * 3).to(dtype).t()
        else:
            z = (torch.randn(B, 2 * C, device="cuda") * 3).to(dtype)[:, ::2]
        out.append(z)
    return out


@pytest.mark.parametrize("M", [2, 3, 4, 5])
def test_scores_warp_per_row_matches_reference_and_repeats_bitwise(cuda, seed, M):
    """Mixed dtypes and strides, B in {1, 7, 1000}, C in {1, 33, 32000}: within fp32 rounding of
    the reference, and the same bits on a second call (fixed reduction order, no atomics)."""
    for B in (1, 7, 1000):
        for C in (1, 33, 32000):
            logits = _mixed_logits(M, B, C, first_dtype=M)
            assert B == 1 or C == 1 or any(not z.is_contiguous() for z in logits)
            labels = torch.randint(0, C, (B,), device="cuda")
            got = cuda.scores(logits, labels)
            want = reference.scores(logits, labels)
            torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-6)
            assert torch.equal(cuda.scores(logits, labels), got), (B, C)


def test_scores_bad_labels_nan_inf_rows_and_many_modalities(cuda, seed):
    """A label outside [0, C) (C, -1, 2^40: never dereferenced) makes its modality's score NaN;
    a NaN in a row gives NaN; +-inf logits follow torch.logsumexp (shift 0 for an infinite max);
    B = 0 gives zeros; M = 19 takes two calls of at most 16 modalities; B = 5000 gives more row
    blocks than the finishing block has threads."""
    B, C = 5000, 33
    logits = _mixed_logits(19, B, C)
    labels = torch.randint(0, C, (B,), device="cuda")
    got = cuda.scores(logits, labels)
    torch.testing.assert_close(got.cpu(), reference.scores(logits, labels).cpu(), rtol=1e-5,
                               atol=1e-6)
    assert torch.equal(cuda.scores(logits, labels), got)
    for bad in (C, -1, 1 << 40):
        y = labels.clone()
        y[B // 2] = bad
        assert torch.isnan(cuda.scores(logits[:5], y)).all()
    # NaN / inf rows, per modality (written into the strided views in place)
    logits = _mixed_logits(5, 7, C)
    labels = torch.randint(0, C, (7,), device="cuda")
    logits[0][3, 5] = float("nan")
    logits[1][2, :] = float("-inf")
    logits[1][2, 4] = 1.0  # one finite entry in a row of -inf
    logits[2][1, labels[1]] = float("inf")  # +inf max: shift 0, p = NaN as in torch
    logits[3][4, :] = float("-inf")  # all -inf: lse = -inf, p = NaN
    logits[4][0, (labels[0] + 1) % C] = float("inf")  # +inf elsewhere: p = 0
    got = cuda.scores(logits, labels).cpu()
    want = reference.scores(logits, labels).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(got[[0, 2, 3]]).all() and torch.isfinite(got[[1, 4]]).all()
    empty = [z[:0] for z in _mixed_logits(3, 4, C)]
    assert torch.equal(cuda.scores(empty, labels[:0]).cpu(), torch.zeros(3))
