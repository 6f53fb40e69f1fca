import json
import signal

import pytest

from conftest import tiny_config
from orthomod.cli import main
from orthomod.report import ReportError, write_report
from orthomod.train import Trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    Trainer(tiny_config(root, name="ortho", iterations=40, diagnostics_every=5, init="orthonormal", reg="ortho",
                        modulation=True, modulation_until=10), progress=False).run()
    Trainer(tiny_config(root, name="l2", iterations=40, diagnostics_every=5), progress=False).run()
    interrupted = Trainer(tiny_config(root, name="stopped", iterations=40, diagnostics_every=0), progress=False)
    interrupted._stop_signal = signal.SIGTERM  # as if SIGTERM arrived during the first step
    interrupted.run()
    Trainer(tiny_config(root, name="diverged", lr=10.0, reg="ortho", reg_coeff=10.0, iterations=40,
                        diagnostics_every=1), progress=False).run()
    return root


@pytest.mark.slow
def test_report_writes_every_file_with_real_numbers(runs, tmp_path, capsys):
    names = ["ortho", "l2", "stopped", "diverged"]
    out = tmp_path / "report"
    assert main(["report", *[str(runs / n) for n in names], "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"report.md", "report.html", "curves.png", "filter_correlation.png", "moment_ratio.png",
            "layer_ratios_ortho.png", "layer_ratios_l2.png", "layer_ratios_diverged.png",
            "first_layer_ortho.png", "first_layer_l2.png", "first_layer_stopped.png"} <= files
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    for name in names:
        summary = json.loads((runs / name / "summary.json").read_text())
        row = rows[name]
        if summary["final_test_acc"] is not None:
            assert f"{100 * summary['final_test_acc']:.2f}%" in row
            assert f"{100 * summary['best_test_acc']:.2f}%" in row
        assert f"{summary['step']}/40" in row
        assert name in html
    assert "| completed |" in rows["ortho"] and "consecutive tau=1 until=10" in rows["ortho"]
    assert "| interrupted |" in rows["stopped"] and "| 1/40 |" in rows["stopped"]
    k = json.loads((runs / "diverged" / "summary.json").read_text())["diverged_at_step"]
    assert f"diverged at step {k}" in rows["diverged"]
    assert "(not drawn: no diagnostics recorded)" in md  # the stopped run recorded none
    assert md.count("![") == html.count("<img")


def test_report_rejects_non_run_folder(tmp_path, capsys):
    with pytest.raises(ReportError, match="is not a run folder"):
        write_report([tmp_path], tmp_path / "out")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_analyze_bn_jacobian_prints_and_plots(tmp_path, capsys):
    assert main(["analyze", "bn-jacobian", "--batch", "32", "--gamma", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "two smallest eigenvalues" in out and "the other 30:" in out
    assert (tmp_path / "bn_jacobian.png").stat().st_size > 2000
    assert main(["analyze", "bn-jacobian", "--batch", "2"]) == 2


def test_analyze_propagation_prints_a_line_per_conv_layer(capsys, tmp_path):
    flags = ["--model", "plain8", "--shapes-train", "200", "--shapes-test", "50", "--batch-size", "20"]
    assert main(["analyze", "propagation", *flags, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "plain8" and out["batch"] == 20 and len(out["names"]) == 7
    assert out["errors_first_over_last"] == pytest.approx(out["errors"][0] / out["errors"][-1])
    assert main(["analyze", "propagation", *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plain8, init msra, activation relu, norm bn") and "(20 images)" in lines[0]
    assert len(lines) == 1 + 1 + 7 + 1 and lines[-1].startswith("signal, last layer over first:")
    assert main(["analyze", "propagation", "--model", "plain8", "--activation", "tanh", "--norm", "none",
                 "--init", "delta-orthogonal", "--shapes-train", "200", "--shapes-test", "50",
                 "--figure", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'propagation.png'}"
    assert (tmp_path / "propagation.png").stat().st_size > 5000
    assert main(["analyze", "propagation", "--model", "resnet8", "--activation", "tanh"]) == 2
    assert "only the CIFAR plain nets" in capsys.readouterr().err


def test_analyze_propagation_of_a_run_measures_its_checkpoint_on_its_first_batch(runs, tmp_path, capsys):
    import shutil

    import torch

    from orthomod.cli import train_config
    from orthomod.train import initial_model

    run = tmp_path / "l2"
    shutil.copytree(runs / "l2", run)
    flags = ["--model", "plain8", "--dataset", "shapes", "--shapes-train", "1000", "--shapes-test", "200",
             "--batch-size", "50", "--iterations", "40"]  # the run's config (tiny_config, 40 iterations)
    assert main(["analyze", "propagation", *flags, "--json"]) == 0
    start = json.loads(capsys.readouterr().out)
    assert main(["analyze", "propagation", "--run", str(run), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["step"] == 40 and trained["checkpoint"] == "checkpoint.pt" and start["step"] == 0
    assert trained["names"] == start["names"] and trained["errors"] != start["errors"]
    # each layer's mean filter norm, from the checkpoint's own tensors (plain8: convs named features.*)
    weights = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert trained["filter_norm"] == pytest.approx(
        [float(weights[f"{name}.weight"].flatten(1).norm(dim=1).mean()) for name in trained["names"]])
    assert start["filter_norm"] != pytest.approx(trained["filter_norm"])
    # the step-0 weights written into the checkpoint: exactly the step-0 measurement, so the batch
    # and the measurement are the start's and only the weights come from the checkpoint
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["model"] = initial_model(train_config(flags))[0].state_dict()
    torch.save(state, run / "checkpoint.pt")
    assert main(["analyze", "propagation", "--run", str(run), "--json"]) == 0
    rewound = json.loads(capsys.readouterr().out)
    assert rewound["forward"] == start["forward"] and rewound["errors"] == start["errors"]
    assert main(["analyze", "propagation", "--run", str(run)]) == 0
    assert "step 40 (checkpoint.pt of " in capsys.readouterr().out.splitlines()[0]
    # refused: config flags beside --run, a folder that is not a run, weights that are not there
    assert main(["analyze", "propagation", "--run", str(run), "--lr", "0.5"]) == 2
    assert "--run measures a run with its saved config; drop --lr" in capsys.readouterr().err
    assert main(["analyze", "propagation", "--run", str(run), "--data", str(tmp_path), "--json"]) == 2
    assert "shapes dataset is generated" in capsys.readouterr().err  # --data is taken, and checked, as eval does
    assert main(["analyze", "propagation", "--run", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    (run / "best.pt").unlink()
    assert main(["analyze", "propagation", "--run", str(run), "--checkpoint", "best"]) == 2
    assert "best.pt is written at the run's first evaluation" in capsys.readouterr().err


def test_line_styles_stay_distinct_past_ten_runs():
    from orthomod.report import _style

    styles = [tuple(sorted(_style(i).items())) for i in range(40)]
    assert len(set(styles)) == 40
    assert _style(10)["color"] == _style(0)["color"] and _style(10)["linestyle"] != _style(0)["linestyle"]


@pytest.mark.parametrize("count, outside", [(3, False), (30, True)])
def test_a_legend_of_many_runs_sits_beside_the_axes_not_over_the_lines(count, outside):
    from orthomod.report import _legend, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i in range(count):
        ax.plot([0, 1], [i, i + 1], label=f"run-{i}")
    _legend(ax, count)
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert len(ax.get_legend().get_texts()) == count
    assert (legend.x0 >= axes.x1) == outside  # beside the axes, or inside them for a few runs
    if outside:
        assert legend.y1 <= fig.bbox.y1 + 1  # not above the top (savefig's tight bbox keeps the right side)
    plt.close(fig)


def test_a_run_with_one_probe_gets_its_heatmap_without_warnings(tmp_path, capsys):
    # a run collected just after it started has a single diagnostics probe
    Trainer(tiny_config(tmp_path, name="young", iterations=3, diagnostics_every=2, modulation=True),
            progress=False).run()
    rows = [json.loads(line) for line in (tmp_path / "young" / "diagnostics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r.get("error_moments_after")]) == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["report", str(tmp_path / "young"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "layer_ratios_young.png").stat().st_size > 2000
