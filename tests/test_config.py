from pathlib import Path

import pytest

from dmoe.config import ConfigError, ExpertCard, load_train_config, parse_override


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError) as exc:
        load_train_config(None, ["dataset=x", "lora_rnak=8"])
    assert "unknown key 'lora_rnak'" in str(exc.value)
    assert "did you mean 'lora_rank'" in str(exc.value)


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as exc:
        load_train_config(None, ["dataset=x", "zzzzqqq=1"])
    assert "unknown key 'zzzzqqq'" in str(exc.value)
    assert "did you mean" not in str(exc.value)


def test_llamafactory_defaults_and_types(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    # LlamaFactory configs write 2e-4, which YAML 1.1 reads as a string
    cfg_file.write_text("stage: sft\ndo_train: true\ndataset: a, b\nlora_rank: 16\nlearning_rate: 2e-4\nlora_target: q_proj,v_proj\n")
    cfg = load_train_config(cfg_file)
    assert cfg.datasets == ["a", "b"]
    assert cfg.alpha == 32.0  # 2 x rank by default
    assert cfg.learning_rate == pytest.approx(2e-4)
    assert cfg.lora_target == ["q_proj", "v_proj"]
    assert cfg.train_on_prompt is False
    assert cfg._ignored_keys == ["do_train", "stage"]


def test_overrides_win_over_file(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("dataset: a\nnum_train_epochs: 3\n")
    cfg = load_train_config(cfg_file, ["num_train_epochs=1", "lora_alpha=7"])
    assert cfg.num_train_epochs == 1
    assert cfg.alpha == 7.0


@pytest.mark.parametrize(
    "override, field",
    [("lora_rank=0", "lora_rank"), ("learning_rate=fast", "learning_rate"), ("lr_scheduler_type=wobbly", "lr_scheduler_type"),
     ("finetuning_type=full", "finetuning_type"), ("lora_dropout=1.5", "lora_dropout")],
)
def test_bad_values_name_the_key(override, field):
    with pytest.raises(ConfigError) as exc:
        load_train_config(None, ["dataset=x", override])
    assert field in str(exc.value)


def test_missing_dataset_is_reported():
    with pytest.raises(ConfigError, match="dataset"):
        load_train_config(None, [])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config(bad)


def test_parse_override():
    assert parse_override("a=1") == ("a", 1)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[x, y]") == ("a", ["x", "y"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


def test_expert_card_name_is_validated():
    ExpertCard(name="automotive", base={"name": "b", "sha256": "0"})
    with pytest.raises(ValueError):
        ExpertCard(name="../etc", base={"name": "b", "sha256": "0"})


def test_relative_paths_in_a_config_resolve_from_its_folder_and_set_from_the_working_dir(tmp_path, monkeypatch):
    """LlamaFactory users run a config from anywhere: dataset_dir, output_dir, a model path and a
    dataset file written in the YAML resolve from the YAML's folder; --set values from the cwd."""
    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    (proj / "data").mkdir()
    (proj / "configs" / "mine.jsonl").write_text("{}\n")
    (proj / "configs" / "a.yaml").write_text("dataset: d\ndataset_dir: ../data\noutput_dir: ../out/x\n")
    (proj / "configs" / "b.yaml").write_text("dataset: mine.jsonl\nmodel_name_or_path: embedded\n")
    monkeypatch.chdir(proj)
    a = load_train_config(proj / "configs" / "a.yaml")
    assert (a.dataset_dir, a.output_dir) == ("data", "out/x")  # inside the cwd: relative to it
    b = load_train_config(proj / "configs" / "b.yaml")
    assert b.datasets == ["configs/mine.jsonl"] and b.model_name_or_path == "embedded"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    a = load_train_config(Path("../proj/configs/a.yaml"), ["output_dir=here"])
    assert a.dataset_dir == str(proj / "data") and a.output_dir == "here"  # outside the cwd: absolute; --set: as given
