"""Plot the latest results: ``python -m benchmarks.plot [--device cpu] [--out DIR]``.

Writes ``<out>/summary_<device>.png`` from the JSON files the benchmarks wrote: modulation time
per workload and contender (log scale, the 12 B/element floor marked), scores time against
classes per batch size (M = 2), and the step overhead over the inner optimizer.
"""
from __future__ import annotations

import argparse
import json
import os

from . import common


def _load(out, name, tag):
    path = os.path.join(out, f"{name}_{tag}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def plot(out: str, tag: str) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mod, sco, step = (_load(out, n, tag) for n in ("bench_modulate", "bench_scores", "bench_step"))
    panels = [p for p in (mod, sco, step) if p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    axes = list(axes[0])
    env = panels[0]["env"]
    fig.suptitle(f"mmmod benchmarks on {env['device_name']} ({tag}), {env['date'][:10]}, "
                 f"git {env['git_revision'][:10]}", fontsize=10)
    if mod:
        ax = axes.pop(0)
        cases = [c for c in mod["cases"] if c["mode"] in ("ogm_ge", "full")]
        names = mod["contenders"]
        width = 0.8 / max(1, len(names))
        for j, n in enumerate(names):
            xs = [i + j * width for i in range(len(cases))]
            ys = [c["contenders"].get(n, {}).get("median_s", float("nan")) * 1e3 for c in cases]
            ax.bar(xs, ys, width, label=n)
        for i, c in enumerate(cases):
            ax.hlines(c["floor_s"] * 1e3, i - width / 2, i + 0.8 - width / 2, colors="k",
                      linestyles="dashed", label="12 B/elem floor" if i == 0 else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{c['workload']}\n{c['mode']}" for c in cases], fontsize=7,
                           rotation=30)
        ax.set_yscale("log")
        ax.set_ylabel("ms per call (median)")
        ax.set_title(f"modulation (copy BW {mod['copy_GBps']:.1f} GB/s)")
        ax.legend(fontsize=8)
    if sco:
        ax = axes.pop(0)
        styles = ["-", "--", ":", "-."]
        bs = sorted({c["B"] for c in sco["cases"]})
        for j, n in enumerate(sco["contenders"]):
            for i, b in enumerate(bs):
                pts = sorted((c["C"], c["contenders"][n]["median_s"] * 1e3) for c in sco["cases"]
                             if c["M"] == 2 and c["B"] == b and n in c["contenders"])
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[i % 4], marker="o",
                            color=f"C{j}", markersize=3, label=f"{n} B={b}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes C (M = 2)")
        ax.set_ylabel("ms per call (median)")
        ax.set_title("scores + coefficients")
        ax.legend(fontsize=6, ncol=2)
    if step:
        ax = axes.pop(0)
        kinds = list(step["optimizers"])
        labels = [n for n in step["optimizers"][kinds[0]]["steps"] if n != "inner"]
        width = 0.8 / max(1, len(kinds))
        for j, k in enumerate(kinds):
            ys = [step["optimizers"][k]["steps"][n]["overhead_pct"] for n in labels]
            ax.bar([i + j * width for i in range(len(labels))], ys, width, label=k)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=8, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("% added to the inner optimizer step")
        ax.set_title(f"whole step, ResNet-18 pair (batch {step['batch']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, f"summary_{tag}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=common.DEFAULT_OUT,
                   help="the folder of a run's JSON files (benchmarks/results: the committed run)")
    args = p.parse_args(argv)
    tag = common.device_tag(common.pick_device(args.device))
    path = plot(args.out, tag)
    print(path or "no results to plot")
    return path


if __name__ == "__main__":
    main()
