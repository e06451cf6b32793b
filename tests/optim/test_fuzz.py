"""Property-based fuzz: every live backend against the reference, over shapes, dtypes, M,
methods, noise options, offsets (64-bit counters), seeds, steps (32-bit wrap) and non-finite
inputs. ``test_fuzz_quick`` runs a small subset by default; ``-m slow`` runs >= 1000 cases.

Checked per case, for each live backend:
- scores vs the reference (float32, from fp32/fp16/bf16 logits); a NaN logit gives a NaN score;
- coefficients vs the reference for the same scores (ties, extreme ratios included);
- in-place modulation vs the reference: bitwise for ``torch``; within float32 rounding of
  log/cos/sin (fp32 grads) or one rounding of the gradient's dtype (fp16/bf16) for fused ones;
- invariants: a NaN/inf gradient element stays put and nothing else turns non-finite; with
  non-finite coefficients the gradients are left exactly as they were; empty tensors untouched.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from mmmod import backends, functional, reference

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")

LIVE = [b for b in ("torch", "cpu", "triton") if backends.status(b)[0]]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METHODS = ["ogm", "ogm_ge", "mlb"]


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(LIVE))
    tiny = backend == "triton"  # the Triton interpreter is slow: tiny shapes only
    m = draw(st.integers(2, 4))
    dim = st.integers(0, 3 if tiny else 7)
    shapes = [draw(st.lists(st.lists(dim, min_size=1, max_size=3 if tiny else 4)
                            .map(tuple), min_size=1, max_size=2 if tiny else 3))
              for _ in range(m)]
    return dict(
        backend=backend, m=m, shapes=shapes,
        method=draw(st.sampled_from(METHODS)),
        gdtype=draw(st.sampled_from(DTYPES)),
        zdtype=draw(st.sampled_from(DTYPES)),
        b=draw(st.integers(1, 4 if tiny else 16)),
        c=draw(st.integers(1, 4 if tiny else 10)),
        zscale=draw(st.sampled_from([0.1, 1.0, 10.0, 60.0])),
        gscale=draw(st.sampled_from([1e-6, 1e-3, 1.0, 30.0])),
        alpha=draw(st.sampled_from([0.1, 0.5, 0.8, 2.0, 8.0])),
        beta_max=draw(st.sampled_from([2.0, 10.0])),
        noise_std=draw(st.sampled_from(["raw", "scaled"])),
        seed=draw(st.integers(0, 2 ** 64 - 1)),
        step=draw(st.sampled_from([0, 1, 7, 2 ** 32 - 1, 2 ** 32 + 3]) | st.integers(0, 10 ** 6)),
        base=draw(st.sampled_from([0, 1, 3, 2 ** 33 + 1])),
        transpose=draw(st.booleans()),
        bad_grad=draw(st.sampled_from([None, None, None, "nan", "inf", "-inf"])),
        bad_logit=draw(st.sampled_from([None] * 5 + ["nan"])),
        tie=draw(st.booleans()),
        data_seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def _grads(case, g):
    out = []
    for shapes in case["shapes"]:
        ts = []
        for s in shapes:
            t = (torch.randn(s, generator=g) * case["gscale"]).to(case["gdtype"])
            if case["transpose"] and t.dim() >= 2 and t.shape[0] > 1 and t.shape[-1] > 1:
                t = t.transpose(0, -1)  # non-contiguous: modulated in logical row-major order
            ts.append(t)
        out.append(ts)
    if case["bad_grad"] is not None:
        nonempty = [t for ts in out for t in ts if t.numel() > 0]
        if nonempty:
            t = nonempty[len(nonempty) // 2]
            idx = tuple(d // 2 for d in t.shape)
            t[idx] = float(case["bad_grad"])
    return out


def _close(out, ref, dtype, sigma, fused):
    if not fused:
        assert torch.equal(out.nan_to_num(), ref.nan_to_num())
        assert torch.equal(out.isnan(), ref.isnan())
        return
    o, r = out.double(), ref.double()
    fin = torch.isfinite(r)
    assert torch.equal(torch.isfinite(o), fin) and torch.equal(o[~fin].nan_to_num(),
                                                              r[~fin].nan_to_num())
    if dtype == torch.float32:
        tol = 1e-5 * (r[fin].abs() + float(sigma)) + 1e-30
    else:  # one rounding of fp16/bf16 may land on the neighbouring value
        eps = torch.finfo(dtype).eps
        tol = 2 * eps * (r[fin].abs() + float(sigma)) + torch.finfo(dtype).tiny
    assert ((o[fin] - r[fin]).abs() <= tol).all(), (o[fin] - r[fin]).abs().max()


def check_case(case):
    g = torch.Generator().manual_seed(case["data_seed"])
    backend, m = case["backend"], case["m"]
    fused = backend != "torch"
    # ---- scores ------------------------------------------------------------------------
    zs = [(torch.randn(case["b"], case["c"], generator=g) * case["zscale"]).to(case["zdtype"])
          for _ in range(m)]
    if case["bad_logit"] is not None:
        zs[-1][0, 0] = float("nan")
    y = torch.randint(0, case["c"], (case["b"],), generator=g)
    s = functional.scores(zs, y, backend=backend)
    s_ref = reference.scores([z.float() for z in zs], y)
    assert s.dtype == torch.float32 and s.shape == (m,)
    assert torch.equal(s.isnan(), s_ref.isnan())
    if case["bad_logit"] is not None:
        assert s[-1].isnan()
    torch.testing.assert_close(s.nan_to_num(), s_ref.nan_to_num(), rtol=1e-5,
                               atol=1e-6 * case["b"])
    # ---- coefficients (same input for backend and reference; ties on request) ---------------
    s_in = s_ref.clone()
    if case["tie"] and torch.isfinite(s_in).all():
        s_in[1] = s_in[0]
    k = functional.coefficients(s_in, case["method"], alpha=case["alpha"],
                                beta_max=case["beta_max"], backend=backend)
    k_ref = reference.coefficients(s_in, case["method"], case["alpha"], case["beta_max"])
    assert k.dtype == torch.float32 and torch.equal(k.isnan(), k_ref.isnan())
    torch.testing.assert_close(k.nan_to_num(), k_ref.nan_to_num(), rtol=1e-6, atol=1e-6)
    # ---- modulation --------------------------------------------------------------------
    grads = _grads(case, g)
    raw = [[t.clone() for t in ts] for ts in grads]
    ref = [[t.clone() for t in ts] for ts in grads]
    offsets = []
    for ts in grads:
        run, offs = case["base"], []
        for t in ts:
            offs.append(run)
            run += t.numel()
        offsets.append(offs)
    noise = case["method"] == "ogm_ge"
    kw = dict(noise=noise, noise_std=case["noise_std"], seed=case["seed"], step=case["step"],
              offsets=offsets)
    functional.modulate_(grads, k_ref, backend=backend, **kw)
    functional.modulate_(ref, k_ref, backend="torch", **kw)
    skipped = not bool(torch.isfinite(k_ref).all())
    for mm, (ts, rs, r0s) in enumerate(zip(grads, ref, raw)):
        for t, r, r0 in zip(ts, rs, r0s):
            assert t.dtype == r0.dtype and t.shape == r0.shape and t.stride() == r0.stride()
            if t.numel() == 0:
                continue
            # invariants first: nothing non-finite appears where the input was finite
            may_be_bad = ~torch.isfinite(r0)
            if not skipped:  # k * g itself may overflow the gradient's dtype
                may_be_bad |= ~torch.isfinite((r0.float() * k_ref[mm]).to(r0.dtype))
            assert not (~torch.isfinite(t) & ~may_be_bad).any(), "modulation spread NaN/inf"
            if skipped:
                torch.testing.assert_close(t, r0, rtol=0, atol=0, equal_nan=True)
                continue
            sigma = 0.0
            if noise and torch.isfinite(r0).all():
                sigma = float(reference.tensor_sigma(r0, k_ref[mm], case["noise_std"]))
            _close(t, r, r0.dtype, sigma, fused)


SETTINGS = dict(deadline=None, derandomize=False, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@settings(max_examples=50, **SETTINGS)
@given(cases())
def test_fuzz_quick(case):
    check_case(case)


@pytest.mark.slow
@settings(max_examples=1200, **SETTINGS)
@given(cases())
def test_fuzz_slow(case):
    check_case(case)


def test_fuzz_covers_every_live_backend():
    """The strategy draws every live backend (and so would test a newly built one)."""
    assert "torch" in LIVE
    seen = set()

    @settings(max_examples=60, deadline=None, database=None)
    @given(cases())
    def collect(case):
        seen.add(case["backend"])
    collect()
    assert seen == set(LIVE)
