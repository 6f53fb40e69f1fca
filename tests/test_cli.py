import json

import pytest

from conftest import tiny_config
from orthomod.cli import main
from orthomod.config import ConfigError, TrainConfig, list_presets, load_config_file
from orthomod.train import Trainer


def _error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("orthomod: error: ") and "\n" not in err and "Traceback" not in err
    return err


def _system_exit_error(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("orthomod: error: ") and "\n" not in err
    return err


def test_invalid_inputs_give_one_line_errors(tmp_path, capsys, monkeypatch):
    base = ["train", "--iterations", "2", "--out", str(tmp_path), "--no-progress"]
    assert "unknown model 'vgg16'" in _error(capsys, *base, "--model", "vgg16")
    assert "depth 45 is not valid" in _error(capsys, *base, "--model", "plain45")
    assert "lr must be > 0, got -0.1" in _error(capsys, *base, "--lr", "-0.1")
    assert "optimizer = 'sgdd' is not valid; choose one of sgd, nesterov" in _error(capsys, *base, "--optimizer", "sgdd")
    missing = tmp_path / "no-such-folder"
    err = _error(capsys, *base, "--dataset", "cifar10", "--data", str(missing))
    assert f"data folder {missing} does not exist" in err
    err = _error(capsys, *base, "--data", str(tmp_path))  # the default dataset, shapes, reads no folder
    assert "the shapes dataset is generated, not read; add --dataset cifar10" in err
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text('model = "plain8"\nlearning_rate = 0.1\n')
    assert f"unknown config key 'learning_rate' in {bad_key}" in _error(capsys, *base, "--config", str(bad_key))
    bad_type = tmp_path / "type.toml"
    bad_type.write_text('batch_size = "large"\n')
    assert "batch_size = 'large' has the wrong type; expected int" in _error(capsys, *base, "--config", str(bad_type))
    assert "neither a file nor a preset" in _error(capsys, *base, "--config", "no-such-preset")
    assert "no training length: give --epochs N or --iterations N, or a --config" in _error(
        capsys, "train", "--out", str(tmp_path))
    both = tmp_path / "both.toml"
    both.write_text("epochs = 2\niterations = 10\n")
    assert "give one of epochs or iterations, not both" in _error(capsys, "train", "--config", str(both))
    assert "unrecognized arguments: --depth" in _system_exit_error(capsys, *base, "--depth", "44")
    assert "invalid float value: 'fast'" in _system_exit_error(capsys, *base, "--lr", "fast")


def test_resume_and_eval_errors(tmp_path, capsys):
    assert "is not a run folder (no config.json)" in _error(capsys, "train", "--resume", str(tmp_path))
    Trainer(tiny_config(tmp_path, iterations=3), progress=False).run()
    capsys.readouterr()
    run = tmp_path / "run"
    assert "drop --lr" in _error(capsys, "train", "--resume", str(run), "--lr", "0.5")
    (run / "checkpoint.pt").write_bytes(b"garbage, not a checkpoint")
    err = _error(capsys, "train", "--resume", str(run), "--no-progress")
    assert f"checkpoint {run / 'checkpoint.pt'} is corrupt" in err
    assert "corrupt" in _error(capsys, "eval", str(run))
    assert "shapes dataset is generated" in _error(capsys, "eval", str(run), "--data", str(tmp_path))
    (run / "checkpoint.pt").unlink()  # a collected copy: the records without the weights
    assert f"no checkpoint at {run / 'checkpoint.pt'}; the run has not written one yet, or this folder holds " \
        "its records without its weights" in _error(capsys, "eval", str(run))


def test_flags_override_config_and_eval_reproduces_summary(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('model = "plain14"\ndataset = "shapes"\nshapes_train = 600\nshapes_test = 100\n'
                      'epochs = 100\nbatch_size = 50\nreg = "ortho"\ninit = "orthonormal"\n')
    code = main(["train", "--config", str(config), "--model", "plain8", "--iterations", "12", "--out", str(tmp_path),
                 "--name", "r", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["model"] == "plain8" and saved["iterations"] == 12 and saved["epochs"] is None
    assert saved["reg"] == "ortho" and saved["shapes_train"] == 600
    assert printed["status"] == "completed" and printed["step"] == 12
    assert main(["eval", str(tmp_path / "r")]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert result["step"] == 12 and result["test_acc"] == pytest.approx(summary["final_test_acc"])


def test_every_preset_is_a_valid_config(capsys):
    presets = list_presets()
    assert {"demo", "plain44-ortho", "plain44-l2", "plain110-ortho-mod", "plain110-ortho-mod-always",
            "resnet110-l2", "table2-plain110-adam", "table2-plain44-adadelta"} <= set(presets)
    for name, description in presets.items():
        assert description, name
        TrainConfig.from_dict(load_config_file(name)).validate()
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(presets) and listed[0].split()[0] == sorted(presets)[0]


def test_paper_presets_follow_the_protocol():
    for name in ("plain44-ortho", "plain110-l2", "table2-plain110-rmsprop"):
        c = TrainConfig.from_dict(load_config_file(name))
        assert (c.dataset, c.iterations, c.batch_size, c.augment, c.normalize) == ("cifar10", 64000, 128, "flip", "pixel")
        assert c.reg_coeff == 1e-4 and c.milestones == [0.5, 0.75]
    ortho = TrainConfig.from_dict(load_config_file("plain44-ortho"))
    assert (ortho.init, ortho.reg) == ("orthonormal", "ortho")


def test_train_config_resolves_flags_as_orthomod_train_does():
    from orthomod.cli import train_config

    c = train_config(["--config", "plain44-ortho", "--epochs", "10", "--reg", "conv-ortho", "--l2-beside", "1e-4"])
    assert (c.model, c.init, c.reg, c.l2_beside) == ("plain44", "orthonormal", "conv-ortho", 1e-4)
    assert (c.epochs, c.iterations) == (10.0, None)  # a budget flag replaces the preset's
    assert c.reg_coeff == 1e-4  # the preset's, validated
    assert train_config(["--iterations", "3"]).reg_coeff == 1e-4  # l2's default, filled in by validation
    with pytest.raises(ConfigError, match="l2_beside adds weight decay"):
        train_config(["--iterations", "3", "--l2-beside", "1e-4"])


def test_config_rejects_unknown_key_with_valid_list():
    with pytest.raises(ConfigError, match="unknown config key 'tau'.*valid keys: .*modulation_tau"):
        TrainConfig.from_dict({"tau": 2})


def test_every_config_key_has_one_flag_described_once():
    import dataclasses

    from orthomod.cli import _TRAIN_FLAGS, _parser

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    keys = [key for key, _, _ in _TRAIN_FLAGS.values()]
    assert sorted(keys) == sorted(fields) and len(set(keys)) == len(keys)
    for flag, (key, _, text) in _TRAIN_FLAGS.items():
        assert flag == "--" + key.replace("_", "-") and text == fields[key].metadata["help"] and text
    args = _parser().parse_args(["train", "--milestones", "0.4,0.8", "--shapes-train", "300", "--modulation-until",
                                 "always", "--decay-bn-bias", "on", "--iterations", "5"])
    assert args.milestones == [0.4, 0.8] and args.shapes_train == 300 and args.modulation_until is None
    assert args.decay_bn_bias is True and args.iterations == 5


def test_a_config_file_can_start_from_a_preset(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('base = "plain44-ortho"\nmodel = "plain56"\nlr = 0.05\n')
    values = load_config_file(str(mine))
    assert values == {"dataset": "cifar10", "iterations": 64000, "batch_size": 128, "optimizer": "sgd", "lr": 0.05,
                      "augment": "flip", "normalize": "pixel", "init": "orthonormal", "reg": "ortho",
                      "reg_coeff": 1e-4, "model": "plain56"}
    shorter = tmp_path / "shorter.toml"  # a budget replaces the base's budget of the other kind, as a flag does
    shorter.write_text('base = "plain44-ortho"\nepochs = 4\n')
    values = load_config_file(str(shorter))
    assert values["epochs"] == 4 and "iterations" not in values
    longer = tmp_path / "longer.toml"
    longer.write_text(f'base = "{shorter}"\niterations = 100\n')
    values = load_config_file(str(longer))
    assert values["iterations"] == 100 and "epochs" not in values
    loop = tmp_path / "loop.toml"
    loop.write_text(f'base = "{loop}"\n')
    with pytest.raises(ConfigError, match="is its own base"):
        load_config_file(str(loop))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('base = "plain45"\n')
    with pytest.raises(ConfigError, match="'plain45' is neither a file nor a preset"):
        load_config_file(str(unknown))


@pytest.mark.slow
def test_output_into_a_closed_pipe_is_no_traceback():
    import subprocess
    import sys

    # `true` exits before orthomod has started, so every write meets a closed pipe
    done = subprocess.run(f"{sys.executable} -m orthomod presets | true", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert done.stderr == ""  # (the exit status of a pipeline is that of `true`)
