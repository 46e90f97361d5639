"""Waiting for replication: one thread per process wakes every request whose TXID has arrived."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping

from .events import EventStream
from .node import Node, mount_problem

log = logging.getLogger("litefs_wsgi")

# With the event stream a waiter is woken by the tx event, but LiteFS sends nothing while
# idle and a slow reader is disconnected: the file is still read this often.
EVENT_FALLBACK_INTERVAL = 0.05

# How often a waiting read asks whether its client is still there (``alive`` in wait).
ALIVE_CHECK_INTERVAL = 0.05

# How long a position or role read from the mount's files is trusted. Between restores a
# position only grows, so a TXID read at or above a cookie's satisfies it without another
# read; a restore (a position going backwards) and a change of role (``.primary`` appearing,
# changing or going) are therefore noticed within this bound. With the event stream up,
# positions and the role are in memory and noticed as the events arrive. With
# require_mount, the answer to "is LiteFS mounted?" is kept as long.
STATE_TTL = 0.1

# Distinct keys (Cookie headers) a memo of reached() holds; emptied when full.
MEMO_MAX = 4096


_READ = object()  # Watcher.txid's default: read the file now


class _Memo(dict):
    """A dict a weak reference can point at: a watcher keeps no memo of a middleware gone."""

    __slots__ = ("__weakref__",)


class TooManyWaiters(Exception):
    """``max_waiters`` requests are already waiting in this process (reads for their TXID,
    writes for a primary)."""


class _Waiter:
    __slots__ = ("targets", "done")

    def __init__(self, targets: Mapping[str, int]) -> None:
        self.targets = dict(targets)
        self.done = threading.Event()


class Watcher:
    """Where a request learns the node's role and positions, and waits for them to change.

    Positions are read from the mount's ``-pos`` files and, with ``api_url``, from LiteFS's
    event stream (the higher of the two wins). A single thread reads them once per
    ``poll_interval``, and only while some request waits; each waiter blocks on its own
    event and is woken as soon as all of its TXIDs are reached.
    """

    def __init__(
        self, node: Node, poll_interval: float = 0.001, api_url: str | None = None, max_waiters: int = 0
    ) -> None:
        self.node = node
        self.poll_interval = poll_interval
        self.max_waiters = max_waiters
        self._cond = threading.Condition()
        self._waiters: list[_Waiter] = []
        self._role_waiters = 0  # requests in wait_for_role: max_waiters bounds them with _waiters
        self._thread: threading.Thread | None = None
        self._changed = False
        self.clock: Callable[[], float] = time.monotonic
        # db -> (TXID, until when it is trusted) and (role, until when): see STATE_TTL. Read
        # by a middleware too: a position it sees again is one no restore has gone below.
        self.seen: dict[str, tuple[int, float]] = {}
        self._role: tuple[tuple[bool, str | None], float] = ((True, None), float("-inf"))
        # Until when (on clock) the files last said this node is the primary: what a write
        # asks first, without a call (-inf: ask role(), with the event stream too).
        self.primary_until = float("-inf")
        # The memos of reached() (see memo()), emptied in place when a position goes backwards.
        self._memos: weakref.WeakValueDictionary[int, _Memo] = weakref.WeakValueDictionary()
        self._memos_lock = threading.Lock()
        # Counts the times the memos were emptied: a reached() that read seen before one of
        # them does not keep what it found (see reached).
        self._forgotten = 0
        self.api_url = api_url
        self.events = EventStream(api_url, self._on_event, on_restore=self.forget) if api_url else None
        # Set by a middleware with require_mount: a node without LiteFS's mount is never the primary.
        self.require_mount = False
        self._mount_checked = float("-inf")
        self._mount_problem: str | None = None

    def _after_fork(self) -> None:
        # A forked worker (gunicorn --preload, uWSGI) inherits no threads: waiters, the poll
        # thread and the event stream of the parent are not its own.
        self._cond = threading.Condition()
        self._memos_lock = threading.Lock()
        self._waiters = []
        self._role_waiters = 0
        self._thread = None
        self.node.after_fork()
        self.forget()
        if self.api_url:
            self.events = EventStream(self.api_url, self._on_event, on_restore=self.forget)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        self.node.close()

    # -- state -------------------------------------------------------------------------

    def txid(self, db: str, data: bytes | None | object = _READ) -> int | None:
        """The database's TXID now (the file is read), or None when it does not exist (or
        cannot be read). ``data``: the ``-pos`` bytes the caller has just read with
        ``node.pos_bytes`` (None: no file), not read again."""
        forgotten = self._forgotten  # before the read: see below
        if data is _READ:
            data = self.node.pos_bytes(db)
        txid = None if data is None else self.node.parsed(db, data)
        if txid is not None:
            seen = self.seen.get(db)
            entry = (txid, self.clock() + STATE_TTL)  # a deadline: one comparison per read
            if seen is not None and txid < seen[0]:
                self._restored(db, entry)
            elif self._forgotten == forgotten:  # no call between the check and the store
                self.seen[db] = entry
                if self._forgotten != forgotten:
                    # forget() ran between the check and the store, on the event thread (a
                    # restore told by /events): what this thread read may predate it.
                    self.seen.pop(db, None)
        # Read on every write: what only the event stream needs is in a method of its own, so
        # that without an api_url a write pays one comparison for it.
        if self.events is None:
            return txid
        return self._raised_by_events(db, txid)

    def _restored(self, db: str, entry: tuple[int, float]) -> None:
        # A restore: what was known reached may be no longer. Counted before it is stored, so
        # that a read under way meanwhile, which may have read the file before the restore,
        # does not store its higher position over this one.
        self._forgotten += 1
        self.seen[db] = entry
        self._clear_memos()

    def _raised_by_events(self, db: str, txid: int | None) -> int | None:
        """``txid``, the file's, raised to the database's last tx event while the stream is up."""
        events = self.events
        if events is not None and events.connected:  # while the stream is down, the file decides
            seen = events.txids.get(db)  # .get: the event thread may replace the dict meanwhile
            if seen is not None:
                if txid is None and not os.path.lexists(os.path.join(self.node.mount_dir, db + "-pos")):
                    return None  # dropped since its last tx event (LiteFS sends none for a drop)
                txid = max(txid or 0, seen)
        return txid

    def mount_problem(self) -> str | None:
        """Why the mount is not LiteFS's (see ``node.mount_problem``), or None; looked at
        again at most every STATE_TTL, so that asking costs no syscall per request."""
        now = self.clock()
        if now - self._mount_checked >= STATE_TTL:
            self._mount_problem = mount_problem(self.node.mount_dir)
            self._mount_checked = now
        return self._mount_problem

    def role(self, fresh: bool = False) -> tuple[bool, str | None]:
        """(this node is the primary, the primary's hostname when it is another node), as
        read at most STATE_TTL ago, or now when ``fresh``."""
        if self.require_mount and self.mount_problem() is not None:
            self.primary_until = float("-inf")  # nor for a write sharing this watcher
            return False, None  # not LiteFS's mount: whatever the files say, never the primary
        events = self.events
        if events is not None and events.connected:
            return events.is_primary, (None if events.is_primary else events.hostname)
        role, until = self._role
        now = self.clock()
        if fresh or now > until:
            role = self.node.role()
            self._role = (role, now + STATE_TTL)
            if events is None:  # else the stream, once up again, says first
                self.primary_until = now + STATE_TTL if role[0] else float("-inf")
        return role

    def forget(self) -> None:
        """Read the files again on the next request, whatever STATE_TTL says."""
        self._forgotten += 1  # first: a read under way stores nothing it read before this
        self.seen = {}
        self._clear_memos()
        self._role = (self._role[0], float("-inf"))
        self.primary_until = float("-inf")
        self._mount_checked = float("-inf")

    # -- waiting -----------------------------------------------------------------------

    def memo(self) -> _Memo:
        """A memo for ``reached``, one per caller that names what it asks by a key (a
        middleware, by the Cookie header its targets come from): a key maps to the time, on
        ``clock``, until which its targets are known reached. Emptied whenever a position is
        seen going backwards, and by ``forget``."""
        memo = _Memo()
        with self._memos_lock:
            self._memos[id(memo)] = memo  # removed when the memo goes, before its id can be another's
        return memo

    def _clear_memos(self) -> None:
        # Called once _forgotten has moved and seen is updated: a reached() racing with this
        # either reads the new seen or sees the count move and drops what it stored.
        with self._memos_lock:
            memos = list(self._memos.values())
        for memo in memos:
            memo.clear()

    def reached(self, targets: Mapping[str, int], memo: dict[str, float] | None = None, key: str | None = None) -> bool:
        """True when every database has reached its TXID (or does not exist: nothing to wait
        for). Known without a read when a position read less than STATE_TTL ago, or a tx
        event, is at or above each TXID; else the files are read. Known by such positions,
        it is kept in ``memo`` under ``key`` until the first of them is no longer trusted."""
        now = self.clock()
        forgotten = self._forgotten
        until = float("inf")
        for db in targets:  # not .items(): a read-only mapping's items cost twice its keys
            target = targets[db]
            seen = self.seen.get(db)
            if seen is None or seen[0] < target or now > seen[1]:
                events = self.events
                if events is None or not events.connected or events.txids.get(db, -1) < target:
                    return all(self._reached(name, self.txid(name), wanted) for name, wanted in targets.items())
                memo = None  # known from the event stream, which has no deadline of its own
            elif seen[1] < until:
                until = seen[1]
        if memo is not None:
            if len(memo) >= MEMO_MAX:
                memo.clear()  # bounded: many clients' headers, or forged ones
            memo[key] = until
            if self._forgotten != forgotten:
                memo.pop(key, None)  # a restore seen meanwhile: what was read may be stale
        return True

    def _reached(self, db: str, txid: int | None, target: int) -> bool:
        if txid is None:
            # No -pos file: the database does not exist, nothing to wait for. A torn or
            # unreadable one is a position not known yet, which never satisfies a cookie.
            return not os.path.lexists(os.path.join(self.node.mount_dir, db + "-pos"))
        return txid >= target

    def wait(
        self,
        targets: Mapping[str, int],
        timeout: float,
        alive: Callable[[], bool] | None = None,
        max_waiters: int | None = None,
    ) -> bool:
        """Block until every database in ``targets`` reaches its TXID; False after ``timeout``,
        or as soon as ``alive()`` (asked every ALIVE_CHECK_INTERVAL) says the client has gone.

        Raises TooManyWaiters at once when ``max_waiters`` (default: the watcher's) requests
        already wait in this process.
        """
        if self.reached(targets):
            return True
        waiter = _Waiter(targets)
        bound = self.max_waiters if max_waiters is None else max_waiters
        with self._cond:
            if self._full(bound):
                raise TooManyWaiters()
            self._waiters.append(waiter)
            self._changed = True
            failed: RuntimeError | None = None
            if self._thread is None:
                thread = threading.Thread(target=self._poll, name="litefs-watcher", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # no thread to be had (a thread or memory limit)
                    self._waiters.remove(waiter)
                    failed = exc
                else:
                    self._thread = thread
            self._cond.notify_all()  # notify() could wake a wait_for_role() caller instead of the poller
        if failed is not None:
            log.warning("cannot start the watcher's thread (%s): this read polls the files itself", failed)
            return self._wait_alone(targets, timeout, alive)
        try:
            if alive is None:
                return waiter.done.wait(timeout) or self.reached(targets)
            deadline = time.monotonic() + timeout
            while not waiter.done.wait(max(0.0, min(ALIVE_CHECK_INTERVAL, deadline - time.monotonic()))):
                if time.monotonic() >= deadline or not alive():
                    return self.reached(targets)
            return True
        finally:
            with self._cond:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wait_alone(self, targets: Mapping[str, int], timeout: float, alive: Callable[[], bool] | None) -> bool:
        """``wait`` without the watcher's thread: this one reads the files every
        ``poll_interval`` itself, as LiteFS's own proxy does for each waiting read."""
        deadline = time.monotonic() + timeout
        while not self.reached(targets):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (alive is not None and not alive()):
                return False
            time.sleep(min(self.poll_interval, remaining))
        return True

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def waiting_for_primary(self) -> int:
        return self._role_waiters

    def wait_for_role(
        self,
        timeout: float,
        need_primary: bool = False,
        step: float = 0.01,
        alive: Callable[[], bool] | None = None,
        max_waiters: int | None = None,
    ) -> tuple[bool, str | None]:
        """The node's role, waiting up to ``timeout`` while no primary is known (an
        election) or, with ``need_primary``, until this node is the primary; no longer once
        ``alive()`` (asked every ALIVE_CHECK_INTERVAL) says the client has gone.

        Raises TooManyWaiters at once when it would wait and ``max_waiters`` (default: the
        watcher's) requests already wait in this process, reads included: a request a client
        marked as forwarded would otherwise hold a thread for ``timeout`` at no cost to it.
        """
        deadline = time.monotonic() + timeout

        def settled() -> bool:
            return is_primary or (hostname is not None and not need_primary)

        is_primary, hostname = self.role(fresh=True)
        if settled() or timeout <= 0:
            return is_primary, hostname
        bound = self.max_waiters if max_waiters is None else max_waiters
        with self._cond:
            if self._full(bound):
                raise TooManyWaiters()
            self._role_waiters += 1
        try:
            asked = time.monotonic()
            while (remaining := deadline - time.monotonic()) > 0:
                with self._cond:
                    self._cond.wait(min(step, remaining))
                is_primary, hostname = self.role(fresh=True)
                if settled():
                    break
                if alive is not None and time.monotonic() - asked >= ALIVE_CHECK_INTERVAL:
                    if not alive():
                        break
                    asked = time.monotonic()
            return is_primary, hostname
        finally:
            with self._cond:
                self._role_waiters -= 1

    def _full(self, bound: int) -> bool:
        """Under ``_cond``: whether ``bound`` requests (0: no bound) already wait, reads for
        their TXID and writes for a primary together."""
        return bool(bound) and len(self._waiters) + self._role_waiters >= bound

    def _on_event(self) -> None:
        with self._cond:
            self._changed = True
            self._cond.notify_all()

    def _poll(self) -> None:
        try:
            self._poll_while_waited()
        except Exception:
            log.exception("the litefs-wsgi watcher failed; the next waiting read starts another")
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None
            raise

    def _poll_while_waited(self) -> None:
        last: dict[str, int | None] = {}
        waiters: list[_Waiter] = []
        dbs: set[str] = set()
        while True:
            with self._cond:
                if not self._waiters:
                    self._thread = None  # under the lock: a waiter arriving now starts a new poller
                    return
                changed, self._changed = self._changed, False
                if changed:
                    # Every new waiter sets _changed, so between changes the snapshot holds
                    # them all (one that left meanwhile is harmless): an idle tick then costs
                    # the same with one waiter or a thousand.
                    waiters = list(self._waiters)
            if changed:
                dbs = {db for waiter in waiters for db in waiter.targets}
            now = {db: self.txid(db) for db in dbs}
            if changed or now != {db: last.get(db) for db in dbs}:
                for waiter in waiters:
                    if all(self._reached(db, now[db], t) for db, t in waiter.targets.items()):
                        waiter.done.set()
            last = now
            # While the stream is up its tx events wake us; while it is down the files decide,
            # and are read as often as without an api_url.
            interval = self.poll_interval
            if self.events is not None and self.events.connected:
                interval = max(interval, EVENT_FALLBACK_INTERVAL)
            with self._cond:
                if self._waiters and not self._changed:
                    self._cond.wait(interval)


_watchers: dict[tuple, Watcher] = {}
_watchers_lock = threading.Lock()


def _before_fork() -> None:
    # Each node's lock is held across the fork: a descriptor another thread is keeping or
    # letting go at that moment is then in the node's lists, which the child closes.
    _watchers_lock.acquire()
    for watcher in _watchers.values():
        watcher.node._lock.acquire()


def _after_fork_in_parent() -> None:
    for watcher in _watchers.values():
        watcher.node._lock.release()
    _watchers_lock.release()


def _after_fork_in_child() -> None:
    global _watchers_lock
    _watchers_lock = threading.Lock()
    for watcher in _watchers.values():
        watcher._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def get_watcher(mount_dir: str, poll_interval: float, api_url: str | None = None, max_waiters: int = 0) -> Watcher:
    """The process's one watcher for this mount (and LiteFS API), made on first use.

    Middlewares sharing it share one poller: it polls at the shortest ``poll_interval``
    asked for; ``max_waiters`` is each caller's to pass to ``wait``."""
    key = (os.path.abspath(mount_dir), api_url)
    with _watchers_lock:
        watcher = _watchers.get(key)
        if watcher is None:
            watcher = _watchers[key] = Watcher(Node(mount_dir), poll_interval, api_url, max_waiters)
        watcher.poll_interval = min(watcher.poll_interval, poll_interval)
        return watcher


_default: Watcher | None = None


def set_default_watcher(watcher: Watcher) -> None:
    """Make ``watcher`` the one that ``is_primary()`` and ``primary_hostname()`` consult."""
    global _default
    _default = watcher


def default_watcher() -> Watcher:
    """The watcher of the last LiteFSMiddleware made, else one for ``LITEFS_DIR``."""
    if _default is not None:
        return _default
    return get_watcher(os.environ.get("LITEFS_DIR") or "/litefs", 0.001)


def is_primary() -> bool:
    """True when this node is the LiteFS primary (no mount at all counts as primary)."""
    return default_watcher().role()[0]


def primary_hostname() -> str | None:
    """The primary's hostname when this node is a replica that knows it, else None."""
    return default_watcher().role()[1]
