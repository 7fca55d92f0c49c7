import json

import pytest

from conftest import write_jsonl
from dmoe.data import DatasetError, load_conversations, load_dataset_info
from dmoe.data.formats import parse_alpaca, parse_sharegpt, read_rows


def test_alpaca_joins_instruction_and_input_and_keeps_history():
    conv = parse_alpaca(
        {"instruction": "Translate", "input": "hello", "output": "hola", "system": "be brief", "history": [["hi", "hey"]]},
        "f: row 0",
    )
    assert conv.system == "be brief"
    assert conv.turns == [("hi", "hey"), ("Translate\nhello", "hola")]


def test_sharegpt_and_openai_messages():
    sg = parse_sharegpt({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "w")
    oa = parse_sharegpt({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "w")
    assert sg.system == "S" and sg.turns == [("q", "a")]
    assert oa.system is None and oa.turns == [("q", "a")]


@pytest.mark.parametrize(
    "row, field",
    [
        ({"input": "x", "output": "y"}, "instruction"),  # missing column
        ({"instruction": "q", "output": "   "}, "output"),  # empty output
        ({"instruction": "q", "output": 3}, "output"),  # wrong type
        ({"instruction": "q", "output": "a", "history": "nope"}, "history"),
    ],
)
def test_alpaca_errors_name_file_row_and_field(tmp_path, row, field):
    rows = [{"instruction": "ok", "output": "fine"}, row]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl"}}))
    with pytest.raises(DatasetError) as exc:
        load_conversations(["d"], tmp_path)
    msg = str(exc.value)
    assert f"{path}:2:" in msg and f"'{field}" in msg  # the file's line, 1-based, as editors show it


def test_row_errors_and_json_errors_number_lines_the_same_way(tmp_path):
    """A blank line and a bad row: the row error names the file line an editor shows."""
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n{oops\n')
    with pytest.raises(DatasetError, match=r"d.jsonl:4: line 4 is not valid JSON"):
        load_conversations(["d.jsonl"], tmp_path)
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n')
    with pytest.raises(DatasetError, match=r"d.jsonl:3: missing field 'output'"):
        load_conversations(["d.jsonl"], tmp_path)
    (tmp_path / "l.json").write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]')
    with pytest.raises(DatasetError, match=r"l.json: item 2: missing field 'output'"):
        load_conversations(["l.json"], tmp_path)


def test_a_missing_dataset_dir_or_registry_says_so(tmp_path):
    with pytest.raises(DatasetError, match="dataset_dir .*nowhere does not exist"):
        load_conversations(["d"], tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="dataset_info.json does not exist"):
        load_conversations(["d"], tmp_path)


def test_sharegpt_errors():
    with pytest.raises(DatasetError, match="unknown role 'bot'"):
        parse_sharegpt({"conversations": [{"from": "bot", "value": "x"}]}, "w")
    with pytest.raises(DatasetError, match="last message must be the assistant"):
        parse_sharegpt({"messages": [{"role": "user", "content": "q"}]}, "w")
    with pytest.raises(DatasetError, match="two user messages"):
        parse_sharegpt({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}, "w")


def test_unknown_formatting_in_registry(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", "formatting": "csv"}}))
    with pytest.raises(DatasetError, match="unknown formatting 'csv'"):
        load_dataset_info(tmp_path)


def test_registry_columns_tags_num_samples_and_json_list(tmp_path):
    rows = [{"chat": [{"speaker": "me", "text": f"q{i}"}, {"speaker": "bot", "text": f"a{i}"}]} for i in range(5)]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    info = {
        "custom": {
            "file_name": "c.json", "formatting": "sharegpt", "columns": {"messages": "chat"},
            "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"},
            "num_samples": 3, "split": "train",
        }
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    convs = load_conversations(["custom"], tmp_path, seed=1)
    assert len(convs) == 3
    assert all(c.turns[0][0].startswith("q") for c in convs)


def test_unregistered_file_is_read_with_guessed_format_and_max_samples(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)])
    convs = load_conversations(["x.jsonl"], tmp_path, max_samples=4)
    assert [c.turns[0] for c in convs] == [(f"q{i}", f"a{i}") for i in range(4)]


def test_unknown_dataset_lists_registered(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"alpha": {"file_name": "a.json"}}))
    with pytest.raises(DatasetError, match="registered: alpha"):
        load_conversations(["beta"], tmp_path)


def test_hub_datasets_are_refused(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"h": {"file_name": "x", "hf_hub_url": "org/data"}}))
    with pytest.raises(DatasetError, match="never downloads"):
        load_conversations(["h"], tmp_path)


def test_bad_json_lines_are_located(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(DatasetError, match="line 2"):
        read_rows(p)
