"""scripts/experiments.py: the statistics behind docs/RESULTS.md and its tables of the committed runs."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def experiments():
    spec = importlib.util.spec_from_file_location("experiments", ROOT / "scripts" / "experiments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_permutation_p_counts_the_splits_as_extreme_as_the_observed_one(experiments):
    # 3 vs 3 fully separated: only the observed split and its mirror are as extreme, 2 of 20
    assert experiments._permutation_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert experiments._permutation_p([1.0, 2.0], [1.0, 2.0]) == 1.0
    # 2 vs 2 can never go below 2 of 6 splits
    assert experiments._permutation_p([0.0, 0.1], [0.9, 1.0]) == pytest.approx(1 / 3)


def test_seed_cells_give_mean_sample_std_and_spread(experiments):
    runs = [{"summary": {"status": "completed", "final_test_acc": a}} for a in (0.60, 0.62, 0.64)]
    assert experiments._seed_cells(runs) == "60.00, 62.00, 64.00 | 62.00 | 2.00 | 4.00"
    diverged = {"summary": {"status": "diverged", "diverged_at_step": 5}}
    assert experiments._seed_cells(runs[:1] + [diverged]) == "60.00, diverged (step 5) | - | - | -"


def test_tables_report_the_committed_summaries(experiments, capsys):
    experiments.tables()
    out = capsys.readouterr().out
    runs = experiments.COLLECTED
    accs = [json.loads((runs / f"e1-plain44-l2-s{seed}" / "summary.json").read_text())["final_test_acc"]
            for seed in range(5)]
    row = next(line for line in out.splitlines() if line.startswith("| e1-plain44-l2 |"))
    assert row.split(" | ")[2] == f"{100 * sum(accs) / len(accs):.2f}"
    for name in ("e1-plain44-ortho-s0", "t2-plain110-ours-s0", "e2-plain110-ortho-s1"):
        assert f"| {name} |" in out


def test_filled_replaces_each_marked_table_and_names_what_does_not_match(experiments):
    begin, end = experiments.BEGIN, experiments.END
    text = (f"# R\n\n{begin.format('a')}\n\n| old |\n|---|\n\n{end}\n\nprose | kept\n\n"
            f"{begin.format('b-2')}\n\n| x |\n\n{end}\n")
    new = experiments.filled(text, {"a": ["| new |", "|---|", "| 1 |"], "b-2": ["| y |"]})
    assert new == (f"# R\n\n{begin.format('a')}\n\n| new |\n|---|\n| 1 |\n\n{end}\n\nprose | kept\n\n"
                   f"{begin.format('b-2')}\n\n| y |\n\n{end}\n")
    assert experiments.filled(new, {"a": ["| new |", "|---|", "| 1 |"], "b-2": ["| y |"]}) == new
    empty = f"{begin.format('a')}\n\n{end}\n\n{begin.format('b-2')}\n\n| x |\n\n{end}\n"  # a new pair
    assert experiments.filled(empty, {"a": ["| t |"], "b-2": ["| y |"]}) == (
        f"{begin.format('a')}\n\n| t |\n\n{end}\n\n{begin.format('b-2')}\n\n| y |\n\n{end}\n")
    with pytest.raises(ValueError, match="markers without a table: b-2; tables without markers: c"):
        experiments.filled(text, {"a": ["| t |"], "c": ["| t |"]})


def test_results_md_holds_the_tables_of_the_committed_runs(experiments):
    """Each generated table in docs/RESULTS.md is what the committed runs give today: after
    `collect`, `tables --write` must follow (this fails until it does)."""
    text, runs = experiments.RESULTS.read_text(), experiments._collected()
    blocks = experiments.table_blocks(runs)
    assert len(blocks) == 20 and experiments.filled(text, blocks) == text
    best = experiments.best_row(experiments.RECIPES["plain44-best"], runs)
    recipe = next(line for line in text.splitlines() if line.startswith("| `plain44-best` |"))
    assert recipe.split(" | ")[2] == best[0]


def test_depth_cells_average_only_when_every_seed_completed(experiments):
    def run(status, acc=None, step=None):
        return {"summary": {"status": status, "final_test_acc": acc, "diverged_at_step": step}}

    runs = {"a-s0": run("completed", 0.50), "a-s1": run("completed", 0.60), "b-s0": run("completed", 0.42),
            "c-s0": run("completed", 0.30), "c-s1": run("diverged", step=7)}
    assert experiments._mean_over_seeds("a", runs) == "55.00 (2 seeds)"
    assert experiments._mean_over_seeds("b", runs) == "42.00"
    assert experiments._mean_over_seeds("c", runs) == "30.00 / diverged (step 7)"
    assert experiments._mean_over_seeds("d", runs) == "not run"


def test_seed_table_keeps_the_named_prefixes(experiments):
    def run(acc):
        return {"summary": {"status": "completed", "final_test_acc": acc}}

    runs = {"e1-a-s0": run(0.5), "e1-a-s1": run(0.7), "t2-b-s0": run(0.3), "t2-b-s1": run(0.4), "e1-c-s0": run(0.9)}
    rows = [line for line in experiments._seed_table(runs, ("e1-",)) if line.startswith(("| e", "| t"))]
    assert rows == ["| e1-a | 50.00, 70.00 | 60.00 | 14.14 | 20.00 |"]  # t2-b filtered out, e1-c has one seed


def _runs(**results):
    """Collected runs from ``name=acc`` (a float) or ``name="diverged"``."""
    return {name.replace("_", "-"): {"summary": {"status": "diverged", "diverged_at_step": 5, "final_test_acc": None}
                                     if acc == "diverged" else {"status": "completed", "final_test_acc": acc}}
            for name, acc in results.items()}


def test_depth_points_give_mean_and_range_and_count_diverged_seeds(experiments, monkeypatch, tmp_path):
    monkeypatch.setattr(experiments, "depth_sweep", lambda runs: {"m": {20: "a", 44: "b", 110: "c"}})
    runs = _runs(a_s0=0.50, a_s1=0.70, a_s2=0.60, b_s0=0.40, b_s1="diverged", c_s0="diverged", c_s1="diverged")
    points = experiments._depth_points(runs)["m"]
    assert points[0] == (20, pytest.approx(60.0), pytest.approx(50.0), pytest.approx(70.0), 3, 0)
    assert points[1] == (44, pytest.approx(40.0), pytest.approx(40.0), pytest.approx(40.0), 1, 1)
    assert points[2] == (110, None, None, None, 0, 2)
    assert experiments.depth_figure(runs, tmp_path).stat().st_size > 0


def test_best_row_needs_enough_seeds_all_completed(experiments, monkeypatch):
    monkeypatch.setattr(experiments, "RECIPE_MIN_SEEDS", 3)
    runs = _runs(a_s0=0.9, a_s1=0.9, b_s0=0.5, b_s1=0.6, b_s2=0.7, c_s0=0.8, c_s1=0.8, c_s2="diverged",
                 d_s0=0.55, d_s1=0.55, d_s2=0.55)
    # a: two seeds only; c: a diverged seed; of b (60.00) and d (55.00), b
    best = experiments.best_row(["a", "b", "c", "d"], runs)
    assert best[0] == "b" and best[1] == pytest.approx(60.0) and best[2] == 3
    assert experiments.best_row(["a", "c"], runs) is None


# what a recipe is made of: every setting of the method, none of the budget, run or machine
METHOD_KEYS = ("model", "optimizer", "learning_rate", "momentum", "init", "reg", "reg_coeff", "l2_beside",
               "activation", "norm", "parametrization", "modulation", "modulation_tau", "modulation_until", "modulation_rule",
               "augment", "normalize", "batch_size", "schedule", "milestones", "lr_decay", "warmup_steps")


def _assert_preset_trains_as(experiments, preset: str, run: str, keys: tuple[str, ...]) -> None:
    import dataclasses

    from orthomod.config import DEFAULT_LR, TrainConfig, load_config_file

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig.from_dict(load_config_file(preset))
    measured = {**defaults, **json.loads((experiments.COLLECTED / run / "config.json").read_text())}
    measured["learning_rate"] = measured["lr"] if measured["lr"] is not None else DEFAULT_LR[measured["optimizer"]]
    for key in keys:
        assert getattr(config, key) == measured[key], (preset, run, key)


def test_recommended_presets_are_the_best_rows_measured(experiments):
    """Each recipe preset trains what the committed runs found best: if a new result changes the
    ranking, this fails until the preset (and the README's paragraph) follow."""
    runs = experiments._collected()
    for preset, bases in experiments.RECIPES.items():
        best = experiments.best_row(bases, runs)
        assert best is not None, preset
        _assert_preset_trains_as(experiments, preset, f"{best[0]}-s0", METHOD_KEYS)


def test_presets_quoting_runs_train_as_those_runs_and_quote_them_right(experiments):
    from importlib import resources

    runs = experiments._collected()
    for preset, base in experiments.PRESET_EVIDENCE.items():
        seeds = [name for name in sorted(runs) if experiments._base(name) == base]
        assert seeds, base
        text = (resources.files("orthomod") / "presets" / f"{preset}.toml").read_text()
        for name in seeds:
            _assert_preset_trains_as(experiments, preset, name, METHOD_KEYS + ("epochs", "iterations", "dataset"))
            assert f"{100 * runs[name]['summary']['final_test_acc']:.2f}%" in text, (preset, name)


def test_only_picks_names_containing_any_of_its_parts(experiments):
    assert experiments._selected("lb-plain44-l2-s0", None)
    assert experiments._selected("lb-plain44-l2-s0", "lb-,x4-") and experiments._selected("x4-resnet44-l2-s1", "lb-,x4-")
    assert not experiments._selected("f-plain44-ortho-s0", "lb-,x4-")
    assert not experiments._selected("f-plain44-ortho-s0", "lb-,")  # an empty part picks nothing
    queue = [name for name in experiments.EXPERIMENTS if experiments._selected(name, "x4-,lb-")]
    assert queue.index("lb-plain44-tat-s0") < queue.index("x4-plain44-ortho-mod-s0")  # the queue's order
    # a row's conditional seeds follow its seed 0 at once: a promising row is confirmed first
    row = queue.index("lb-plain44-delta-ortho-mod-s0")
    assert queue[row + 1:row + 4] == ["lb-plain44-delta-ortho-mod-s1", "lb-plain44-delta-ortho-mod-s2",
                                      "lb-plain44-isonet-bn-s0"]


def test_setting_replaces_a_flags_value_or_adds_the_flag(experiments):
    flags = ["--reg", "l2", "--lr", "0.01", "--norm", "none"]
    assert experiments.setting(flags, "--lr", "0.1") == ["--reg", "l2", "--lr", "0.1", "--norm", "none"]
    assert experiments.setting(flags, "--seed", "3") == [*flags, "--seed", "3"]
    assert flags == ["--reg", "l2", "--lr", "0.01", "--norm", "none"]  # a new list
    # a probe's command differs from its row's only in the setting it names and the budget
    row, probe = experiments.EXPERIMENTS["lb-plain44-tat-s0"], experiments.EXPERIMENTS["lb-probe-tat-lr0.1-s0"]
    assert [a for a in probe if a not in row] == ["--iterations", "150", "0.1"]


def test_probe_table_names_the_setting_each_probe_changed(experiments):
    runs = {"lb-probe-tat-lr0.1-s0": {"summary": {"status": "diverged", "diverged_at_step": 9}},
            "lb-probe-tat-s0": {"summary": {"status": "completed", "final_test_acc": 0.2078}}}
    lines = experiments._probe_table(runs)
    assert len(lines) == 2 + len(experiments.PROBES)
    tat = [line for line in lines if "lb-probe-tat" in line]
    assert tat[0].endswith("| lb-probe-tat-lr0.1-s0 | --lr 0.1 | diverged (step 9) |")
    assert tat[1].endswith("| lb-probe-tat-lr0.03-s0 | --lr 0.03 | not run |")
    assert tat[2].endswith("| lb-probe-tat-s0 | the row's own | 20.78 |")


def test_conditional_seeds_run_only_for_rows_that_decide_the_ranking(experiments, monkeypatch):
    summaries = {"lb-plain44-srip-s0": {"status": "completed", "final_test_acc": 0.65},
                 "lb-plain44-tat-s0": {"status": "completed", "final_test_acc": 0.60},
                 "lb-plain44-isonet-s0": {"status": "diverged", "final_test_acc": None}}
    monkeypatch.setattr(experiments, "_summary", summaries.get)
    monkeypatch.setattr(experiments, "DECIDING_MARGIN", 3.0)
    runs = _runs(e2_plain44_ortho_mod_s0=0.67, e2_plain44_ortho_mod_s1=0.66, e2_plain44_ortho_mod_s2=0.67)  # 66.67
    assert experiments._decides("lb-plain44-srip-s1", runs)          # 65.00: within 3 points
    assert not experiments._decides("lb-plain44-tat-s2", runs)       # 60.00: 6.67 below
    assert not experiments._decides("lb-plain44-isonet-s1", runs)    # diverged
    assert not experiments._decides("lb-plain44-dirac-param-s1", runs)  # seed 0 not run yet
    assert experiments._decides("lb-plain44-tat-s1", {})              # no row with 3 seeds: every row decides
    assert "lb-plain44-srip-s2" in experiments.CONDITIONAL_SEEDS and "lb-plain44-l2-s1" not in experiments.EXPERIMENTS


def test_leaderboard_gives_the_permutation_p_against_the_best_row(experiments, monkeypatch):
    monkeypatch.setattr(experiments, "LEADERBOARD_ROWS", {"a": "row a", "b": "row b", "c": "row c", "r": "resnet"})
    monkeypatch.setattr(experiments, "LEADERBOARD_REFERENCE", "r")
    monkeypatch.setattr(experiments, "RECIPES", {"plain44-best": ["a", "b", "c"]})
    monkeypatch.setattr(experiments, "EXPERIMENTS", {"a-s0": [], "b-s0": [], "c-s0": [], "r-s0": []})
    runs = _runs(a_s0=0.70, a_s1=0.71, a_s2=0.72, b_s0=0.60, b_s1=0.61, b_s2=0.62, c_s0=0.65, r_s0=0.80, r_s1=0.81)
    runs["r-s2"] = {"summary": {"status": "running", "final_test_acc": 0.10}}  # seeds under way: counted aside
    runs["r-s3"] = {"summary": {"status": "interrupted", "final_test_acc": None}}  # stopped, to be resumed
    for run in runs.values():
        run.update(probes=[], probe=None, command="orthomod train")
        run["summary"]["wall_time_s"] = 1.0
    lines = {line.split(" | ")[0][2:]: line.split(" | ") for line in experiments.leaderboard(runs)
             if line.startswith("| row") or line.startswith("| resnet")}
    # b is fully below a, 3 against 3: 2 of the 20 splits are as extreme; c has one seed; r is 2 against 3: 1 of 10
    assert {row: cells[4] for row, cells in lines.items()} == {"row a": "the best", "row b": "0.100", "row c": "-",
                                                               "resnet": "0.100"}
    assert lines["resnet"][1:3] == ["2 (+2 unfinished)", "80.50 ± 0.71"]


def test_leaderboard_time_column_is_the_side_by_side_benchmark(experiments, monkeypatch, tmp_path):
    times, later = tmp_path / "bench-rows.json", tmp_path / "bench-rows-later.json"
    times.write_text(json.dumps({"rows": {"l2": {"ratio_to_l2": 1.0}, "m": {"ratio_to_l2": 9.9}}}))
    later.write_text(json.dumps({"rows": {"l2": {"ratio_to_l2": 1.0}, "m": {"ratio_to_l2": 1.234}}}))
    monkeypatch.setattr(experiments, "ROW_TIMES", (times, later, tmp_path / "absent.json"))
    monkeypatch.setattr(experiments, "LEADERBOARD_ROWS", {"a": "row a", "b": "row b", "n": "row n", "s": "row s"})
    monkeypatch.setattr(experiments, "ROW_METHOD", {"a": "m", "b": "l2", "n": "unmeasured", "s": "m-lr"})
    monkeypatch.setattr(experiments, "RECIPES", {"plain44-best": ["a", "b"]})
    monkeypatch.setattr(experiments, "EXPERIMENTS", {"a-s0": [], "b-s0": [], "n-s0": ["--x"], "s-s0": ["--x"]})
    runs = _runs(a_s0=0.70, b_s0=0.60)
    for run in runs.values():
        run.update(probes=[], probe=None, command="orthomod train")
    assert experiments.step_ratios(times) == {"l2": 1.0, "m": 9.9}
    assert experiments.step_ratios() == {"l2": 1.0, "m": 1.234}  # the later measurement of a row wins
    assert experiments.step_ratios(tmp_path / "absent.json") == {}
    monkeypatch.setattr(experiments, "SAME_STEP", {"m-lr": "m"})
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[7] for line in experiments.leaderboard(runs)
             if line.startswith("| row")}
    assert cells == {"row a": "1.23", "row b": "1.00", "row n": "-", "row s": "1.23"}  # n: not run, not measured


def test_a_row_timed_as_another_differs_from_it_only_in_its_lr_schedule(experiments):
    def step_flags(flags):
        out, skip = [], False
        for flag in flags:
            if skip or flag in ("--lr", "--warmup-steps"):
                skip = not skip
                continue
            out.append(flag)
        return out

    assert experiments.SAME_STEP
    for key, timed in experiments.SAME_STEP.items():
        flags, other = experiments.METHOD_FLAGS[key], experiments.METHOD_FLAGS[timed]
        assert flags != other and step_flags(flags) == step_flags(other)


def test_the_queue_follows_the_ranking_for_depth_and_longer_runs(experiments, monkeypatch):
    three = dict(s0=0.70, s1=0.70, s2=0.70)

    def rows(**means):  # base -> a mean over three completed seeds
        return _runs(**{f"{base}_{seed}": mean for base, mean in means.items() for seed in three})

    runs = rows(e2_plain44_ortho_mod=0.667, e1_plain44_ortho=0.618, e1_plain44_l2=0.90)  # l2 is never a method pick
    assert experiments.top_methods(runs) == ["ortho-mod", "ortho"]
    sweep = experiments.depth_sweep(runs)
    assert list(sweep) == ["msra + L2", "the paper: orthonormal init + orthonormality",
                           "the paper: orthonormality + modulation (tau 1)", "residual, msra + L2"]
    assert sweep["the paper: orthonormality + modulation (tau 1)"][110] == "e4-plain110-ortho-mod-always"
    conditions = experiments.CONDITIONS
    assert not conditions["dp-plain110-srip-s0"](runs) and not conditions["x4-plain44-srip-s0"](runs)
    # SRIP measured with three seeds above the paper's method: its depth runs and its 4x-budget runs are due
    runs = {**runs, **rows(lb_plain44_srip=0.70)}
    assert experiments.top_methods(runs) == ["srip", "ortho-mod"]
    assert conditions["dp-plain20-srip-s1"](runs) and conditions["x4-plain44-srip-s1"](runs)
    assert not conditions["dp-plain20-tat-s0"](runs) and not conditions["x4-plain44-ortho-s0"](runs)
    assert experiments.depth_sweep(runs)["orthonormal init + SRIP"] == {20: "dp-plain20-srip", 44: "lb-plain44-srip",
                                                                        110: "dp-plain110-srip"}
    # the paper's method stays in the sweep whatever its rank; the other paper row leaves it
    runs = {**runs, **rows(lb_plain44_tat=0.69)}
    assert experiments.top_methods(runs) == ["srip", "tat"]
    assert list(experiments.depth_sweep(runs)) == ["msra + L2", "the paper: orthonormality + modulation (tau 1)",
                                                   "orthonormal init + SRIP",
                                                   "TAT: transformed leaky ReLU + SUO-delta init, no BN, L2, lr 0.01",
                                                   "residual, msra + L2"]
    # a method whose depth runs completed while it was one of the best two stays in the sweep
    later = {**runs, **rows(dp_plain20_srip=0.80, lb_plain44_delta_l2=0.695)}
    assert experiments.top_methods(later) == ["srip", "delta-l2"]
    assert "TAT: transformed leaky ReLU + SUO-delta init, no BN, L2, lr 0.01" not in experiments.depth_sweep(later)
    later = {**later, **rows(lb_plain44_tat=0.72, lb_plain44_delta_l2=0.75)}
    assert experiments.top_methods(later) == ["delta-l2", "tat"]
    assert list(experiments.depth_sweep(later)) == ["msra + L2", "the paper: orthonormality + modulation (tau 1)",
                                                   "delta-orthogonal init + L2", "orthonormal init + SRIP",
                                                   "TAT: transformed leaky ReLU + SUO-delta init, no BN, L2, lr 0.01",
                                                   "residual, msra + L2"]
    # the paper's method runs at 4x the budget whatever the ranking; so does the residual net
    assert "x4-plain44-ortho-mod-s0" not in conditions and "x4-resnet44-l2-s1" not in conditions
    queue = list(experiments.EXPERIMENTS)
    assert queue.index("lb-plain44-tat-s2") < queue.index("dp-plain20-delta-ortho-mod-s0") < \
        queue.index("x4-plain44-ortho-mod-s0")
    flags = experiments.EXPERIMENTS["dp-plain110-srip-s1"]
    assert flags[flags.index("--model") + 1] == "plain110" and flags[flags.index("--epochs") + 1] == "4"
    # plain-110 depth runs take a third seed, so that such a row can become plain110-best
    assert conditions["dp-plain110-srip-s2"](runs) and "dp-plain20-srip-s2" not in experiments.EXPERIMENTS
    plain110 = rows(e4_plain110_ortho_mod_always=0.255)
    assert experiments.best_row(experiments.RECIPES["plain110-best"], plain110)[0] == "e4-plain110-ortho-mod-always"
    plain110 |= rows(dp_plain110_srip=0.48)
    assert experiments.best_row(experiments.RECIPES["plain110-best"], plain110)[0] == "dp-plain110-srip"
    del plain110["dp-plain110-srip-s2"]  # two seeds do not decide a recipe
    assert experiments.best_row(experiments.RECIPES["plain110-best"], plain110)[0] == "e4-plain110-ortho-mod-always"


def test_spearman_is_the_correlation_of_ranks_with_ties_sharing_their_mean_rank(experiments):
    assert experiments._spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert experiments._spearman([1, 2, 3], [9, 5, 1]) == pytest.approx(-1.0)
    # ties: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3): covariance 4.5, variances 4.5 and 5
    assert experiments._spearman([1, 2, 2, 5], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)


def test_fit_table_orders_rows_by_training_loss_with_the_train_test_gap(experiments):
    def done(loss, train, test):
        return {"summary": {"status": "completed", "final_train_loss": loss, "final_train_acc": train,
                            "final_test_acc": test}}

    runs = {"e1-plain44-l2-s0": done(1.1, 0.60, 0.58), "e1-plain44-l2-s1": done(1.0, 0.62, 0.60),
            "e2-resnet44-l2-s0": done(0.4, 0.86, 0.82),
            "lb-plain44-isonet-s0": done(0.6, 0.79, 0.76),
            "lb-plain44-srip-s0": {"summary": {"status": "interrupted"}}}  # not completed: left out
    lines = experiments._fit_table(runs)
    assert lines[2:5] == ["| residual, msra + L2 | 1 | 0.400 | 86.00 | 82.00 | +4.00 |",
                          "| ISONet without BN, lr 0.01 | 1 | 0.600 | 79.00 | 76.00 | +3.00 |",
                          "| msra + L2 (baseline, experiment 1) | 2 | 1.050 | 61.00 | 59.00 | +2.00 |"]
    assert lines[5:] == ["", "(Spearman rank correlation of final training loss and test accuracy over these 3 "
                             "rows: -1.000.)"]


def test_x4_table_puts_each_method_at_40_epochs_beside_its_10_epoch_row(experiments):
    def done(acc):
        return {"summary": {"status": "completed", "final_test_acc": acc, "step": 9, "total_steps": 9}}

    runs = {**{f"e2-plain44-ortho-mod-s{i}": done(a) for i, a in enumerate((0.66, 0.67, 0.68))},
            **{f"lb-plain44-isonet-s{i}": done(a) for i, a in enumerate((0.75, 0.76, 0.77))},  # the best row
            **{f"e2-resnet44-l2-s{i}": done(a) for i, a in enumerate((0.81, 0.83))},
            "x4-plain44-ortho-mod-s0": done(0.80),
            "x4-plain44-ortho-mod-s1": {"summary": {"status": "interrupted", "final_test_acc": 0.5, "step": 1200,
                                                    "total_steps": 15600}},
            "x4-plain44-isonet-s0": done(0.85), "x4-plain44-isonet-s1": done(0.87),
            "x4-resnet44-l2-s0": done(0.90), "x4-resnet44-l2-s1": done(0.92)}
    lines = experiments._x4_table(runs)
    assert lines[0].count(" | ") == 7 and "seed 0 | seed 1" in lines[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:7] for line in lines[2:]}
    assert list(rows) == ["the paper: orthonormality + modulation (tau 1)", "ISONet without BN, lr 0.01",
                          "residual, msra + L2"]
    assert rows["the paper: orthonormality + modulation (tau 1)"] == [
        "67.00 ± 1.00 (3 seeds)", "-15.00", "80.00", "interrupted: step 1,200 of 15,600, 50.00 so far", "-", "-"]
    assert rows["ISONet without BN, lr 0.01"] == ["76.00 ± 1.00 (3 seeds)", "-6.00", "85.00", "87.00",
                                                  "86.00 ± 1.41 (2 seeds)", "-5.00"]
    assert rows["residual, msra + L2"][4:] == ["91.00 ± 1.41 (2 seeds)", "+0.00"]
    del runs["x4-plain44-isonet-s1"]
    assert experiments._x4_table(runs)[3].split(" | ")[4] == "queued"


def test_full_protocol_table_gives_progress_against_the_paper_and_hours_left(experiments):
    runs = {"f-plain44-ortho-s0": {"speed": 128 * 10000 / 7200, "summary": {  # 10,000 steps in 2 hours of
        "status": "interrupted", "step": 40000, "total_steps": 64000, "final_test_acc": 0.8,  # training:
        "best_test_acc": 0.8328, "best_step": 34710, "settings": {"batch_size": 128}}},  # 24,000 take 4.8
        "f-plain44-l2-s0": {"summary": {"status": "completed", "step": 64000, "total_steps": 64000,
                                        "final_test_acc": 0.9, "best_test_acc": 0.91, "best_step": 60000}}}
    lines = experiments._full_protocol_table(runs)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:7] for line in lines[2:]}
    assert rows["f-plain44-ortho-s0"] == ["88.42", "40,000 of 64,000", "80.00", "83.28", "34,710", "4.8"]
    assert rows["f-plain44-l2-s0"] == ["-", "completed", "90.00", "91.00", "60,000", "-"]
    assert rows["f-plain110-ortho-mod-s0"] == ["81.6", "queued", "-", "-", "-", "-"]
    # before its first evaluation, at 64 images a second (half a step): 63,700 steps take 35.4 hours
    runs["f-plain44-ortho-s0"].update(speed=64.0)
    runs["f-plain44-ortho-s0"]["summary"].update(step=300, final_test_acc=None, best_test_acc=None, best_step=None)
    assert experiments._full_protocol_table(runs)[2].split(" | ")[2:7] == ["300 of 64,000", "-", "-", "-", "35.4"]
    runs["f-plain44-ortho-s0"].update(speed=None)  # before its first logging window: not known
    assert experiments._full_protocol_table(runs)[2].split(" | ")[6] == "-"
    assert rows["f-plain110-ortho-mod-always-s0"][0] == "73.5"
    assert rows["f-plain44-ortho-flipcrop-s0"][0] == "88.42 (without --augment flip-crop)"  # a variant of the protocol
    assert lines[2].endswith("`orthomod train --config plain44-ortho --seed 0 --no-progress --log-every 50 "
                             "--diagnostics-every 100` |")


def test_recent_speed_is_the_median_of_the_last_windows_so_a_paused_one_does_not_count_nor_a_cut_line(experiments, tmp_path):
    from orthomod.files import RunFolder

    assert experiments._recent_speed(RunFolder(tmp_path).records()) is None  # no metrics yet
    records = [{"kind": "train", "images_per_s": 1000.0}]  # an older session's, beyond the last 20 windows
    records += [{"kind": "train", "images_per_s": 100.0 + i} for i in range(19)]  # 100..118
    records += [{"kind": "eval", "test_acc": 0.5}, {"kind": "train", "images_per_s": 2.0}]  # paused in this one
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tra')
    assert experiments._recent_speed(RunFolder(tmp_path).records()) == 108.5  # median of 2, 100, ..., 118: (108 + 109) / 2


def test_phase_table_splits_the_probes_at_the_lr_drops_of_the_runs_config(experiments):
    def probe(step, corr, ratio):
        return {"step": step, "filter_correlation_mean": corr, "moment_ratio_first_last": ratio}

    config = {"lr": 0.1, "lr_decay": 0.1, "milestones": [0.5, 0.75]}  # drops after steps 400 and 600 of 800
    runs = {"f-plain44-ortho-s0": {"config": config, "summary": {"total_steps": 800}, "probes": [
        probe(100, 0.05, 3.0), probe(200, 0.04, 1.0), probe(300, 0.03, 2.0), probe(400, 0.02, 50.0),
        probe(500, 0.01, 7.0), probe(600, 0.009, 9.0)]},  # stopped at 600: nothing yet in the third phase
        "f-plain44-l2-s0": {"config": config, "summary": {"total_steps": 800}, "probes": []}}
    rows = [line.split(" | ")[1:] for line in experiments._phase_table(runs)[2:]]
    assert rows == [["0.1", "0-400", "4", "0.0200", "3 |"],  # median of 1, 2, 3, 50
                    ["0.01", "400-600", "2", "0.0090", "9 |"]]  # of two, the upper


def test_pairs_match_each_full_protocol_row_with_the_row_of_the_same_seed_it_is_measured_against(experiments):
    assert experiments._pairs() == [("f-plain44-ortho-s0", "f-plain44-l2-s0"),
                                    ("f-plain110-ortho-mod-s0", "f-plain110-ortho-mod-always-s0"),
                                    ("f-plain44-ortho-s1", "f-plain44-l2-s1")]  # flip-crop has no L2 partner


def test_pair_table_compares_two_runs_per_lr_phase_at_the_steps_both_reached(experiments):
    config = {"lr": 0.1, "lr_decay": 0.1, "milestones": [0.5, 0.75]}  # drops after steps 400 and 600 of 800

    def run(evals, losses, probes):
        return {"config": config, "summary": {"total_steps": 800},
                "records": [{"kind": "eval", "step": s, "test_acc": a} for s, a in evals]
                + [{"kind": "train", "step": s, "loss": l} for s, l in losses],
                "probes": [{"step": s, "filter_correlation_mean": c} for s, c in probes]}

    runs = {"f-plain44-ortho-s0": run([(200, 0.5), (400, 0.6), (600, 0.8), (800, 0.85)],
                                      [(200, 1.0), (400, 0.8), (600, 0.4)], [(400, 0.02), (600, 0.01)]),
            "f-plain44-l2-s0": run([(200, 0.7), (400, 0.5), (600, 0.7)],  # stopped at 600
                                   [(200, 0.6), (400, 0.4), (500, 9.9), (600, 0.3)], [(300, 0.06), (600, 0.04)])}
    rows = [line.split(" | ")[2:] for line in experiments._pair_table(runs, experiments._pairs())[2:]]
    assert rows == [
        # phase 1: evaluations at 200, 400 (ahead at 400 only); losses at 200, 400; probes shared: none
        ["1 (0.1)", "2 (steps 200-400)", "55.00 (50.00-60.00)", "60.00 (50.00-70.00)", "1", "0.900", "0.500",
         "-", "-", "- |"],
        # phase 2: 600 only; the L2 run's window at 500 has no partner; probes shared at 600: 0.04 / 0.01
        ["2 (0.01)", "1 (step 600)", "80.00 (80.00-80.00)", "70.00 (70.00-70.00)", "1", "0.400", "0.300",
         "0.0100", "0.0400", "4.00 |"]]  # phase 3: the L2 run has no evaluation there yet, no row
    del runs["f-plain44-l2-s0"]
    assert experiments._pair_table(runs, experiments._pairs())[2:] == []  # the partner not run yet


def test_x4_pairs_put_the_best_method_against_the_papers_and_resnet44_per_seed(experiments, monkeypatch):
    monkeypatch.setattr(experiments, "top_methods", lambda runs, n: ["isonet"])
    assert experiments._x4_pairs({}) == [("x4-plain44-isonet-s0", "x4-plain44-ortho-mod-s0"),
                                         ("x4-plain44-isonet-s0", "x4-resnet44-l2-s0"),
                                         ("x4-plain44-isonet-s1", "x4-plain44-ortho-mod-s1"),
                                         ("x4-plain44-isonet-s1", "x4-resnet44-l2-s1")]
    monkeypatch.setattr(experiments, "top_methods", lambda runs, n: ["ortho-mod"])  # the paper's method best:
    assert experiments._x4_pairs({}) == [("x4-plain44-ortho-mod-s0", "x4-resnet44-l2-s0"),  # not against itself
                                         ("x4-plain44-ortho-mod-s1", "x4-resnet44-l2-s1")]


def test_list_shows_an_unfinished_runs_step_and_a_finished_runs_status(experiments, monkeypatch, tmp_path):
    summaries = {"a-s0": {"status": "interrupted", "step": 27545, "total_steps": 64000},
                 "b-s0": {"status": "completed", "step": 3900, "total_steps": 3900}}
    monkeypatch.setattr(experiments, "_summary", summaries.get)
    monkeypatch.setattr(experiments, "_recent_speed", lambda records: 128.0)  # one step a second
    monkeypatch.setattr(experiments, "_run_folder", lambda name: tmp_path)  # records read from here: none
    assert experiments._progress("a-s0") == "interrupted 27545/64000"  # no batch size: no hours
    summaries["a-s0"] |= {"settings": {"batch_size": 128}}
    assert experiments._progress("a-s0") == "interrupted 27545/64000, 10.1 h left"  # 36,455 steps left
    assert experiments._progress("b-s0") == "completed"
    assert experiments._progress("lb-plain44-srip-s1") == "if deciding"  # not run: why it may not
    assert experiments._progress("x4-resnet44-l2-s0") == "-"


def test_run_takes_repeated_only_selections_one_after_the_other(experiments, monkeypatch, tmp_path):
    monkeypatch.setattr(experiments, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(experiments, "COLLECTED", tmp_path / "collected")
    monkeypatch.setattr(experiments, "EXPERIMENTS", {name: ["--model", "plain8"] for name in ("a-s0", "b-s0", "b-s1")})
    started = []
    monkeypatch.setattr(experiments.subprocess, "call", lambda cmd: started.append(cmd[cmd.index("--name") + 1]) or 0)
    monkeypatch.setattr(sys, "argv", ["experiments.py", "run", "--only", "b-s1", "--only", "a-,b-s0"])
    experiments.main()
    assert started == ["b-s1", "a-s0", "b-s0"]  # the selections in turn, each in the queue's order
    started.clear()
    monkeypatch.setattr(sys, "argv", ["experiments.py", "run"])
    experiments.main()
    assert started == ["a-s0", "b-s0", "b-s1"]


def test_park_keeps_an_unfinished_runs_checkpoint_and_run_resumes_from_it(experiments, monkeypatch, tmp_path):
    """A fresh machine has no runs/: `park` commits what `run` needs to resume there."""
    runs, collected = tmp_path / "runs", tmp_path / "collected"
    monkeypatch.setattr(experiments, "RUNS", runs)
    monkeypatch.setattr(experiments, "COLLECTED", collected)
    monkeypatch.setattr(experiments, "EXPERIMENTS", {"a-s0": ["--model", "plain8"], "b-s0": ["--model", "plain8"]})
    for name, status in (("a-s0", "interrupted"), ("b-s0", "completed")):
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(json.dumps({"status": status, "step": 7, "total_steps": 9}))
        (runs / name / "metrics.jsonl").write_text(f'{{"kind": "train", "step": 5, "images_per_s": 100.0, "run": "{name}"}}\n')
        (runs / name / "checkpoint.pt").write_bytes(name.encode())
    experiments.collect()  # collecting alone keeps no checkpoint
    assert not list(collected.glob("*/checkpoint.pt"))
    experiments.collect(park=True)
    assert (collected / "a-s0" / "checkpoint.pt").read_bytes() == b"a-s0"
    assert not (collected / "b-s0" / "checkpoint.pt").exists()  # finished: nothing to resume
    assert not list(collected.glob("*/.*tmp"))  # no temporary file of the atomic copy left behind

    shutil.rmtree(runs)  # the next session's machine
    calls = []
    monkeypatch.setattr(experiments.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert experiments._progress("a-s0") == "interrupted 7/9, parked"  # `list` says where it will resume from
    experiments.run(None)
    assert calls == [[sys.executable, "-m", "orthomod", "train", "--resume", str(runs / "a-s0"), "--no-progress"]]
    assert {p.name for p in (runs / "a-s0").iterdir()} == {"summary.json", "metrics.jsonl", "checkpoint.pt"}
    assert (runs / "a-s0" / "checkpoint.pt").read_bytes() == b"a-s0"
    assert (runs / "a-s0" / "metrics.jsonl").read_text() == (collected / "a-s0" / "metrics.jsonl").read_text()

    # a run the queue skips under the ranking as it is: not parked, its parked checkpoint removed
    monkeypatch.setattr(experiments, "CONDITIONS", {"a-s0": lambda runs: False})
    experiments.collect(park=True)
    assert not (collected / "a-s0" / "checkpoint.pt").exists()
    assert (collected / "a-s0" / "metrics.jsonl").exists()  # its records of the partial run stay
    monkeypatch.setattr(experiments, "CONDITIONS", {"a-s0": lambda runs: True})
    experiments.collect(park=True)
    assert (collected / "a-s0" / "checkpoint.pt").read_bytes() == b"a-s0"

    # once the run has finished, collecting drops its parked checkpoint (and parks nothing)
    (runs / "a-s0" / "summary.json").write_text(json.dumps({"status": "completed", "step": 9}))
    experiments.collect(park=True)
    assert not list(collected.glob("*/checkpoint.pt"))

    # ... unless it is one whose final weights are kept: then its last checkpoint, not the parked one
    monkeypatch.setattr(experiments, "KEEP_FINAL", ("a-",))
    (runs / "a-s0" / "checkpoint.pt").write_bytes(b"a-s0 final")
    experiments.collect()  # collecting alone keeps none
    assert not list(collected.glob("*/checkpoint.pt"))
    experiments.collect(park=True)
    assert [p.parent.name for p in collected.glob("*/checkpoint.pt")] == ["a-s0"]
    assert (collected / "a-s0" / "checkpoint.pt").read_bytes() == b"a-s0 final"
    calls.clear()
    experiments.run(None)
    assert calls == []  # finished: `run` resumes nothing from it


def test_propagation_measures_the_net_each_rows_seed_0_trained(experiments):
    from orthomod.cli import train_config

    flags = experiments.propagation_flags()
    assert set(flags) == {20, 44, 110}
    assert all(set(methods) == set(experiments.METHOD_FLAGS) | {"resnet"} for methods in flags.values())
    pairs = {**{(44, base): key for base, key in experiments.ROW_METHOD.items()},
             **{(depth, base): key for key, bases in experiments.DEPTH_RUNS.items() for depth, base in bases.items()},
             **{(depth, base): "resnet" for depth, base in experiments.RESNET_DEPTH_RUNS.items()}}
    for (depth, base), key in pairs.items():
        trained = train_config(experiments.EXPERIMENTS[base + "-s0"])
        probed = train_config([*flags[depth][key], "--iterations", "1"])
        for field in ("model", "dataset", "init", "activation", "norm", "parametrization", "seed", "batch_size",
                      "augment", "normalize"):
            assert getattr(probed, field) == getattr(trained, field), (base, field)


def test_propagation_tables_set_each_nets_start_beside_its_end(experiments, tmp_path):
    path = tmp_path / "propagation.json"
    path.write_text(json.dumps({"depths": {
        "44": {"isonet": {"forward_last_over_first": 0.5, "errors_first_over_last": 0.25},
               "l2": {"forward_last_over_first": 4.0, "errors_first_over_last": 2e6}},
        "110": {"l2": {"forward_last_over_first": 4.0, "errors_first_over_last": 5e14}}}}))
    runs = experiments._collected()
    lines = experiments._propagation_table(runs, path)
    # the baseline once (experiment 1's five seeds, not the rerun's one), then the rows measured, in leaderboard order
    assert lines[2:] == ["| msra + L2 (baseline, experiment 1) | 4 | 2e+06 | 1.93 | 59.63 (5 seeds) |",
                         "| ISONet without BN, lr 0.01 | 0.5 | 0.25 | 243 | 75.56 (3 seeds) |"]
    assert experiments._propagation_table({}, tmp_path / "missing.json")[2:] == []
    depth = experiments._propagation_depth_table(runs, path)
    columns = depth[0].strip("| ").split(" | ")
    assert columns[0] == "depth" and columns[1] == "msra + L2" and columns[-1] == "residual, msra + L2"
    assert "ISONet without BN, lr 0.01" in columns
    cells = {row.split(" | ")[0].strip("| "): row.strip("| ").split(" | ")[1:] for row in depth[2:]}
    assert cells["plain-20"] == ["-"] * (len(columns) - 1)
    assert cells["plain-44"][0] == "2e+06" and cells["plain-44"][columns.index("ISONet without BN, lr 0.01") - 1] == "0.25"
    assert cells["plain-110"][0] == "5e+14" and cells["plain-110"][1:] == ["-"] * (len(columns) - 2)


def test_propagation_figure_draws_one_line_per_distinct_net(experiments, tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr("orthomod.report.propagation_figure", lambda nets, path: drawn.update(nets) or path)
    same = {"forward": [1.0, 2.0], "errors": [4.0, 1.0]}
    rows = {"ortho": same, "l2": {"forward": [1.0, 3.0], "errors": [9.0, 1.0]}, "srip": dict(same), "tat": dict(same)}
    experiments.propagation_figure(rows, tmp_path / "p.png")
    assert list(drawn) == ["ortho, srip, tat", "l2"] and drawn["ortho, srip, tat"] == same
