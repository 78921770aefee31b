"""Figures: `flowrl compare` overlays runs (one PNG per metric, a table of final evaluations), every axis of
`flowrl plot` carries one quantity with its unit, and values spanning decades get a logarithmic axis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowrl_megatron.cli import main
from flowrl_megatron.errors import UserError
from flowrl_megatron.plots import PLOTS, compare_runs, plot_run


def fake_run(path: Path, scale: float) -> Path:
    """A run directory with a metrics.jsonl as the trainer writes it: eval rows at steps 0, 2, 4."""
    path.mkdir(parents=True)
    rows = []
    for step in range(5):
        row = {"step": step}
        if step:
            row |= {"reward/mean": scale * step / 4, "time/total": 30.0, "mismatch/abs_diff": 10.0 ** -(step + 3),
                    "mismatch/prob_ratio": 1.0, "train/entropy": 2.0 - step / 4, "train/policy_logprob": -1.5}
        if step % 2 == 0:
            row |= {"eval/pass@1": scale * (0.5 + step / 10), "eval/pass@16": 0.9, "eval/distinct_correct": 2.0}
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_compare_overlays_runs_and_tables_their_final_evaluation(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a" / "flowrl", 1.0), fake_run(tmp_path / "b" / "flowrl", 0.5)
    with pytest.raises(SystemExit) as e:
        main(["compare", str(a), str(b), "--metrics", "reward/mean,eval/pass@1", "--out", str(tmp_path / "c"),
              "--smoothing", "0.5", "--x", "time"])
    assert e.value.code == 0
    out = tmp_path / "c"
    assert sorted(p.name for p in out.iterdir()) == ["compare.md", "eval_pass_at_1.png", "reward_mean.png"]
    assert all((out / n).read_bytes()[:4] == b"\x89PNG" for n in ("eval_pass_at_1.png", "reward_mean.png"))
    table = (out / "compare.md").read_text()
    assert "| run | step | pass@1 | pass@16 | distinct_correct |" in table  # pass@k in k order, then the rest
    assert "| a/flowrl | 4 | 0.9 | 0.9 | 2 |" in table and "| b/flowrl | 4 | 0.45 | 0.9 | 2 |" in table
    assert table in capsys.readouterr().out
    with pytest.raises(UserError, match="no run has eval/nope"):
        compare_runs([a], tmp_path / "d", ["eval/nope"])
    with pytest.raises(UserError, match=r"has no metrics\.jsonl"):
        compare_runs([tmp_path], tmp_path / "d")


def test_every_axis_is_one_labelled_quantity_and_decades_are_logarithmic(tmp_path, monkeypatch):
    import matplotlib.figure

    for panels in PLOTS.values():
        for label, keys in panels:
            assert label.endswith(")") and "(" in label, f"{label}: no unit"
            assert len({k.split("/")[0] for k in keys}) == 1, f"{label}: {keys} mix sources"
    figures: list[matplotlib.figure.Figure] = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (figures.append(self),
                                                                                     save(self, *a, **k))[1])
    written = plot_run(fake_run(tmp_path / "run", 1.0))
    assert {p.name for p in written} >= {"reward.png", "mismatch.png", "policy.png", "eval_pass.png"}
    axes = {fig.get_suptitle().split(": ")[1]: fig.axes for fig in figures}
    for name, panel_axes in axes.items():
        for ax in panel_axes:
            assert ax.get_xlabel() == "step" and ax.get_ylabel(), name
    abs_diff, ratio = axes["mismatch"]  # 1e-4 .. 1e-7 and 1.0: two panels, the first logarithmic
    assert abs_diff.get_yscale() == "log" and ratio.get_yscale() == "linear"
    assert [len(ax.get_lines()) for ax in axes["policy"]] == [1, 1]  # entropy apart from the log-probs
