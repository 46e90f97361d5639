"""The standalone proxy: ``gunicorn -c gunicorn.conf.py`` (and ``litefs-wsgi serve``) run as
subprocesses in front of a real WSGI app on 127.0.0.1, configured by a litefs.yml file."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import socket
import struct
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest
from fwd_client import chunks, header, request, txid_cookie
from proxy_target import GZIP_BODY, PATTERN, Target
from proxy_ws import GREETING, TEXT, Client, echo_server
from servers import free_port, listening, proxy_config, serve, standalone_proxy, wait_until

from litefs_wsgi.config import Config
from litefs_wsgi.proxy import make_application
from litefs_wsgi.testing import LiteFSMount

MB = 1024 * 1024


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    m = LiteFSMount(tmp_path_factory.mktemp("proxy") / "litefs")
    m.make_primary()
    m.set_position("app.db", 1)
    return m


@pytest.fixture(scope="module")
def target(mount):
    app = Target(mount)
    with serve(app) as url:
        app.port = urlsplit(url).port
        yield app


@pytest.fixture(scope="module")
def proxy(mount, target, tmp_path_factory):
    config = proxy_config(tmp_path_factory.mktemp("conf"), mount, f"127.0.0.1:{target.port}")
    with standalone_proxy(config, threads=8) as url:
        yield urlsplit(url).port


@pytest.fixture(scope="module")
def spliced_proxy(mount, target, tmp_path_factory):
    config = proxy_config(tmp_path_factory.mktemp("conf"), mount, f"127.0.0.1:{target.port}", splice="always")
    with standalone_proxy(config, threads=8) as url:
        yield urlsplit(url).port


@pytest.fixture(params=["copied", "spliced"])
def large_proxy(request):
    """The proxy as large answers leave it: to a client on 127.0.0.1 copied through gunicorn
    (``splice: remote``, the default), or by splice(2) (``splice: always``)."""
    return request.getfixturevalue("proxy" if request.param == "copied" else "spliced_proxy")


def report(port, method="POST", target="/echo", **kwargs) -> dict:
    status, _, body = request(port, method, target, **kwargs)
    assert status == 200, body
    return json.loads(body)


def test_upload_with_content_length(proxy, target, mount):
    data = os.urandom(8 * MB)
    status, headers, body = request(proxy, "POST", "/echo", body=data)
    assert status == 200
    got = json.loads(body)
    assert (got["body_len"], got["body_sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert header(got, "Content-Length") == [str(len(data))]
    # The proxy runs on the primary: the write gets the position after it.
    assert txid_cookie(headers) == mount.position("app.db")


def test_chunked_upload(proxy, target):
    data = os.urandom(6 * MB + 7)
    got = report(proxy, "PUT", "/echo", body=chunks(data), chunked=True)
    assert (got["body_len"], got["body_sha256"]) == (len(data), hashlib.sha256(data).hexdigest())


def test_download_streams_every_byte(proxy):
    size = 5 * MB + 3
    status, headers, body = request(proxy, "GET", f"/download?size={size}")
    assert status == 200
    assert len(body) == size
    assert body == (PATTERN * (size // len(PATTERN) + 1))[:size]
    assert "Set-Cookie" not in headers  # a read gets no cookie


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_large_downloads_on_one_kept_alive_connection_stay_in_step(large_proxy, framing):
    # Bodies this large are copied through gunicorn or, with a Content-Length and splice:
    # always, go from the target's socket to the client's by splice(2): each must end exactly
    # where it says, on both connections.
    query = "&length=1" if framing == "length" else ""
    conn = http.client.HTTPConnection("127.0.0.1", large_proxy, timeout=30)
    try:
        for size in (3 * MB + 1, 1 * MB, 2 * MB + 5):
            conn.request("GET", f"/download?size={size}{query}")
            response = conn.getresponse()
            body = response.read()
            assert (response.status, len(body)) == (200, size)
            assert body == (PATTERN * (size // len(PATTERN) + 1))[:size]
        conn.request("POST", "/body", body=b"after")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"after")
    finally:
        conn.close()


def test_clients_leaving_mid_download_free_the_workers_threads(large_proxy):
    # More clients than the worker has threads each leave a large download part way (a reset,
    # as a killed browser): each thread must end its copy (its send, or splice(2), to the
    # client's socket fails) and serve again, and the target's connection must be dropped, not
    # reused mid-body.
    proxy = large_proxy
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", proxy), timeout=30) as sock:
            sock.sendall(b"GET /download?size=%d&length=1 HTTP/1.1\r\nHost: x\r\n\r\n" % (64 * MB))
            got = 0
            while got < 512 * 1024:
                data = sock.recv(65536)
                assert data
                got += len(data)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    size = 3 * MB
    status, _, body = request(proxy, "GET", f"/download?size={size}")
    assert (status, body) == (200, (PATTERN * (size // len(PATTERN) + 1))[:size])


def test_binary_body_with_every_byte_value(proxy):
    data = bytes(range(256)) * 1024
    status, _, body = request(proxy, "POST", "/body", body=data)
    assert (status, body) == (200, data)


def test_two_set_cookie_headers_stay_apart(proxy, mount):
    status, headers, _ = request(proxy, "POST", "/cookies", body=b"")
    cookies = headers.get_all("Set-Cookie")
    assert "a=1; Path=/" in cookies and "b=2; HttpOnly; Path=/" in cookies
    assert len(cookies) == 3
    assert txid_cookie(headers) == mount.position("app.db")


def test_gzip_response_is_passed_through_untouched(proxy):
    status, headers, body = request(proxy, "GET", "/gzip", headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Length"] == str(len(GZIP_BODY))
    assert body == GZIP_BODY


def test_request_target_reaches_the_target_byte_for_byte(proxy, target):
    raw = "/echo/a%2Fb/c%20d?path=a%2Fb&q=hello%20world&plus=a+b&euro=%E2%82%AC&empty=&flag"
    assert report(proxy, "GET", raw)["raw_uri"] == raw


def test_redirect_is_relayed_not_followed(proxy, target):
    before = len(target.requests)
    status, headers, _ = request(proxy, "GET", "/redirect")
    assert (status, headers["Location"]) == (302, "/elsewhere")
    assert target.requests[before:] == ["GET /redirect"]


def test_a_targets_replay_signal_is_relayed_as_it_came(proxy, target):
    # ReplayOnPrimary's header means something only inside the middleware's own process: the
    # target's answer is relayed untouched, the request sent nowhere else.
    before = len(target.requests)
    status, headers, body = request(proxy, "GET", "/replay")
    assert (status, headers["X-LiteFS-Replay"], body) == (503, "1", b"must run on the primary")
    assert target.requests[before:] == ["GET /replay"]


def test_a_targets_replay_signal_on_a_passthrough_path_is_relayed_as_it_came(mount, target, tmp_path):
    # In-process a view's ReplayOnPrimary on a passthrough path is a 500 saying so; the
    # standalone proxy's target is another process, whose answer is relayed untouched there too.
    config = proxy_config(tmp_path, mount, f"127.0.0.1:{target.port}", passthrough='["/replay"]')
    with standalone_proxy(config) as url:
        status, headers, body = request(urlsplit(url).port, "GET", "/replay")
    assert (status, headers["X-LiteFS-Replay"], body) == (503, "1", b"must run on the primary")


def test_forwarded_headers_added_host_kept_nothing_else_added(proxy):
    got = report(proxy, "GET", "/echo", headers={"X-Forwarded-For": "203.0.113.9"})
    assert header(got, "Host") == [f"127.0.0.1:{proxy}"]
    assert header(got, "X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
    assert header(got, "X-Forwarded-Proto") == ["http"]
    assert header(got, "X-Forwarded-Host") == [f"127.0.0.1:{proxy}"]
    names = {name.lower() for name, _ in got["headers"]}
    assert not names & {"user-agent", "accept-encoding", "accept", "cookie", "x-litefs-forwarded"}


def test_hop_by_hop_headers_are_dropped_both_ways(proxy):
    got = report(
        proxy,
        "GET",
        "/echo",
        headers={"Connection": "X-Private", "X-Private": "1", "Keep-Alive": "timeout=5", "X-Kept": "1"},
    )
    names = {name.lower() for name, _ in got["headers"]}
    assert "x-private" not in names and "keep-alive" not in names
    assert header(got, "X-Kept") == ["1"]
    status, headers, body = request(proxy, "GET", "/hop")
    assert (status, body) == (200, b"hop")
    assert headers["X-Kept"] == "1"
    assert "X-Hop-Secret" not in headers


def test_no_cookie_leaks_between_clients(proxy):
    status, headers, _ = request(proxy, "POST", "/session?user=alice", body=b"")
    assert "session=alice; Path=/" in headers.get_all("Set-Cookie")
    for _ in range(3):
        _, _, body = request(proxy, "POST", "/session", body=b"")
        assert json.loads(body) == {"cookie": None}


def test_server_sent_events_arrive_one_by_one(proxy, target):
    conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=15)
    try:
        conn.request("GET", "/sse")
        response = conn.getresponse()
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        for n in range(len(target.gates) + 1):
            # The target sends event n+1 only after this one is read here: a proxy that
            # held the stream back would leave this read to time out.
            event = b""
            while not event.endswith(b"\n\n"):
                event += response.read1(1024)
            assert event == f"data: event {n}\n\n".encode()
            if n < len(target.gates):
                assert not target.gates[n].is_set()
                target.gates[n].set()
        assert response.read() == b""
    finally:
        conn.close()


# -- `litefs-wsgi serve`, with a target that is down, then restarting ---------------------


@contextlib.contextmanager
def litefs_wsgi_serve(config: str):
    port = free_port()
    # The console command of this Python's environment (a venv need not be activated).
    beside = os.path.join(os.path.dirname(sys.executable), "litefs-wsgi")
    command = [beside if os.path.exists(beside) else shutil.which("litefs-wsgi"), "serve", "--config", config]
    command += ["--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4"]
    with listening(command, port) as proc:
        yield port, proc


def logged(proc, line: bytes) -> bool:
    """The proxy logged ``line`` (with ``debug: true``, one line per routing decision)."""
    return any(line in logged_line for logged_line in list(proc.output))


def test_serve_retries_a_refused_connection_until_the_target_is_back(tmp_path, mount):
    target_port = free_port()
    config = proxy_config(tmp_path, mount, f"127.0.0.1:{target_port}", connect_timeout="20s", debug="true")
    app = Target(mount)
    with litefs_wsgi_serve(config) as (port, proc):
        with serve(app, target_port):
            assert request(port, "GET", "/echo")[0] == 200
        # The target is down (restarting): the proxy dials again every 100 ms.
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=request(port, "POST", "/echo", body=b"once")))
        thread.start()
        # The proxy logs its decision, then dials at once: its first dial is refused. (Only
        # nearly certain: nothing outside the proxy shows a refused dial. The 0.3 s more make it so.)
        wait_until(lambda: logged(proc, b"POST /echo: write on the primary"), 20, "the write to reach the proxy")
        time.sleep(0.3)
        assert "r" not in result
        with serve(app, target_port):
            thread.join(30)
        status, headers, body = result["r"]
        assert status == 200
        assert json.loads(body)["body_len"] == 4
        assert app.requests == ["GET /echo", "POST /echo"]  # sent once
        # A WebSocket upgrade waits for the target the same way.
        thread = threading.Thread(target=lambda: result.update(ws=Client.open(port)))
        thread.start()
        wait_until(lambda: logged(proc, b"GET /ws: read"), 20, "the upgrade to reach the proxy")
        time.sleep(0.3)
        assert "ws" not in result
        with echo_server(target_port) as echo:
            thread.join(30)
            ws = result["ws"]
            assert ws.status == 101
            assert ws.recv() == (TEXT, GREETING)
            ws.close()
            assert len(echo.heads) == 1


def test_serve_answers_502_when_the_target_stays_down(tmp_path, mount):
    target_port = free_port()
    config = proxy_config(tmp_path, mount, f"127.0.0.1:{target_port}", connect_timeout="500ms")
    with litefs_wsgi_serve(config) as (port, _proc):
        status, headers, body = request(port, "POST", "/echo", body=b"x")
        ws = Client.open(port)  # a WebSocket upgrade gets the same answer
    assert status == 502
    assert body == f"Proxy error: connection refused by 127.0.0.1:{target_port}\n".encode()
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert (ws.status, ws.body) == (502, body)


@pytest.mark.parametrize(("given", "used"), [(None, "remote"), ("always", "always"), ("never", "never")])
def test_the_proxy_splices_as_its_splice_option_says(mount, given, used):
    options = {} if given is None else {"splice": given}
    proxy = make_application(Config(db="app.db", mount_dir=mount.path, target="127.0.0.1:1", **options))
    assert proxy.forwarder.splice == used
