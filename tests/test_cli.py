"""The CLI: bad input gives exit code 2 and one readable line."""

import json

from typer.testing import CliRunner

from dmoe.cli import app

runner = CliRunner()


def test_unknown_config_key_exits_2_with_suggestion(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: x\nlearning_rat: 1e-4\n")
    res = runner.invoke(app, ["train", str(cfg)])
    assert res.exit_code == 2
    assert "did you mean 'learning_rate'" in res.output
    assert "Traceback" not in res.output


def test_missing_dataset_file_exits_2(tmp_path, tiny_base):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_base}\ndataset: nothere\ndataset_dir: {tmp_path}\noutput_dir: {tmp_path / 'o'}\n")
    res = runner.invoke(app, ["train", str(cfg)])
    assert res.exit_code == 2
    assert "dataset 'nothere'" in res.output


def test_data_generate_and_experts_list(tmp_path):
    res = runner.invoke(app, ["data", "generate", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d" / "dataset_info.json").is_file()
    res = runner.invoke(app, ["experts", "list", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not found" in res.output


def test_experts_list_shows_trained_expert(tiny_train_cfg, tmp_path):
    from dmoe.config import load_train_config
    from dmoe.train import train

    train(load_train_config(None, tiny_train_cfg(tmp_path / "e" / "toy", max_steps=1)), show_progress=False)
    res = runner.invoke(app, ["experts", "list", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert "toy" in res.output


def test_generate_with_unknown_expert_is_an_error(tiny_base, tmp_path):
    (tmp_path / "experts").mkdir()
    res = runner.invoke(app, ["generate", "hi", "--base", str(tiny_base), "--expert", "ghost", "--experts", str(tmp_path / "experts")])
    assert res.exit_code == 2
    assert "unknown expert 'ghost'" in res.output


def test_generate_base_and_expert_json(tiny_train_cfg, tiny_base, tmp_path):
    from dmoe.config import load_train_config
    from dmoe.train import train

    train(load_train_config(None, tiny_train_cfg(tmp_path / "e" / "toy", max_steps=2)), show_progress=False)
    args = ["generate", "What car?", "--base", str(tiny_base), "--experts", str(tmp_path / "e"), "--max-tokens", "4", "--json"]
    base = runner.invoke(app, args)
    expert = runner.invoke(app, args + ["--expert", "toy"])
    assert base.exit_code == 0 and expert.exit_code == 0, base.output + expert.output
    assert json.loads(base.output.strip().splitlines()[-1])["expert"] is None
    assert json.loads(expert.output.strip().splitlines()[-1])["expert"] == "toy"
