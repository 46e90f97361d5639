"""LiteFS's /events stream as the source of positions and of the primary, against a real HTTP server."""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import sys
import threading

import pytest
from servers import (
    Clock,
    FakeLiteFS,
    answers,
    free_port,
    in_thread,
    primary_change,
    recording_app,
    serve,
    tx_event,
    unreleased,
    wait_until,
)
from werkzeug.test import Client

from litefs_wsgi import LiteFSMiddleware, events
from litefs_wsgi.node import Node
from litefs_wsgi.testing import LiteFSMount
from litefs_wsgi.watcher import Watcher


@pytest.fixture
def litefs():
    with FakeLiteFS().running() as fake:
        yield fake


@pytest.fixture
def closing():
    """Close every Watcher (and its event thread) a test made."""
    made: list[Watcher] = []
    yield made.append
    for watcher in made:
        watcher.close()


def connected_watcher(mount: LiteFSMount, url: str, closing) -> Watcher:
    watcher = Watcher(Node(mount.path), api_url=url)
    closing(watcher)
    wait_until(lambda: watcher.events.connected, 10, "the init event")
    return watcher


def test_a_tx_event_wakes_a_waiter_while_the_pos_file_stays_behind(replica, litefs, closing):
    watcher = connected_watcher(replica, litefs.url, closing)
    assert watcher.role() == (False, "node-a")
    thread, result = in_thread(watcher.wait, {"app.db": 5}, 30)
    wait_until(lambda: watcher.waiting == 1, 10, "the waiter")
    with answers(watcher, "txid") as reads:
        litefs.send(tx_event("app.db", 4))  # not far enough
        litefs.send(tx_event("other.db", 9))  # another database
        wait_until(lambda: watcher.events.txids.get("other.db") == 9, 10, "the events")
        # Read three times: the watcher has weighed the waiter against TXID 4 at least once.
        wait_until(lambda: reads["app.db", 4] >= 3 or result, 10, "the watcher to read TXID 4")
    assert result == [] and unreleased(watcher) == [{"app.db": 5}]
    litefs.send(tx_event("app.db", 5))
    thread.join(20)
    assert result == [True]
    assert replica.position("app.db") == 1  # the file never moved: the event woke it
    assert watcher.txid("app.db") == 5
    replica.set_position("app.db", 9)  # the higher of the two wins
    assert watcher.txid("app.db") == 9


def test_events_that_are_not_lines_of_json_are_ignored(replica, litefs, closing):
    watcher = connected_watcher(replica, litefs.url, closing)
    litefs.send_raw(b"not json\n")
    litefs.send_raw(b'["a list"]\n')
    litefs.send_raw(b'{"type":"tx","db":"app.db","data":{"txID":"0x0000000000007"}}\n')
    litefs.send(tx_event("app.db", 3))
    wait_until(lambda: watcher.txid("app.db") == 3, 10, "the valid event after the garbage")
    assert watcher.events.connected


def test_a_dropped_stream_reconnects_and_reads_init_again(replica, litefs, closing):
    watcher = connected_watcher(replica, litefs.url, closing)
    assert litefs.connections == 1
    litefs.hostname = "node-b"  # a failover while the stream was down
    litefs.send(tx_event("app.db", 50))
    wait_until(lambda: watcher.txid("app.db") == 50, 10, "a tx on the first stream")
    litefs.drop()
    wait_until(lambda: litefs.connections == 2 and watcher.events.connected, 10, "a reconnect")
    wait_until(lambda: watcher.role() == (False, "node-b"), 10, "the new init")
    assert Node(replica.path).primary() == "node-a"  # the files still name the old one
    # A TXID from an earlier connection is not trusted: LiteFS may have restarted on a
    # restored database since. Until the next tx, the file decides.
    assert watcher.txid("app.db") == 1
    litefs.send(tx_event("app.db", 7))  # the new connection delivers positions
    wait_until(lambda: watcher.txid("app.db") == 7, 10, "a tx on the new stream")


def test_while_the_stream_is_down_the_files_decide(replica, closing):
    with FakeLiteFS(is_primary=True, hostname=None).running() as litefs:
        watcher = connected_watcher(replica, litefs.url, closing)
        assert watcher.role() == (True, None)  # the stream says so, whatever .primary says
        litefs.send(tx_event("app.db", 3))
        wait_until(lambda: watcher.txid("app.db") == 3, 10, "the tx event")
    wait_until(lambda: not watcher.events.connected, 10, "the stream to go down")
    assert watcher.role() == (False, "node-a")  # from .primary
    assert watcher.txid("app.db") == 1  # from app.db-pos, not the last tx event
    replica.make_primary()
    assert watcher.role(fresh=True) == (True, None)
    # Not trusted by a write without asking role(): the stream, once up again, says first.
    assert watcher.primary_until == float("-inf")
    replica.make_replica("node-a")
    # A waiter is still released by the file alone.
    thread, result = in_thread(watcher.wait, {"app.db": 4}, 30)
    wait_until(lambda: watcher.waiting == 1, 10, "the waiter")
    replica.set_position("app.db", 4)
    thread.join(20)
    assert result == [True]


def test_an_api_that_is_not_there_leaves_the_files_in_charge(replica, closing):
    watcher = Watcher(Node(replica.path), api_url=f"http://127.0.0.1:{free_port()}")
    closing(watcher)
    assert watcher.role() == (False, "node-a")
    thread, result = in_thread(watcher.wait, {"app.db": 2}, 30)
    wait_until(lambda: watcher.waiting == 1, 10, "the waiter")
    replica.set_position("app.db", 2)
    thread.join(20)
    assert result == [True] and not watcher.events.connected


@pytest.mark.parametrize("hostname", ["evil.example/x", "node-b\r\nSet-Cookie: a=b", "node b", "http://node-b", ""])
def test_a_hostname_that_is_not_a_plain_host_name_is_refused(replica, litefs, closing, hostname):
    watcher = connected_watcher(replica, litefs.url, closing)
    litefs.send(primary_change(False, "node-b"))
    wait_until(lambda: watcher.role() == (False, "node-b"), 10, "a valid primaryChange")
    litefs.send(primary_change(False, hostname))
    wait_until(lambda: watcher.role() != (False, "node-b"), 10, "the bad primaryChange")
    assert watcher.role() == (False, None)  # no primary known, never the bad name


def app_for(calls: list):
    """An app that records the methods it serves."""
    return recording_app(calls, b"written", "REQUEST_METHOD")


def middleware(mount: LiteFSMount, url: str, closing, app, **options) -> LiteFSMiddleware:
    options.setdefault("forward", "http")
    mw = LiteFSMiddleware(app, db="app.db", mount_dir=mount.path, api_url=url, **options)
    closing(mw.watcher)
    wait_until(lambda: mw.watcher.events.connected, 10, "the init event")
    return mw


def test_an_election_the_files_cannot_see_makes_a_write_wait_then_503(mount, closing):
    # No .primary: from the files alone this node is the primary and would take the write.
    mount.set_position("app.db", 3)
    calls: list = []
    with FakeLiteFS(is_primary=False, hostname=None).running() as litefs:
        mw = middleware(mount, litefs.url, closing, app_for(calls), primary_redirect_timeout=0.3)
        response = Client(mw).post("/items", data=b"x")
    assert response.status_code == 503
    assert response.get_data() == b"Proxy error: no primary available\n"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "Set-Cookie" not in response.headers
    assert calls == []


def test_an_event_with_a_bad_hostname_never_becomes_a_forwarding_target(replica, closing):
    calls: list = []
    with FakeLiteFS(is_primary=False, hostname="127.0.0.1/evil").running() as litefs:
        mw = middleware(replica, litefs.url, closing, app_for(calls), primary_redirect_timeout=0.3)
        response = Client(mw).post("/items", data=b"x")
    assert response.status_code == 503
    assert response.get_data() == b"Proxy error: no primary available\n"
    assert calls == []


def test_a_primary_change_in_time_lets_a_waiting_write_through_here(mount, closing):
    mount.set_position("app.db", 3)
    calls: list = []
    with FakeLiteFS(is_primary=False, hostname=None).running() as litefs:
        mw = middleware(mount, litefs.url, closing, app_for(calls), primary_redirect_timeout=30)
        with answers(mw.watcher, "role") as roles:
            thread, result = in_thread(lambda: Client(mw).post("/items", data=b"x"))
            # Told "no primary" three times and still no answer: the write waits for one.
            wait_until(lambda: roles[((False, None),)] >= 3 or result, 10, "the write to look for a primary")
            assert result == [] and calls == []
            litefs.send(primary_change(True))
            thread.join(20)
    response = result[0]
    assert response.status_code == 200 and response.get_data() == b"written"
    assert calls == ["POST"]
    assert "__txid=0000000000000003" in response.headers["Set-Cookie"]


def test_a_primary_change_in_time_lets_a_waiting_write_go_to_the_new_primary(mount, closing):
    # mount is a primary by its files, which would wrongly keep the write here.
    primary_calls: list = []
    local_calls: list = []
    with serve(app_for(primary_calls)) as primary_url, FakeLiteFS(is_primary=False, hostname=None).running() as litefs:
        port = primary_url.rsplit(":", 1)[1]
        mw = middleware(
            mount,
            litefs.url,
            closing,
            app_for(local_calls),
            primary_redirect_timeout=30,
            primary_url="http://{hostname}:" + port,
        )
        with answers(mw.watcher, "role") as roles:
            thread, result = in_thread(lambda: Client(mw).put("/items/1", data=b"x"))
            wait_until(lambda: roles[((False, None),)] >= 3 or result, 10, "the write to look for a primary")
            assert result == [] and primary_calls == local_calls == []
            litefs.send(primary_change(False, "127.0.0.1"))
            thread.join(20)
    response = result[0]
    assert response.status_code == 200 and response.get_data() == b"written"
    assert primary_calls == ["PUT"] and local_calls == []


def test_a_read_with_a_cookie_is_released_by_a_tx_event_through_the_middleware(replica, litefs, closing):
    calls: list = []
    mw = middleware(replica, litefs.url, closing, app_for(calls))
    client = Client(mw)
    client.set_cookie("__txid", "0000000000000006")
    thread, result = in_thread(client.get, "/items")
    wait_until(lambda: mw.watcher.waiting == 1, 10, "the read to wait")
    assert calls == []
    litefs.send(tx_event("app.db", 6))
    thread.join(20)
    assert result[0].status_code == 200 and calls == ["GET"]
    assert replica.position("app.db") == 1


def test_closing_a_watcher_ends_its_event_thread_on_an_idle_stream(replica, litefs):
    # LiteFS sends nothing while idle: close() must not wait for bytes that never come
    # (gunicorn's worker_exit calls it).
    watcher = Watcher(Node(replica.path), api_url=litefs.url)
    wait_until(lambda: watcher.events.connected, 10, "the init event")
    closer = threading.Thread(target=watcher.close, daemon=True)
    closer.start()
    closer.join(20)
    assert not closer.is_alive()
    wait_until(lambda: not watcher.events._thread.is_alive(), 10, "the event thread to end")


def test_closing_as_the_event_thread_closes_its_stream_raises_nothing(litefs):
    # The stream's thread may close its response (the stream ended) between close() looking
    # it up and asking for its socket: close() then holds a response that http.client has
    # closed, and once raised AttributeError at a test's teardown (gunicorn's worker_exit
    # calls it too). Here close() gets such a response: a real one, read and closed.
    import urllib3

    stream = events.EventStream(litefs.url, lambda: None)
    wait_until(lambda: stream.connected, 10, "the init event")
    with urllib3.PoolManager(retries=False, timeout=10) as http:
        done = http.request("GET", litefs.url + "/info", preload_content=False)
        done.read()
        done.close()
        stream._response = done
        stream.close()  # raises nothing
    litefs.drop()  # the live stream ends: the thread, told to stop, does
    wait_until(lambda: not stream._thread.is_alive(), 10, "the event thread to end")


def test_an_idle_stream_has_no_read_timeout_and_tcp_keepalive_instead(replica, litefs, closing):
    # LiteFS sends nothing while idle: a read timeout would drop a healthy stream every so
    # often, log a warning, and leave the files in charge meanwhile.
    watcher = connected_watcher(replica, litefs.url, closing)
    fd = watcher.events._response.fileno()
    assert os.get_blocking(fd)  # Python puts a socket with a timeout in non-blocking mode
    with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == events.KEEPALIVE_IDLE
    assert litefs.connections == 1


def test_a_snapshot_at_a_lower_txid_is_the_position_from_its_tx_event_on(replica, litefs, closing):
    # LiteFS sends a tx event after applying a snapshot too (a restore, or a replica that was
    # ahead of a new primary), at the lower TXID: from then on the event's TXID is that one,
    # not the highest seen, or cookies past the node's position would be served at once.
    replica.set_position("app.db", 100)
    watcher = connected_watcher(replica, litefs.url, closing)
    litefs.send(tx_event("app.db", 100))
    replica.set_position("app.db", 50)
    litefs.send(tx_event("app.db", 50))
    litefs.send(tx_event("sentinel.db", 1))  # events arrive in order: once it is in, so is 50
    wait_until(lambda: watcher.events.txids.get("sentinel.db") == 1, 10, "the events")
    assert watcher.events.txids["app.db"] == 50
    assert watcher.txid("app.db") == 50
    assert not watcher.reached({"app.db": 90})


def test_a_restore_told_by_a_tx_event_is_honoured_at_once_by_the_next_read(replica, litefs, closing):
    # A read served from the file keeps its Cookie header as reached for up to STATE_TTL; a
    # tx event below the stream's last one is a restore, which empties that memo at once.
    # The watcher's clock never moves here: only the event can make the read wait.
    replica.set_position("app.db", 10)
    mw = middleware(replica, litefs.url, closing, app_for([]), poll_timeout="20ms")
    mw.watcher.clock = Clock()
    client = Client(mw, use_cookies=False)
    cookie = {"Cookie": f"__txid={10:016x}"}
    assert client.get("/", headers=cookie).status_code == 200  # from the file: kept for this header
    assert client.get("/", headers=cookie).status_code == 200
    litefs.send(tx_event("app.db", 10))
    replica.set_position("app.db", 4)  # restored: LiteFS then sends the lower TXID
    litefs.send(tx_event("app.db", 4))
    litefs.send(tx_event("sentinel.db", 1))  # events arrive in order: once it is in, so is 4
    wait_until(lambda: mw.watcher.events.txids.get("sentinel.db") == 1, 10, "the events")
    assert client.get("/", headers=cookie).status_code == 504  # not served before TXID 10 again
    assert client.get("/", headers={"Cookie": f"__txid={4:016x}"}).status_code == 200


def test_a_write_after_a_snapshot_gets_the_position_it_wrote(mount, closing):
    mount.set_position("app.db", 100)

    def app(environ, start_response):
        mount.set_position("app.db", 51)  # the write commits TXID 51, on the restored database
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    with FakeLiteFS(is_primary=True, hostname=None).running() as primary_api:
        mw = middleware(mount, primary_api.url, closing, app)
        primary_api.send(tx_event("app.db", 100))
        mount.set_position("app.db", 50)
        primary_api.send(tx_event("app.db", 50))
        primary_api.send(tx_event("sentinel.db", 1))
        wait_until(lambda: mw.watcher.events.txids.get("sentinel.db") == 1, 10, "the events")
        cookie = Client(mw).post("/items").headers["Set-Cookie"]
    assert cookie.startswith(f"__txid={51:016x};")


def test_a_database_dropped_after_its_tx_events_has_nothing_to_wait_for(replica, litefs, closing):
    # LiteFS sends no event when a database is dropped: its -pos file going is the sign, as
    # without the stream (SPEC 2.4: no -pos file, the read is served at once).
    replica.set_position("app.db", 5)
    watcher = connected_watcher(replica, litefs.url, closing)
    litefs.send(tx_event("app.db", 5))
    wait_until(lambda: watcher.events.txids.get("app.db") == 5, 10, "the tx event")
    replica.remove_position("app.db")
    assert watcher.txid("app.db") is None
    assert watcher.wait({"app.db": 9}, 10)  # at once: before the fix, False after 10 s


def test_an_api_url_that_is_not_litefs_backs_off_and_is_one_warning(replica, closing, caplog):
    # api_url at the app itself, or any server answering every path with 200 and a page:
    # each answer ends cleanly, but none is LiteFS's stream (its first line is always init).
    hits: list = []

    def page(environ, start_response):
        hits.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "text/html")])
        return [b"<!doctype html>\n<html>\n<body>hello</body>\n</html>\n"]

    with caplog.at_level("DEBUG", logger="litefs_wsgi"), serve(page) as url:
        watcher = Watcher(Node(replica.path), api_url=url)
        closing(watcher)
        wait_until(lambda: hits, 10, "the first request")
        threading.Event().wait(2.0)
        watcher.close()
    # Backoff from 0.1 s doubling: connections at about 0, 0.1, 0.3, 0.7, 1.5 s.
    assert len(hits) <= 6, f"{len(hits)} connections in 2 s"
    assert not watcher.events.connected and watcher.role() == (False, "node-a")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert url in warnings[0].getMessage() and "init" in warnings[0].getMessage()


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that takes connections and answers ``head`` (the bytes its
    ``head`` list holds; none by default) to each request, then nothing more."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    head: list[bytes] = []
    held: list[socket.socket] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            held.append(conn)
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(65536)  # the request
                conn.sendall(b"".join(head))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", head, held
    stop.set()
    thread.join(5)
    listener.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize(
    "head, said",
    [
        ([], "no answer within 0.3 s"),
        (
            [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"],
            "no init event within 0.3 s",
        ),
    ],
)
def test_an_api_url_that_never_answers_is_a_warning_and_the_files_decide(
    replica, closing, caplog, monkeypatch, silent_server, head, said
):
    # A port that takes the connection and says nothing (a firewall's, a hung server's) or
    # an answer whose stream never starts: LiteFS writes init at once, so it is not LiteFS's
    # API. Before, no read timeout: the thread waited for ever, and nothing was said.
    url, sent, held = silent_server
    sent.extend(head)
    monkeypatch.setattr(events, "INIT_TIMEOUT", 0.3)
    with caplog.at_level("WARNING", logger="litefs_wsgi"):
        watcher = Watcher(Node(replica.path), api_url=url)
        closing(watcher)
        wait_until(lambda: any(said in r.getMessage() for r in caplog.records), 10, "the warning")
        wait_until(lambda: len(held) >= 2, 10, "a second try, after the backoff")
    warning = next(r.getMessage() for r in caplog.records if said in r.getMessage())
    assert url in warning and "api_url" in warning
    assert not watcher.events.connected and watcher.role() == (False, "node-a")


def test_a_stream_silent_longer_than_the_init_timeout_stays_connected(replica, litefs, closing, monkeypatch):
    # The timeout is for the answer and its init event only: after init, LiteFS is silent
    # while the cluster is idle.
    monkeypatch.setattr(events, "INIT_TIMEOUT", 0.3)
    watcher = connected_watcher(replica, litefs.url, closing)
    threading.Event().wait(1.5)
    assert watcher.events.connected and litefs.connections == 1
    litefs.send(tx_event("app.db", 7))
    wait_until(lambda: watcher.events.txids.get("app.db") == 7, 10, "the tx event")


def test_a_restore_told_while_a_read_stores_what_it_read_is_not_kept_over_it(replica, litefs, closing):
    # A read that read the file before a restore must not store that position once the
    # event thread has forgotten everything for the restore (Watcher.forget, on_restore), not
    # even when forget() runs between its "nothing forgotten since" check and its store: a
    # tracer holds the read just there, where a thread switch can fall.
    from litefs_wsgi import watcher as watcher_module

    lines = inspect.getsource(watcher_module).splitlines()
    check = next(n for n, line in enumerate(lines, 1) if "elif self._forgotten == forgotten:" in line)
    replica.set_position("app.db", 10)
    mw = middleware(replica, litefs.url, closing, app_for([]), poll_timeout="20ms")
    mw.watcher.clock = Clock()  # never moves: only the restore can make the read wait
    litefs.send(tx_event("app.db", 8))  # the files run ahead of the stream: the read reads the file
    wait_until(lambda: mw.watcher.events.txids.get("app.db") == 8, 10, "tx 8")
    cookie = {"Cookie": f"__txid={10:016x}"}
    at_store, release = threading.Event(), threading.Event()

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is watcher_module.Watcher.txid.__code__:
            return held
        return None

    def held(frame, event, arg):
        if event == "line" and frame.f_lineno == check + 1 and not at_store.is_set():
            at_store.set()  # the check passed
            release.wait(10)
        return held

    def read():
        sys.settrace(tracer)
        try:
            return Client(mw, use_cookies=False).get("/", headers=cookie).status_code
        finally:
            sys.settrace(None)

    thread, result = in_thread(read)
    assert at_store.wait(10)
    replica.set_position("app.db", 4)  # restored: LiteFS then sends the lower TXID
    litefs.send(tx_event("app.db", 4))
    litefs.send(tx_event("sentinel.db", 1))
    wait_until(lambda: mw.watcher.events.txids.get("sentinel.db") == 1, 10, "the events")
    release.set()
    thread.join(10)
    assert result == [200]  # it read TXID 10 before the restore: served, as it would have been
    assert Client(mw, use_cookies=False).get("/", headers=cookie).status_code == 504
