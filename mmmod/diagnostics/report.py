"""One imbalance report: Shapley contributions and probe accuracies of one or more runs as a
table (text or Markdown) and a figure (matplotlib, imported only when drawn)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .shapley import ShapleyResult

COLUMNS = ("run", "modality", "Shapley share %", "Shapley acc (pts)", "Shapley loss drop",
           "probe acc %")


@dataclass
class ImbalanceReport:
    """``runs``: label -> ``{"shapley": ShapleyResult | None, "probe": {name: acc} | None}``."""
    runs: dict

    # ---- table -------------------------------------------------------------------------
    def rows(self) -> list[tuple[str, ...]]:
        out = []
        for label, run in self.runs.items():
            sh, probe = run.get("shapley"), run.get("probe") or {}
            names = list(sh.names) if sh is not None else list(probe)
            shares = sh.shares() if sh is not None else {}
            for n in names:
                out.append((label, n,
                            _fmt(shares.get(n), 100, "{:.1f}"),
                            _fmt(sh.accuracy[n] if sh else None, 100, "{:+.1f}"),
                            _fmt(sh.loss[n] if sh else None, 1, "{:+.3f}"),
                            _fmt(probe.get(n), 100, "{:.1f}")))
        return out

    def notes(self) -> list[str]:
        out = []
        for label, run in self.runs.items():
            sh = run.get("shapley")
            if sh is not None:
                out.append(f"{label}: accuracy {100 * sh.full_accuracy:.1f}% with every "
                           f"modality, {100 * sh.empty_accuracy:.1f}% with none "
                           f"({sh.masking} masking, {sh.samples} samples)")
        return out

    def table(self, format: str = "text") -> str:
        """The table: ``"text"`` (aligned columns) or ``"markdown"``."""
        if format not in ("text", "markdown"):
            raise ValueError(f"format must be 'text' or 'markdown', got {format!r}")
        rows = self.rows()
        widths = [max(len(r[i]) for r in [COLUMNS] + rows) for i in range(len(COLUMNS))]
        if format == "markdown":
            def line(r):
                return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
            sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
            notes = [""] + [f"- {n}" for n in self.notes()] if self.notes() else []
            return "\n".join([line(COLUMNS), sep] + [line(r) for r in rows] + notes)

        def line(r):
            return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        return "\n".join([line(COLUMNS), "  ".join("-" * w for w in widths)]
                         + [line(r) for r in rows] + self.notes())

    def markdown(self) -> str:
        return self.table("markdown")

    def __str__(self) -> str:
        return self.table("text")

    def to_dict(self) -> dict:
        return {label: {"shapley": None if run.get("shapley") is None
                        else run["shapley"].to_dict(), "probe": run.get("probe")}
                for label, run in self.runs.items()}

    # ---- figure ------------------------------------------------------------------------
    def figure(self, path: str | None = None, dpi: int = 120):
        """Left: each run's Shapley accuracy shares (stacked bars); right: each run's probe
        accuracy per modality. Returns the ``matplotlib.figure.Figure``; saved to ``path``
        when given. matplotlib is imported here only (no pyplot, no global backend)."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("ImbalanceReport.figure needs matplotlib (pip install "
                              "matplotlib)") from None
        labels = list(self.runs)
        names: list[str] = []
        for run in self.runs.values():
            src = run.get("shapley").names if run.get("shapley") is not None else \
                list(run.get("probe") or {})
            names += [n for n in src if n not in names]
        fig = Figure(figsize=(10, 0.5 * len(labels) + 2.2))
        ax1, ax2 = fig.subplots(1, 2)
        colors = [f"C{i}" for i in range(len(names))]
        ys = list(range(len(labels)))[::-1]
        left = [0.0] * len(labels)
        for n, c in zip(names, colors):
            share = []
            for label in labels:
                sh = self.runs[label].get("shapley")
                v = sh.shares().get(n, float("nan")) if sh is not None else float("nan")
                share.append(100 * v if v == v else 0.0)
            ax1.barh(ys, share, left=left, color=c, label=n)
            left = [a + b for a, b in zip(left, share)]
        ax1.set_yticks(ys, labels)
        ax1.set_xlabel("Shapley share of accuracy %")
        ax1.axvline(100 / max(len(names), 1), color="grey", lw=0.8, ls="--")
        ax1.legend(loc="lower right", fontsize="small")
        h = 0.8 / max(len(names), 1)
        for j, (n, c) in enumerate(zip(names, colors)):
            acc = [100 * (self.runs[label].get("probe") or {}).get(n, float("nan"))
                   for label in labels]
            ax2.barh([y + 0.4 - h * (j + 0.5) for y in ys], acc, height=h, color=c, label=n)
        ax2.set_yticks(ys, [""] * len(labels))
        ax2.set_xlabel("linear-probe accuracy %")
        ax2.set_xlim(0, 100)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=dpi)
        return fig


def _fmt(v: Any, scale: float, fmt: str) -> str:
    if v is None or v != v:
        return "-"
    return fmt.format(v * scale)


def report(runs: Mapping[str, Mapping] | None = None, *, shapley: ShapleyResult | None = None,
           probe: Mapping[str, float] | None = None, label: str = "model") -> ImbalanceReport:
    """The imbalance report of one run (``shapley=``, ``probe=``) or of several
    (``runs={label: {"shapley": ..., "probe": ...}}``, e.g. before and after training).
    ``shapley`` may also be the dict of :meth:`ShapleyResult.to_dict`."""
    if runs is None:
        runs = {label: {"shapley": shapley, "probe": probe}}
    elif shapley is not None or probe is not None:
        raise ValueError("pass either runs= or shapley=/probe=, not both")
    if not isinstance(runs, Mapping) or not runs:
        raise TypeError("runs must be a non-empty mapping label -> {'shapley': ..., 'probe': ...}")
    out = {}
    for lab, run in runs.items():
        if not isinstance(run, Mapping):
            raise TypeError(f"run {lab!r} must be a mapping with 'shapley' and/or 'probe', got "
                            f"{type(run).__name__}")
        sh = run.get("shapley")
        if isinstance(sh, Mapping):
            sh = ShapleyResult.from_dict(sh)
        if sh is not None and not isinstance(sh, ShapleyResult):
            raise TypeError(f"run {lab!r}: shapley must be a ShapleyResult, got "
                            f"{type(sh).__name__}")
        if sh is None and not run.get("probe"):
            raise ValueError(f"run {lab!r} has neither Shapley values nor probe accuracies")
        out[str(lab)] = {"shapley": sh, "probe": dict(run["probe"]) if run.get("probe") else None}
    return ImbalanceReport(out)
