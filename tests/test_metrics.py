"""Prometheus metrics: every request counted once by its decision, waits timed, forward
failures by cause, the lag read at scrape time; added up over gunicorn's workers in the
standalone proxy; and nothing at all without prometheus_client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from urllib.parse import urlsplit

import pytest
from fwd_client import request
from proxy_target import Target
from servers import ROOT, free_port, gunicorn, in_thread, proxy_config, recording_app, serve, unreleased, wait_until
from werkzeug.test import Client

from litefs_wsgi import Config, LiteFSMiddleware, ReplayOnPrimary, metrics
from litefs_wsgi.testing import LiteFSMount

REQUESTS = "litefs_wsgi_requests_total"
WAIT = "litefs_wsgi_wait_seconds"
NO_PROMETHEUS = "import sys; sys.modules['prometheus_client'] = None\n"  # import prometheus_client now fails


def cookie(txid: int) -> dict:
    return {"Cookie": f"__txid={txid:016x}"}


# -- without prometheus_client ------------------------------------------------------------------

MIDDLEWARE_WITHOUT_PROMETHEUS = (
    NO_PROMETHEUS
    + """
import json
from werkzeug.test import Client
from litefs_wsgi import LiteFSMiddleware, metrics
from litefs_wsgi.testing import LiteFSMount

mount = LiteFSMount(sys.argv[1])
mount.make_replica("127.0.0.1")
mount.set_position("app.db", 1)
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
middleware = LiteFSMiddleware(
    app, db="app.db", mount_dir=mount.path, forward="http", primary_url="http://{hostname}:" + sys.argv[2],
    poll_timeout=0.05, connect_timeout=0.1, passthrough=["/static/*"],
)
client = Client(middleware, use_cookies=False)
statuses = [
    client.get("/").status_code,
    client.get("/", headers={"Cookie": "__txid=0000000000000001"}).status_code,
    client.get("/", headers={"Cookie": "__txid=00000000000000ff"}).status_code,
    client.post("/").status_code,
    client.get("/static/a.css").status_code,
    client.get("/litefs/health").status_code,
]
loaded = sorted(name for name, module in sys.modules.items() if name.startswith("prometheus") and module is not None)
print(json.dumps({"statuses": statuses, "noop": metrics.recorder() is metrics.NOOP, "loaded": loaded}))
"""
)


def test_without_prometheus_client_nothing_is_imported_and_requests_are_served(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", MIDDLEWARE_WITHOUT_PROMETHEUS, str(tmp_path / "litefs"), str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # read, satisfied read, timed out, forward to a closed port, passthrough, health
    assert report == {"statuses": [200, 200, 504, 502, 200, 200], "noop": True, "loaded": []}


def test_without_prometheus_client_metrics_path_is_a_config_error(tmp_path):
    env = {
        **os.environ,
        "LITEFS_PROXY_DB": "app.db",
        "LITEFS_PROXY_TARGET": "127.0.0.1:9",
        "LITEFS_PROXY_METRICS_PATH": "/litefs/metrics",
        "LITEFS_DIR": str(tmp_path),
    }
    env.pop("LITEFS_WSGI_CONFIG", None)
    # The gunicorn settings stop the master before any worker starts, as for any bad option...
    settings = NO_PROMETHEUS + "import runpy; runpy.run_module('litefs_wsgi.gunicorn_conf')"
    result = subprocess.run([sys.executable, "-c", settings], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "metrics_path: serving metrics needs prometheus_client: pip install 'litefs-wsgi[metrics]'" in result.stderr
    # ... and the proxy, built otherwise, says the same.
    build = NO_PROMETHEUS + "from litefs_wsgi import proxy; proxy.make_application()"
    result = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert "ConfigError: metrics_path: serving metrics needs prometheus_client" in result.stderr


# -- with prometheus_client, in-process -------------------------------------------------------

try:
    from prometheus_client import REGISTRY
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # the tests above still run
    REGISTRY = None

needs_prometheus = pytest.mark.skipif(
    REGISTRY is None, reason="needs prometheus_client: pip install 'litefs-wsgi[metrics]'"
)


class Counts:
    """The registry's values when made; ``moved()`` tells what changed since, and by how much.
    The registry is the process's: only differences mean anything in a test."""

    def __init__(self) -> None:
        self.before = self._now()

    @staticmethod
    def _now() -> dict[str, float]:
        values = {d: REGISTRY.get_sample_value(REQUESTS, {"decision": d}) for d in metrics.DECISIONS}
        values["wait_count"] = REGISTRY.get_sample_value(WAIT + "_count")
        values["wait_sum"] = REGISTRY.get_sample_value(WAIT + "_sum")
        for to in ("primary", "target"):
            for cause in metrics.FORWARD_CAUSES:
                labels = {"to": to, "cause": cause}
                values[f"{to}:{cause}"] = REGISTRY.get_sample_value("litefs_wsgi_forward_errors_total", labels)
        return values

    def moved(self) -> dict[str, float]:
        now = self._now()
        moved = {name: now[name] - self.before[name] for name in now if now[name] != self.before[name]}
        self.before = now
        return moved


def waiting() -> float:
    return REGISTRY.get_sample_value("litefs_wsgi_waiting_reads")


@pytest.fixture
def primary_server():
    """An HTTP server standing in for the primary: it records the paths it is sent."""
    calls: list[str] = []
    with serve(recording_app(calls)) as url:
        yield urlsplit(url).port, calls


@pytest.fixture
def replica(tmp_path):
    """A replica whose primary, 127.0.0.1, is reached at primary_url's port."""
    m = LiteFSMount(tmp_path / "replica")
    m.make_replica("127.0.0.1")
    m.set_position("app.db", 1)
    return m


def ok(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


@needs_prometheus
def test_each_decision_moves_its_counter_and_the_wait_histogram_by_exactly_one(replica, mount, primary_server):
    port, calls = primary_server
    options = {"db": "app.db", "forward": "http", "primary_url": f"http://{{hostname}}:{port}"}
    on_replica = LiteFSMiddleware(ok, mount_dir=replica.path, poll_timeout="300ms", max_waiters=1, **options)
    client = Client(on_replica, use_cookies=False)
    counts = Counts()

    # A read that waits, then gets its TXID.
    thread, result = in_thread(lambda: client.get("/", headers=cookie(2)).status_code)
    wait_until(lambda: unreleased(on_replica.watcher), 10, "the read to wait")
    assert waiting() == 1  # waiting now
    # A second one is refused: max_waiters is 1. It neither waits nor is timed.
    assert client.get("/", headers=cookie(2)).status_code == 503
    assert counts.moved() == {"refused": 1}
    replica.set_position("app.db", 2)
    thread.join(10)
    assert result == [200]
    moved = counts.moved()
    assert moved.keys() == {"waited", "wait_count", "wait_sum"}
    assert (moved["waited"], moved["wait_count"]) == (1, 1)
    assert waiting() == 0

    # A read that times out (300 ms) is timed too.
    assert client.get("/", headers=cookie(5)).status_code == 504
    moved = counts.moved()
    assert moved.keys() == {"timeout", "wait_count", "wait_sum"}
    assert (moved["timeout"], moved["wait_count"]) == (1, 1)
    assert 0.3 <= moved["wait_sum"] < 10

    # A write on a replica is forwarded to the primary.
    assert client.post("/items").status_code == 200
    assert calls == ["/items"]
    assert counts.moved() == {"forward": 1}

    # A write on the primary.
    on_primary = LiteFSMiddleware(ok, mount_dir=mount.path, **options)
    assert Client(on_primary, use_cookies=False).post("/items").status_code == 200
    assert counts.moved() == {"write_primary": 1}

    # Reads served at once: no cookie, and a cookie this node has reached.
    assert client.get("/").status_code == 200
    assert client.get("/", headers=cookie(2)).status_code == 200
    assert counts.moved() == {"read": 2}


@needs_prometheus
def test_the_other_decisions_count_once_each(replica, mount, tmp_path):
    counts = Counts()
    options = {"db": "app.db", "passthrough": ["/static/*"]}
    fly = Client(LiteFSMiddleware(ok, mount_dir=replica.path, forward="fly-replay", **options), use_cookies=False)
    assert fly.get("/static/app.css").status_code == 200
    assert counts.moved() == {"passthrough": 1}
    assert fly.get("/litefs/health").status_code == 200
    assert counts.moved() == {"health": 1}
    assert fly.post("/items").headers["fly-replay"] == "instance=127.0.0.1"
    assert counts.moved() == {"fly_replay": 1}

    # A view asking for the primary: on a replica, counted where it went (not as a read too);
    # on the primary, the middleware's 500.
    def replays(environ, start_response):
        return ReplayOnPrimary()(environ, start_response)

    assert (
        Client(LiteFSMiddleware(replays, mount_dir=replica.path, forward="fly-replay", **options), use_cookies=False)
        .get("/")
        .status_code
        == 200
    )
    assert counts.moved() == {"fly_replay": 1}
    assert (
        Client(LiteFSMiddleware(replays, mount_dir=mount.path, **options), use_cookies=False).get("/").status_code
        == 500
    )
    assert counts.moved() == {"error": 1}

    # No primary known (a .primary that is not a host name), after primary_redirect_timeout.
    electing = LiteFSMount(tmp_path / "electing")
    electing.make_replica("not a host name")
    no_primary = LiteFSMiddleware(ok, mount_dir=electing.path, primary_redirect_timeout=0, **options)
    assert Client(no_primary, use_cookies=False).post("/items").status_code == 503
    assert counts.moved() == {"no_primary": 1}


@needs_prometheus
def test_a_read_whose_app_raises_is_counted_once(mount):
    # Counted once the app has returned, or raised: a plain WSGI app that starts its answer
    # and then raises (the server's 500) is a read too, as when counted at start_response.
    def raises(environ, start_response):
        start_response("200 OK", [])
        raise RuntimeError("the view failed")

    counts = Counts()
    with pytest.raises(RuntimeError):
        Client(LiteFSMiddleware(raises, db="app.db", mount_dir=mount.path), use_cookies=False).get("/")
    assert counts.moved() == {"read": 1}


@needs_prometheus
def test_forward_failures_by_cause(replica, mount):
    closed = free_port()
    options = {"db": "app.db", "forward": "http", "connect_timeout": "200ms"}
    refused = LiteFSMiddleware(ok, mount_dir=replica.path, primary_url=f"http://{{hostname}}:{closed}", **options)
    counts = Counts()
    assert Client(refused, use_cookies=False).post("/items").status_code == 502
    assert counts.moved() == {"forward": 1, "primary:connect": 1}

    # The primary takes the request and stays silent past read_timeout.
    release = threading.Event()

    def silent(environ, start_response):
        release.wait(30)
        return ok(environ, start_response)

    with serve(silent) as url:
        slow = LiteFSMiddleware(
            ok,
            mount_dir=replica.path,
            primary_url=f"http://{{hostname}}:{urlsplit(url).port}",
            read_timeout="300ms",
            **options,
        )
        try:
            assert Client(slow, use_cookies=False).post("/items").status_code == 504
        finally:
            release.set()
    assert counts.moved() == {"forward": 1, "primary:timeout": 1}

    # The primary accepts the connection, reads the request, and closes without an answer.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(20)

        def hang_up():
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(20)
                conn.recv(65536)

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        closing = LiteFSMiddleware(
            ok, mount_dir=replica.path, primary_url=f"http://{{hostname}}:{listener.getsockname()[1]}", **options
        )
        assert Client(closing, use_cookies=False).post("/items").status_code == 502
        thread.join(20)
    assert counts.moved() == {"forward": 1, "primary:protocol": 1}

    # The standalone proxy's own target, down.
    from litefs_wsgi.proxy import make_application

    proxy = make_application(
        Config(db="app.db", mount_dir=mount.path, target=f"127.0.0.1:{closed}", connect_timeout=0.2)
    )
    assert Client(proxy, use_cookies=False).get("/").status_code == 502
    assert counts.moved() == {"read": 1, "target:connect": 1}


@needs_prometheus
def test_an_app_exporting_prometheus_client_includes_them_as_the_readme_says(replica):
    import flask
    from prometheus_client import make_wsgi_app
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    app = flask.Flask("exported")
    app.add_url_rule("/", "index", lambda: "ok")
    app.wsgi_app = DispatcherMiddleware(
        LiteFSMiddleware(app.wsgi_app, db="app.db", mount_dir=replica.path), {"/metrics": make_wsgi_app()}
    )
    client = app.test_client(use_cookies=False)
    counts = Counts()

    def exported_reads() -> float:
        text = client.get("/metrics").get_data(as_text=True)
        families = {family.name: family for family in text_string_to_metric_families(text)}
        return next(s.value for s in families["litefs_wsgi_requests"].samples if s.labels == {"decision": "read"})

    before = exported_reads()
    assert [client.get("/").status_code for _ in range(3)] == [200] * 3
    assert exported_reads() == before + 3
    assert counts.moved() == {"read": 3}  # the scrapes are not counted


@needs_prometheus
def test_a_write_refused_for_want_of_a_mount_is_no_primary(tmp_path):
    counts = Counts()
    unmounted = LiteFSMiddleware(ok, db="app.db", mount_dir=str(tmp_path / "nothing"), require_mount=True)
    assert Client(unmounted, use_cookies=False).post("/items").status_code == 503
    assert counts.moved() == {"no_primary": 1}


@needs_prometheus
def test_lag_and_role_are_read_when_scraped(replica):
    LiteFSMiddleware(ok, db="app.db", mount_dir=replica.path)  # the last one made is reported
    replica.set_lag(1234)
    assert REGISTRY.get_sample_value("litefs_wsgi_lag_seconds") == 1.234
    assert REGISTRY.get_sample_value("litefs_wsgi_primary") == 0
    replica.set_lag(56)
    assert REGISTRY.get_sample_value("litefs_wsgi_lag_seconds") == 0.056
    replica.make_primary()
    assert REGISTRY.get_sample_value("litefs_wsgi_primary") == 1
    with open(os.path.join(replica.path, ".lag"), "wb") as f:
        f.write(b"garbage")
    lag = REGISTRY.get_sample_value("litefs_wsgi_lag_seconds")
    assert lag != lag  # NaN: unreadable


# -- the standalone proxy under gunicorn's workers ----------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """metrics_path's samples, as {"name{label=value}": value}."""
    with urllib.request.urlopen(url + "/litefs/metrics", timeout=20) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def requests_counted(samples: dict[str, float]) -> dict[str, float]:
    return {
        d: samples[f"{REQUESTS}{{decision={d}}}"] for d in metrics.DECISIONS if samples[f"{REQUESTS}{{decision={d}}}"]
    }


@pytest.fixture
def target_port(tmp_path):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    mount.set_position("app.db", 1)
    mount.set_lag(0)
    app = Target(mount)
    with serve(app) as url:
        yield mount, urlsplit(url).port


def proxy_env(config: str) -> dict[str, str]:
    """The standalone proxy with two workers, reading ``config``."""
    env = {**os.environ, "LITEFS_WSGI_CONFIG": config, "GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "4"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn_conf then makes a temporary one
    return env


@needs_prometheus
def test_two_workers_count_every_request_once(tmp_path, target_port):
    mount, port = target_port
    config = proxy_config(tmp_path, mount, f"127.0.0.1:{port}", metrics_path="/litefs/metrics")
    env = proxy_env(config)
    with gunicorn(["-c", os.path.join(ROOT, "gunicorn.conf.py")], env=env) as (url, _proc):
        proxy = urlsplit(url).port
        threads = [
            threading.Thread(target=lambda: [request(proxy, "GET", "/echo") for _ in range(10)]) for _ in range(3)
        ] + [
            threading.Thread(target=lambda: [request(proxy, "POST", "/echo", body=b"x") for _ in range(5)])
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        samples = scrape(url)
        assert requests_counted(samples) == {"read": 30, "write_primary": 10}
        assert scrape(url)[f"{REQUESTS}{{decision=read}}"] == 30  # a scrape is not a request
        assert samples["litefs_wsgi_waiting_reads"] == 0
        assert (samples["litefs_wsgi_lag_seconds"], samples["litefs_wsgi_primary"]) == (0, 1)


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(child) for child in f.read().split()}


@needs_prometheus
def test_counts_of_workers_that_exited_still_add_up(tmp_path, target_port):
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        pytest.skip("needs Linux's /proc/PID/task/PID/children to find gunicorn's workers")
    mount, port = target_port
    config = proxy_config(tmp_path, mount, f"127.0.0.1:{port}", metrics_path="/litefs/metrics")
    directory = tmp_path / "prometheus"  # given: then it is kept, and can be looked into
    env = {**proxy_env(config), "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    with gunicorn(["-c", os.path.join(ROOT, "gunicorn.conf.py")], env=env) as (url, proc):
        proxy = urlsplit(url).port
        first = wait_until(lambda: len(children(proc.pid)) == 2 and children(proc.pid), 30, "two workers")
        for _ in range(12):
            assert request(proxy, "GET", "/echo")[0] == 200
        # Both workers exit (gunicorn starts two others): what they counted is in their files.
        for pid in first:
            os.kill(pid, signal.SIGTERM)

        def replaced():
            now = children(proc.pid)
            fresh = now - first
            return len(fresh) == 2 and all((directory / f"counter_{pid}.db").exists() for pid in fresh) and fresh

        second = wait_until(replaced, 30, "two new workers")
        # child_exit told prometheus_client: the "waiting now" gauge of a dead worker is dropped.
        wait_until(lambda: not any((directory / f"gauge_livesum_{pid}.db").exists() for pid in first), 30, "cleanup")
        for _ in range(8):
            assert request(proxy, "POST", "/echo", body=b"x")[0] == 200
        assert requests_counted(scrape(url)) == {"read": 12, "write_primary": 8}
        assert all((directory / f"gauge_livesum_{pid}.db").exists() for pid in second)
    assert directory.is_dir()  # yours: not removed
