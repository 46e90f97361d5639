"""Read a LiteFS node's state from the control files in its mount: ``DB-pos``, ``.primary``, ``.lag``."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .txid import Pos, parse_pos, parse_pos_txid

T = TypeVar("T")

log = logging.getLogger("litefs_wsgi")

# Letters, digits, "-" and "." with an optional port: nothing that could split a header or
# change a URL's meaning when it is written into "fly-replay" or primary_url.
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})(?::[0-9]{1,5})?")
_LAG = re.compile(rb"[+-][0-9]{1,10}\n?")
# A real control file is tens of bytes (.primary, a host name and port, at most 260): a longer
# one is malformed whatever follows, and a read this small stays in Python's small-object
# allocator (a position is read on every write).
_MAX_CONTROL_FILE = 320

# LiteFS drops the kernel's cached page of a DB-pos file whenever the position changes (its
# setPos calls InvalidatePos, before the commit returns), so a descriptor kept open reads each
# new position with one pread(2): one round trip to the LiteFS daemon, where open, read and
# close take four (on this 2-core machine 94 µs against 330-500 µs). But a descriptor open on
# the mount keeps LiteFS from unmounting ("fusermount3: Device or resource busy": it exits 1,
# and cannot mount there again). So a kept descriptor is let go as soon as it has served no
# read for IDLE_FOR: its number then points at /dev/null (dup2), which frees the mount at once
# while a thread that has just looked it up reads nothing and opens the file instead; the
# number itself is closed RETIRED_FOR later, when no thread can still hold it. A node whose
# last write is older than IDLE_FOR therefore holds nothing open on the mount, like an app
# whose SQLite connections are closed between requests. Descriptors are kept by default on
# LiteFS's own mount (where LiteFS changes a file in place) and under its exec:; not on a
# directory laid out like a mount, whose files a test or the demo replaces by rename, and
# never when keep_pos_open is false.
KEEP_FOR = 1.0  # seconds one kept descriptor serves: a dropped and re-created database is seen within it
# A kept descriptor that served no read this long is let go: the mount is free to unmount. A
# second, not less: each time the node's thread wakes to look, while request threads are busy,
# it waits for the GIL behind them, and each of their preads (which give the GIL up) then
# hands it over and must win it back: at 0.1 s that slowed a quarter of the preads of a
# single busy thread from 1.3 µs to 10-20 µs, and cost a write 0.1 of the app's throughput.
IDLE_FOR = 1.0
RETIRED_FOR = 10.0  # a descriptor let go is closed this much later, when no thread can still be reading it
# (a bound in time: a thread frozen longer than that between its look-up and its pread, by
# SIGSTOP say, could read a number used again meanwhile; a socket's fails with ESPIPE.)


def valid_hostname(name: str) -> bool:
    """True if ``name`` is a plain host name (optionally ``:port``) safe to put in a header."""
    return bool(_HOSTNAME.fullmatch(name))


def litefs_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """The directories where LiteFS is mounted (type ``fuse``, source ``litefs``), as Linux
    lists them; empty where /proc is not there."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        # "36 35 98:0 / /litefs rw,relatime - fuse litefs rw,...": the mount point is the
        # fifth field (spaces escaped as \040), the type and source follow the " - ".
        fields, _, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        if len(fields) >= 5 and tail[:2] == ["fuse", "litefs"]:
            found.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return found


def mount_problem(mount_dir: str) -> str | None:
    """Why ``mount_dir`` is not a LiteFS mount, or None when it is one: a mounted LiteFS
    always holds ``.lag``; the mount point it leaves (or has not mounted yet) is empty."""
    if os.path.lexists(os.path.join(mount_dir, ".lag")):
        return None
    try:
        entries = os.listdir(mount_dir)
    except FileNotFoundError:
        return "it does not exist"
    except NotADirectoryError:
        return "it is not a directory"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if not entries:
        return "it is empty (a mount point LiteFS has not mounted, or has left)"
    return "it has no .lag file, which a LiteFS mount always holds"


def describe_mount_problem(mount_dir: str, problem: str) -> str:
    """``problem`` (from mount_problem) with where LiteFS is mounted instead, if anywhere."""
    elsewhere = [path for path in litefs_mounts() if os.path.abspath(path) != os.path.abspath(mount_dir)]
    if elsewhere:
        return f"{problem}; LiteFS is mounted at {', '.join(elsewhere)}: set mount_dir (fuse.dir, LITEFS_DIR) to it"
    return problem


def database_files(mount_dir: str, limit: int = 20) -> list[str]:
    """The databases a mount shows: every name with a ``-pos`` file, and SQLite-looking files."""
    try:
        names = os.listdir(mount_dir)
    except OSError:
        return []
    found = {name[:-4] for name in names if name.endswith("-pos")}
    found.update(name for name in names if name.endswith((".db", ".sqlite", ".sqlite3", ".db3")))
    return sorted(found)[:limit]


def under_litefs_exec() -> bool:
    """True when an ancestor of this process is ``litefs mount``: its exec: started us (or the
    server that forked us), and it unmounts only after we have exited."""
    pid = os.getppid()
    for _ in range(16):  # gunicorn's worker, its master, a shell: never a long chain
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # not Linux, or the process is gone
            return False
        if os.path.basename(argv[0]) == b"litefs" and argv[1:2] == [b"mount"]:
            return True
        pid = int(stat.rpartition(b")")[2].split()[1])  # "pid (comm) state ppid ..."
    return False


def on_litefs_mount(mount_dir: str) -> bool:
    """True when ``mount_dir`` is where LiteFS is mounted now (see litefs_mounts)."""
    here = os.path.realpath(mount_dir)
    return any(os.path.realpath(path) == here for path in litefs_mounts())


def _read(path: str) -> bytes | None:
    """Return a control file's bytes, or None when it is absent; other errors raise OSError."""
    try:
        fd = os.open(path, os.O_RDONLY)  # not open(): a buffered file object costs more than the read
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return os.read(fd, _MAX_CONTROL_FILE)
    finally:
        os.close(fd)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # a dead mount's descriptor closes with ENOTCONN, closed all the same
        pass


class Node:
    """The control files of one LiteFS mount: positions, the primary and the lag."""

    def __init__(self, mount_dir: str, keep_open: bool | None = None) -> None:
        """``keep_open``: read positions through kept descriptors (see KEEP_FOR); by default
        on LiteFS's own mount and under its exec:."""
        self.mount_dir = mount_dir
        self._reported: dict[str, object] = {}
        self._pos_paths: dict[str, str] = {}
        if keep_open is None:
            keep_open = on_litefs_mount(mount_dir) or under_litefs_exec()
        self.keep_open = keep_open
        self.clock: Callable[[], float] = time.monotonic
        # db -> [descriptor, until when it serves, when it last served]: a list, so that a
        # read stamps its use with one store.
        self._kept: dict[str, list] = {}
        self._retired: list[tuple[int, float]] = []  # (descriptor let go, when)
        self._devnull: int | None = None  # what a descriptor let go points at until closed
        self._reaper: threading.Thread | None = None
        self._wake = threading.Event()  # a descriptor kept: the reaper, asleep, looks again
        self._wake_at = 0.0  # when the reaper, asleep, looks again by itself (on clock)
        self._lock = threading.Lock()

    def set_keep_open(self, keep_open: bool) -> None:
        """Read positions through kept descriptors or not, from now on (``keep_pos_open``).
        Turned off, the descriptors kept so far are let go at once (see IDLE_FOR)."""
        with self._lock:
            self.keep_open = keep_open
            if not keep_open:
                self._let_go_all()

    def release_idle(self) -> bool:
        """Let go of the descriptors that served no read for IDLE_FOR (one kept past KEEP_FOR
        is replaced by the next read), and close those let go RETIRED_FOR ago; what a thread
        of the node's own does every IDLE_FOR while any is kept. True while some descriptor is
        still held."""
        with self._lock:
            closing = self._sweep(self.clock())
            held = bool(self._kept or self._retired)
        for fd in closing:
            _close(fd)
        return held

    def close(self) -> None:
        """Let go of the kept descriptors now, which frees the mount; they are closed
        RETIRED_FOR later, since a request still running may be about to read one."""
        with self._lock:
            self._let_go_all()

    def after_fork(self) -> None:
        # The child's copies of the descriptors would keep the mount busy while the child
        # lives, and no thread of its own lets them go: closed now, while it has one thread
        # (watcher.py holds this lock across the fork, so none was half kept or let go). A
        # lock held at the fork would never be released in the child: a new one.
        self._lock = threading.Lock()
        self._reaper = None
        self._wake = threading.Event()
        fds = [kept[0] for kept in self._kept.values()] + [fd for fd, _ in self._retired]
        self._kept, self._retired = {}, []
        for fd in fds:
            _close(fd)

    def _let_go(self, fd: int, now: float) -> None:
        """Point ``fd`` at /dev/null, which frees the mount, and close it RETIRED_FOR later.
        Called with the lock held."""
        try:
            if self._devnull is None:
                self._devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(self._devnull, fd, inheritable=False)
        except OSError:
            pass  # closed RETIRED_FOR later all the same
        self._retired.append((fd, now))
        if self._reaper is None:
            self._start_reaper()

    def _let_go_all(self) -> None:
        """Let go of every kept descriptor. With the lock held."""
        now = self.clock()
        for kept in self._kept.values():
            self._let_go(kept[0], now)
        self._kept = {}

    def _sweep(self, now: float) -> list[int]:
        """Let go of idle descriptors; the ones due to be closed. With the lock held."""
        for db, kept in list(self._kept.items()):
            # Not one merely past KEEP_FOR: the next read replaces it, and the thread, woken
            # again by that, would look twice a second.
            if now - kept[2] >= IDLE_FOR:
                del self._kept[db]
                self._let_go(kept[0], now)
        closing = []
        while self._retired and now - self._retired[0][1] >= RETIRED_FOR:
            closing.append(self._retired.pop(0)[0])
        return closing

    def _start_reaper(self) -> None:
        # With the lock held: the thread's first step waits for it, so it finds itself named.
        thread = threading.Thread(target=self._reap, name="litefs-pos-descriptors", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (the interpreter exiting): tried again next time
            return
        self._reaper = thread

    def _reap(self) -> None:
        while True:
            with self._lock:
                if self._reaper is not threading.current_thread():
                    return  # forked: the child starts its own
                now = self.clock()
                if self._kept:
                    # Till the first may be idle: under load, once every IDLE_FOR.
                    due = min(kept[2] for kept in self._kept.values()) + IDLE_FOR
                elif self._retired:
                    due = self._retired[0][1] + RETIRED_FOR
                else:
                    self._reaper = None  # under the lock: the next descriptor kept starts another
                    return
                pause = min(RETIRED_FOR, max(IDLE_FOR / 10, due - now))
                self._wake_at = now + pause
            self._wake.wait(pause)
            self._wake.clear()
            self.release_idle()

    def _report(self, level: int, name: str, problem: object, message: str, *args: object) -> None:
        """Log a bad control file once per distinct problem, not on every read."""
        if self._reported.get(name) != problem:
            self._reported[name] = problem
            log.log(level, message, *args)

    def pos(self, db: str) -> Pos | None:
        """The database's position; None when it does not exist yet or cannot be read."""
        return self.txid(db, parse_pos)

    def txid(self, db: str, parse: Callable[[bytes], T | None] = parse_pos_txid) -> T | None:
        """The TXID of the database's position (what a request needs, parsed alone), or what
        ``parse`` makes of the file (``pos`` passes ``parse_pos``); None when it does not exist
        yet or cannot be read."""
        data = self.pos_bytes(db)
        return None if data is None else self.parsed(db, data, parse)

    def pos_bytes(self, db: str) -> bytes | None:
        """The bytes of the database's ``-pos`` file, as read now; None when it does not exist
        yet or cannot be read (said once)."""
        # Read on every write: a descriptor kept and still serving is read here, with no call
        # between this and the pread(2) (a Python call costs about what the read does).
        kept = self._kept.get(db)
        if kept is not None:
            now = self.clock()
            if now < kept[1]:  # a deadline: one comparison per write
                kept[2] = now
                try:
                    data = os.pread(kept[0], _MAX_CONTROL_FILE, 0)
                except OSError:
                    data = b""  # the mount went away (ENOTCONN): opening again says why
                if data:  # else let go meanwhile (/dev/null reads nothing): opened below
                    return data
        path = self._pos_paths.get(db)
        if path is None:
            path = self._pos_paths[db] = os.path.join(self.mount_dir, db + "-pos")
        try:
            # A descriptor opened now in place of ``kept``, the one this thread found past its
            # time or let go; or the file opened for this read alone.
            return self._open_kept(db, path, kept) if self.keep_open else _read(path)
        except OSError as exc:  # a directory, no permission, the mount going away
            self._report(logging.WARNING, db, str(exc), "cannot read the position of %s: %s", db, exc)
            return None

    def parsed(self, db: str, data: bytes, parse: Callable[[bytes], T | None] = parse_pos_txid) -> T | None:
        """What ``parse`` makes of ``data``, the database's ``-pos`` bytes; None, said once,
        when they are not a position. Not opened again for that: the file is as LiteFS serves it."""
        value = parse(data)
        if value is None:
            self._report_malformed(db, data)
        return value

    def _report_malformed(self, db: str, data: bytes) -> None:
        self._report(logging.WARNING, db, data, "ignoring a malformed position file for %s: %r", db, data[:64])

    def _open_kept(self, db: str, path: str, kept: list | None) -> bytes | None:
        """``_read(path)`` through a descriptor opened now in place of ``kept`` and kept for
        KEEP_FOR, or less while idle; or through the one another thread has just opened."""
        with self._lock:
            if not self.keep_open:
                return _read(path)  # turned off while this thread waited for the lock
            now = self.clock()
            current = self._kept.get(db)
            if current is not None and current is not kept and now < current[1]:
                current[2] = now  # another thread opened it, and it cannot be let go meanwhile
                return os.pread(current[0], _MAX_CONTROL_FILE, 0)
            if current is not None:
                del self._kept[db]
                self._let_go(current[0], now)
            try:
                fd = os.open(path, os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError):
                return None  # no database (yet): open again next time
            try:
                data = os.pread(fd, _MAX_CONTROL_FILE, 0)
            except OSError:
                _close(fd)
                raise
            self._kept[db] = [fd, now + KEEP_FOR, now]
            if self._reaper is None:
                self._start_reaper()
            elif self._wake_at > now + IDLE_FOR:
                self._wake.set()  # asleep till a descriptor let go is due, later than this one may idle
            return data

    def role(self) -> tuple[bool, str | None]:
        """(this node is the primary, the primary's hostname), from one read of ``.primary``.

        No file means this node is the primary: how LiteFS's users read the files (they
        cannot tell the primary from a replica during an election). A file that cannot be
        read or is not a plain host name means a replica that knows no primary."""
        try:
            data = _read(os.path.join(self.mount_dir, ".primary"))
        except OSError as exc:
            self._report(logging.WARNING, ".primary", str(exc), "cannot read .primary: %s", exc)
            return False, None
        if data is None:
            return True, None
        name = data.decode("ascii", "replace").strip()
        if not valid_hostname(name):
            self._report(logging.ERROR, ".primary", data, "ignoring .primary: %r is not a plain host name", data[:64])
            return False, None
        return False, name

    def primary(self) -> str | None:
        """The primary's hostname; None on the primary itself or when no primary is known."""
        return self.role()[1]

    def is_primary(self) -> bool:
        """True when no ``.primary`` file exists."""
        return self.role()[0]

    def lag(self) -> int | None:
        """Replication lag in milliseconds: 0 with no ``.lag`` file, None when it is garbled."""
        try:
            data = _read(os.path.join(self.mount_dir, ".lag"))
        except OSError as exc:
            self._report(logging.WARNING, ".lag", str(exc), "cannot read .lag: %s", exc)
            return None
        if data is None:
            return 0
        if not _LAG.fullmatch(data):
            self._report(logging.WARNING, ".lag", data, "ignoring a malformed .lag file: %r", data[:64])
            return None
        return int(data)
