"""A real two-node LiteFS cluster on 127.0.0.1 (static lease, FUSE mounts), for tests and bench/soak.py.

Node A starts as the primary (``candidate: true``); node B is a replica naming A's
``advertise-url``. Each node has its own ``fuse.dir`` and ``data.dir`` and free ports for its
API (``http.addr``), LiteFS's own proxy and the test app. A replica reaches the primary's API
through a :class:`Relay` of this module, so that a test can slow replication down at will.

Everything waits for what it can observe (the mount in ``/proc/self/mountinfo``, ``.lag``,
``.primary``, ``-pos``, ``/info``), never for a fixed time, and stops by itself: every wait and
every socket has a timeout. Nothing here needs pytest.

A static lease names the primary by ``hostname``, which LiteFS writes into a replica's
``.primary`` and its ``fly-replay`` answers. All nodes share 127.0.0.1 here, so a node's
hostname is ``127.0.0.1:<port of its app>``: with ``primary_url = "http://{hostname}"`` a
replica's writes reach the primary's app, whichever node is the primary.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from litefs_wsgi.node import litefs_mounts

TESTS = os.path.dirname(os.path.abspath(__file__))
DB = "app.db"
NOT_SYNCED_LAG = 2147483647  # a replica's .lag until its first sync
# The test app's rows; no unique key on wid, so that a write applied twice shows as two rows.
SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS rows (wid TEXT NOT NULL, node TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rows_wid ON rows (wid);
"""


def litefs_binary() -> str | None:
    return shutil.which("litefs")


def unusable_reason() -> str | None:
    """Why a real cluster cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "a real LiteFS cluster needs Linux and FUSE"
    if litefs_binary() is None:
        return (
            "no litefs binary on PATH: get LiteFS 0.5.14 from https://github.com/superfly/litefs/releases "
            "(or build it with ../shared/tools/build-litefs.sh) to run the tests marked litefs"
        )
    if shutil.which("fusermount3") is None:
        return "fusermount3 not found: install fuse3 (apt-get install fuse3) to run the tests marked litefs"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"FUSE is not usable here (/dev/fuse: {exc.strerror}): LiteFS cannot mount"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.01) -> object:
    """``predicate()`` once it is true; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def mounted(path: str | os.PathLike) -> bool:
    """True while LiteFS is mounted at ``path``, alive or killed (then the mount is dead until
    ``fusermount3 -u``): from mountinfo, as ``os.path.ismount`` cannot stat a dead mount."""
    return os.path.abspath(path) in litefs_mounts()


def _read_text(path: str | os.PathLike) -> str | None:
    try:
        with open(path) as f:
            return f.read(4096)
    except OSError:  # absent, or a mount whose LiteFS died ("Transport endpoint is not connected")
        return None


# -- the delaying relay -----------------------------------------------------------------------


class Relay:
    """A TCP relay on 127.0.0.1 in front of ``target_port`` that holds every chunk, both ways,
    ``delay`` seconds before passing it on (order kept), and passes nothing while paused.

    Between a replica and the primary's API it is a slow link: LiteFS replicates over that
    connection, so the replica lags behind by ``delay``. ``delay`` may change at any time; it
    applies to the bytes read from then on.
    """

    def __init__(self, target_port: int, delay: float = 0.0, port: int = 0) -> None:
        self.target_port = target_port
        self.delay = delay
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads = [threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True)]
        self._threads[0].start()

    def pause(self) -> None:
        """Hold every byte from now on, until ``resume()``."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def close(self) -> None:
        """Stop relaying and close every connection, within a second."""
        self._stop.set()
        self._running.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        for thread in list(self._threads):
            thread.join(2)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)  # blocking: reads wait in poll(), close() ends a blocked send
            upstream.settimeout(None)
            pair = (client, upstream)
            finished: list[bool] = []
            with self._lock:
                self._sockets.update(pair)
            for src, dst in ((client, upstream), (upstream, client)):
                chunks: queue.Queue = queue.Queue()
                self._spawn(self._read, src, chunks)
                self._spawn(self._write, dst, chunks, pair, finished)

    def _read(self, src: socket.socket, chunks: queue.Queue) -> None:
        poller = select.poll()
        poller.register(src, select.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(200):
                    continue
                data = src.recv(65536)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def _write(self, dst: socket.socket, chunks: queue.Queue, pair: tuple, finished: list) -> None:
        try:
            while not self._stop.is_set():
                try:
                    due, data = chunks.get(timeout=0.2)
                except queue.Empty:
                    continue
                while not self._stop.is_set():
                    if not self._running.is_set():
                        self._running.wait(0.1)
                        continue
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    time.sleep(min(left, 0.1))
                if self._stop.is_set():
                    return
                if not data:
                    dst.shutdown(socket.SHUT_WR)  # pass the end on; the other way may still flow
                    return
                dst.sendall(data)
        except OSError:  # one side is gone: end both ways
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        finally:
            with self._lock:
                finished.append(True)
                if len(finished) == 2:  # both ways are done
                    for sock in pair:
                        self._sockets.discard(sock)
                        sock.close()


# -- LiteFS nodes ---------------------------------------------------------------------------


class LiteFSNode:
    """One ``litefs mount`` process with its config, mount, data directory and ports.

    ``app_port`` is where the node's app serves with litefs-wsgi (its hostname in the lease),
    ``raw_port`` the bare app, ``proxy_port`` LiteFS's own proxy (when the cluster has one).
    """

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.dir = Path(root) / name
        self.fuse_dir = self.dir / "litefs"
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "litefs.yml"
        self.log_path = self.dir / "litefs.log"
        for d in (self.fuse_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.api_port, self.app_port, self.raw_port, self.proxy_port = (free_port() for _ in range(4))
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.app_url = f"http://127.0.0.1:{self.app_port}"
        self.raw_url = f"http://127.0.0.1:{self.raw_port}"
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"
        self.hostname = f"127.0.0.1:{self.app_port}"
        self.relay = Relay(self.api_port)  # how the other node reaches this one's API
        self.proc: subprocess.Popen | None = None
        self.is_primary = False
        self.has_proxy = False

    def __repr__(self) -> str:
        return f"<LiteFSNode {self.name} {'primary' if self.is_primary else 'replica'}>"

    def configure(self, primary: LiteFSNode, proxy: dict | None = None) -> None:
        """Write litefs.yml: a static lease naming ``primary``; LiteFS's proxy in front of the
        bare app when ``proxy`` (extra ``proxy:`` keys, e.g. ``{"max-lag": "2s"}``) is given."""
        self.is_primary = primary is self
        config: dict = {
            "fuse": {"dir": str(self.fuse_dir)},
            "data": {"dir": str(self.data_dir)},
            "http": {"addr": f"127.0.0.1:{self.api_port}"},
            "lease": {
                "type": "static",
                "hostname": primary.hostname,
                "advertise-url": primary.relay.url,
                "candidate": self.is_primary,
            },
            "log": {"debug": False},
        }
        self.has_proxy = proxy is not None
        if proxy is not None:
            config["proxy"] = {
                "addr": f"127.0.0.1:{self.proxy_port}",
                "target": f"127.0.0.1:{self.raw_port}",
                "db": DB,
                **proxy,
            }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    # -- the process --

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"LiteFS of node {self.name} is already running")
        self.unmount()  # after a kill: a dead mount point cannot be mounted over
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LITEFS_", "FLY_"))}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [litefs_binary() or "litefs", "mount", "-config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def ready(self, primary: LiteFSNode) -> bool:
        """Mounted, and either the primary (/info says so, ``.lag`` is 0) or a replica that
        names ``primary`` and has finished its first sync."""
        if not self.running():
            raise RuntimeError(f"LiteFS of node {self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
        if not mounted(self.fuse_dir):
            return False
        lag = self.lag()
        if lag is None:
            return False
        info = self.info()
        if info is None or bool(info.get("isPrimary")) != (primary is self):
            return False
        if self.has_proxy and not port_open(self.proxy_port):
            return False
        if primary is self:
            return lag == 0
        return self.primary_file() == primary.hostname and lag != NOT_SYNCED_LAG

    def wait_ready(self, primary: LiteFSNode, timeout: float = 60.0) -> None:
        try:
            wait_for(lambda: self.ready(primary), timeout, f"LiteFS node {self.name} to be ready", 0.02)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; its log:\n{self.log_tail()}") from None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (LiteFS unmounts itself), SIGKILL if it lingers, then ``fusermount3 -u``."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.unmount()

    def kill(self) -> None:
        """SIGKILL: the mount stays behind, dead ("Transport endpoint is not connected")."""
        if self.running():
            self.proc.kill()
            self.proc.wait(5)

    def unmount(self) -> None:
        if mounted(self.fuse_dir):
            if subprocess.run(["fusermount3", "-u", str(self.fuse_dir)], capture_output=True, timeout=10).returncode:
                subprocess.run(["fusermount3", "-uz", str(self.fuse_dir)], capture_output=True, timeout=10)
            wait_for(lambda: not mounted(self.fuse_dir), 10, f"{self.fuse_dir} to be unmounted")

    # -- what the node shows --

    def lag(self) -> int | None:
        """``.lag`` in milliseconds; None when it cannot be read."""
        text = _read_text(self.fuse_dir / ".lag")
        try:
            return int(text) if text else None
        except ValueError:
            return None

    def primary_file(self) -> str | None:
        text = _read_text(self.fuse_dir / ".primary")
        return text.strip() if text else None

    def pos(self, db: str = DB) -> int | None:
        """The TXID in ``DB-pos``; None when there is none."""
        text = _read_text(self.fuse_dir / (db + "-pos"))
        try:
            return int(text.split("/")[0], 16) if text else None
        except ValueError:
            return None

    def info(self) -> dict | None:
        """``GET /info`` of the node's API, None when it does not answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=2)
        try:
            conn.request("GET", "/info")
            response = conn.getresponse()
            return json.loads(response.read()) if response.status == 200 else None
        except (OSError, ValueError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def close(self) -> None:
        self.stop()
        self.relay.close()


class Cluster:
    """Two LiteFS nodes, ``a`` then ``b``; ``a`` is the primary until ``failover()``."""

    def __init__(self, root: str | os.PathLike, proxy: dict | None = None, names: tuple[str, ...] = ("a", "b")):
        self.root = Path(root)
        self.proxy = proxy
        self.nodes = [LiteFSNode(self.root, name) for name in names]
        self.primary = self.nodes[0]

    @property
    def replicas(self) -> list[LiteFSNode]:
        return [node for node in self.nodes if node is not self.primary]

    @property
    def replica(self) -> LiteFSNode:
        return self.replicas[0]

    def node(self, name: str) -> LiteFSNode:
        return next(node for node in self.nodes if node.name == name)

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.configure(self.primary, self.proxy)
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready(self.primary, timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.wait_ready(self.primary, timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def failover(self, to: LiteFSNode | None = None, timeout: float = 60.0) -> None:
        """A manual failover with a static lease: stop every node, name ``to`` (default: the
        first replica) as the primary in every litefs.yml, start them again."""
        to = to or self.replica
        self.stop()
        self.primary = to
        self.start(timeout)

    def wait_replicated(self, txid: int, db: str = DB, timeout: float = 30.0) -> None:
        """Until every replica's position is at least ``txid``."""
        for node in self.replicas:
            wait_for(lambda n=node: (n.pos(db) or 0) >= txid, timeout, f"node {node.name} to reach TXID {txid}", 0.002)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the app on each node ---------------------------------------------------------------------


def _no_control_socket() -> list[str]:
    # gunicorn 24+ opens a control socket at one path per user: apps killed with SIGKILL, and
    # several apps at once, must not share (or leave behind) one.
    from gunicorn.config import KNOWN_SETTINGS

    return ["--no-control-socket"] if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS) else []


class NodeApp:
    """``tests/litefs_app.py`` under gunicorn for one node: the bare app on ``raw_port``, the
    app inside LiteFSMiddleware on ``app_port`` (options from ``options``, as LITEFS_PROXY_*)
    and on ``fly_port`` the same with ``forward="fly-replay"``.

    It runs in a session of its own, so that ``kill()`` and ``pause()`` reach the master and
    its workers, and nothing else.
    """

    def __init__(self, node: LiteFSNode, threads: int = 16, **options):
        self.node = node
        self.threads = threads
        self.fly_port = free_port()  # the app inside LiteFSMiddleware with forward="fly-replay"
        self.fly_url = f"http://127.0.0.1:{self.fly_port}"
        self.options = {
            "db": DB,
            "primary_url": "http://{hostname}",
            "api_url": node.api_url,
            **{k: str(v) for k, v in options.items()},
        }
        self.log_path = node.dir / "app.log"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LITEFS_", "FLY_"))}
        env.update({"LITEFS_PROXY_" + k.upper(): v for k, v in self.options.items()})
        env.update(
            LITEFS_DIR=str(self.node.fuse_dir),
            LITEFS_APP_NODE=self.node.name,
            LITEFS_APP_RAW_PORT=str(self.node.raw_port),
            LITEFS_APP_FLY_PORT=str(self.fly_port),
        )
        return env

    def start(self, timeout: float = 60.0) -> None:
        ports = [self.node.app_port, self.node.raw_port, self.fly_port]
        binds = [arg for port in ports for arg in ("--bind", f"127.0.0.1:{port}")]
        command = [sys.executable, "-m", "gunicorn", *binds, "-k", "gthread", "-w", "1"]
        command += ["--threads", str(self.threads), "--timeout", "120", "--graceful-timeout", "5"]
        command += ["--keep-alive", "5", *_no_control_socket(), "litefs_app:application"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=TESTS, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the app of node {self.node.name} exited {self.proc.returncode}:\n{self.log_tail()}"
                )
            return all(port_open(port) for port in ports)

        wait_for(listening, timeout, f"the app of node {self.node.name} to listen", 0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # its own session: the master and its workers

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.running():
            self.resume()
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> NodeApp:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def create_schema(node: LiteFSNode) -> int:
    """Create the app's table in the primary's database; returns the TXID after it."""
    db = sqlite3.connect(str(node.fuse_dir / DB), timeout=10)
    try:
        db.executescript(SCHEMA)
    finally:
        db.close()
    return node.pos() or 0
