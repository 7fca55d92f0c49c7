"""Limits and exposure: an oversized body is refused unread (413), a foreign Host is refused
(421, DNS rebinding), the count limits on messages and logit_bias hold, and slow clients
(slowloris) lose their connection instead of holding it."""

import socket

import httpx
import pytest

from dmoe.cli.serve import hosts_to_allow


@pytest.fixture(scope="module")
def srv(tiny_base, tiny_experts, dmoe_home):
    from dmoe.runtime import ServeConfig, build_state
    from dmoe.serve.http import ThreadedServer

    st = build_state(ServeConfig.make(base=str(tiny_base), experts_dir=tiny_experts, max_batch=2, max_seq=128,
                                      max_loras=4, max_rank=8, use_router=False, max_body_bytes=64 * 1024))
    with ThreadedServer(st) as s:
        yield s


def test_an_oversized_body_is_refused_before_it_is_read(srv):
    """The server answers 413 from Content-Length while the client still holds 63 of 64 MB
    unsent: it never read (or tokenised) the body."""
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {64 * 1024 * 1024}\r\n\r\n".encode() + b'{"messages": [' + b" " * 1024 * 1024)
        reply = s.recv(65536).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413") and "at most 65536" in reply, reply[:300]
    chunked = httpx.post(f"{srv.url}/v1/completions", content=iter([b'{"prompt": "', b"x" * 70_000, b'"}']), timeout=30)
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    assert httpx.get(f"{srv.url}/health").status_code == 200  # still serving


SLOW_S = 0.5  # the slow-client server's --client-timeout


@pytest.fixture(scope="module")
def slow_srv(tiny_base, tiny_experts, dmoe_home):
    """A server with a short client timeout; its engine pauses 3 timeouts at the 2nd step of
    the first request, so that request outlives the header deadline."""
    import time

    from conftest import StepHook
    from dmoe.runtime import ServeConfig, build_state
    from dmoe.serve.http import ThreadedServer

    st = build_state(ServeConfig.make(base=str(tiny_base), experts_dir=tiny_experts, max_batch=2, max_seq=128,
                                      max_loras=4, max_rank=8, use_router=False, client_timeout_s=SLOW_S))
    hook = StepHook(2, lambda: time.sleep(3 * SLOW_S))  # holds a request in flight, it times nothing
    with ThreadedServer(st, after_step=hook) as s:
        yield s


def _raw(url: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (30 s at most)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def test_slow_clients_lose_their_connection(slow_srv):
    """Headers that never finish, a body that never finishes, and a connection that sends
    nothing: each is closed by the server (recv returns), the body case with a 408."""
    host = slow_srv.url.removeprefix("http://")
    assert _raw(slow_srv.url, b"") == b""  # connected, silent: closed
    assert _raw(slow_srv.url, f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode()) == b""
    reply = _raw(slow_srv.url, f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                               f"Content-Length: 100\r\n\r\n{{\"prompt\": ".encode()).decode()
    assert reply.startswith("HTTP/1.1 408") and "--client-timeout" in reply, reply[:300]
    assert httpx.get(f"{slow_srv.url}/health").status_code == 200


def test_a_request_longer_than_the_client_timeout_is_not_cut(slow_srv):
    """The header deadline closes a connection only between requests: a generation that runs
    past it completes, and the same keep-alive connection then serves a second request."""
    with httpx.Client(base_url=slow_srv.url, timeout=60) as client:
        for _ in range(2):
            r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 6, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text


def test_idle_keep_alive_outlasts_the_clients_pool_expiry(srv):
    """A server that closes an idle connection when the client's pool does races it: the client
    sends on a closing connection and gets "Server disconnected" (a CI flake of
    bench/load_faults.py, whose admin client idles 5 s). httpx's and the OpenAI client's pools
    drop a connection after 5 s idle, aiohttp's after 15 s; the server keeps it longer, and
    the header deadline (--client-timeout) still bounds an idle connection."""
    import openai._constants

    expiries = [httpx.Limits().keepalive_expiry, openai._constants.DEFAULT_CONNECTION_LIMITS.keepalive_expiry, 15.0]
    keep_alive = srv.server.config.timeout_keep_alive
    assert keep_alive > max(expiries), (keep_alive, expiries)
    assert keep_alive < srv.state.client_timeout_s


def test_a_foreign_host_is_refused_and_loopback_names_are_served(srv):
    r = httpx.get(f"{srv.url}/v1/models", headers={"Host": "evil.example.com"})
    assert r.status_code == 421 and "DNS-rebinding" in r.json()["error"]["message"]
    port = srv.url.rsplit(":", 1)[1]
    for name in ("localhost", "127.0.0.1", f"localhost:{port}"):
        assert httpx.get(f"{srv.url}/v1/models", headers={"Host": name}).status_code == 200, name


def test_which_hosts_a_bind_address_accepts():
    assert "localhost" in hosts_to_allow("127.0.0.1", []) and "evil.example.com" not in hosts_to_allow("127.0.0.1", [])
    assert hosts_to_allow("0.0.0.0", []) is None  # public: the names clients use are unknown
    assert "dmoe.internal" in hosts_to_allow("0.0.0.0", ["dmoe.internal"])


def test_count_limits(srv):
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 600
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and "at most 1024 messages" in r.json()["error"]["message"]
    bias = {str(i): 1 for i in range(301)}
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 1, "logit_bias": bias}, timeout=30)
    assert r.status_code == 400 and "at most 300 tokens" in r.json()["error"]["message"]


def test_the_mcp_http_transport_refuses_a_foreign_host(tmp_path):
    """The MCP SDK's own DNS-rebinding protection stays on for dmoe mcp over HTTP on loopback."""
    import threading
    import time

    from conftest import unused_port
    from dmoe.mcp.server import build_mcp

    port = unused_port()
    mcp = build_mcp(experts_dir=tmp_path)
    threading.Thread(target=lambda: mcp.run("streamable-http", host="127.0.0.1", port=port), daemon=True).start()
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=2)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline
            time.sleep(0.1)  # waiting for a server thread to listen (bounded), not timing a test
    r = httpx.post(f"http://127.0.0.1:{port}/mcp", headers={"Host": "evil.example.com", "Content-Type": "application/json",
                                                              "Accept": "application/json, text/event-stream"},
                   json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert r.status_code in (403, 421), (r.status_code, r.text)


def test_a_public_bind_without_a_key_is_warned_about():
    from dmoe.cli.serve import exposure_warning

    assert "no API key" in exposure_warning("0.0.0.0", None) and "--api-key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "k") is None and exposure_warning("127.0.0.1", None) is None


def test_the_api_key_is_never_logged(make_state, tiny_experts, live_server, caplog):
    """With every dmoe and uvicorn logger at DEBUG, neither a wrong key nor the right one
    appears in the logs of a guarded request."""
    import logging

    key = "sk-dmoe-test-7f3a9c1e"
    st = make_state(tiny_experts, api_key=key)
    with caplog.at_level(logging.DEBUG), live_server(st) as srv:
        for given in (key, key + "x", "wrong"):
            r = httpx.post(f"{srv.url}/lora-adapters", json=[{"id": 0, "scale": 1.0}],
                           headers={"Authorization": f"Bearer {given}"})
            assert r.status_code == (200 if given == key else 401), r.text
    assert caplog.records and "sk-dmoe-test" not in caplog.text
