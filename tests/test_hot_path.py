"""The hot path reads no control file whose answer is known, and gives nothing up for it.

Positions and the role are trusted for STATE_TTL after a read (a position only grows between
restores). These tests move the watcher's clock instead of sleeping: what they show is the
bound itself, whatever the machine's load.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from servers import Clock, answers
from werkzeug.test import Client

import litefs_wsgi.node as node_module
from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.cookie import cookie_value
from litefs_wsgi.node import IDLE_FOR, KEEP_FOR, RETIRED_FOR, Node
from litefs_wsgi.txid import Pos, format_pos
from litefs_wsgi.watcher import STATE_TTL, get_watcher


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"app"]


def setup(mount, wsgi_app=app, **options) -> tuple[Client, LiteFSMiddleware, Clock]:
    options.setdefault("forward", "fly-replay")
    middleware = LiteFSMiddleware(wsgi_app, db="app.db", mount_dir=mount.path, **options)
    clock = middleware.watcher.clock = Clock()
    return Client(middleware, use_cookies=False), middleware, clock


def get(client: Client, txid: int):
    return client.get("/", headers={"Cookie": f"__txid={txid:016x}"})


def test_a_satisfied_cookie_reads_no_file_within_the_bound(replica):
    replica.set_position("app.db", 10)
    client, middleware, clock = setup(replica)
    with answers(middleware.watcher.node, "pos_bytes") as reads:
        assert get(client, 10).status_code == 200
        for txid in (1, 5, 10, 10, 10):
            assert get(client, txid).status_code == 200
        assert sum(reads.values()) == 1  # the first read only
        clock.advance(STATE_TTL * 1.01)
        assert get(client, 10).status_code == 200
        assert sum(reads.values()) == 2  # read again once the bound has passed


def test_a_restore_is_noticed_within_the_bound(replica):
    replica.set_position("app.db", 10)
    client, _, clock = setup(replica, poll_timeout="20ms")
    assert get(client, 10).status_code == 200
    replica.set_position("app.db", 4)  # restored to an earlier position
    clock.advance(STATE_TTL * 1.01)
    assert get(client, 10).status_code == 504  # not served before this node has TXID 10 again
    assert get(client, 4).status_code == 200


def counted(monkeypatch, obj: object, method: str) -> list:
    """The calls ``obj.method`` gets from now on (the real method still answers)."""
    calls: list = []
    real = getattr(obj, method)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, method, spy)
    return calls


def test_the_same_cookie_again_is_served_by_one_look_up_within_the_bound(replica, monkeypatch):
    replica.set_position("app.db", 10)
    client, middleware, clock = setup(replica)
    assert get(client, 10).status_code == 200  # read the file
    assert get(client, 10).status_code == 200  # known from that read: kept for this header
    checks = counted(monkeypatch, middleware.watcher, "reached")
    parses = counted(monkeypatch, middleware.cookie, "read")
    for _ in range(3):
        assert get(client, 10).status_code == 200
    assert not checks and not parses  # neither parsed nor checked again
    clock.advance(STATE_TTL * 1.01)
    assert get(client, 10).status_code == 200
    assert len(checks) == len(parses) == 1  # once the bound has passed


def test_a_restore_seen_by_a_write_is_honoured_at_once_by_the_next_read(mount):
    # A write on the primary reads the position: gone backwards, every cookie header known
    # to be reached is forgotten, whatever is left of the bound.
    mount.set_position("app.db", 10)
    client, _, _ = setup(mount, poll_timeout="20ms")
    assert get(client, 10).status_code == 200
    assert get(client, 10).status_code == 200  # now kept for this header
    mount.set_position("app.db", 4)
    assert client.post("/").headers["Set-Cookie"].startswith("__txid=0000000000000004;")
    assert get(client, 10).status_code == 504  # no clock moved: the restore was seen
    assert get(client, 4).status_code == 200


def test_a_restore_to_the_last_writes_own_bytes_is_seen_by_the_next_write(mount):
    # A write reading the bytes the write before it read sends the cookie made then, unless
    # the watcher has seen another position since: here a restore back to those very bytes.
    mount.set_position("app.db", 10)
    client, _, _ = setup(mount, poll_timeout="20ms")
    assert client.post("/").headers["Set-Cookie"].startswith("__txid=000000000000000a;")
    mount.set_position("app.db", 12)
    assert get(client, 12).status_code == 200  # 12 seen, and this header kept as reached
    mount.set_position("app.db", 10)  # restored: the file as the first write read it
    assert client.post("/").headers["Set-Cookie"].startswith("__txid=000000000000000a;")
    assert get(client, 12).status_code == 504  # no clock moved: the restore was seen by the write
    assert get(client, 10).status_code == 200


def test_a_restore_seen_while_a_read_checks_is_not_kept_past_it(mount):
    # A read finds its TXID in what the watcher had seen just as a write on another thread
    # sees a restore: that read is served as before, but the next one waits.
    mount.set_position("app.db", 10)
    client, middleware, _ = setup(mount, poll_timeout="20ms")
    watcher = middleware.watcher
    assert get(client, 10).status_code == 200

    class RestoredMeanwhile(dict):
        armed = True

        def get(self, key, default=None):
            value = super().get(key, default)
            if self.armed:
                self.armed = False
                mount.set_position("app.db", 4)
                watcher.txid("app.db")  # the write, between the read's look and its memo
            return value

    watcher.seen = RestoredMeanwhile(watcher.seen)
    assert get(client, 10).status_code == 200  # it looked before the restore
    assert get(client, 10).status_code == 504  # not served from what that read found


def test_a_position_read_before_a_restore_seen_meanwhile_is_not_kept_over_it(mount, monkeypatch):
    # One thread reads the file before a restore and is held before it stores what it read;
    # another reads the restored position meanwhile. The first thread's position, read the
    # earlier, must not replace the restored one as trusted: the next read would be served
    # before this node has the TXID again.
    mount.set_position("app.db", 10)
    client, middleware, _ = setup(mount, poll_timeout="20ms")
    watcher = middleware.watcher
    assert get(client, 10).status_code == 200
    read = watcher.node.pos_bytes

    def restored_after_the_read(db):
        data = read(db)  # 10, read before the restore
        monkeypatch.setattr(watcher.node, "pos_bytes", read)
        mount.set_position("app.db", 4)
        assert watcher.txid(db) == 4  # the other thread, its write say, sees the restore
        return data

    monkeypatch.setattr(watcher.node, "pos_bytes", restored_after_the_read)
    assert watcher.txid("app.db") == 10  # what this thread read, for its own request
    assert watcher.seen["app.db"][0] == 4
    assert get(client, 10).status_code == 504  # not served: this node is at 4
    assert get(client, 4).status_code == 200


def test_middlewares_sharing_a_mount_keep_what_they_found_apart(replica):
    # One watcher per mount: the same Cookie header means another TXID to a middleware of
    # another database, and is checked again for it.
    replica.set_position("app.db", 10)
    replica.set_position("other.db", 1)
    client, _, _ = setup(replica, poll_timeout="20ms")
    other = Client(
        LiteFSMiddleware(app, db="other.db", mount_dir=replica.path, forward="fly-replay", poll_timeout="20ms"),
        use_cookies=False,
    )
    for _ in range(2):
        assert get(client, 10).status_code == 200
    assert get(other, 10).status_code == 504  # other.db is at 1
    assert get(client, 10).status_code == 200


def test_what_reads_found_is_bounded_and_forgotten_on_forget(replica):
    from litefs_wsgi.watcher import MEMO_MAX

    replica.set_position("app.db", 10)
    client, middleware, _ = setup(replica)
    memo = middleware._reached
    for n in range(MEMO_MAX + 10):
        client.get("/", headers={"Cookie": f"n={n}; __txid={10:016x}"})
    assert 0 < len(memo) <= MEMO_MAX
    middleware.watcher.forget()
    assert not memo


def test_a_watcher_keeps_no_memo_of_a_middleware_gone(replica):
    import gc

    watcher = LiteFSMiddleware(app, db="app.db", mount_dir=replica.path).watcher
    kept = len(watcher._memos)
    LiteFSMiddleware(app, db="app.db", mount_dir=replica.path)  # an app factory's, made per test
    gc.collect()
    assert len(watcher._memos) == kept


def test_a_cookie_ahead_of_what_was_seen_reads_the_file_at_once(replica):
    replica.set_position("app.db", 10)
    client, _, _ = setup(replica, poll_timeout="5s")
    assert get(client, 10).status_code == 200
    replica.set_position("app.db", 11)
    assert get(client, 11).status_code == 200  # no clock moved: the cached 10 is not trusted for 11


@pytest.mark.parametrize(
    ("before", "after", "local_after"),
    [
        (None, "node-b", False),  # .primary appears: this node became a replica
        ("node-b", None, True),  # .primary goes: this node was promoted
        ("node-b", "node-c", False),  # .primary changes: another node took over
    ],
)
def test_a_role_change_is_noticed_within_the_bound(tmp_path, before, after, local_after):
    from litefs_wsgi.testing import LiteFSMount

    mount = LiteFSMount(tmp_path / "litefs")
    mount.set_position("app.db", 3)

    def role(primary):
        if primary is None:
            mount.make_primary()
        else:
            mount.make_replica(primary)

    def where(response) -> str:
        return response.headers.get("fly-replay") or response.get_data(as_text=True)

    role(before)
    client, _, clock = setup(mount)
    first = where(client.post("/"))
    assert first == ("app" if before is None else f"instance={before}")
    role(after)
    assert where(client.post("/")) == first  # within the bound: what was read STATE_TTL ago
    clock.advance(STATE_TTL * 1.01)
    assert where(client.post("/")) == ("app" if local_after else f"instance={after}")


def test_forget_makes_the_next_write_read_the_role_again(mount):
    # A write trusts the files' "primary" for STATE_TTL without asking role(); forget() ends
    # that trust at once, as it does for the positions.
    mount.set_position("app.db", 3)
    client, middleware, _ = setup(mount)
    assert client.post("/").get_data() == b"app"
    mount.make_replica("node-b")
    assert client.post("/").get_data() == b"app"  # within the bound, no clock moved
    middleware.watcher.forget()
    assert client.post("/").headers["fly-replay"] == "instance=node-b"


def test_the_cookie_of_a_write_is_the_position_after_the_write(mount):
    mount.set_position("app.db", 5)

    def writes(environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            mount.set_position("app.db", 6)  # the commit, before the response starts
        return app(environ, start_response)

    client, _, _ = setup(mount, writes)
    assert get(client, 5).status_code == 200  # TXID 5 is now known to the watcher
    response = client.post("/")
    assert response.headers["Set-Cookie"].startswith("__txid=0000000000000006;")


def test_each_write_gets_the_position_it_left_though_the_last_one_is_remembered(mount):
    # The last position parsed and the last Set-Cookie made are kept for the next write: one
    # that moved the position (up, or down after a restore), or came over https, gets its own.
    client, _, _ = setup(mount)
    for txid, scheme in [(5, "http"), (5, "http"), (7, "http"), (7, "https"), (7, "http"), (3, "http"), (3, "https")]:
        mount.set_position("app.db", txid)
        header = client.post("/", base_url=f"{scheme}://localhost/").headers["Set-Cookie"]
        assert header.startswith(f"__txid={txid:016x};")
        assert ("; Secure;" in header) == (scheme == "https")


def test_the_next_second_gets_the_next_expiry(mount, monkeypatch):
    mount.set_position("app.db", 1)
    client, _, _ = setup(mount, cookie_expiry="1h")
    now = 1_800_000_000.25
    monkeypatch.setattr(time, "time", lambda: now)
    first = client.post("/").headers["Set-Cookie"]
    assert client.post("/").headers["Set-Cookie"] == first
    now += 1
    later = client.post("/").headers["Set-Cookie"]
    assert "Expires=Fri, 15 Jan 2027 09:00:00 GMT" in first
    assert "Expires=Fri, 15 Jan 2027 09:00:01 GMT" in later


def test_the_first_write_of_a_new_database_gets_no_cookie(mount):
    client, _, _ = setup(mount)
    assert "Set-Cookie" not in client.post("/").headers


def test_the_expiry_follows_the_clock(mount):
    mount.set_position("app.db", 1)
    client, _, _ = setup(mount, cookie_expiry="1h")
    first = client.post("/").headers["Set-Cookie"]
    assert re.search(r"Expires=\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} GMT", first)


# -- the Cookie header, read as Go's Request.Cookie reads it --------------------------------


def go_cookie(header: str, name: str = "__txid") -> str | None:
    """Go's net/http readCookies with a filter, then the first cookie: a model to check against."""

    def trim(text: str) -> str:
        return text.strip(" \t\r\n")

    def valid_byte(c: str) -> bool:
        return 0x20 <= ord(c) < 0x7F and c not in '";\\'

    line = trim(header)
    while line:
        part, _, line = line.partition(";")
        part = trim(part)
        if not part:
            continue
        key, _, value = part.partition("=")
        if trim(key) != name:
            continue
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if all(valid_byte(c) for c in value):
            return value
    return None


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("__txid=000000000000002a", "000000000000002a"),
        ("a=1; __txid=000000000000002a; b=2", "000000000000002a"),
        ("a=1;__txid=000000000000002a", "000000000000002a"),
        ("  __txid  =  000000000000002a  ", "  000000000000002a"),  # Go keeps the value's leading spaces
        ('__txid="000000000000002a"', "000000000000002a"),
        ('__txid="00000000000000"2a"', None),  # a quote inside: invalid, and no other
        ("__txid=bad\\; __txid=000000000000002a", "000000000000002a"),  # the first valid one
        ("__txid=first; __txid=000000000000002a", "first"),
        ("x__txid=000000000000002a", None),
        ("__txidx=000000000000002a", None),
        ('a="x;__txid=000000000000002a;y"', "000000000000002a"),  # Go splits on ";" inside quotes too
        ("__txid=00000000000000\xe92a; __txid=0000000000000001", "0000000000000001"),  # a non-ASCII byte
        ("", None),
    ],
)
def test_cookie_value_is_gos(header, value):
    assert go_cookie(header) == value
    assert cookie_value(header) == value


_pieces = st.sampled_from(["__txid", "=", ";", " ", "\t", '"', "\\", "0000000000000007", "a", "x", "\xe9", "__txi"])


@given(st.lists(_pieces, max_size=14).map("".join))
def test_cookie_value_is_gos_on_any_header(header):
    assert cookie_value(header) == go_cookie(header)


def open_descriptors(path: str) -> int:
    """Descriptors of this process open on ``path``, or on a file once there ("... (deleted)")."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(target)
        except OSError:  # the descriptor listdir itself used, closed since
            pass
    return count


@pytest.fixture
def no_reaper(monkeypatch):
    """No thread of the node's own: on a clock moved by hand, the test alone lets go and closes."""
    monkeypatch.setattr(Node, "_start_reaper", lambda self: None)


def points_at_devnull(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == os.devnull
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_kept_descriptors_serve_for_keep_for_are_let_go_when_idle_and_closed_after_retired_for(mount, no_reaper):
    # What a process on LiteFS's mount does (tests/test_litefs.py runs it there for real).
    node = Node(mount.path, keep_open=True)
    clock = node.clock = Clock()
    pos = os.path.join(mount.path, "app.db-pos")
    mount.set_position("app.db", 5)
    assert node.txid("app.db") == 5
    assert open_descriptors(pos) == 1
    first = node._kept["app.db"][0]
    with open(pos, "r+b") as f:  # LiteFS changes the file it serves, not another one
        f.write(format_pos(Pos(6, 6)))
    clock.advance(IDLE_FOR / 2)
    assert node.txid("app.db") == 6  # through the kept descriptor, at once
    mount.set_position("app.db", 7)  # a new file in its place: a database dropped and made again
    clock.advance(KEEP_FOR)
    assert node.txid("app.db") == 7  # opened again after KEEP_FOR
    assert open_descriptors(pos) == 1  # the one replaced no longer holds the mount...
    assert points_at_devnull(first)  # ...but its number stays taken: a thread may be about to read it
    second = node._kept["app.db"][0]
    clock.advance_past(IDLE_FOR)
    assert node.release_idle() is True  # what the node's thread does: idle, let go
    assert open_descriptors(pos) == 0 and points_at_devnull(second)
    assert node.txid("app.db") == 7  # the next write opens it again
    third = node._kept["app.db"][0]
    clock.advance_past(RETIRED_FOR)
    node.release_idle()
    assert [fd for fd, _ in node._retired] == [third]  # the first two closed, the third let go now
    assert not points_at_devnull(first) and not points_at_devnull(second)
    node.close()
    assert open_descriptors(pos) == 0


def test_a_thread_holding_a_descriptor_let_go_reads_the_file_again(mount, no_reaper):
    # A thread that looked the kept descriptor up just before it was let go reads /dev/null
    # through it: it opens the file instead, and never takes that for a missing position.
    node = Node(mount.path, keep_open=True)
    clock = node.clock = Clock()
    mount.set_position("app.db", 5)
    assert node.txid("app.db") == 5
    stale = node._kept["app.db"]
    clock.advance_past(IDLE_FOR)
    node.release_idle()
    assert points_at_devnull(stale[0])
    stale[1] = clock.now + KEEP_FOR  # as the thread saw it: still serving
    node._kept["app.db"] = stale
    node._retired = [entry for entry in node._retired if entry[0] != stale[0]]  # let go once, below
    mount.set_position("app.db", 6)
    assert node.txid("app.db") == 6
    assert node._kept["app.db"] is not stale
    node.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_malformed_position_read_through_a_kept_descriptor_is_said_once_and_not_opened_again(
    mount, no_reaper, caplog
):
    # A torn or garbled -pos, changed in place as LiteFS changes it: each write reads it
    # through the one descriptor kept, and none is opened (and let go) per read.
    node = Node(mount.path, keep_open=True)
    mount.set_position("app.db", 5)
    assert node.txid("app.db") == 5
    kept = node._kept["app.db"][0]
    with open(os.path.join(mount.path, "app.db-pos"), "r+b") as f:
        f.write(b"not a position at all, 34 bytes.\n")
    with caplog.at_level("WARNING", logger="litefs_wsgi"):
        assert [node.txid("app.db") for _ in range(50)] == [None] * 50
    assert node._kept["app.db"][0] == kept and node._retired == []
    assert open_descriptors(os.path.join(mount.path, "app.db-pos")) == 1
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("ignoring a malformed position file for app.db"), said
    node.close()


def real_clock_node(mount, monkeypatch, idle_for: float, retired_for: float) -> tuple[Node, str]:
    """A node keeping descriptors, with its thread on the real clock and these bounds; app.db
    at TXID 5. (The node and the path of app.db-pos.)"""
    monkeypatch.setattr(node_module, "IDLE_FOR", idle_for)
    monkeypatch.setattr(node_module, "RETIRED_FOR", retired_for)
    mount.set_position("app.db", 5)
    return Node(mount.path, keep_open=True), os.path.join(mount.path, "app.db-pos")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_an_idle_node_holds_nothing_open_on_the_mount(mount, monkeypatch):
    # The node's own thread lets go of a descriptor unused for IDLE_FOR, closes it
    # RETIRED_FOR later, and then ends: on the real clock, observed, not slept for. IDLE_FOR
    # of three seconds: a busy machine's pause between a read and the look that follows it
    # is not taken for idleness.
    node, pos = real_clock_node(mount, monkeypatch, idle_for=3.0, retired_for=0.05)
    assert node.txid("app.db") == 5
    fd = node._kept["app.db"][0]
    assert node._reaper is not None
    deadline = time.monotonic() + 20
    while (open_descriptors(pos) or node._reaper is not None) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_descriptors(pos) == 0
    assert not node._kept and not node._retired and not points_at_devnull(fd)
    assert node._reaper is None  # no thread left behind
    assert node.txid("app.db") == 5 and open_descriptors(pos) == 1  # kept again on the next read
    node.close()


def test_while_reads_go_on_the_nodes_thread_wakes_about_once_a_second_not_ten_times(mount):
    # Each time it wakes while a request thread is busy, it waits for the GIL behind that
    # thread's preads and slows a quarter of them tenfold (node.py, IDLE_FOR): it must not look
    # more often than a descriptor may go idle (once a second), nor be woken when one is opened
    # again (every KEEP_FOR). Twice a second allowed: a busy machine that freezes this thread for
    # a second has its descriptor let go and opened again, which may wake it once more.
    mount.set_position("app.db", 5)
    node = Node(mount.path, keep_open=True)
    wakes = []
    release_idle = node.release_idle
    node.release_idle = lambda: wakes.append(time.monotonic()) or release_idle()
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # reads on, each a kept pread
        assert node.txid("app.db") == 5
        time.sleep(0.001)
    reads_for = time.monotonic() - started
    node.close()
    assert len(wakes) <= 2 * reads_for, wakes  # every 0.1 s, and at each re-open: 24 and more


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_descriptor_kept_while_the_nodes_thread_waits_to_close_others_is_let_go_when_idle(mount, monkeypatch):
    # Its thread, with only descriptors let go, sleeps until the first is due (RETIRED_FOR):
    # a descriptor kept meanwhile wakes it, and is let go once idle (IDLE_FOR), not when the
    # first is due. Three seconds idle, 60 s retired: a busy machine's pauses fit in between.
    node, pos = real_clock_node(mount, monkeypatch, idle_for=3.0, retired_for=60.0)
    for _ in range(2):
        assert node.txid("app.db") == 5 and open_descriptors(pos) == 1
        started = time.monotonic()
        while open_descriptors(pos) and time.monotonic() - started < 30:
            time.sleep(0.01)
        assert open_descriptors(pos) == 0, "still kept after half of RETIRED_FOR"
    node.close()


def test_a_kept_descriptor_is_never_kept_for_a_database_not_made_yet(mount, no_reaper):
    node = Node(mount.path, keep_open=True)
    node.clock = Clock()
    assert node.txid("new.db") is None
    mount.set_position("new.db", 1)
    assert node.txid("new.db") == 1  # at once: a missing file is opened again on each read
    node.close()


def test_on_a_directory_laid_out_like_a_mount_no_descriptor_is_kept(mount):
    node = Node(mount.path)
    # Not LiteFS's mount, and pytest has no `litefs mount` among its ancestors: its files
    # may be replaced by rename (litefs_wsgi.testing, the demo), so each read opens them.
    assert node.keep_open is False
    mount.set_position("app.db", 3)
    assert node.txid("app.db") == 3
    assert open_descriptors(os.path.join(mount.path, "app.db-pos")) == 0


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_keep_pos_open_keeps_the_descriptor_and_a_write_still_gets_its_position(mount, monkeypatch):
    monkeypatch.setattr(node_module, "RETIRED_FOR", 0.05)
    pos = os.path.join(mount.path, "app.db-pos")
    mount.set_position("app.db", 5)

    def writes(environ, start_response):
        with open(pos, "r+b") as f:  # the commit, as LiteFS moves the file it serves
            f.write(format_pos(Pos(6, 6)))
        return app(environ, start_response)

    client, middleware, _ = setup(mount, writes, keep_pos_open=True)
    node = middleware.watcher.node
    node.clock = middleware.watcher.clock  # never idle unless moved: the real thread lets nothing go
    assert node.keep_open is True
    assert client.post("/").headers["Set-Cookie"].startswith("__txid=0000000000000006;")
    assert open_descriptors(pos) == 1  # kept
    with open(pos, "r+b") as f:
        f.write(format_pos(Pos(7, 7)))
    assert node.txid("app.db") == 7
    assert open_descriptors(pos) == 1  # the same descriptor
    node.set_keep_open(False)
    assert open_descriptors(pos) == 0  # let go at once
    assert client.post("/").headers["Set-Cookie"].startswith("__txid=0000000000000006;")
    assert not node._kept  # opened for the read, none kept
    deadline = time.monotonic() + 10
    node.clock = time.monotonic
    while node._retired and time.monotonic() < deadline:  # closed RETIRED_FOR later
        time.sleep(0.01)
    assert not node._retired


def test_keep_pos_open_left_on_auto_changes_nothing(mount):
    # What the mount's node chose stays (kept, as under LiteFS's exec:): auto is not False.
    node = LiteFSMiddleware(app, db="app.db", mount_dir=mount.path).watcher.node
    node.keep_open = True
    assert LiteFSMiddleware(app, db="app.db", mount_dir=mount.path).watcher.node is node  # one per mount
    assert node.keep_open is True
    node.set_keep_open(False)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
def test_a_forked_child_closes_the_descriptors_it_inherited(mount, monkeypatch):
    # Its copies would keep the mount busy for as long as it lives, and the parent's thread
    # cannot let them go: the child closes them at the fork; the parent's stay kept (for a
    # minute idle here, whatever the fork takes).
    monkeypatch.setattr(node_module, "IDLE_FOR", 60.0)
    mount.set_position("app.db", 4)
    node = get_watcher(mount.path, 0.001).node
    node.set_keep_open(True)
    assert node.txid("app.db") == 4
    fd = node._kept["app.db"][0]
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            closed = not node._kept and not os.path.exists(f"/proc/self/fd/{fd}")
            code = 0 if closed and node.txid("app.db") == 4 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    if not done[0]:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done[0] == pid, "the child hung"
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert node._kept["app.db"][0] == fd and os.path.exists(f"/proc/self/fd/{fd}")
    node.set_keep_open(False)
