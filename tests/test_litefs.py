"""Against a real LiteFS cluster: the cookie is the primary's position, reads wait for real
replication, health from the real ``.lag``, positions and the primary from the real ``/events``,
and the mount check on a real FUSE mount and on the mount point LiteFS leaves.

The fixture ``litefs`` (conftest.py) runs two LiteFS nodes on 127.0.0.1 with the app of
tests/litefs_app.py on each; these tests skip without a litefs binary or FUSE.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import uuid
from http.cookies import SimpleCookie

import pytest
import yaml
from litefs_cluster import LiteFSNode, create_schema, mounted, wait_for
from servers import form_request, recording_app
from werkzeug.test import Client

import litefs_wsgi.node as node_module
from litefs_wsgi import LiteFSMiddleware, events
from litefs_wsgi.node import Node, litefs_mounts, mount_problem
from litefs_wsgi.watcher import Watcher

pytestmark = [pytest.mark.litefs, pytest.mark.timeout(120)]


def txid_of(headers) -> int:
    cookies = SimpleCookie()
    for value in headers.get_all("Set-Cookie") or []:
        cookies.load(value)
    return int(cookies["__txid"].value, 16)


def write(url: str, wid: str | None = None) -> tuple[str, int, dict]:
    """POST a new row through ``url``; (its wid, the TXID of the answer's cookie, the answer's JSON)."""
    wid = wid or uuid.uuid4().hex
    status, headers, text = form_request(url, "POST", "/rows", body=f"wid={wid}")
    assert status == 201, (status, text)
    return wid, txid_of(headers), json.loads(text)


def read(url: str, wid: str, txid: int | None = None) -> tuple[int, str]:
    cookie = f"__txid={txid:016x}" if txid else None
    status, _headers, text = form_request(url, "GET", f"/rows/{wid}", cookie=cookie)
    return status, text


def test_the_cookie_of_a_write_is_the_primarys_position(litefs):
    primary, replica = litefs.primary, litefs.replica
    for url in (primary.app_url, replica.app_url):  # on the primary; from the replica, forwarded
        before = primary.pos()
        _wid, txid, answer = write(url)
        assert answer["node"] == primary.name  # applied on the primary in both cases
        assert txid == primary.pos() == before + 1


def test_without_litefs_wsgi_a_replica_read_is_stale(litefs):
    primary, replica = litefs.primary, litefs.replica
    primary.relay.delay = 1.0  # the replica replicates through it: a second behind
    for _attempt in range(3):
        wid, txid, _ = write(primary.app_url)
        status, text = read(replica.raw_url, wid, txid)  # the bare app: the cookie means nothing
        if (replica.pos() or 0) < txid:
            break  # still not replicated after the answer: the read was certainly served before
    else:
        pytest.fail("the replica kept up with a 1 s slower link: the machine is too slow for this test")
    assert status == 404, text
    assert json.loads(text)["found"] == 0  # stale: the client does not see its own write
    litefs.wait_replicated(txid)
    assert read(replica.raw_url, wid)[0] == 200  # it was only late


def test_with_litefs_wsgi_a_replica_read_waits_for_real_replication(litefs):
    primary, replica = litefs.primary, litefs.replica
    primary.relay.delay = 0.5
    waited = 0
    for url in (primary.app_url, replica.app_url, replica.app_url):
        wid, txid, _ = write(url)
        waited += (replica.pos() or 0) < txid
        status, text = read(replica.app_url, wid, txid)
        assert status == 200, text
        assert json.loads(text) == {"wid": wid, "found": 1, "written_on": primary.name, "served_by": replica.name}
    assert waited  # the replica was behind when the read came, at least once: it did wait


def test_many_clients_reading_their_writes_on_a_lagging_replica_never_see_stale_data(litefs):
    primary, replica = litefs.primary, litefs.replica
    primary.relay.delay = 0.2

    def client(n: int) -> list[int]:
        statuses = []
        for _ in range(4):
            wid, txid, _ = write(replica.app_url if n % 2 else primary.app_url)
            statuses.append(read(replica.app_url, wid, txid)[0])
        return statuses

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = [s for result in pool.map(client, range(8)) for s in result]
    assert statuses == [200] * 32


def test_health_from_the_real_lag(litefs):
    primary, replica = litefs.primary, litefs.replica
    assert form_request(primary.app_url, "GET", "/litefs/health")[::2] == (200, "OK\n")
    wait_for(lambda: (replica.lag() or 0) < 1500, 20, "the replica's .lag under 1.5 s")
    assert form_request(replica.app_url, "GET", "/litefs/health")[::2] == (200, "OK\n")
    primary.relay.pause()  # nothing from the primary, not even its heartbeats: .lag grows
    wait_for(lambda: (replica.lag() or 0) > 3000, 20, "the replica's .lag over 3 s (max_lag 2 s)")
    assert form_request(replica.app_url, "GET", "/litefs/health")[::2] == (503, "Replication lag exceeded\n")
    assert form_request(primary.app_url, "GET", "/litefs/health")[::2] == (200, "OK\n")
    primary.relay.resume()
    wait_for(lambda: (replica.lag() or 0) < 1500, 20, "the replica's .lag back under 1.5 s")
    assert form_request(replica.app_url, "GET", "/litefs/health")[::2] == (200, "OK\n")


@pytest.fixture
def watchers(litefs):
    made = []

    def make(node, api_url):
        watcher = Watcher(Node(str(node.fuse_dir)), api_url=api_url)
        made.append(watcher)
        return watcher

    yield make
    for watcher in made:
        watcher.close()


def test_positions_and_the_primary_from_the_real_event_stream(litefs, watchers):
    primary, replica = litefs.primary, litefs.replica
    on_primary, on_replica = watchers(primary, primary.api_url), watchers(replica, replica.api_url)
    wait_for(lambda: on_primary.events.connected and on_replica.events.connected, 20, "both event streams")
    assert on_primary.role() == (True, None)
    assert on_replica.role() == (False, primary.hostname)  # from the init event, as .primary says
    assert replica.primary_file() == primary.hostname

    primary.relay.delay = 0.5
    _wid, txid, _ = write(primary.app_url)
    wait_for(lambda: on_primary.events.txids.get("app.db") == txid, 20, "the tx event on the primary")
    assert on_replica.wait({"app.db": txid}, 10)
    # The replica's own tx event comes once the transaction is applied there: the file shows it.
    wait_for(lambda: on_replica.events.txids.get("app.db") == txid, 10, "the tx event on the replica")
    assert replica.pos() >= txid


def test_the_real_event_stream_idle_past_the_init_timeout_stays_connected(litefs, watchers, monkeypatch, caplog):
    # The read timeout holds until LiteFS's init event only: then its socket waits without
    # one, however LiteFS frames the answer (the timeout is lifted on the socket under it).
    monkeypatch.setattr(events, "INIT_TIMEOUT", 0.5)
    with caplog.at_level(logging.WARNING, logger="litefs_wsgi"):
        watcher = watchers(litefs.replica, litefs.replica.api_url)
        wait_for(lambda: watcher.events.connected, 20, "the event stream")
        fd = watcher.events._response.fileno()
        assert os.get_blocking(fd)  # no timeout left: CPython puts a socket with one in non-blocking mode
        stream = watcher.events._response
        threading.Event().wait(2.0)  # idle: four times the init timeout
        assert watcher.events.connected and watcher.events._response is stream  # the same connection
    assert not [r for r in caplog.records if "event stream" in r.getMessage()]


def test_the_mount_check_on_a_real_mount_and_on_the_mount_point_litefs_left(tmp_path, caplog):
    node = LiteFSNode(tmp_path, "solo")  # a node of its own: the shared cluster keeps running
    node.configure(node)
    calls: list[str] = []
    mount_dir = str(node.fuse_dir)
    try:
        node.start()
        node.wait_ready(node)
        assert mount_problem(mount_dir) is None
        assert mount_dir in litefs_mounts()
        with caplog.at_level(logging.WARNING, "litefs_wsgi"):
            client = Client(
                LiteFSMiddleware(recording_app(calls), db="app.db", mount_dir=mount_dir, require_mount=True)
            )
        assert not [r for r in caplog.records if "not mounted" in r.getMessage()]
        assert client.post("/rows").status_code == 200
        assert client.get("/litefs/health").status_code == 200

        node.stop()  # SIGTERM: LiteFS unmounts itself and leaves the empty mount point
        assert not mounted(mount_dir)
        assert mount_problem(mount_dir) == "it is empty (a mount point LiteFS has not mounted, or has left)"
        caplog.clear()
        with caplog.at_level(logging.WARNING, "litefs_wsgi"):
            LiteFSMiddleware(recording_app(calls), db="app.db", mount_dir=mount_dir)
        [warning] = [r.getMessage() for r in caplog.records if "not mounted" in r.getMessage()]
        assert warning.startswith(f"LiteFS is not mounted at {mount_dir} (mount_dir): it is empty")
        assert "This node acts as the primary" in warning
        # The middleware made while the mount was there notices it has gone (within STATE_TTL).
        refused = wait_for(lambda: (r := client.post("/rows")).status_code == 503 and r, 10, "writes refused")
        assert refused.get_data(as_text=True) == f"Proxy error: LiteFS is not mounted at {mount_dir}\n"
        assert client.get("/litefs/health").status_code == 503
        served = len(calls)

        node.start()
        node.wait_ready(node)
        wait_for(lambda: client.post("/rows").status_code == 200, 10, "writes served again")
        assert client.get("/litefs/health").status_code == 200
        assert len(calls) == served + 1  # nothing reached the app while the mount was gone
    finally:
        node.close()


def test_under_litefs_exec_positions_are_read_through_kept_descriptors_and_litefs_still_unmounts(tmp_path):
    # A descriptor kept open on the mount would keep LiteFS from unmounting (fusermount3:
    # "Device or resource busy"), unless the process holding it has exited first, as LiteFS's
    # exec: has when LiteFS unmounts. What LiteFS's own invalidation promises is checked too:
    # after each commit, the kept descriptor reads the same position as a fresh open.
    node = LiteFSNode(tmp_path, "solo")
    node.configure(node)
    report = tmp_path / "report.json"
    child = os.path.join(os.path.dirname(__file__), "pos_exec_child.py")
    config = yaml.safe_load(node.config_path.read_text())
    config["exec"] = [{"cmd": f"{sys.executable} {child} {node.fuse_dir} {report}"}]
    node.config_path.write_text(yaml.safe_dump(config))
    try:
        node.start()
        seen = json.loads(wait_for(lambda: report.exists() and report.read_text(), 60, "the exec child's report"))
        assert seen["keep_open"] is True  # it found `litefs mount` among its ancestors
        assert seen["kept"] == seen["opened"]  # never a stale position through the kept descriptor
        first = seen["kept"][0]
        assert seen["kept"] == list(range(first, first + len(seen["kept"])))  # one TXID per commit
        assert seen["descriptors"] >= 1  # kept (and any replaced one not closed yet), open while LiteFS runs

        node.proc.send_signal(signal.SIGTERM)  # LiteFS stops its exec child, then unmounts
        assert node.proc.wait(30) == 0, node.log_tail()
        assert "litefs shut down complete" in node.log_tail()
        assert not mounted(node.fuse_dir)  # by LiteFS itself: nothing here unmounted it
    finally:
        node.close()


def test_beside_litefs_writes_read_their_commit_through_a_kept_descriptor_and_litefs_still_unmounts(
    tmp_path, monkeypatch
):
    # By default, on LiteFS's mount: one pread per write. The descriptor is let go once the
    # app has been idle for IDLE_FOR, so LiteFS, stopped then, unmounts by itself (exit 0).
    # IDLE_FOR of two seconds: a busy machine's pause between writes is not idleness here.
    monkeypatch.setattr(node_module, "IDLE_FOR", 2.0)
    node = LiteFSNode(tmp_path, "solo")
    node.configure(node)
    mount_dir = str(node.fuse_dir)
    pos = os.path.realpath(os.path.join(mount_dir, "app.db-pos"))

    def kept() -> int:
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == pos for fd in os.listdir("/proc/self/fd"))

    def inserts(environ, start_response):
        with sqlite3.connect(os.path.join(mount_dir, "app.db")) as db:
            db.execute("INSERT INTO rows VALUES (?, 'a')", (uuid.uuid4().hex,))
        db.close()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    try:
        node.start()
        node.wait_ready(node)
        create_schema(node)
        middleware = LiteFSMiddleware(inserts, db="app.db", mount_dir=mount_dir, forward="http")
        assert middleware.watcher.node.keep_open is True  # LiteFS's own mount
        client = Client(middleware, use_cookies=False)
        for _ in range(5):
            cookie = SimpleCookie(client.post("/").headers["Set-Cookie"])
            assert int(cookie["__txid"].value, 16) == node.pos()  # the commit's, never the one before
            assert kept() == 1
        wait_for(lambda: kept() == 0, 10, "the idle descriptor let go")
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(30) == 0, node.log_tail()
        assert not mounted(node.fuse_dir)  # by LiteFS itself: nothing here unmounted it
    finally:
        node.close()


def test_keep_pos_open_false_opens_the_position_file_for_each_read(litefs):
    mount_dir = str(litefs.primary.fuse_dir)
    node = Node(mount_dir, keep_open=False)
    assert Node(mount_dir).keep_open is True  # what it is by default here
    assert node.txid("app.db") == litefs.primary.pos()
    pos = os.path.realpath(litefs.primary.fuse_dir / "app.db-pos")
    assert not [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == pos]
