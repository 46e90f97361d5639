"""``litefs-wsgi status`` as a subprocess, against a mount and a fake LiteFS HTTP API."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from servers import ROOT, FakeLiteFS, free_port

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
    assert "(not found: is LiteFS running?" in lines(out)["mount"]
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


def test_an_unreachable_api_leaves_the_files_in_charge(mount):
    mount.make_replica("node-a")
    url = f"http://127.0.0.1:{free_port()}"
    output = status("--dir", mount.path, "--api-url", url)
    out = lines(output)
    assert out["role"] == "replica (from the mount's .primary file)"
    assert out["primary"] == "node-a"
    assert f"api {url}/info: unreachable" in output
