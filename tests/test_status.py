"""``litefs-wsgi status`` as a subprocess, against a mount and a fake LiteFS HTTP API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from servers import ROOT, FakeLiteFS, free_port, serve

from litefs_wsgi.testing import LiteFSMount


def status(*args: str, env: dict | None = None, code: int = 0) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LITEFS_", "FLY_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "litefs_wsgi.cli", "status", *args],
        cwd=ROOT,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == code, proc.stderr
    return proc.stdout


def lines(output: str) -> dict[str, str]:
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in output.splitlines())}


@pytest.fixture
def mount(tmp_path):
    return LiteFSMount(tmp_path / "litefs")


def test_a_primary(mount):
    mount.make_primary()
    mount.set_position("app.db", 0x2A, checksum=0xABCDEF)
    mount.set_position("other.db", 1)
    out = lines(status("--dir", mount.path))
    assert out["role"] == "primary (from the mount's .primary file)"
    assert out["primary"] == "this node"
    assert out["lag"] == "0 ms"
    assert out["db app.db"] == "TXID 000000000000002a (42), checksum 0000000000abcdef"
    assert out["db other.db"].startswith("TXID 0000000000000001 (1)")


def test_a_replica(mount):
    mount.make_replica("node-a", lag_ms=463)
    mount.set_position("app.db", 7)
    out = lines(status("--dir", mount.path, "--db", "app.db", "--db", "later.db"))
    assert out["role"].startswith("replica")
    assert out["primary"] == "node-a"
    assert out["lag"] == "463 ms"
    assert out["db app.db"].startswith("TXID 0000000000000007 (7)")
    assert out["db later.db"] == "no position"


def test_the_mount_from_the_environment_and_a_missing_mount(mount, tmp_path):
    mount.make_replica("node-a")
    assert lines(status(env={"LITEFS_DIR": mount.path}))["primary"] == "node-a"
    out = status("--dir", str(tmp_path / "nowhere"), code=1)
    # Where LiteFS is mounted instead, if anywhere on this machine, follows "it does not exist".
    assert lines(out)["mount"].startswith(f"{tmp_path / 'nowhere'} (not a LiteFS mount: it does not exist;")
    assert "is LiteFS running?" in out or "LiteFS is mounted at" in out
    assert lines(out)["role"] == "unknown"  # not "primary", which is all the absent files would say


def test_garbled_files_are_reported_not_trusted(mount):
    mount._write(".primary", b"evil.example/x\r\n")
    mount._write(".lag", b"lots\n")
    mount._write("app.db-pos", b"000000000000000g/0000000000000000\n")
    out = lines(status("--dir", mount.path))
    assert out["role"].startswith("replica")  # a .primary exists: not the primary
    assert out["primary"] == "unknown (.primary is not a plain host name)"
    assert out["lag"] == "unreadable"
    assert out["db app.db"] == "unreadable position"
    assert "evil" not in status("--dir", mount.path)


def test_the_role_comes_from_the_api_when_it_answers(mount):
    mount.make_primary()  # the files say primary; LiteFS knows better
    mount.set_position("app.db", 3)
    with FakeLiteFS(is_primary=False, hostname="node-b").running() as litefs:
        output = status("--dir", mount.path, "--api-url", litefs.url)
        out = lines(output)
        assert out["role"] == f"replica (from {litefs.url}/info)"
        assert out["primary"] == "node-b"
        assert f'api {litefs.url}/info: {{"id": "ABC", "clusterID": "LFSC1"' in output
        litefs.hostname = None  # an election: only the API can tell
        out = lines(status("--dir", mount.path, "--api-url", litefs.url))
        assert out["role"].startswith("replica") and out["primary"] == "none (an election)"
        litefs.is_primary = True
        out = lines(status("--dir", mount.path, "--api-url", litefs.url))
        assert out["role"] == f"primary (from {litefs.url}/info)" and out["primary"] == "this node"


def test_a_bad_hostname_from_the_api_is_refused(mount):
    mount.make_replica("node-a")
    with FakeLiteFS(is_primary=False, hostname="node-b\r\nX: y").running() as litefs:
        out = lines(status("--dir", mount.path, "--api-url", litefs.url))
    assert out["primary"] == "none (an election)"


def test_the_api_url_from_a_litefs_yml(mount, tmp_path):
    mount.make_primary()
    with FakeLiteFS(is_primary=False, hostname="node-c").running() as litefs:
        config = tmp_path / "litefs.yml"
        config.write_text(f"fuse:\n  dir: {mount.path}\nhttp:\n  addr: {litefs.url.split('//')[1]}\n")
        out = lines(status("--config", str(config)))
    assert out["primary"] == "node-c"


def test_an_api_url_that_is_not_litefs_is_exit_1_and_leaves_the_files_in_charge(mount):
    # An app answering JSON on every path (a catch-all, a health endpoint): not LiteFS's /info,
    # which always says isPrimary; its silence must not read as "a replica during an election".
    def any_json(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"status": "ok"}']

    mount.make_replica("node-a")
    with serve(any_json) as url:
        output = status("--dir", mount.path, "--api-url", url, code=1)
    out = lines(output)
    assert out["role"] == "replica (from the mount's .primary file)"
    assert out["primary"] == "node-a"
    assert f"api {url}/info: unexpected answer" in output


def test_an_unreachable_api_leaves_the_files_in_charge(mount):
    mount.make_replica("node-a")
    url = f"http://127.0.0.1:{free_port()}"
    output = status("--dir", mount.path, "--api-url", url, code=1)
    out = lines(output)
    assert out["role"] == "replica (from the mount's .primary file)"
    assert out["primary"] == "node-a"
    assert f"api {url}/info: unreachable" in output


@pytest.mark.parametrize(
    ("layout", "problem"),
    [
        (lambda d: d.mkdir(), "it is empty (a mount point LiteFS has not mounted, or has left)"),
        (
            lambda d: (d.mkdir(), (d / "app.db").write_bytes(b"")),
            "it has no .lag file, which a LiteFS mount always holds",
        ),
    ],
)
def test_a_directory_that_is_not_a_litefs_mount_is_role_unknown_and_exit_1(tmp_path, layout, problem):
    # As the middleware judges it at start-up: no .lag, not LiteFS's mount.
    directory = tmp_path / "litefs"
    layout(directory)
    out = lines(status("--dir", str(directory), code=1))
    assert out["mount"].startswith(f"{directory} (not a LiteFS mount: {problem}")
    assert out["role"] == "unknown" and "primary" not in out


def test_json(mount):
    mount.make_replica("node-a", lag_ms=12)
    mount.set_position("app.db", 7, checksum=0xABC)
    report = json.loads(status("--dir", mount.path, "--db", "app.db", "--db", "later.db", "--json"))
    assert report == {
        "mount": mount.path,
        "mount_problem": None,
        "role": "replica",
        "role_source": "the mount's .primary file",
        "primary": "node-a",
        "lag_ms": 12,
        "databases": {"app.db": {"txid": "0000000000000007", "checksum": "0000000000000abc"}, "later.db": None},
    }
    url = f"http://127.0.0.1:{free_port()}"
    report = json.loads(status("--dir", mount.path, "--api-url", url, "--json", code=1))
    assert report["api"]["url"] == url and report["api"]["info"] is None
    assert report["api"]["error"].startswith("unreachable (")
    assert report["role_source"] == "the mount's .primary file"
    report = json.loads(status("--dir", mount.path + "-nowhere", "--json", code=1))
    assert report["mount_problem"].startswith("it does not exist") and report["role"] == "unknown"
    with FakeLiteFS(is_primary=True).running() as litefs:
        report = json.loads(status("--dir", mount.path, "--api-url", litefs.url, "--json"))
    assert (report["role"], report["primary"], report["api"]["info"]["clusterID"]) == ("primary", None, "LFSC1")


def test_a_mistyped_variable_is_exit_2_naming_it(mount):
    mount.make_primary()
    proc = subprocess.run(
        [sys.executable, "-m", "litefs_wsgi.cli", "status", "--dir", mount.path],
        cwd=ROOT,
        env={**os.environ, "LITEFS_PROXY_POLL_TIMOUT": "2s"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "litefs-wsgi: unknown environment variable LITEFS_PROXY_POLL_TIMOUT" in proc.stderr
    assert "did you mean LITEFS_PROXY_POLL_TIMEOUT?" in proc.stderr


def test_a_comma_list_in_litefs_proxy_db_is_several_databases(mount):
    # As Config reads it: status read the list as one name, "app.db,other.db".
    mount.make_primary()
    mount.set_position("app.db", 2)
    mount.set_position("other.db", 5)
    out = lines(status("--dir", mount.path, env={"LITEFS_PROXY_DB": "app.db,other.db"}))
    assert out["db app.db"].startswith("TXID 0000000000000002 (2)")
    assert out["db other.db"].startswith("TXID 0000000000000005 (5)")
    assert "db app.db,other.db" not in out


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("proxy:\n  db: 5\n", "db: expected a list of strings, got 5 (set by proxy.db in "),
        ("proxy:\n  db: [1]\n", "db: expected a list of strings, got [1] (set by proxy.db in "),
        ("proxy:\n  db: sub/app.db\n", "db: 'sub/app.db' is not a database file name in the mount"),
        ("fuse:\n  dir: 5\nproxy:\n  db: app.db\n", "mount_dir: expected a string, got 5 (set by fuse.dir in "),
    ],
)
def test_a_bad_db_or_fuse_dir_in_the_file_is_exit_2_naming_it(mount, tmp_path, yaml, message):
    # They were a TypeError traceback, exit 1.
    mount.make_primary()
    config = tmp_path / "litefs.yml"
    config.write_text(yaml)
    proc = subprocess.run(
        [sys.executable, "-m", "litefs_wsgi.cli", "status", "--config", str(config)],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith(("LITEFS_", "FLY_"))},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"litefs-wsgi: {message}") and "Traceback" not in proc.stderr
