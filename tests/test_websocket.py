"""WebSockets through the standalone proxy: gunicorn -c gunicorn.conf.py in front of a raw
RFC 6455 echo server, both on 127.0.0.1."""

from __future__ import annotations

import socket
import struct
import threading
import time
from urllib.parse import urlsplit

import pytest
from proxy_ws import BINARY, CLOSE, GREETING, PING, PONG, TEXT, Client, accept_key, echo_server, read_head
from servers import RawServer, opens, proxy_config, standalone_proxy, wait_until

from litefs_wsgi.testing import LiteFSMount

IDLE = 3  # seconds; the proxy's websocket-idle-timeout


@pytest.fixture(scope="module")
def target():
    with echo_server() as server:
        yield server


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    m = LiteFSMount(tmp_path_factory.mktemp("ws") / "litefs")
    m.make_primary()
    m.set_position("app.db", 5)
    return m


@pytest.fixture(scope="module")
def proxy_port(target, mount, tmp_path_factory):
    directory = tmp_path_factory.mktemp("wsconf")
    options = {"poll_timeout": "3s", "websocket_idle_timeout": f"{IDLE}s"}
    config = proxy_config(directory, mount, f"127.0.0.1:{target.port}", **options)
    with standalone_proxy(config, threads=4) as url:
        yield urlsplit(url).port


def test_echo_through_the_proxy(target, proxy_port):
    ws = Client.open(proxy_port)
    assert ws.status == 101
    assert ws.headers["Sec-WebSocket-Accept"] == accept_key(ws.key)
    assert ws.headers["Upgrade"].lower() == "websocket"
    assert ws.headers["Connection"].lower() == "upgrade"
    # The target sent this frame in the same packet as its 101 head: it must not be lost.
    assert ws.recv() == (TEXT, GREETING)
    every_byte = bytes(range(256)) * 4
    big = bytes(range(256)) * 800  # 200 KiB, several socket reads each way
    for opcode, payload in ((TEXT, "héllo".encode()), (BINARY, every_byte), (BINARY, big), (PING, b"p")):
        ws.send(payload, opcode)
        assert ws.recv() == (PONG if opcode == PING else opcode, payload)
    ws.close()
    head = target.heads[-1].decode("latin-1")
    assert head.startswith("GET /ws HTTP/1.1\r\n")
    for line in ("Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {ws.key}", "X-Forwarded-For: "):
        assert line in head


def test_request_target_reaches_the_target_byte_for_byte(target, proxy_port):
    ws = Client.open(proxy_port, "/ws?room=a%2Fb&name=x%20y+z")
    # The echo server only upgrades "/ws" exactly; anything else it refuses with a 403.
    assert ws.status == 403
    assert target.heads[-1].startswith(b"GET /ws?room=a%2Fb&name=x%20y+z HTTP/1.1\r\n")


def test_an_answer_other_than_101_is_relayed(target, proxy_port):
    ws = Client.open(proxy_port, "/not-a-socket")
    assert ws.status == 403
    assert ws.body == b"forbidden"
    assert ws.headers["X-Target"] == "yes"
    assert ws.headers["Content-Length"] == "9"


@pytest.mark.parametrize("header", [{"Content-Length": "5"}, {"Transfer-Encoding": "chunked"}])
def test_an_upgrade_with_a_body_is_refused_never_sent_on_half(target, proxy_port, header):
    # The pipe would take no body, and a target waiting for the one its head announced
    # would hold the tunnel until read_timeout: said at once instead.
    heads = len(target.heads)
    ws = Client.open(proxy_port, "/ws", header)
    assert ws.status == 400
    assert ws.body == b"Proxy error: a WebSocket upgrade request cannot have a body\n"
    assert len(target.heads) == heads


def test_client_going_away_closes_the_target_side(target, proxy_port):
    before = target.closed
    ws = Client.open(proxy_port)
    assert ws.recv() == (TEXT, GREETING)
    ws.sock.close()  # no closing handshake: the TCP connection just ends
    wait_until(lambda: target.closed > before, 15, "the target's connection to close")


def test_idle_tunnel_is_closed(target, proxy_port):
    before = target.closed
    ws = Client.open(proxy_port)
    assert ws.recv() == (TEXT, GREETING)
    # Nothing is sent either way: after the idle limit the proxy ends both connections.
    ws.sock.settimeout(IDLE + 20)
    assert ws.sock.recv(1) == b""
    wait_until(lambda: target.closed > before, 15, "the target's connection to close")


def test_tunnels_release_their_threads(proxy_port):
    # Four threads in the only worker: if a finished tunnel kept its thread, the fifth
    # tunnel would never be served.
    for _ in range(3):
        sockets = [Client.open(proxy_port) for _ in range(3)]
        for i, ws in enumerate(sockets):
            assert ws.recv() == (TEXT, GREETING)
            ws.send(b"%d" % i)
        for i, ws in enumerate(sockets):
            assert ws.recv() == (BINARY, b"%d" % i)
            ws.close()


def test_upgrade_waits_for_the_cookie_then_succeeds(target, mount, proxy_port):
    # The upgrade is a read: a client that wrote TXID 7 must not reach a node still at 5.
    seen = len(target.heads)
    result = {}

    def connect():
        result["ws"] = Client.open(proxy_port, headers={"Cookie": "__txid=0000000000000007"})

    thread = threading.Thread(target=connect)
    with opens(mount.path) as opened:
        thread.start()
        # Its watcher polls app.db-pos: the upgrade is held in the proxy.
        wait_until(lambda: opened("app.db-pos") >= 3 or "ws" in result, 20, "the upgrade to wait in the proxy")
    try:
        assert len(target.heads) == seen and "ws" not in result
        mount.set_position("app.db", 7)
        thread.join(15)
        ws = result["ws"]
        assert ws.status == 101
        assert ws.recv() == (TEXT, GREETING)
        ws.close()
    finally:
        mount.set_position("app.db", 5)


def test_upgrade_with_a_cookie_never_reached_gets_504(target, proxy_port):
    seen = len(target.heads)
    ws = Client.open(proxy_port, headers={"Cookie": "__txid=00000000000000ff"})
    assert ws.status == 504
    assert ws.body == b"Proxy timeout\n"
    assert len(target.heads) == seen  # the target never saw it


def test_nothing_after_the_tunnel_is_read_as_a_request(target, proxy_port):
    ws = Client.open(proxy_port)
    assert ws.recv() == (TEXT, GREETING)
    ws.send(struct.pack(">H", 1000), CLOSE)
    assert ws.recv()[0] == CLOSE  # the target closed its side: the tunnel is over
    # Had gunicorn kept the connection, it would now parse these bytes as a new request
    # and send it to the target.
    try:
        ws.sock.sendall(b"GET /after-the-tunnel HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = ws.sock.recv(64)
    except ConnectionError:
        answer = b""
    assert answer == b""
    # Weak by nature (no event shows a request that never comes): the closed connection above
    # is the proof; this only adds that nothing reached the target within half a second.
    time.sleep(0.5)
    assert not any(b"/after-the-tunnel" in head for head in target.heads)


# -- a target failing an upgrade before its answer's body -----------------------------------------

FAILS_BEFORE_THE_BODY = {
    "/bad-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n", 502),
    "/closed": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", 502),
    "/silent": (b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nContent-Length: 10\r\n\r\n", 504),
}


class FailsBeforeTheBody(RawServer):
    """Answers an upgrade to each path of ``FAILS_BEFORE_THE_BODY`` with that head and no
    good body byte; "/closed" then closes, the others wait for the proxy to."""

    def _connection(self, conn: socket.socket, number: int) -> None:
        with conn:
            conn.settimeout(20)
            path = read_head(conn).split(b" ")[1].decode()
            conn.sendall(FAILS_BEFORE_THE_BODY[path][0])
            if path != "/closed":
                conn.recv(1)


@pytest.fixture(scope="module")
def failing_proxy_port(mount, tmp_path_factory):
    target = FailsBeforeTheBody()
    config = proxy_config(tmp_path_factory.mktemp("wsfail"), mount, f"127.0.0.1:{target.port}", read_timeout="1s")
    try:
        with standalone_proxy(config) as url:
            yield urlsplit(url).port, target.port
    finally:
        target.close()


@pytest.mark.parametrize("path", FAILS_BEFORE_THE_BODY)
def test_an_answer_other_than_101_failing_before_its_body_gets_the_proxys_error(failing_proxy_port, path):
    # Not gunicorn's HTML 500: the first body item is read before the head goes out.
    port, target_port = failing_proxy_port
    code = FAILS_BEFORE_THE_BODY[path][1]
    ws = Client.open(port, path)
    assert ws.status == code, ws.body
    where = f"127.0.0.1:{target_port}"
    why = (
        f"no answer from {where} within 1s"
        if code == 504
        else f"{where} closed the connection or sent a bad response ("
    )
    assert ws.body.startswith(f"Proxy error: {why}".encode()), ws.body
    assert "Set-Cookie" not in ws.headers and "Transfer-Encoding" not in ws.headers


def test_an_idle_limit_of_weeks_keeps_the_tunnel_open(target, mount, tmp_path_factory):
    # websocket_idle_timeout "720h" is a valid option; epoll takes at most 2**31 - 1 ms
    # (24.8 days): the tunnel raised OverflowError and closed right after its 101.
    directory = tmp_path_factory.mktemp("wsweeks")
    config = proxy_config(directory, mount, f"127.0.0.1:{target.port}", websocket_idle_timeout="720h")
    with standalone_proxy(config, threads=2) as url:
        ws = Client.open(urlsplit(url).port)
        assert ws.status == 101
        assert ws.recv() == (TEXT, GREETING)
        ws.send(b"still there?", TEXT)
        assert ws.recv() == (TEXT, b"still there?")
        ws.close()


def test_the_tunnel_to_the_target_sends_small_frames_at_once():
    # Go, under LiteFS's proxy, turns Nagle's algorithm off on every connection, as the
    # forwarding client does: else a small frame behind one the target has not acknowledged
    # yet (a chat, a cursor) waits for its delayed ACK, about 40 ms on Linux.
    from litefs_wsgi import websocket
    from litefs_wsgi.forwarding import Forwarder, destination

    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        tunnel = websocket.connect(urlsplit(url), 5)
        forwarded = Forwarder(5, 5).connect(destination(url))
        for sock in (tunnel, forwarded):
            with sock:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
