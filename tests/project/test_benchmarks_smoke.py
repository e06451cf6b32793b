"""The benchmark harness runs (``--smoke``: tiny sizes) and its contenders agree.

No timing assertions: speed is measured by ``python -m benchmarks.run_all``, never by tests.
"""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import (bandwidth, bench_modulate, bench_scores, bench_step, common,  # noqa: E402
                        paper_eager, plain_torch, plot, run_all, workloads)
from mmmod import functional  # noqa: E402

ENV_KEYS = {"date", "git_revision", "torch", "device", "device_name", "backends", "torch_threads"}
DEVICE = torch.device("cpu")


def _load(out, name):
    path = os.path.join(out, f"{name}_cpu.json")
    assert os.path.exists(path), path
    assert os.path.exists(os.path.join(out, f"{name}_cpu.md"))
    with open(path) as f:
        doc = json.load(f)
    assert doc["benchmark"] == name and doc["mode"] == "smoke"
    assert ENV_KEYS <= set(doc["env"])
    return doc


def _smoke(mod, tmp_path, *extra):
    return mod.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), *extra])


def test_bandwidth_smoke(tmp_path):
    _smoke(bandwidth, tmp_path)
    doc = _load(tmp_path, "bandwidth")
    r = doc["results"][0]
    assert r["copy_GBps"] > 0 and r["read_GBps"] > 0 and "median_s" in r["copy"]


def test_scores_smoke(tmp_path):
    _smoke(bench_scores, tmp_path)
    doc = _load(tmp_path, "bench_scores")
    names = doc["contenders"]
    assert names[:3] == ["paper", "plain", "torch"]
    assert "triton" not in names  # never benchmarked under the CPU interpreter
    for case in doc["cases"]:
        assert {"B", "C", "M", "paper_softmax", "contenders"} <= set(case)
        for n in names:
            c = case["contenders"][n]
            assert {"median_s", "syncs", "x_vs_paper", "x_vs_plain", "agrees"} <= set(c)
            assert c["agrees"], (case["B"], case["C"], case["M"], n)
        # the paper indexes with a device label per sample, plus one host `if` per decision
        assert case["contenders"]["paper"]["syncs"] >= case["B"] * case["M"] + 1
        for n in names[1:]:
            assert case["contenders"][n]["syncs"] == 0, n


def test_modulate_smoke(tmp_path):
    _smoke(bench_modulate, tmp_path)
    doc = _load(tmp_path, "bench_modulate")
    assert doc["copy_GBps"] > 0
    modes = {(c["workload"], c["mode"]) for c in doc["cases"]}
    assert {m for _, m in modes} == {"ogm_ge", "ogm", "full"}
    for case in doc["cases"]:
        assert {"workload", "mode", "tensors", "elements", "floor_s", "contenders"} <= set(case)
        for n, c in case["contenders"].items():
            assert {"median_s", "syncs", "x_vs_paper", "x_vs_plain", "GBps_at_12B", "x_floor",
                    "agrees"} <= set(c)
            assert c["agrees"], (case["workload"], case["mode"], n, c)
        paper = case["contenders"]["paper"]
        if case["mode"] == "ogm_ge":  # one .std().item() per tensor
            assert paper["syncs"] == case["tensors"]
        for n in case["contenders"]:
            if n != "paper":
                assert case["contenders"][n]["syncs"] == 0, n


def test_step_smoke(tmp_path):
    _smoke(bench_step, tmp_path)
    doc = _load(tmp_path, "bench_step")
    for kind in ("sgd", "adamw"):
        steps = doc["optimizers"][kind]["steps"]
        assert {"inner", "paper", "plain", "mmmod:torch"} <= set(steps)
        for s in steps.values():
            assert {"median_s", "overhead_pct", "pct_of_train_step", "syncs"} <= set(s)


def test_run_all_and_plot(tmp_path):
    run_all.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    for name in ("bandwidth", "bench_scores", "bench_modulate", "bench_step"):
        _load(tmp_path, name)
    assert os.path.getsize(tmp_path / "summary_cpu.png") > 1000
    assert (tmp_path / "README_cpu.md").read_text().startswith("# Latest benchmark results")
    assert plot.plot(str(tmp_path), "cpu").endswith("summary_cpu.png")


def test_workload_counts():
    c = workloads.conv_counts()
    assert c["tensors"] == 40
    assert round(c["elements"] / 1e6, 1) == 22.3


# ---- the contenders on the same inputs -----------------------------------------------------
def _fused_live():
    return [n for n in common.contenders(DEVICE) if n not in ("paper", "plain")]


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("B,C", [(7, 5), (64, 6), (33, 300)])
def test_scores_and_coefficients_agree(B, C, M):
    logits, labels = bench_scores.make_inputs(B, C, M, DEVICE, seed=3)
    s_a = paper_eager.as_tensor(paper_eager.scores(logits, labels))
    k_a = paper_eager.as_tensor(paper_eager.coefficients(paper_eager.scores(logits, labels), 0.8))
    s_b = plain_torch.scores(logits, labels)
    k_b = plain_torch.coefficients(s_b, 0.8)
    for name in _fused_live():
        s = functional.scores(logits, labels, backend=name)
        k = functional.coefficients(s, "ogm_ge", 0.8, backend=name)
        torch.testing.assert_close(s, s_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, s_b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, k_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(k, k_b, rtol=1e-5, atol=1e-6)


def test_ogm_tie_damps_modality_zero_everywhere():
    s = torch.tensor([3.0, 3.0])
    k_a = paper_eager.as_tensor(paper_eager.coefficients(list(s.unbind()), 0.8))
    k_b = plain_torch.coefficients(s, 0.8)
    k_c = functional.coefficients(s, "ogm_ge", 0.8, backend="torch")
    for k in (k_a, k_b, k_c):
        torch.testing.assert_close(k, torch.tensor([1 - torch.tanh(torch.tensor(0.8)).item(), 1.0]))


def _modulated(name, inst, k, noise):
    inst.reset()
    if name == "paper":
        paper_eager.modulate(inst.model, [k[0], k[1]], inst.names, inst.workload.dim_test(), noise)
    elif name == "plain":
        plain_torch.Modulator()(inst.grads, k, noise)
    else:
        functional.modulate_(inst.grads, k, noise=noise, backend=name, seed=0, step=0)
    return [[g.clone() for g in gs] for gs in inst.grads]


@pytest.mark.parametrize("wl", ["tiny_conv", "tiny_vit", "tiny_many"])
def test_ogm_modulation_equal(wl):
    inst = workloads.build(workloads.SMOKE[wl], DEVICE)
    k = torch.tensor([0.3364, 1.0])
    outs = {n: _modulated(n, inst, k, noise=False) for n in common.contenders(DEVICE)}
    raw = [workloads._split(m, ps) for m, ps in zip(inst.masters, inst.params)]
    for n, out in outs.items():
        for i, (gs, rs) in enumerate(zip(out, raw)):
            for g, r in zip(gs, rs):
                torch.testing.assert_close(g, r * k[i], rtol=1e-6, atol=0, msg=n)


def test_ogm_ge_sigma_equal():
    """Same noise scale everywhere (streams differ: torch's generator vs Philox)."""
    inst = workloads.build(workloads.SMOKE["tiny_vit"], DEVICE)
    k = torch.tensor([0.3364, 1.0])
    raw = [workloads._split(m, ps) for m, ps in zip(inst.masters, inst.params)]
    outs = {n: _modulated(n, inst, k, noise=True) for n in common.contenders(DEVICE)}
    for n, out in outs.items():
        for i, (gs, rs) in enumerate(zip(out, raw)):
            for g, r in zip(gs, rs):
                if r.numel() >= 2000:
                    ratio = float((g - r * k[i]).std()) / (float(r.std()) + 1e-8)
                    assert 0.9 < ratio < 1.1, (n, ratio)
    ref = outs["torch"]
    for n in _fused_live():
        if n != "torch":
            for gs, hs in zip(outs[n], ref):
                for g, h in zip(gs, hs):
                    torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7, msg=n)


def test_methods_smoke(tmp_path):
    from benchmarks import bench_methods
    from mmmod import backends
    if not backends.status("cpu")[0]:
        pytest.skip(backends.status("cpu")[1])
    _smoke(bench_methods, tmp_path)
    doc = _load(tmp_path, "bench_methods")
    assert set(doc["methods"]) == {"agm", "mslr", "inforeg"}
    for r in doc["methods"].values():
        assert r["check"]["agrees"], r["check"]
        assert {"paper", "mmmod:cpu"} == set(r["steps"])


def test_runs_leave_the_committed_results_alone_unless_asked():
    p = common.parser("x")
    assert p.parse_args([]).out == "benchmarks_out" != common.RESULTS_DIR
    assert p.parse_args(["--update-results"]).out == common.RESULTS_DIR
    assert p.parse_args(["--out", "elsewhere"]).out == "elsewhere"
    assert os.path.isdir(common.RESULTS_DIR)
