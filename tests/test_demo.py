"""``litefs-wsgi demo``: the unattended check, the interactive nodes, their LiteFS control files."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
from servers import form_request, port_open, stop, wait_until

DEMO = [sys.executable, "-m", "litefs_wsgi.cli", "demo"]
POS = re.compile(rb"[0-9a-f]{16}/[0-9a-f]{16}\n")
LAG = re.compile(rb"[+-][0-9]{9}\n")


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DEMO, "--check", *args], capture_output=True, text=True, timeout=90)


def test_check_shows_read_your_writes():
    result = run_check("--lag", "300ms")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "303" in out and "Set-Cookie: __txid=" in out
    assert re.search(r"WITH __txid=[0-9a-f]{16} .*: 200 OK after \d+ ms: the note is there", out), out
    assert "OK: read-your-writes held" in out


def test_check_fails_when_replication_outlasts_poll_timeout():
    # The check can fail: a replica slower than poll_timeout answers 504 to the writer.
    result = run_check("--lag", "5s", "--poll-timeout", "200ms")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "504" in result.stdout and "Proxy timeout" in result.stdout
    assert "FAILED: read-your-writes did not hold" in result.stdout


@contextlib.contextmanager
def demo_process(tmp_path, args: list[str], ready: Callable[[str], bool], what: str):
    """``litefs-wsgi demo ARGS`` in a subprocess writing to a log file; yields (process, its log)
    once ``ready(log)``. The log as it ends is kept in ``process.log``."""
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*DEMO, *args], stdout=out, stderr=subprocess.STDOUT)
    try:

        def started():
            text = log.read_text()
            if proc.poll() is not None:
                raise AssertionError(f"demo exited {proc.returncode}: {text}")
            return ready(text) and text

        yield proc, wait_until(started, 60, what)
    finally:
        stop(proc)
    proc.log = log.read_text()


@contextlib.contextmanager
def demo(tmp_path, *args: str) -> Iterator[tuple[subprocess.Popen, dict[str, str], str]]:
    """The interactive demo; yields (process, URLs by node, mounts directory)."""
    running = demo_process(tmp_path, ["--port", "0", *args], lambda text: "Ctrl-C" in text, "the demo to start")
    with running as (proc, text):
        urls = dict(re.findall(r"^  (replica|primary)  (http://127\.0\.0\.1:\d+)/", text, re.M))
        mounts = re.search(r"^mounts: (\S+)", text, re.M)[1]
        yield proc, urls, mounts


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def change_counter(db: str) -> int:
    """SQLite's file change counter: what LiteFSMount.committing publishes as the TXID."""
    return struct.unpack(">I", read(db)[24:28])[0]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interactive_demo_serves_both_nodes_and_stops_cleanly(tmp_path, sig):
    with demo(tmp_path, "--lag", "200ms") as (proc, urls, mounts):
        for node in ("replica", "primary"):
            status, _, page = form_request(urls[node])
            assert status == 200 and f"served by the <b>{node}</b>" in page
        status, headers, _ = form_request(urls["replica"], "POST", "/notes", body="text=from-the-test")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"].split(";")[0]
        status, _, page = form_request(urls["replica"], cookie=cookie)
        assert status == 200 and "from-the-test" in page
        assert os.path.isdir(mounts)
        proc.send_signal(sig)
        assert proc.wait(20) == 0
        ports = [urlsplit(url).port for url in urls.values()]
    assert "stopping" in proc.log and "Traceback" not in proc.log
    assert not os.path.exists(mounts), "the temporary mounts are removed at exit"
    assert not any(port_open(port) for port in ports)
    # Each node logged its side: the replica relayed the POST that the primary served.
    assert "[primary] POST /notes -> 303" in proc.log and "[replica] POST /notes -> 303" in proc.log


def test_control_files_are_litefs_s(tmp_path):
    """SPEC.md section 1, byte for byte, in the mounts kept with --dir."""
    mounts = tmp_path / "mounts"
    with demo(tmp_path, "--lag", "300ms", "--dir", str(mounts)) as (proc, urls, printed):
        assert printed == str(mounts)
        primary, replica = mounts / "primary", mounts / "replica"
        # The primary: no .primary file, a lag of zero, a position from its SQLite file.
        assert not (primary / ".primary").exists()
        assert read(primary / ".lag") == b"+000000000\n"
        pos = read(primary / "notes.db-pos")
        assert POS.fullmatch(pos) and len(pos) == 34
        assert int(pos[:16], 16) == change_counter(primary / "notes.db")
        # The replica names its primary by hostname only, and its .lag is LiteFS's 11 bytes.
        assert read(replica / ".primary") == b"localhost\n"
        lags = set()

        def lag_moves():
            data = read(replica / ".lag")
            assert LAG.fullmatch(data) and len(data) == 11 and int(data) >= 0, data
            lags.add(data)
            return len(lags) > 2

        wait_until(lag_moves, 10, ".lag to stay current")
        assert read(replica / "notes.db-pos") == pos

        status, headers, _ = form_request(urls["replica"], "POST", "/notes", body="text=hello")
        assert status == 303
        txid = re.search(r"__txid=([0-9a-f]{16});", headers["Set-Cookie"])[1]
        after = read(primary / "notes.db-pos")
        assert after[:16].decode() == txid and int(txid, 16) > int(pos[:16], 16)
        assert int(txid, 16) == change_counter(primary / "notes.db")
        # The replica catches up: the database first, then the very same position bytes.
        wait_until(lambda: read(replica / "notes.db-pos") == after, 20, "the replica to catch up")
        with contextlib.closing(sqlite3.connect(replica / "notes.db")) as db:
            assert db.execute("SELECT text FROM notes").fetchall() == [("hello",)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    assert (replica / ".primary").exists(), "--dir mounts are kept"


def signal_masks(pid: int) -> dict[int, int]:
    """The blocked-signals mask of each thread of process ``pid``, by thread id (Linux's /proc)."""
    masks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = read(f"/proc/{pid}/task/{tid}/status")
        except FileNotFoundError:  # a thread that has just ended
            continue
        masks[int(tid)] = int(re.search(rb"^SigBlk:\s*([0-9a-f]+)$", status, re.M)[1], 16)
    return masks


def test_check_stops_cleanly_on_sigterm_while_a_read_waits(tmp_path):
    def reading(text: str) -> bool:
        return "\n3. " in text and "\n4. " not in text  # step 4 is the read that waits a minute, here

    args = ["--check", "--lag", "60s", "--poll-timeout", "60s"]
    with demo_process(tmp_path, args, reading, "the read that waits") as (proc, text):
        if os.path.isdir(f"/proc/{proc.pid}/task"):
            # The kernel gives a process's signal to any thread not blocking it, and a handler
            # run for another thread does not wake the main one from its recv(): every thread
            # but the main one blocks SIGINT and SIGTERM. Besides the main thread: two servers,
            # the replication, and once the read waits, its request's thread and the watcher.
            def others_while_the_read_waits():
                masks = signal_masks(proc.pid)
                masks.pop(proc.pid)
                return masks if len(masks) >= 5 else None

            others = wait_until(others_while_the_read_waits, 30, "the read to wait")
            stop_bits = (1 << signal.SIGINT - 1) | (1 << signal.SIGTERM - 1)
            assert all(mask & stop_bits == stop_bits for mask in others.values()), others
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 130
    mounts = re.search(r"^mounts: (\S+)", text, re.M)[1]
    assert not os.path.exists(mounts) and "interrupted" in proc.log


def test_check_stops_cleanly_on_sigterm_while_it_starts(tmp_path):
    # From the moment its mounts directory exists, a signal is cleaned up after: it waits
    # until the cluster can be stopped, rather than killing the demo with the mounts left behind.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*DEMO, "--check", "--lag", "60s", "--poll-timeout", "60s"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": str(tmp)},
        )
    try:
        wait_until(lambda: os.listdir(tmp) or proc.poll() is not None, 60, "the mounts directory")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 130, log.read_text()
    finally:
        stop(proc)
    assert os.listdir(tmp) == [] and "Traceback" not in log.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "-3"], "litefs-wsgi: --port: expected 0 (any) or 1 to 65534 (the primary takes the next port), "),
        (["--port", "65535"], "litefs-wsgi: --port: expected 0 (any) or 1 to 65534"),
        (["--dir", "{file}"], "litefs-wsgi demo: cannot make the mounts: [Errno 20] Not a directory: "),
    ],
)
def test_a_bad_port_or_dir_is_exit_2_saying_why(tmp_path, args, message):
    # An OverflowError and a NotADirectoryError traceback before.
    file = tmp_path / "file"
    file.write_text("not a directory")
    result = run_check(*(arg.format(file=file) for arg in args))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(message) and "Traceback" not in result.stderr, result.stderr
