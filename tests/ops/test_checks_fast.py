"""The C++ fast path of ``functional.check_grads`` (``mmmod._C.check_grads``, csrc/common/checks.cpp)
against its Python definition: the same verdict on random views, every refusal raised with
the same message whether the fast path runs or not, the Python checks used whenever the fast
path is unavailable (no extension, compiling) or unsure (a tensor subclass, a pair of views
whose byte ranges overlap)."""
import random

import pytest
import torch

from mmmod import _ext, functional

C = _ext.load("cpu")[0]
FAST = getattr(C, "check_grads", None)
needs_fast = pytest.mark.skipif(FAST is None, reason="mmmod._C (with check_grads) is not built")


@pytest.fixture
def python_only(monkeypatch):
    """check_grads as it runs with no extension: the Python checks alone."""
    monkeypatch.setattr(functional, "_fast_check_grads", False)


@pytest.fixture
def spy(monkeypatch):
    """Counts the fast path's calls (and makes sure check_grads uses it)."""
    calls = []
    real = functional._fast_checker()
    if not real:
        pytest.skip("mmmod._C (with check_grads) is not built")

    def counted(grads):
        calls.append(grads)
        return real(grads)
    monkeypatch.setattr(functional, "_fast_check_grads", counted)
    return calls


def verdict(grads, names=None, tensor_names=None, fast=True):
    """The error check_grads raises (type and message), or None."""
    with pytest.MonkeyPatch.context() as mp:
        if not fast:
            mp.setattr(functional, "_fast_check_grads", False)
        try:
            functional.check_grads(grads, names, tensor_names)
        except (TypeError, ValueError) as e:
            return type(e).__name__, str(e)
    return None


def random_view(rnd, buf, like=None):
    if like is not None:  # same shape and strides at another offset (blocks of one buffer)
        last = sum((n - 1) * st for n, st in zip(like.shape, like.stride())) if like.numel() else 0
        return buf.as_strided(like.shape, like.stride(),
                              rnd.randint(0, min(60, buf.numel() - 1 - last)))
    nd = rnd.randint(0, 3)
    shape = [rnd.randint(0, 4) if rnd.random() < 0.1 else rnd.randint(1, 4) for _ in range(nd)]
    stride = [rnd.choice([0, 1, 2, 3, 4, 5, 8, 12, 16]) for _ in range(nd)]
    return buf.as_strided(shape, stride, rnd.randint(0, 60))


def python_sweep_pairs(grads):
    """The pairs check_no_overlap hands to _disjoint_blocks, in its order (none refused)."""
    seen = []
    present = [((m, i), g) for m, ts in enumerate(grads) for i, g in enumerate(ts)
               if g is not None]
    by_id = {id(g): key for key, g in present}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(functional, "_disjoint_blocks",
                   lambda a, b: seen.append((by_id[id(a)], by_id[id(b)])) or True)
        functional.check_no_overlap(present, lambda m, i: "")
    return seen


# ---- the fast path's answers against the Python rules ----------------------------------------
@needs_fast
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_self_overlap_rule_is_exactly_pythons_on_random_views(seed, dtype):
    rnd = random.Random(seed)
    buf = torch.zeros(256, dtype=dtype)
    for _ in range(3000):
        v = random_view(rnd, buf)
        # one tensor, no other: the fast path has only the per-tensor checks to report
        assert (FAST([[v]]) == (0, 0)) == functional.self_overlaps(v), (v.shape, v.stride())


@needs_fast
def test_overlapping_pairs_are_exactly_those_of_the_python_sweep(seed):
    """Random sets of views of one or two buffers: the fast path reports the pairs the Python
    sweep would test, in the same order, or a tensor that needs the full check exactly when a
    view overlaps itself; and the verdict and message of check_grads are the Python ones."""
    rnd = random.Random(seed)
    bufs = [torch.zeros(256), torch.zeros(256)]
    addr = torch.arange(256)
    stats = {"pairs": 0, "refused": 0, "accepted_pairs": 0}
    for trial in range(600):
        n = rnd.randint(1, 6)
        views = []
        for _ in range(n):
            buf = rnd.choice(bufs)
            r = rnd.random()
            if r < 0.4:  # a block of a matrix over the buffer (a ParamSlice): same strides
                mat = buf.view(16, 16) if trial % 2 else buf[:240].view(12, 20)
                r0, c0 = rnd.randrange(mat.shape[0]), rnd.randrange(mat.shape[1])
                views.append(mat[r0:rnd.randint(r0 + 1, mat.shape[0]),
                                 c0:rnd.randint(c0 + 1, mat.shape[1])])
            else:
                like = views[-1] if views and r < 0.7 else None
                views.append(random_view(rnd, buf, like))
        split = rnd.randint(0, n)
        grads = [views[:split], views[split:]]
        if rnd.random() < 0.3:
            grads[rnd.randint(0, 1)].insert(0, None)
        got = FAST(grads)
        if any(functional.self_overlaps(v) for v in views):
            first = next((m, i) for m, ts in enumerate(grads) for i, g in enumerate(ts)
                         if g is not None and functional.self_overlaps(g))
            assert got == first
        else:
            pairs = python_sweep_pairs(grads)
            assert (got or []) == pairs
            stats["pairs"] += len(pairs)
            # no pair of views that share an element goes unreported
            for (ka, a), (kb, b) in ((x, y) for x in enumerate(views) for y in enumerate(views)
                                     if x[0] < y[0]):
                if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
                    continue
                cells = [set(addr.as_strided(t.shape, t.stride(), t.storage_offset())
                             .flatten().tolist()) for t in (a, b)]
                if cells[0] & cells[1]:
                    key = {id(g): (m, i) for m, ts in enumerate(grads) for i, g in enumerate(ts)
                           if g is not None}
                    pair = {key[id(a)], key[id(b)]}
                    assert any(set(p) == pair for p in pairs)
        fast_v = verdict(grads)
        assert fast_v == verdict(grads, fast=False)
        stats["refused"] += fast_v is not None
        stats["accepted_pairs"] += fast_v is None and bool(got)
    # the random views exercise every answer: refusals, and overlapping ranges accepted as
    # disjoint blocks
    assert stats["pairs"] > 100 and stats["refused"] > 50 and stats["accepted_pairs"] > 10


@needs_fast
def test_answers_on_common_layouts():
    a, b = torch.randn(10), torch.randn(4, 6)
    assert FAST([[a], [b]]) is None
    assert FAST([[a, None], [None, b.t(), b[:0]]]) is None  # None and empty tensors: skipped
    assert FAST([[a, a], [b]]) == [((0, 0), (0, 1))]
    assert FAST([[b[:, :3]], [b[:, 3:]]]) == [((0, 0), (1, 0))]  # decided in Python: disjoint
    assert FAST([[a], [torch.ones(3).expand(2, 3)]]) == (1, 0)
    assert FAST([[a, 1.5]]) == (0, 1)
    assert FAST([[a.int()]]) == (0, 0)
    assert FAST([[b.to_sparse()]]) == (0, 0)
    assert FAST([[torch.empty(5, device="meta"), torch.empty(5, device="meta")]]) is None
    assert FAST(((a,),)) == (-1, -1)  # not lists: the Python checks decide

    class Sub(torch.Tensor):
        pass
    assert FAST([[a.as_subclass(Sub)]]) == (0, 0)  # a subclass may define its own metadata


@needs_fast
def test_thousands_of_views_of_one_flat_buffer(seed):
    """A flat gradient buffer cut into 2 x 1000 views (adjacent ranges, none shared): all clear;
    one view widened by an element over its neighbour: that pair only, refused as in Python."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 40, (2000,), generator=g).tolist()
    flat = torch.zeros(sum(sizes) + 1)
    views, off = [], 0
    for n in sizes:
        views.append(flat[off:off + n])
        off += n
    grads = [views[:1000], views[1000:]]
    assert FAST(grads) is None and verdict(grads) is None
    j = int(torch.randint(0, 1999, (1,), generator=g))
    start = sum(sizes[:j])
    views[j] = flat[start:start + sizes[j] + 1]  # now shares one element with views[j + 1]
    grads = [views[:1000], views[1000:]]
    key = lambda t: (t // 1000, t % 1000)  # noqa: E731
    assert FAST(grads) == [(key(j), key(j + 1))]
    assert verdict(grads) == verdict(grads, fast=False)
    assert "overlap in memory" in verdict(grads)[1]


@needs_fast
def test_inference_tensors_follow_inference_mode():
    with torch.inference_mode():
        g = torch.ones(4, 3)
        assert FAST([[g]]) is None  # modifiable in place under inference_mode
        assert verdict([[g]]) is None and verdict([[g]], fast=False) is None
    assert FAST([[g]]) == (0, 0)
    assert verdict([[g]]) == verdict([[g]], fast=False) is not None
    assert "inference tensor" in verdict([[g]])[1]


# ---- every refusal, same message, with the fast path on ---------------------------------------
def _inference_grad():
    with torch.inference_mode():
        return torch.ones(4, 3)


def _bad_grads():
    """(grads, the message's distinctive part) for every kind of refusal."""
    store = torch.ones(17)
    a, b = torch.randn(10), torch.randn(4, 6)
    ok = torch.ones(5)
    return {
        "expanded": ([[ok, torch.ones(1, 3).expand(4, 3)], [b]], "share memory"),
        "expanded-column": ([[ok], [torch.ones(4, 1).expand(4, 3)]], "share memory"),
        "as_strided-overlap": ([[torch.ones(12).as_strided((4, 3), (1, 1))]], "share memory"),
        "aliases": ([[store[:5], store[3:15].view(4, 3)], [b]], "overlap in memory"),
        "same-twice": ([[a, a], [b]], "tensor 0 of modality 0 and tensor 1 of modality 0"),
        "view-across-modalities": ([[a], [b, a[3:8]]], "overlap in memory"),
        "blocks-that-overlap": ([[b[:, :4]], [b[1:, 2:]]], "overlap in memory"),
        "transpose-and-row": ([[b.t()], [b[2]]], "overlap in memory"),
        "reshaped-prefix": ([[a[:6].view(2, 3)], [a[5:]]], "overlap in memory"),
        "inference": ([[ok], [_inference_grad()]], "inference tensor"),
        "int": ([[ok, torch.ones(4, 3, dtype=torch.int32)]], "dtype torch.int32"),
        "fp8": ([[torch.ones(3).to(torch.float8_e4m3fn)]], "dtype torch.float8_e4m3fn"),
        "complex": ([[torch.ones(3, dtype=torch.complex64)]], "dtype torch.complex64"),
        "sparse": ([[ok], [torch.ones(4, 3).to_sparse()]], "non-dense gradient"),
        "not-a-tensor": ([[ok, [1.0, 2.0]]], "is a list, not a tensor"),
        # a bad tensor after an overlapping pair: the per-tensor error comes first, as in Python
        "overlap-then-int": ([[a, a], [torch.ones(2, dtype=torch.int64)]], "dtype torch.int64"),
    }


@pytest.mark.parametrize("case", list(_bad_grads()))
def test_every_refusal_has_the_python_message(case, spy):
    grads, match = _bad_grads()[case]
    tensor_names = [[f"p{m}_{i}" for i in range(len(ts))] for m, ts in enumerate(grads)]
    for names, tn in ((None, None), (["audio", "visual"][:len(grads)], tensor_names)):
        fast = verdict(grads, names, tn)
        n_calls = len(spy)
        assert n_calls > 0  # the fast path ran (and said: check in Python)
        assert fast is not None
        assert (match if names is None else "parameter 'p") in fast[1]
        assert fast == verdict(grads, names, tn, fast=False)
        assert len(spy) == n_calls


def test_refusals_without_the_fast_path(python_only, monkeypatch):
    """The extension missing: the Python checks alone raise every refusal."""
    monkeypatch.setattr(functional, "_fast_checker",
                        lambda: pytest.fail("the fast path must not be looked up"))
    for case, (grads, match) in _bad_grads().items():
        with pytest.raises((TypeError, ValueError), match=match):
            functional.check_grads(grads)


def test_missing_extension_falls_back_to_python(monkeypatch):
    monkeypatch.setattr(functional, "_fast_check_grads", None)
    monkeypatch.setattr(_ext, "load", lambda backend="cpu": (None, "pretend it is not built"))
    functional.check_grads([[torch.ones(3)], [torch.ones(4)]])
    assert functional._fast_check_grads is False
    with pytest.raises(ValueError, match="share memory"):
        functional.check_grads([[torch.ones(1, 3).expand(2, 3)]])
    a = torch.ones(4)
    with pytest.raises(ValueError, match="overlap in memory"):
        functional.check_grads([[a], [a]])


def test_accepted_inputs_skip_the_python_checks(spy, monkeypatch):
    """All clear from C++ is the answer: no Python per-tensor check runs (the point of it)."""
    def boom(*args):
        raise AssertionError("Python checks ran")
    monkeypatch.setattr(functional, "self_overlaps", boom)
    monkeypatch.setattr(functional, "check_no_overlap", boom)
    w = torch.randn(5, 8)
    functional.check_grads([[torch.randn(3, 3), w[:, :3], None], [w[:, 3:], torch.randn(0)]])
    assert len(spy) == 1
    # disjoint column blocks were decided by _disjoint_blocks, not by the full Python check
    with pytest.raises(ValueError, match="overlap in memory"):
        functional.check_grads([[w[:, :4]], [w[:, 3:]]])


def test_subclass_goes_to_the_python_checks(spy):
    class Sub(torch.Tensor):
        pass
    g = torch.ones(3).as_subclass(Sub)
    functional.check_grads([[g], [torch.ones(2)]])  # accepted by the definition
    with pytest.raises(ValueError, match="share memory"):
        functional.check_grads([[torch.ones(1, 3).expand(2, 3).as_subclass(Sub)]])


def test_compiling_uses_the_python_checks(spy, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    functional.check_grads([[torch.ones(3)], [torch.ones(2)]])
    with pytest.raises(ValueError, match="share memory"):
        functional.check_grads([[torch.ones(1, 3).expand(2, 3)]])
    assert spy == []


# ---- modulate_ after the checks (its no-noise path skips work lists and stream offsets) -------
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_modulate_mixed_contiguous_bucket_no_noise(backend, dtype, seed):
    """One bucket with contiguous, non-contiguous, empty and odd-sized tensors: g <- k g, as
    float32 math rounded once to the dtype (so bitwise equal to that, tolerance 0), and the
    elements outside each view untouched."""
    if backend == "cpu" and C is None:
        pytest.skip("mmmod._C is not built")
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(7, 9, generator=g).to(dtype), torch.randn(13, generator=g).to(dtype),
            torch.randn(6, 5, generator=g).to(dtype), torch.randn(0, 3).to(dtype),
            torch.randn(1031, generator=g).to(dtype)]
    work = [b.clone() for b in base]
    views = [work[0].t(), work[1], work[2][::2, 1:], work[3], work[4]]
    k = torch.tensor([0.3, 1.7])
    functional.modulate_([views[:3], views[3:]], k, noise=False, backend=backend)
    select = [lambda t: t.t(), lambda t: t, lambda t: t[::2, 1:], lambda t: t, lambda t: t]
    for j, (b, f) in enumerate(zip(base, select)):
        want = b.clone()
        f(want).copy_((f(want).float() * k[0 if j < 3 else 1]).to(dtype))
        assert torch.equal(work[j], want), j
