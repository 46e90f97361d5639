"""Writes on a replica reach the primary over HTTP: a replica's LiteFSMiddleware (under
gunicorn) forwarding to a primary process (gunicorn), both real Flask apps on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from urllib.parse import urlsplit

import pytest
from fwd_app import GZIP_BODY, create
from fwd_client import chunks, header, request, txid_cookie
from servers import NOT_PRIMARY, ROOT, free_port, gunicorn, serve

from litefs_wsgi.testing import LiteFSMount

TESTS = os.path.join(ROOT, "tests")
MB = 1024 * 1024


class Node:
    def __init__(self, port: int, mount: LiteFSMount, log: str) -> None:
        self.port, self.mount, self.log = port, mount, log

    def requests(self) -> list[str]:
        """Every request the node's app ran, as "METHOD TARGET"."""
        try:
            with open(self.log) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []


def app_env(mount: LiteFSMount, log: str, **options: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITEFS_", "FLY_"))}
    env.update({"FWD_MOUNT": mount.path, "FWD_LOG": log})
    env.update({"LITEFS_PROXY_" + k.upper(): v for k, v in options.items()})
    return env


@contextlib.contextmanager
def gunicorn_node(mount: LiteFSMount, log: str, port: int | None = None, **options: str):
    args = ["-w", "1", "--threads", "8", "--timeout", "60", "fwd_app:application"]
    with gunicorn(args, env=app_env(mount, log, **options), port=port, cwd=TESTS) as (url, _proc):
        yield Node(urlsplit(url).port, mount, log)


@pytest.fixture(scope="module")
def primary(tmp_path_factory):
    base = tmp_path_factory.mktemp("primary")
    mount = LiteFSMount(base / "litefs")
    mount.make_primary()
    with gunicorn_node(mount, str(base / "requests.log")) as node:
        yield node


@pytest.fixture(scope="module")
def replica(tmp_path_factory, primary):
    base = tmp_path_factory.mktemp("replica")
    mount = LiteFSMount(base / "litefs")
    mount.make_replica("127.0.0.1")
    url = f"http://{{hostname}}:{primary.port}"
    with gunicorn_node(
        mount, str(base / "requests.log"), primary_url=url, poll_timeout="2s", primary_redirect_timeout="1s"
    ) as node:
        yield node


def echo(port, method="POST", target="/echo", **kwargs) -> dict:
    status, _, body = request(port, method, target, **kwargs)
    assert status == 200, body
    return json.loads(body)


def test_upload_with_content_length_reaches_the_primary(primary, replica):
    data = os.urandom(6 * MB)
    status, headers, body = request(replica.port, "POST", "/echo", body=data)
    assert status == 200
    report = json.loads(body)
    assert report["primary"] is True
    assert (report["body_len"], report["body_sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    # The primary's __txid, set after its write, reaches the client through the replica.
    assert txid_cookie(headers) == primary.mount.position("app.db") > 0
    assert not any(line.startswith("POST") for line in replica.requests())


def test_chunked_upload_reaches_the_primary(primary, replica):
    data = os.urandom(5 * MB + 123)
    status, headers, body = request(replica.port, "PUT", "/echo", body=chunks(data), chunked=True)
    assert status == 200
    report = json.loads(body)
    assert (report["body_len"], report["body_sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert header(report, "Transfer-Encoding") == ["chunked"]
    assert header(report, "Content-Length") == []
    assert txid_cookie(headers) == primary.mount.position("app.db")


def test_binary_body_with_every_byte_value_both_ways(primary, replica):
    data = bytes(range(256)) * 4096 + b"\r\n\r\n0\r\n\x00"
    status, headers, body = request(
        replica.port, "POST", "/body", body=data, headers={"Content-Type": "application/octet-stream"}
    )
    assert status == 200
    assert body == data
    assert headers["Content-Length"] == str(len(data))


def test_two_set_cookie_headers_stay_apart(primary, replica):
    status, headers, _ = request(replica.port, "POST", "/cookies", body=b"")
    assert status == 200
    cookies = headers.get_all("Set-Cookie")
    assert "a=1; Path=/" in cookies
    assert "b=2; HttpOnly; Path=/" in cookies
    assert len(cookies) == 3  # and __txid, each its own header
    assert txid_cookie(headers) == primary.mount.position("app.db")


def test_gzip_response_is_passed_through_untouched(primary, replica):
    status, headers, body = request(replica.port, "POST", "/gzip", body=b"", headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert body == GZIP_BODY
    assert headers["Content-Length"] == str(len(GZIP_BODY))


def test_request_target_reaches_the_primary_byte_for_byte(primary, replica):
    target = "/echo/a%2Fb/c%20d?path=a%2Fb&q=hello%20world&plus=a+b&euro=%E2%82%AC&empty=&flag"
    report = echo(replica.port, target=target, body=b"")
    assert report["raw_uri"] == target
    assert report["query"] == target.split("?", 1)[1]


def test_redirect_is_relayed_not_followed(primary, replica):
    before = len(primary.requests())
    status, headers, _ = request(replica.port, "POST", "/redirect", body=b"")
    assert status == 302
    assert headers["Location"] == "/elsewhere"
    assert primary.requests()[before:] == ["POST /redirect"]


def test_forwarded_headers_added_and_host_kept(primary, replica):
    report = echo(replica.port, body=b"x", headers={"X-Forwarded-For": "203.0.113.9"})
    assert header(report, "Host") == [f"127.0.0.1:{replica.port}"]
    assert header(report, "X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
    assert header(report, "X-Forwarded-Proto") == ["http"]
    assert header(report, "X-Forwarded-Host") == [f"127.0.0.1:{replica.port}"]
    report = echo(replica.port, body=b"x")
    assert header(report, "X-Forwarded-For") == ["127.0.0.1"]


def test_hop_by_hop_headers_are_dropped(primary, replica):
    report = echo(
        replica.port,
        body=b"x",
        headers={
            "Connection": "keep-alive, X-Private",
            "X-Private": "only for the next hop",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Proxy-Connection": "keep-alive",
            "X-Kept": "yes",
        },
    )
    names = {name.lower() for name, _ in report["headers"]}
    assert not names & {"x-private", "keep-alive", "proxy-authorization", "proxy-connection"}
    assert header(report, "X-Kept") == ["yes"]
    assert "x-private" not in ",".join(header(report, "Connection")).lower()


def test_hop_marker_reaches_no_app(primary, replica):
    # The marker the replica adds is removed by the primary before its app sees it.
    report = echo(replica.port, body=b"x")
    assert "HTTP_X_LITEFS_FORWARDED" not in report["environ_keys"]
    # One sent by a client only makes a replica refuse to forward it.
    before = len(primary.requests())
    status, _, body = request(replica.port, "POST", "/echo", body=b"x", headers={"X-LiteFS-Forwarded": "1"})
    assert (status, body) == (503, NOT_PRIMARY)
    assert len(primary.requests()) == before


def test_no_header_is_added_to_the_forwarded_request(primary, replica):
    report = echo(replica.port, body=b"x")
    names = {name.lower() for name, _ in report["headers"]}
    assert not names & {"user-agent", "accept-encoding", "accept", "cookie", "authorization"}


def test_no_cookie_leaks_between_clients(primary, replica):
    status, headers, body = request(replica.port, "POST", "/session?user=alice", body=b"")
    assert status == 200
    assert "session=alice; Path=/" in headers.get_all("Set-Cookie")
    # A second client, without cookies: the forwarder must not send it alice's session.
    for _ in range(3):
        status, _, body = request(replica.port, "POST", "/session", body=b"")
        assert json.loads(body) == {"cookie": None}
    status, _, body = request(replica.port, "POST", "/session", body=b"", headers={"Cookie": "session=bob"})
    assert json.loads(body) == {"cookie": "session=bob"}


def test_fly_replay_answers_small_writes_with_the_header(primary, replica):
    before = len(primary.requests())
    status, headers, body = request(replica.port, "POST", "/fly/echo", body=b"small")
    assert (status, body) == (200, b"")
    assert headers["fly-replay"] == "instance=127.0.0.1"
    assert len(primary.requests()) == before


def test_fly_replay_falls_back_to_http_for_a_body_over_1mb(primary, replica):
    data = os.urandom(MB + MB // 2)
    status, headers, body = request(replica.port, "POST", "/fly/echo", body=data)
    assert status == 200
    assert "fly-replay" not in headers
    report = json.loads(body)
    assert (report["body_len"], report["body_sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert report["raw_uri"] == "/fly/echo"
    assert txid_cookie(headers) == primary.mount.position("app.db")


def test_fly_replay_falls_back_to_http_for_a_chunked_body(primary, replica):
    data = b"a small body, but chunked: its length is unknown up front"
    status, headers, body = request(replica.port, "POST", "/fly/echo", body=chunks(data, 10), chunked=True)
    assert status == 200
    assert "fly-replay" not in headers
    report = json.loads(body)
    assert report["body_sha256"] == hashlib.sha256(data).hexdigest()


def test_replay_on_primary_from_a_get_view(primary, replica):
    before = len(primary.requests())
    status, headers, body = request(replica.port, "GET", "/visit")
    assert (status, body) == (200, b"visited on the primary")
    assert txid_cookie(headers) == primary.mount.position("app.db")
    assert primary.requests()[before:] == ["GET /visit"]
    assert replica.requests()[-1] == "GET /visit"  # the replica's view ran first and asked


def test_is_primary_and_primary_hostname(primary, replica):
    assert echo(primary.port, "GET", "/whoami") == {"is_primary": True, "primary_hostname": None}
    assert echo(replica.port, "GET", "/whoami") == {"is_primary": False, "primary_hostname": "127.0.0.1"}


def test_read_after_the_forwarded_write_waits_for_the_replica(primary, replica):
    status, headers, _ = request(replica.port, "POST", "/echo", body=b"write")
    cookie = next(v.split(";")[0] for v in headers.get_all("Set-Cookie") if v.startswith("__txid="))
    replica.mount.set_position("app.db", txid_cookie(headers) - 1)
    status, _, body = request(replica.port, "GET", "/echo", headers={"Cookie": cookie})
    assert (status, body) == (504, b"Proxy timeout\n")  # the replica never caught up
    replica.mount.replicate(primary.mount, "app.db")
    report = echo(replica.port, "GET", "/echo", headers={"Cookie": cookie})
    assert report["primary"] is False


# -- replicas served in this process (werkzeug) -----------------------------------------


def test_primary_down_answers_502(tmp_path):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_replica("127.0.0.1")
    closed = free_port()
    app = create(mount.path, primary_url=f"http://{{hostname}}:{closed}", connect_timeout=0.3)
    with serve(app) as url:
        status, headers, body = request(urlsplit(url).port, "POST", "/echo", body=b"x")
    assert status == 502
    assert body.startswith(b"Proxy error: ") and b"refused" in body
    assert headers["Content-Type"] == "text/plain; charset=utf-8"


def test_two_replicas_naming_each_other_do_not_loop(tmp_path):
    ports = free_port(), free_port()
    nodes = []
    for name, own, other in (("a", ports[0], ports[1]), ("b", ports[1], ports[0])):
        mount = LiteFSMount(tmp_path / name)
        mount.make_replica(f"127.0.0.1:{other}")  # each thinks the other is the primary
        log = str(tmp_path / f"{name}.log")
        app = create(mount.path, log, primary_url="http://{hostname}", primary_redirect_timeout=1)
        nodes.append((own, app, log))
    with serve(nodes[0][1], nodes[0][0]), serve(nodes[1][1], nodes[1][0]):
        for port in ports:
            # A loop would run until the client's 30 s timeout fails the test.
            status, _, body = request(port, "POST", "/echo", body=b"x")
            assert (status, body) == (503, NOT_PRIMARY)  # the other node got it forwarded
    for _, _, log in nodes:
        assert not os.path.exists(log)  # no app ran the write
