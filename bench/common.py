"""Running the benchmarks' servers: processes on 127.0.0.1 that are waited for and always stopped."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Return once something accepts on 127.0.0.1:``port``; end the run if ``proc`` exits first or ``timeout`` ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout is not None else ""
            if isinstance(output, bytes):
                output = output.decode(errors="replace")
            raise SystemExit(f"{' '.join(proc.args[:4])} exited {proc.returncode}: {output[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def running(command: list[str], port: int, env: dict | None = None, cwd: str = ROOT, **popen) -> Iterator:
    """Run ``command`` until it listens on ``port``; yields the process, stopped on exit.

    Its output goes nowhere unless ``popen`` says otherwise (``stdout=subprocess.PIPE``: then
    read it, or a server that logs each request blocks on a full pipe).
    """
    popen.setdefault("stdout", subprocess.DEVNULL)
    proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})}, **popen)
    try:
        wait_listening(port, proc)
        yield proc
    finally:
        stop(proc)


def gunicorn(args: list[str], port: int, env: dict | None = None, cwd: str = ROOT, **popen):
    """``gunicorn ARGS`` bound to 127.0.0.1:``port``, as a context manager yielding the master process."""
    command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", *args]
    return running(command, port, {**(env or {}), "GUNICORN_BIND": f"127.0.0.1:{port}"}, cwd, **popen)


def proxy_config(path: str, mount_dir: str, target: str, **options: object) -> str:
    """Write a litefs.yml for the standalone proxy in front of ``target`` (host:port) on
    ``mount_dir``, tracking app.db; ``options`` go under ``proxy:`` (``poll_timeout`` as
    ``poll-timeout``). Returns ``path``."""
    lines = "".join(f"  {key.replace('_', '-')}: {value}\n" for key, value in options.items())
    with open(path, "w") as f:
        f.write(f'fuse:\n  dir: "{mount_dir}"\nproxy:\n  target: "{target}"\n  db: "app.db"\n' + lines)
    return path


def standalone_proxy(config: str, port: int, threads: int, args: tuple[str, ...] = (), **popen):
    """The standalone proxy (``gunicorn -c gunicorn.conf.py ARGS``, one worker) reading ``config``."""
    env = {"LITEFS_WSGI_CONFIG": config, "GUNICORN_WORKERS": "1", "GUNICORN_THREADS": str(threads)}
    return gunicorn(["-c", os.path.join(ROOT, "gunicorn.conf.py"), *args], port, env, ROOT, **popen)


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (gunicorn's workers), from /proc."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def cpu_seconds(pids: list[int]) -> float:
    """The user and system CPU time the processes ``pids`` have used so far."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def context_switches(pids: list[int]) -> int:
    """The context switches (voluntary and forced) every thread of the processes ``pids`` has
    made so far: a thread makes one each time it waits, for a socket or for the GIL."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
            except OSError:  # a thread gone meanwhile
                continue
    return total


def callgrind_instructions(script: str, args: list[str]) -> int:
    """The CPU instructions ``python script ARGS`` executes, counted by valgrind's callgrind
    (with a fixed hash seed, so that two runs differ only by what they were asked to do)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, script, *args]
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONHASHSEED": "0"}
    )
    found = re.search(r"Collected : (\d+)", run.stderr)
    if found is None:
        raise SystemExit(f"callgrind counted nothing for {' '.join(args)}:\n{run.stderr[-2000:]}")
    return int(found[1])
