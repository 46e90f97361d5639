"""One watcher per process: many waiting reads, one thread, woken by a position change."""

from __future__ import annotations

import threading
import time

import pytest
from servers import answers, in_thread, recording_app, unreleased, wait_until
from werkzeug.test import Client

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.node import Node
from litefs_wsgi.watcher import TooManyWaiters, Watcher, get_watcher


class Waiters:
    """Threads each calling ``watcher.wait``; records when and how each one ended."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.threads: list[threading.Thread] = []
        self.results: dict[int, tuple[bool, float]] = {}
        self._lock = threading.Lock()

    def start(self, key: int, targets: dict[str, int], timeout: float = 60) -> None:
        def run() -> None:
            reached = self.watcher.wait(targets, timeout)
            with self._lock:
                self.results[key] = (reached, time.monotonic())

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self.threads)

    def done(self) -> set[int]:
        with self._lock:
            return set(self.results)


def test_200_waiters_are_all_released_by_one_position_change(replica):
    watcher = Watcher(Node(replica.path))
    waiters = Waiters(watcher)
    for i in range(200):
        waiters.start(i, {"app.db": 2})
    wait_until(lambda: watcher.waiting == 200, 30, "200 waiters")
    assert waiters.done() == set()  # nobody leaves before the position moves
    changed = time.monotonic()
    replica.set_position("app.db", 2)
    waiters.join()
    assert all(reached for reached, _ in waiters.results.values()) and len(waiters.results) == 200
    released = sorted(at - changed for _, at in waiters.results.values())
    assert released[0] >= 0
    print(f"\n200 waiters released {released[0] * 1000:.1f} to {released[-1] * 1000:.1f} ms after the change")
    wait_until(lambda: watcher._thread is None, 10, "the watcher thread to stop")


def test_waiters_are_released_in_order_as_the_position_climbs(replica):
    watcher = Watcher(Node(replica.path))
    waiters = Waiters(watcher)
    for txid in range(2, 12):
        waiters.start(txid, {"app.db": txid})
    wait_until(lambda: watcher.waiting == 10, 10, "10 waiters")
    for txid in range(2, 12):
        with answers(watcher, "txid") as reads:
            replica.set_position("app.db", txid)
            wait_until(lambda: txid in waiters.done(), 10, f"the waiter for TXID {txid}")  # noqa: B023
            # Read again after the round that woke it: that round is over, and woke nobody further
            # ahead (a waiter it woke wrongly may not have recorded itself yet; unreleased() sees it).
            wait_until(lambda: reads["app.db", txid] >= 3 or not watcher.waiting, 10, "the next round")  # noqa: B023
        assert waiters.done() == set(range(2, txid + 1))
        assert sorted(targets["app.db"] for targets in unreleased(watcher)) == list(range(txid + 1, 12))
    waiters.join()
    assert all(reached for reached, _ in waiters.results.values())


def test_a_position_that_jumps_releases_everyone_it_passes(replica):
    watcher = Watcher(Node(replica.path))
    waiters = Waiters(watcher)
    for txid in (3, 5, 9):
        waiters.start(txid, {"app.db": txid})
    wait_until(lambda: watcher.waiting == 3, 10, "3 waiters")
    with answers(watcher, "txid") as reads:
        replica.set_position("app.db", 6)
        wait_until(lambda: waiters.done() == {3, 5}, 10, "the waiters up to 6")
        wait_until(lambda: reads["app.db", 6] >= 3, 10, "a round after the one that woke them")
    assert 9 not in waiters.done() and unreleased(watcher) == [{"app.db": 9}]
    replica.set_position("app.db", 100)
    waiters.join()


def polling_thread(watcher: Watcher) -> threading.Thread | None:
    """The watcher's thread while someone waits, else None.

    Read under the watcher's lock: wait() adds its waiter and then starts the thread while
    holding it, so ``waiting`` alone can already count a waiter whose thread is not there yet.
    """
    with watcher._cond:
        return watcher._thread if watcher.waiting else None


def test_the_watcher_thread_runs_only_while_someone_waits(replica):
    watcher = Watcher(Node(replica.path))
    assert watcher._thread is None
    assert watcher.wait({"app.db": 1}, 5)  # already there: no thread at all
    assert watcher._thread is None
    waiters = Waiters(watcher)
    waiters.start(1, {"app.db": 2})
    thread = wait_until(lambda: polling_thread(watcher), 10, "the waiter and its thread")
    assert thread.is_alive()
    replica.set_position("app.db", 2)
    waiters.join()
    wait_until(lambda: not thread.is_alive(), 10, "the thread to stop")
    assert watcher._thread is None
    # It starts again for the next waiter, and stops again when that one leaves without its
    # TXID: its client went away (no clock involved), or its wait timed out.
    gone = threading.Event()
    leaver, result = in_thread(watcher.wait, {"app.db": 3}, 60, lambda: not gone.is_set())
    again = wait_until(lambda: polling_thread(watcher), 10, "the next waiter and its thread")
    assert again is not thread and again.is_alive()
    gone.set()
    leaver.join(30)
    assert result == [False]
    wait_until(lambda: not again.is_alive(), 10, "the thread to stop after the client left")
    assert watcher._thread is None
    assert watcher.wait({"app.db": 3}, 0.05) is False
    wait_until(lambda: watcher._thread is None, 10, "the thread to stop after a timeout")
    assert watcher.waiting == 0


def test_a_wait_times_out_and_a_missing_database_is_not_waited_for(replica):
    watcher = Watcher(Node(replica.path))
    assert watcher.wait({"app.db": 5}, 0.05) is False
    assert watcher.wait({"other.db": 5}, 5) is True  # no position file: serve at once
    waiters = Waiters(watcher)
    waiters.start(1, {"app.db": 5})
    wait_until(lambda: watcher.waiting == 1, 10, "the waiter")
    replica.remove_position("app.db")  # the database went away: nothing left to wait for
    waiters.join()
    assert waiters.results[1][0] is True


def test_max_waiters_refuses_the_next_waiter_at_once(replica):
    watcher = Watcher(Node(replica.path), max_waiters=3)
    waiters = Waiters(watcher)
    for i in range(3):
        waiters.start(i, {"app.db": 2})
    wait_until(lambda: watcher.waiting == 3, 10, "3 waiters")
    with pytest.raises(TooManyWaiters):
        watcher.wait({"app.db": 2}, 60)
    assert watcher.wait({"app.db": 1}, 60) is True  # nothing to wait for: never refused
    replica.set_position("app.db", 2)
    waiters.join()
    assert watcher.wait({"app.db": 2}, 60) is True


def test_a_watcher_thread_that_cannot_start_leaves_the_read_polling_and_nothing_behind(replica, monkeypatch):
    # Thread.start() fails when the process hits a thread or memory limit: the read then
    # polls the files itself, and no waiter is left counted against max_waiters, nor a
    # thread that never ran taken for the poller by the reads after it.
    watcher = Watcher(Node(replica.path), max_waiters=1)
    real_start = threading.Thread.start

    def start(thread):
        if thread.name == "litefs-watcher":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with answers(watcher, "txid") as reads:
        thread, result = in_thread(watcher.wait, {"app.db": 2}, 30)
        wait_until(lambda: reads["app.db", 1] >= 3, 10, "the read to poll")
        assert watcher.waiting == 0
        replica.set_position("app.db", 2)
        thread.join(20)
    assert result == [True]
    monkeypatch.setattr(threading.Thread, "start", real_start)
    waiters = Waiters(watcher)
    waiters.start(1, {"app.db": 3})  # admitted under max_waiters=1, and woken by a poller
    wait_until(lambda: watcher.waiting == 1, 10, "the waiter")
    replica.set_position("app.db", 3)
    waiters.join()
    assert waiters.results[1][0] is True


def test_max_waiters_makes_the_middleware_answer_503_with_retry_after(replica):
    calls: list = []
    mw = LiteFSMiddleware(
        recording_app(calls, b"read"), db="app.db", mount_dir=replica.path, max_waiters=2, forward="http"
    )
    results: list = []

    def read(path: str) -> None:
        client = Client(mw)
        client.set_cookie("__txid", "0000000000000002")
        results.append(client.get(path))

    threads = [threading.Thread(target=read, args=(f"/wait/{i}",), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    wait_until(lambda: mw.watcher.waiting == 2, 10, "2 waiting reads")
    client = Client(mw)
    client.set_cookie("__txid", "0000000000000002")
    refused = client.get("/third")
    assert refused.status_code == 503
    assert refused.headers["Retry-After"].isdigit()
    assert refused.get_data(as_text=True).startswith("Proxy error: ")
    assert mw.watcher.waiting == 2 and results == []  # refused while the others still wait
    satisfied = Client(mw)
    satisfied.set_cookie("__txid", "0000000000000001")
    assert satisfied.get("/no-cookie-needed").status_code == 200  # nothing to wait for: served
    replica.set_position("app.db", 2)
    for thread in threads:
        thread.join(30)
    assert [r.status_code for r in results] == [200, 200]
    assert sorted(calls) == ["/no-cookie-needed", "/wait/0", "/wait/1"]


def test_one_watcher_per_mount_and_settings_in_a_process(replica, tmp_path):
    app = LiteFSMiddleware(lambda e, s: [], db="app.db", mount_dir=replica.path, forward="http")
    other = LiteFSMiddleware(lambda e, s: [], db="app.db", mount_dir=replica.path, forward="http")
    assert app.watcher is other.watcher
    assert get_watcher(replica.path, 0.001) is app.watcher
    elsewhere = LiteFSMiddleware(lambda e, s: [], db="app.db", mount_dir=str(tmp_path / "x"), forward="http")
    assert elsewhere.watcher is not app.watcher


def test_control_files_are_read_whole_up_to_the_longest_valid_one(tmp_path):
    # Reads are bounded (node._MAX_CONTROL_FILE): the longest .primary LiteFS users can write, a
    # 253-character host name and a port, still fits.
    longest = "a" * 253 + ":65535"
    (tmp_path / ".primary").write_text(longest + "\n")
    assert Node(str(tmp_path)).primary() == longest
    (tmp_path / ".primary").write_text(longest + "a\n")  # a character more: not a host name
    assert Node(str(tmp_path)).primary() is None


def test_writes_waiting_for_a_primary_count_against_max_waiters(replica):
    # A write a client marked as already forwarded waits on a replica for this node to
    # become the primary: with max_waiters it holds a thread only within that bound, shared
    # with the reads waiting for their TXID.
    mw = LiteFSMiddleware(
        recording_app([], b"written"),
        db="app.db",
        mount_dir=replica.path,
        max_waiters=1,
        forward="http",
        primary_redirect_timeout="30s",
    )
    marked = {"X-LiteFS-Forwarded": "1"}
    thread, result = in_thread(lambda: Client(mw).post("/first", headers=marked))
    wait_until(lambda: mw.watcher.waiting_for_primary == 1, 10, "the write to wait for a primary")
    refused = Client(mw).post("/second", headers=marked)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.get_data(as_text=True) == "Proxy error: too many requests waiting for a primary\n"
    reader = Client(mw)
    reader.set_cookie("__txid", "0000000000000002")
    assert reader.get("/behind").status_code == 503  # the bound is shared: this read is refused too
    reader.set_cookie("__txid", "0000000000000001")
    assert reader.get("/reached").status_code == 200  # a read with nothing to wait for never is
    replica.make_primary()
    thread.join(20)
    assert result[0].status_code == 200 and result[0].headers["Set-Cookie"].startswith("__txid=")
    assert mw.watcher.waiting_for_primary == 0


def test_a_write_waiting_for_a_primary_stops_when_its_client_leaves(replica):
    watcher = Watcher(Node(replica.path))
    gone = threading.Event()
    thread, result = in_thread(watcher.wait_for_role, 60, True, 0.01, lambda: not gone.is_set())
    wait_until(lambda: watcher.waiting_for_primary == 1, 10, "the write to wait for this node to be the primary")
    assert thread.is_alive()
    gone.set()
    thread.join(20)
    assert result == [(False, "node-a")]  # given up on at once, not after 60 s
    assert watcher.waiting_for_primary == 0
