"""dmoe bench against a live server on the tiny model: modes, counting, logs, errors."""

import json
import shutil

import pytest

from conftest import unused_port
from dmoe.evals.behaviour import BenchError, BenchRun, parse_mode, read_question_set
from dmoe.runtime import ServeConfig, build_state
from dmoe.serve.http import serve_in_thread


@pytest.fixture(scope="module")
def live(tiny_base, tiny_experts, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "experts"
    for name in ("alpha", "beta"):
        shutil.copytree(tiny_experts / name, root / name)
    st = build_state(ServeConfig.make(base=str(tiny_base), experts_dir=root, max_batch=4, max_seq=128))
    with serve_in_thread(st) as url:
        yield url, root


@pytest.fixture
def questions(tmp_path):
    rows = [{"question": "first question", "domain": "alpha", "expect": [".*"]},  # always a hit
            {"question": "second question", "domain": "alpha", "expect": "zzzq never"},  # never
            {"question": "an off-domain one", "domain": "none", "forbid": ["zzzq never"]}]
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_question_set(f, {})


def test_modes_are_counted_and_logged_and_errors_are_not_misses(live, questions, tmp_path):
    url, _ = live
    modes = [parse_mode(m) for m in ("vanilla", "expert:alpha", "blend:alpha=0.5+beta=0.5", "auto")]
    out = tmp_path / "run"
    summary = BenchRun(url, questions, modes, out, parallel=2, params={"max_tokens": 6, "temperature": 0.0}).run()
    assert summary["status"] == "complete"
    m = summary["modes"]
    for name in ("vanilla", "expert:alpha", "blend:alpha=0.5+beta=0.5"):
        assert m[name]["hits"]["alpha"]["hits"] == 1 and m[name]["hits"]["alpha"]["n"] == 2
        assert m[name]["bleed"] == {"hits": 0, "n": 1, "rate": 0.0, "ci95": [0.0, 0.793]}
        assert m[name]["errors"] == 0 and m[name]["mean_output_tokens"] == 6 and m[name]["tokens_per_s"] > 0
        assert m[name]["ttft_ms"]["p50"] > 0 and m[name]["latency_ms"]["p95"] >= m[name]["latency_ms"]["p50"]
    assert m["auto"]["routing_accuracy"]["n"] == 3 and m["auto"]["routing_accuracy"]["hits"] == 1  # no router: base
    assert m["expert:alpha"]["increase_vs_vanilla"] == {"alpha": 1.0}
    assert "Q: first question" in (out / "vanilla.log").read_text()
    rows = [json.loads(l) for l in (out / "comparison.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"vanilla", "auto", "expert:alpha"} <= set(rows[0])


def test_an_interrupted_run_keeps_what_it_has(live, questions, tmp_path):
    url, _ = live
    seen = []

    def stop_after_two(a):
        seen.append(a)
        if len(seen) == 2:
            raise KeyboardInterrupt

    run = BenchRun(url, questions, [parse_mode("vanilla")], tmp_path / "run", parallel=1, params={"max_tokens": 4})
    with pytest.raises(KeyboardInterrupt):
        run.run(on_answer=stop_after_two)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"].startswith("partial") and summary["modes"]["vanilla"]["answered"] == 2
    assert (tmp_path / "run" / "vanilla.log").read_text().count("Q: ") == 2


def test_failed_requests_are_counted_as_errors_not_misses(live, questions, tmp_path):
    url, _ = live
    summary = BenchRun(url, questions, [parse_mode("expert:beta")], tmp_path / "run", params={"max_tokens": 100_000}).run()
    assert summary["status"] == "complete, 3 requests failed"  # said at the top
    bad = summary["modes"]["expert:beta"]
    assert bad["errors"] == 3 and bad["answered"] == 0 and "400" in bad["error_examples"][0]
    assert bad["hits"] == {}  # errors are not misses
    assert "ERROR: HTTP 400" in (tmp_path / "run" / "expert-beta.log").read_text()


@pytest.mark.parametrize("mode, words", [
    ("expert:gardening", "does not serve gardening; it serves: alpha, auto, base, beta"),
    ("blend:alpha=0.5+nope=0.5", "does not serve nope"),
    ("lora:7=1", "no adapter id 7"),
])
def test_modes_the_endpoint_does_not_serve_are_refused_before_the_first_question(live, questions, tmp_path, mode, words):
    url, _ = live
    run = BenchRun(url, questions, [parse_mode("vanilla"), parse_mode(mode)], tmp_path / "run")
    with pytest.raises(BenchError, match=words):
        run.run()
    assert not (tmp_path / "run" / "vanilla.log").exists()  # nothing was asked


def test_unreachable_endpoint_is_a_clear_error(questions, tmp_path):
    run = BenchRun(f"http://127.0.0.1:{unused_port()}", questions, [parse_mode("vanilla")], tmp_path, timeout_s=2)
    with pytest.raises(BenchError, match="cannot reach an OpenAI-compatible endpoint"):
        run.run()


@pytest.mark.parametrize("line,msg", [("{not json", "not valid JSON"), ('{"domain": "x"}', "non-empty 'question'"),
                                      ('{"question": "q", "domain": "x"}', "no 'expect' regexes"),
                                      ('{"question": "q", "expect": "(["}', "regex")])
def test_malformed_question_file_names_the_line(tmp_path, line, msg):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "fine", "domain": "none"}) + "\n" + line + "\n")
    with pytest.raises(BenchError, match=f"q.jsonl:2: .*{msg}"):
        read_question_set(f, {})


def test_llama_server_lora_mode_and_no_think(live, questions, tmp_path):
    url, _ = live
    BenchRun(url, questions, [parse_mode("expert:alpha")], tmp_path / "a", params={"max_tokens": 5}).run()
    by_id = BenchRun(url, questions, [parse_mode("lora:0=1.0")], tmp_path / "b", params={"max_tokens": 5}).run()
    a = [json.loads(l)["expert:alpha"] for l in (tmp_path / "a" / "comparison.jsonl").read_text().splitlines()]
    b = [json.loads(l)["lora:0=1.0"] for l in (tmp_path / "b" / "comparison.jsonl").read_text().splitlines()]
    assert a == b and by_id["modes"]["lora:0=1.0"]["errors"] == 0  # id 0 is alpha: the same answers
    think = BenchRun(url, questions, [parse_mode("vanilla")], tmp_path / "c", params={"max_tokens": 5}, no_think=True).run()
    assert think["modes"]["vanilla"]["errors"] == 0


def test_modes_parse_or_say_how():
    assert parse_mode("blend:a=0.5+b=0.25").body == {"experts": [{"name": "a", "scale": 0.5}, {"name": "b", "scale": 0.25}]}
    assert parse_mode("lora:0=1+2=0.5").body == {"lora": [{"id": 0, "scale": 1.0}, {"id": 2, "scale": 0.5}]}
    with pytest.raises(BenchError, match="lora:ID=SCALE"):
        parse_mode("lora:x")
    with pytest.raises(BenchError, match="unknown mode"):
        parse_mode("lora")


def test_cli_bench_against_a_url(live, tmp_path):
    from typer.testing import CliRunner

    from dmoe.cli import app

    url, root = live
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "hi", "domain": "alpha", "expect": ".*"}) + "\n")
    r = CliRunner().invoke(app, ["bench", "--url", url, "--questions", str(q), "--modes", "vanilla,expert:beta",
                                 "--experts", str(root), "--out", str(tmp_path / "res"), "--run-id", "r1", "--max-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "=== ALPHA QUESTIONS (1) ===" in r.output and (tmp_path / "res" / "r1" / "summary.json").is_file()
    bad = CliRunner().invoke(app, ["bench", "--url", url, "--questions", str(tmp_path / "missing.jsonl")])
    assert bad.exit_code == 2 and "not found" in " ".join(bad.output.split())
    q.write_text("".join(json.dumps({"question": f"q{i}", "domain": d, "expect": ".*"}) + "\n"
                         for i in range(3) for d in ("alpha", "beta")))
    quick = CliRunner().invoke(app, ["bench", "--url", url, "--questions", str(q), "--modes", "vanilla", "--limit", "2",
                                     "--experts", str(root), "--out", str(tmp_path / "res"), "--run-id", "r2", "--max-tokens", "2"])
    assert quick.exit_code == 0, quick.output
    summary = json.loads((tmp_path / "res" / "r2" / "summary.json").read_text())
    assert summary["questions"] == 4 and summary["modes"]["vanilla"]["answered"] == 4  # --limit 2 per domain
    failed = CliRunner().invoke(app, ["bench", "--url", url, "--questions", str(q), "--modes", "vanilla", "--limit", "1",
                                      "--experts", str(root), "--out", str(tmp_path / "res"), "--max-tokens", "100000"])
    assert failed.exit_code == 1 and "2 requests failed" in failed.output  # failures are not a clean exit


def test_report_and_compare(live, questions, tmp_path):
    from dmoe.evals.report import compare_runs, write_report

    url, _ = live
    for run, n in (("a", 4), ("b", 6)):
        BenchRun(url, questions, [parse_mode("vanilla"), parse_mode("expert:alpha")], tmp_path / run,
                 params={"max_tokens": n}).run()
    page = write_report(tmp_path / "a").read_text()
    assert page.count("data:image/png;base64,") == 4 and "first question" in page and "expert:alpha" in page
    assert "<script" not in page  # self-contained, static
    rows = compare_runs(tmp_path / "a", tmp_path / "b")
    speed = next(r for r in rows if r["mode"] == "vanilla" and r["metric"] == "tokens/s")
    assert speed["a"] > 0 and speed["b"] > 0
    hits = next(r for r in rows if r["mode"] == "expert:alpha" and r["metric"] == "hits alpha")
    assert hits["a"] == hits["b"] == "1/2" and hits["delta"] == 0
    from typer.testing import CliRunner

    from dmoe.cli import app

    out = CliRunner().invoke(app, ["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert out.exit_code == 0 and "tokens/s" in out.output
    with pytest.raises(BenchError, match="summary.json is missing"):
        compare_runs(tmp_path / "a", tmp_path / "nothing")


def test_a_connection_closed_before_any_response_is_retried_and_nothing_else_is():
    """llama-server closes idle kept-alive connections: a request that met one got no response
    and is sent again (twice at most); an HTTP error status is an answer and is not retried."""
    import httpx

    from dmoe.evals.behaviour import Question, ask

    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        body = 'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: [DONE]\n\n'
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    q = Question("q", "none")
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        a = ask(client, "http://x", parse_mode("vanilla"), 0, q, {})
    assert a.error is None and a.text == "hi" and len(calls) == 2
    with httpx.Client(transport=httpx.MockTransport(lambda r: (calls.append(1), httpx.Response(503, text="busy"))[1])) as client:
        calls.clear()
        a = ask(client, "http://x", parse_mode("vanilla"), 0, q, {})
    assert a.error == "HTTP 503: busy" and len(calls) == 1

    def always_closed(request):
        calls.append(1)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    calls.clear()
    with httpx.Client(transport=httpx.MockTransport(always_closed)) as client:
        a = ask(client, "http://x", parse_mode("vanilla"), 0, q, {})
    assert a.error.startswith("RemoteProtocolError") and len(calls) == 3
