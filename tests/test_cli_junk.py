"""Every command's file arguments fed junk (a truncated GGUF, an empty file, a folder where a
file belongs, JSON where YAML belongs, binary bytes): one readable error, exit code 2, no traceback."""

import pytest
from typer.testing import CliRunner

from dmoe.base import resolve_base
from dmoe.cli import app


@pytest.fixture(scope="module")
def junk(tmp_path_factory):
    d = tmp_path_factory.mktemp("junk")
    (d / "trunc.gguf").write_bytes(resolve_base(None).path.read_bytes()[:4096])
    (d / "empty.gguf").write_bytes(b"")
    (d / "empty.yaml").write_text("")
    (d / "json.gguf").write_text('{"not": "gguf"}')
    (d / "config.json").write_text('{"model_name_or_path": "x"')  # cut JSON
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    (d / "folder").mkdir()
    (d / "notdir").write_text("a file where a folder belongs")
    return d


CASES = [
    ("generate hi --base {d}/trunc.gguf", "damaged or truncated GGUF"),
    ("generate hi --base {d}/empty.gguf", "is empty"),
    ("generate hi --base {d}/json.gguf", "not a GGUF file"),
    ("generate hi --base {d}/folder", "no config.json"),
    ("serve --base {d}/trunc.gguf --port 0", "damaged or truncated GGUF"),
    ("export base --base {d}/trunc.gguf", "damaged or truncated GGUF"),
    ("train {d}/empty.yaml", "empty"),
    ("train {d}/folder", "folder"),
    ("train {d}/config.json", "config.json"),
    ("train {d}/binary.yaml", "binary.yaml"),
    ("bench --questions {d}/binary.jsonl --url http://127.0.0.1:9", "binary.jsonl"),
    ("bench --questions {d}/folder --url http://127.0.0.1:9", "folder"),
    ("bench --questions {d}/empty.yaml --url http://127.0.0.1:9", "no questions"),
    ("route train --experts {d}/notdir", "notdir"),
    ("route query hi --experts {d}/folder", "no router"),
    ("experts list {d}/notdir", "notdir"),
    ("export {d}/folder", "folder"),
    ("moe generate {d}/trunc.gguf hi", "not a dmoe MoE directory"),
]


@pytest.mark.parametrize("args, words", CASES, ids=[c[0].replace("{d}/", "") for c in CASES])
def test_junk_files_give_one_readable_error(junk, args, words, dmoe_home):
    r = CliRunner().invoke(app, args.format(d=junk).split())
    flat = " ".join(r.output.split())
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and flat.count("error:") == 1, r.output
    assert words in flat, flat


def test_the_bundled_defaults_work_from_another_directory(tmp_path, monkeypatch):
    """No examples/ in the working directory: the checkout's experts and held-out questions are found."""
    from dmoe.paths import default_data_dir, default_experts_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DMOE_EXAMPLES", raising=False)
    monkeypatch.delenv("DMOE_EXPERTS", raising=False)
    assert (default_experts_dir() / "cooking" / "expert.yaml").is_file()
    assert (default_data_dir() / "heldout.jsonl").is_file()
    r = CliRunner().invoke(app, ["experts", "list"])
    assert r.exit_code == 0 and "cooking" in r.output, r.output
    monkeypatch.setenv("DMOE_EXPERTS", str(tmp_path))
    assert default_experts_dir() == tmp_path


def test_a_failed_training_run_leaves_no_empty_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("dataset: nothing\ndataset_dir: .\noutput_dir: runs/new/expert\nmax_steps: 1\n")
    (tmp_path / "runs").mkdir()  # the user's folder stays
    r = CliRunner().invoke(app, ["train", "bad.yaml"])
    assert r.exit_code == 2 and "dataset 'nothing'" in " ".join(r.output.split())
    assert (tmp_path / "runs").is_dir() and not (tmp_path / "runs" / "new").exists()


def test_experts_from_several_folders_for_every_command(tiny_base, tiny_experts, tmp_path, monkeypatch, dmoe_home):
    """--experts given twice (or $DMOE_EXPERTS with ':'): every folder's experts are listed,
    found by name and served; the same name in two folders is an error naming both."""
    import shutil

    from dmoe.runtime import ServeConfig, build_state

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_experts / "alpha", a / "alpha")
    shutil.copytree(tiny_experts / "beta", b / "beta")
    r = CliRunner().invoke(app, ["experts", "list", str(a), str(b)])
    assert r.exit_code == 0 and "alpha" in r.output and "beta" in r.output, r.output
    r = CliRunner().invoke(app, ["generate", "hi", "--base", str(tiny_base), "--expert", "beta", "--experts", str(a),
                                 "--experts", str(b), "--max-tokens", "2"])
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("DMOE_EXPERTS", f"{a}:{b}")
    r = CliRunner().invoke(app, ["generate", "hi", "--base", str(tiny_base), "--expert", "beta", "--max-tokens", "2"])
    assert r.exit_code == 0, r.output
    st = build_state(ServeConfig.make(base=str(tiny_base), experts_dir=a, more_experts=[b], max_batch=2, max_seq=64,
                                      max_loras=2, max_rank=8, use_router=False))
    assert sorted(st.engine.resident) == ["alpha", "beta"] and b in st.roots
    shutil.copytree(tiny_experts / "alpha", b / "alpha")
    r = CliRunner().invoke(app, ["experts", "list", str(a), str(b)])
    assert r.exit_code == 2 and "two experts are named 'alpha'" in " ".join(r.output.split())


def test_every_command_has_an_example_and_every_option_a_description():
    import click
    import typer

    root = typer.main.get_command(app)
    missing = []

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
            if not getattr(cmd, "invoke_without_command", False):
                return
        if path and "Example:" not in (cmd.help or ""):
            missing.append(f"{' '.join(path)}: no example")
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help" and not p.help:
                missing.append(f"{' '.join(path)} {p.opts[0]}: no description")

    walk(root, [])
    assert not missing, missing


def test_an_unknown_expert_is_reported_before_the_base_loads(tmp_path, monkeypatch):
    """A misspelt --expert is an error at once: the (slow) base is never loaded."""
    import dmoe.base

    def no_load(*a, **k):
        raise AssertionError("the base was loaded before the expert name was checked")

    monkeypatch.setattr(dmoe.base, "load_base", no_load)
    monkeypatch.setattr(dmoe.base, "load_tokenizer", no_load)
    (tmp_path / "e").mkdir()
    for cmd in (["generate", "hi"], ["chat"]):
        r = CliRunner().invoke(app, [*cmd, "--expert", "ghost", "--experts", str(tmp_path / "e")])
        assert r.exit_code == 2 and "unknown expert 'ghost'" in r.output, (cmd, r.output)


@pytest.mark.slow
def test_a_wheel_carries_the_bundled_defaults_and_an_install_finds_them(tmp_path, monkeypatch):
    """A non-editable install: the wheel holds the examples under share/dmoe/examples, and with
    no checkout and no ./examples, the defaults resolve there."""
    import subprocess
    import sys
    import zipfile

    from conftest import REPO
    from dmoe import paths

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(REPO)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("dmoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("examples/experts/cooking/expert.yaml", "examples/experts/cooking/adapter_model.safetensors",
                 "examples/experts/router/router.json", "examples/data/heldout.jsonl", "examples/configs/cooking.yaml"):
        assert any(n.endswith(f".data/data/share/dmoe/{want}") for n in names), want
    prefix = tmp_path / "prefix"
    (prefix / "share" / "dmoe" / "examples" / "experts").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DMOE_EXAMPLES", raising=False)
    monkeypatch.delenv("DMOE_EXPERTS", raising=False)
    monkeypatch.setattr(paths, "_checkout_examples", lambda: tmp_path / "no-checkout")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    assert paths.default_experts_dir() == prefix / "share" / "dmoe" / "examples" / "experts"


def test_the_base_comes_from_the_expert_cards_when_none_is_given():
    from types import SimpleNamespace

    from dmoe.base import BaseIdentity
    from dmoe.runtime import base_from_cards

    def expert(name):
        return SimpleNamespace(base=BaseIdentity(name, "x"))

    assert base_from_cards([expert("gemma-3-270m"), expert("gemma-3-270m")]) == "gemma-3-270m"
    assert base_from_cards([expert("SmolLM2-135M-Instruct")]) is None  # the default anyway
    assert base_from_cards([expert("gemma-3-270m"), expert("SmolLM2-135M-Instruct")]) is None  # mixed: check_base says which
    assert base_from_cards([]) is None
