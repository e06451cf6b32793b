"""Resume: save at step n, load in a NEW process, continue: bitwise identical to the run that
never stopped (parameters, inner optimizer state, coefficients, scores, modulated gradients and
so the noise, GradScaler and LR-scheduler state), for OGM-GE + AdamW + GradScaler (with an inf
step after the resume point), MLB with fusion-weight slices + Adam in update mode, and OGM +
SGD with a modulation window. The checkpoint loads with ``torch.load``'s default
``weights_only=True``.
"""
import os
import subprocess
import sys

import pytest
import torch

from mmmod import backends
import _dist_utils as du

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")

HOST = [b for b in ("torch", "cpu") if backends.status(b)[0]]
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: _models
ROOT = os.path.dirname(TESTS_DIR)


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(
            a.nan_to_num(), b.nan_to_num()), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module", params=HOST)
def resumed(request, tmp_path_factory):
    backend = request.param
    out = tmp_path_factory.mktemp(f"resume-{backend}")
    data_seed = int.from_bytes(os.urandom(3), "little")
    print(f"seed={data_seed}")
    straight = {}
    with du.one_thread():
        for name, cfg in du.RESUME_CONFIGS.items():
            model, opt, scaler, sched = du.build_resume(cfg, backend, init_seed=data_seed,
                                                        opt_seed=data_seed + 1, alpha=0.8)
            du.run_resume_steps(model, opt, scaler, sched, range(du.RESUME_AT), data_seed)
            torch.save(du.checkpoint(model, opt, scaler, sched), out / f"{name}.ckpt.pt")
            rec = du.run_resume_steps(model, opt, scaler, sched,
                                      range(du.RESUME_AT, du.RESUME_TOTAL), data_seed)
            straight[name] = du.final_state(model, opt, scaler, rec)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, TESTS_DIR] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    code = ("import sys, _dist_utils; "
            "_dist_utils.resume_child(sys.argv[1], sys.argv[2], int(sys.argv[3]))")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(out), backend,
                           str(data_seed)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = {name: torch.load(out / f"{name}.resumed.pt") for name in du.RESUME_CONFIGS}
    return straight, resumed


@pytest.mark.parametrize("name", list(du.RESUME_CONFIGS))
def test_resume_in_new_process_is_bitwise_identical(resumed, name):
    straight, again = resumed
    a, b = straight[name], again[name]
    assert len(a["rec"]) == len(b["rec"]) == du.RESUME_TOTAL - du.RESUME_AT
    for t, (x, y) in enumerate(zip(a["rec"], b["rec"]), start=du.RESUME_AT):
        _assert_same(x, y, f"step {t}")  # coefficients, scores, modulated grads (noise)
    _assert_same(a["params"], b["params"], "params")
    _assert_same(a["opt"], b["opt"], "optimizer state")  # inner state + mmmod's entry
    _assert_same(a["scaler"], b["scaler"], "scaler")


def test_resume_exercised_what_it_claims(resumed):
    straight, _ = resumed
    rec = straight["ogm_ge-adamw-scaler"]["rec"]
    steps = [r["step_count"] for r in rec]
    assert steps == [5, 5, 6, 7]  # the inf step (t = 5) was skipped by the scaler
    mm = straight["ogm_ge-adamw-scaler"]["opt"]["mmmod"]
    assert mm["seed"] != 999 and mm["hyper"]["alpha"] == 0.8
    assert straight["ogm-sgd-window"]["opt"]["mmmod"]["epoch"] == (du.RESUME_TOTAL - 1) // 3


def test_checkpoint_never_switches_the_configuration():
    """A checkpoint of another method, apply_to or selection is refused at load, before the
    inner optimizer or any mmmod value changes; one of the same setup loads."""
    builds = {name: du.build_resume(cfg, "torch", init_seed=1, opt_seed=2, alpha=0.8)
              for name, cfg in du.RESUME_CONFIGS.items()}
    for name, (model, opt, scaler, sched) in builds.items():
        du.run_resume_steps(model, opt, scaler, sched, range(2), 3)
    saved = {name: b[1].state_dict() for name, b in builds.items()}
    for src in saved:
        for dst, (_, opt, _, _) in builds.items():
            before = repr(opt.state_dict())
            if src == dst:
                opt.load_state_dict(saved[src])
                continue
            with pytest.raises(ValueError, match="state_dict was saved with|selects other"):
                opt.load_state_dict(saved[src])
            assert repr(opt.state_dict()) == before
