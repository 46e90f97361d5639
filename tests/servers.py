"""Real servers on 127.0.0.1 for the tests: werkzeug in a thread, gunicorn in a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

from werkzeug.serving import make_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns a true value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def serve(app, port: int = 0) -> Iterator[str]:
    """Serve a WSGI app with werkzeug's threaded server; yields its base URL."""
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def gunicorn(args: list[str], env: dict[str, str] | None = None, port: int | None = None,
             cwd: str = ROOT) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``gunicorn ARGS`` bound to 127.0.0.1; yields (base URL, process) once it listens."""
    port = port or free_port()
    full_env = {**os.environ, **(env or {}), "GUNICORN_BIND": f"127.0.0.1:{port}"}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", *args],
                            cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, 30, f"gunicorn on port {port}")
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
