"""``mmmod plot``: panels follow the log (score kind, extra per-modality columns), many runs wrap
into a grid, and bad input is a one-line error with exit code 2."""
import csv
import json
import subprocess
import sys

import pytest
import torch

from mmmod.monitor import Recorder
from mmmod.monitor import plot as mplot

pytest.importorskip("matplotlib")


def write_log(path, steps=12, names=("audio", "visual"), score=1.3, extra=None, samples=8):
    """A CSV in the recorder's row format (what CSVLogger writes), with optional extras."""
    rec = Recorder(list(names), steps)
    for i in range(steps):
        s = torch.tensor([score * samples, (score + 0.2) * samples])
        k = torch.tensor([1.0 - 0.01 * i, 1.0])
        ex = None if extra is None else {key: torch.full((2,), float(i) * v) for key, v in extra.items()}
        rec.record(s, k, None, ex, step=i, epoch=i // 4, samples=samples, modulated=i >= 2)
    rows = rec.history("rows")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_modulation would save, kept for inspection (nothing written)."""
    out = []
    monkeypatch.setattr(mplot, "_save", lambda fig, path, dpi: out.append(fig))
    return out


def visible(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_agm_scores_are_titled_and_scaled_as_nll(tmp_path, figures):
    (run,) = mplot.load(str(write_log(tmp_path / "agm_seed0.csv", extra={"score_mean": 1.0})))
    assert run.score_kind == "nll"
    mplot.plot_modulation([run], str(tmp_path / "x.png"))
    score_ax = visible(figures[0])[0]
    assert "mean NLL of the true class" in score_ax.get_title()
    lo, hi = score_ax.get_ylim()
    assert hi > 1.5 > 1.3 > lo  # the curves are inside the axis, not clipped at 1


def test_prob_scores_keep_the_unit_range_and_unknown_ones_are_autoscaled(tmp_path, figures):
    (ogm,) = mplot.load(str(write_log(tmp_path / "ogm_ge_seed0.csv", score=0.4)))
    (other,) = mplot.load(str(write_log(tmp_path / "myrun.csv", score=3.0)))
    assert (ogm.score_kind, other.score_kind) == ("prob", None)
    mplot.plot_modulation([ogm, other], str(tmp_path / "x.png"))
    ax_ogm, ax_other = visible(figures[0])[:2]  # row-major: the two score panels first
    assert ax_ogm.get_ylim() == (0.0, 1.0) and "mean p(true class)" in ax_ogm.get_title()
    assert ax_other.get_ylim()[1] > 3.0 and "mean score" in ax_other.get_title()


def test_extra_per_modality_columns_get_their_own_panels(tmp_path, figures):
    path = write_log(tmp_path / "inforeg_seed0.csv", score=0.5,
                     extra={"beta": 0.1, "window": 1.0, "accuracy": 0.05, "grad_norm": 2.0})
    (run,) = mplot.load(str(path))
    assert list(run.extras) == ["beta", "window", "accuracy", "grad_norm"]
    assert run.extras["beta"]["visual"][3] == pytest.approx(0.3)
    mplot.plot_modulation([run], str(tmp_path / "x.png"))
    titles = [ax.get_title() for ax in visible(figures[0])]
    assert titles[2:] == [f"inforeg_seed0: {k}" for k in ("beta", "window", "accuracy", "grad_norm")]
    assert len(visible(figures[0])[2].get_lines()) == 2  # one line per modality


def test_many_runs_wrap_into_a_grid(tmp_path, figures):
    (run,) = mplot.load(str(write_log(tmp_path / "mslr_seed0.csv", score=0.5, extra={"ratio": 0.1})))
    mplot.plot_modulation([run] * 30, str(tmp_path / "x.png"), cols=4)
    fig = figures[0]
    w, h = fig.get_size_inches()
    assert w == pytest.approx(4 * 4.2) and h == pytest.approx(8 * 3 * 2.6)  # 8 rows of 3 panels
    assert len(visible(fig)) == 30 * 3
    assert mplot.grid(30, 3, 4) == (24, 4) and mplot.grid(2, 2, 4) == (2, 2)


def errors(capsys, argv):
    rc = mplot.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("mmmod plot: ") and "Traceback" not in err, err
    return err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    path = write_log(tmp_path / "run.csv")
    text = path.read_text().splitlines()
    head = text[0].split(",")
    i = head.index("coeff/visual")
    blank = [",".join("" if j == i else c for j, c in enumerate(line.split(","))) for line in text[1:]]
    (tmp_path / "blank.csv").write_text("\n".join([text[0]] + blank) + "\n")
    assert "column 'coeff/visual' is empty" in errors(capsys, [str(tmp_path / "blank.csv")])
    bad_num = text[1].split(",")
    bad_num[head.index("score/audio")] = "abc"
    (tmp_path / "word.csv").write_text("\n".join([text[0], ",".join(bad_num)]) + "\n")
    assert "'score/audio' holds 'abc'" in errors(capsys, [str(tmp_path / "word.csv")])

    cases = {
        "list.json": ([], "expected a JSON object"),
        "five.json": ({"runs": 5}, "'runs' must be a list of runs, got int 5"),
        "noseed.json": ({"runs": [{"method": "mlb", "steps": {}}]}, "run #0 has no 'seed'"),
        "strrun.json": ({"runs": ["x"]}, "run #0 is a str"),
        "ragged.json": ({"runs": [{"method": "mlb", "seed": 0, "steps": {"score/a": [1], "coeff/a": 2}}]},
                        "'steps' must map each column to a list"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        assert match in errors(capsys, [str(tmp_path / name)]), name
    (tmp_path / "broken.json").write_text("{")
    assert "not valid JSON" in errors(capsys, [str(tmp_path / "broken.json")])

    assert "--dpi must be in 1..2000, got 0" in errors(capsys, [str(path), "--dpi", "0"])
    assert "--cols must be >= 1" in errors(capsys, [str(path), "--cols", "0"])
    assert "is a file, not a folder" in errors(capsys, [str(path), "-o", str(path / "sub" / "x.png")])
    assert "is a folder" in errors(capsys, [str(path), "-o", str(tmp_path)])
    assert not list(tmp_path.glob("*.png"))


def test_command_line_exit_code_and_score_kind_override(tmp_path):
    path = write_log(tmp_path / "run.csv", score=2.0)
    r = subprocess.run([sys.executable, "-m", "mmmod", "plot", str(path), "--dpi", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--dpi" in r.stderr
    out = tmp_path / "o.png"
    r = subprocess.run([sys.executable, "-m", "mmmod", "plot", str(path), "-o", str(out),
                        "--score-kind", "nll", "--dpi", "40"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "(default: None)" not in subprocess.run(
        [sys.executable, "-m", "mmmod", "plot", "--help"], capture_output=True, text=True).stdout
