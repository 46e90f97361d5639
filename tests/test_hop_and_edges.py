"""Edge cases found in review: the hop marker's limits, fork, unix sockets, bad upstream
headers, paths as UTF-8, and an event stream without chunked framing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from servers import NOT_PRIMARY, RawServer, in_thread, proxy_config, serve, standalone_proxy, stop, tx_event, wait_until
from werkzeug.test import Client

from litefs_wsgi import LiteFSMiddleware, ReplayOnPrimary
from litefs_wsgi.middleware import local_port
from litefs_wsgi.node import Node
from litefs_wsgi.testing import LiteFSMount
from litefs_wsgi.watcher import Watcher, get_watcher


def ok_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"served"]


def test_a_client_sent_hop_marker_does_not_turn_a_read_into_a_write(replica):
    app = LiteFSMiddleware(ok_app, db="app.db", mount_dir=replica.path, primary_redirect_timeout=3)
    response = Client(app).get("/", headers={"X-LiteFS-Forwarded": "1"})
    assert response.status_code == 200 and response.get_data() == b"served"


def test_a_client_sent_hop_marker_does_not_skip_the_read_wait_on_the_primary(mount):
    mount.set_position("app.db", 5)
    app = LiteFSMiddleware(ok_app, db="app.db", mount_dir=mount.path, poll_timeout="100ms")
    c = Client(app)
    c.set_cookie("__txid", "0000000000000009")
    response = c.get("/", headers={"X-LiteFS-Forwarded": "1"})
    assert response.status_code == 504 and response.get_data() == b"Proxy timeout\n"


def test_a_request_fly_replayed_here_is_not_replayed_again_by_replay_on_primary(replica):
    def view(environ, start_response):
        return ReplayOnPrimary()(environ, start_response)

    app = LiteFSMiddleware(
        view, db="app.db", mount_dir=replica.path, forward="fly-replay", primary_redirect_timeout="200ms"
    )
    response = Client(app).get("/login", headers={"Fly-Replay-Src": "instance=x;region=ord;t=1"})
    assert response.status_code == 503
    assert response.get_data() == NOT_PRIMARY
    assert "fly-replay" not in response.headers
    # Without the header, the same view is replayed on the primary.
    response = Client(app).get("/login")
    assert response.headers["fly-replay"] == "instance=node-a"


def test_the_port_of_a_request_comes_from_its_socket_never_from_the_host_header(tmp_path):
    # gunicorn's SERVER_PORT follows the client's Host header: under gunicorn only the socket
    # says, and a unix socket has no port at all.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s"))
        assert local_port({"gunicorn.socket": sock, "SERVER_PORT": "8080"}) is None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert local_port({"gunicorn.socket": sock, "SERVER_PORT": "80"}) == str(sock.getsockname()[1])
    # Other servers set SERVER_PORT to the port they listen on; anything but one is no port.
    assert local_port({"SERVER_PORT": "8080"}) == "8080"
    for bad in ("1@127.0.0.1", "", "0", "65536", "８０", "80/x"):
        assert local_port({"SERVER_PORT": bad}) is None, bad


class Listener(RawServer):
    """Records the first bytes of each connection and answers 200 ``listener``."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        super().__init__()

    def _connection(self, conn: socket.socket, number: int) -> None:
        with conn:
            conn.settimeout(10)
            self.received.append(conn.recv(65536))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nlistener\n")


def _post_on_unix_socket(path: str, host: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(20)
        client.connect(path)
        head = f"POST /write HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        client.sendall(head.encode())
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("fixed_url", [False, True])
def test_a_write_on_a_unix_socket_is_forwarded_only_where_primary_url_says(tmp_path, fixed_url):
    """gunicorn bound to a unix socket builds SERVER_PORT from the client's Host header: with
    {port} in primary_url, the client would choose where the write goes (a Host of
    ``x:PORT@127.0.0.1`` names another server). It is a 502 saying why; a primary_url with
    the port written in forwards it."""
    listener = Listener()
    mount = LiteFSMount(str(tmp_path / "replica"))
    mount.make_replica("127.0.0.1")
    sock_path = str(tmp_path / "g.sock")
    env = {**os.environ, "FWD_MOUNT": mount.path, "PYTHONPATH": os.path.dirname(__file__)}
    if fixed_url:
        env["LITEFS_PROXY_PRIMARY_URL"] = f"http://{{hostname}}:{listener.port}"
    command = [sys.executable, "-m", "gunicorn", "--bind", f"unix:{sock_path}", "-k", "gthread", "fwd_app:application"]
    here = os.path.dirname(__file__)
    proc = subprocess.Popen(command, cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: os.path.exists(sock_path) or proc.poll() is not None, 60, "gunicorn on its unix socket")
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        answer = _post_on_unix_socket(sock_path, f"x:{listener.port}@127.0.0.1")
    finally:
        stop(proc)
        listener.close()
    if fixed_url:
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"listener\n"), answer
        assert len(listener.received) == 1 and b"POST /write " in listener.received[0]
    else:
        assert answer.startswith(b"HTTP/1.1 502"), answer
        assert answer.endswith(b"Proxy error: no port for primary_url (unix socket)\n"), answer
        assert listener.received == []
        assert b"came in on a unix socket" in proc.stderr.read()


def raw_server(answer: bytes):
    """A server on 127.0.0.1 that answers every request with ``answer``; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    accepted = []

    def run():
        try:
            while True:
                conn, _ = listener.accept()
                accepted.append(conn)
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                conn.sendall(answer)
        except OSError:
            pass

    threading.Thread(target=run, daemon=True).start()
    return listener, accepted


def test_an_invalid_header_from_the_primary_answers_502_and_frees_the_connection(replica):
    listener, accepted = raw_server(b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok")
    port = listener.getsockname()[1]
    app = LiteFSMiddleware(
        ok_app, db="app.db", mount_dir=replica.path, forward="http", primary_url=f"http://{{hostname}}:{port}"
    )
    replica.make_replica("127.0.0.1")
    try:
        for _ in range(2):
            response = Client(app).delete("/")
            assert response.status_code == 502
            assert response.get_data().startswith(b"Proxy error: ")
        # Each refused answer's connection was closed, not kept half-read in the pool.
        assert all(conn.recv(1) == b"" for conn in accepted)
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def test_patterns_match_the_path_as_utf8(mount):
    calls = []

    def app(environ, start_response):
        calls.append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b""]

    mount.set_position("app.db", 1)  # the database exists: a write that is not passed through gets the cookie
    mw = LiteFSMiddleware(app, db="app.db", mount_dir=mount.path, passthrough=["/café/*"])
    response = Client(mw).post("/caf%C3%A9/menu")
    assert response.status_code == 200
    assert "Set-Cookie" not in response.headers  # passthrough: no cookie on a write
    control = Client(mw).post("/cafe/menu")
    assert control.headers["Set-Cookie"].startswith("__txid=0000000000000001;")
    assert calls == ["/café/menu".encode().decode("latin-1"), "/cafe/menu"]  # WSGI's latin-1 text


def test_a_forked_child_waits_with_its_own_poller(tmp_path):
    m = LiteFSMount(tmp_path / "m")
    m.set_position("a.db", 1)
    watcher = get_watcher(m.path, 0.001)
    # The parent forks while a read waits and its poller runs: the child inherits neither that
    # thread nor that waiter, and must start a poller of its own.
    parent, parent_result = in_thread(watcher.wait, {"a.db": 5}, 60)
    wait_until(lambda: polling(watcher), 10, "the parent's waiter and its poller")
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            child, result = in_thread(watcher.wait, {"a.db": 2}, 60)
            wait_until(lambda: any(w.targets == {"a.db": 2} for w in watcher._waiters), 10, "the child's waiter")
            m.set_position("a.db", 2)
            # Woken by a poller, not by its wait running out (60 s) and reading the file at last.
            child.join(20)
            code = 0 if result == [True] else 2
        finally:
            os._exit(code)
    done = (0, 0)
    try:
        deadline = time.monotonic() + 40
        while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done[0] == pid, "the child hung"
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        if not done[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        m.set_position("a.db", 5)
        parent.join(20)
    assert parent_result == [True]


def polling(watcher: Watcher) -> bool:
    """A read waits in ``watcher`` and its poller thread is running."""
    with watcher._cond:
        return bool(watcher._waiters) and watcher._thread is not None and watcher._thread.is_alive()


def test_an_event_stream_without_chunked_framing_is_read_as_it_arrives(tmp_path):
    """An HTTP/1.0-style stream (no length, no chunks, ends at close) is read line by line."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    release = threading.Event()

    def run():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            conn.recv(4096)
            init = json.dumps({"type": "init", "data": {"isPrimary": False, "hostname": "node-a"}})
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + init.encode() + b"\n")
            conn.sendall(json.dumps(tx_event("a.db", 7)).encode() + b"\n")
            release.wait(10)

    threading.Thread(target=run, daemon=True).start()
    m = LiteFSMount(tmp_path / "m")
    m.set_position("a.db", 1)
    watcher = Watcher(Node(m.path), api_url=f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        wait_until(lambda: watcher.txid("a.db") == 7, 10, "the tx event")
        assert watcher.role() == (False, "node-a")
    finally:
        release.set()
        watcher.close()
        listener.close()


def test_a_marked_write_whose_client_left_behind_its_body_frees_the_thread(tmp_path, replica):
    # A write marked as forwarded waits on a replica for this node to become the primary
    # (primary_redirect_timeout, 60 s here). Its client sends 64 KiB of body and leaves: the
    # unread body stands before the FIN, so a peek alone saw a client still there and the
    # one thread stayed taken for the whole minute. The next request must be served at once.
    with serve(lambda environ, start_response: (start_response("200 OK", []), [b"target"])[1]) as target:
        config = proxy_config(tmp_path, replica, target.removeprefix("http://"), primary_redirect_timeout="60s")
        with standalone_proxy(config, threads=1) as url:
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                head = "POST /w HTTP/1.1\r\nHost: x\r\nX-LiteFS-Forwarded: 1\r\nContent-Length: 65536\r\n\r\n"
                client.sendall(head.encode() + b"a" * 65536)
                time.sleep(0.3)  # taken by the one thread, which waits for a primary
            with urllib.request.urlopen(url + "/read", timeout=20) as answer:  # well within the minute
                assert answer.read() == b"target"
