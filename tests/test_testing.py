"""LiteFSMount writes LiteFS's control files byte for byte (SPEC.md section 1)."""

import os
import sqlite3

import pytest

from litefs_wsgi.node import Node
from litefs_wsgi.testing import LiteFSMount


def read(mount, name):
    with open(os.path.join(mount.path, name), "rb") as f:
        return f.read()


def test_pos_file_format(tmp_path):
    mount = LiteFSMount(tmp_path)
    mount.set_position("app.db", 7, checksum=0xDEADBEEF)
    data = read(mount, "app.db-pos")
    assert data == b"0000000000000007/00000000deadbeef\n"
    assert len(data) == 34
    assert mount.position("app.db") == 7


def test_pos_file_default_checksum_is_lowercase_hex(tmp_path):
    mount = LiteFSMount(tmp_path)
    mount.set_position("app.db", 0xABC)
    data = read(mount, "app.db-pos")
    assert len(data) == 34
    assert data[:17] == b"0000000000000abc/"
    assert data[17:33] == data[17:33].lower()
    assert all(c in b"0123456789abcdef" for c in data[17:33])
    assert data.endswith(b"\n")


def test_remove_position(tmp_path):
    mount = LiteFSMount(tmp_path)
    assert mount.position("app.db") is None
    mount.set_position("app.db", 1)
    mount.remove_position("app.db")
    assert not os.path.exists(os.path.join(mount.path, "app.db-pos"))
    assert mount.position("app.db") is None


def test_replica_files(tmp_path):
    mount = LiteFSMount(tmp_path)
    mount.make_replica("node-a", lag_ms=463)
    assert read(mount, ".primary") == b"node-a\n"
    assert read(mount, ".lag") == b"+000000463\n"
    assert len(read(mount, ".lag")) == 11
    node = Node(mount.path)
    assert node.primary() == "node-a"
    assert not node.is_primary()
    assert node.lag() == 463


def test_primary_files(tmp_path):
    mount = LiteFSMount(tmp_path)
    mount.make_replica("node-a")
    mount.make_primary()
    assert not os.path.exists(os.path.join(mount.path, ".primary"))
    assert read(mount, ".lag") == b"+000000000\n"
    node = Node(mount.path)
    assert node.is_primary()
    assert node.primary() is None


@pytest.mark.parametrize(
    ("ms", "data"),
    [
        (0, b"+000000000\n"),
        (463, b"+000000463\n"),
        (-5, b"-000000005\n"),  # clock skew
        (2147483647, b"+2147483647\n"),  # a replica before its first sync
    ],
)
def test_lag_file_format(tmp_path, ms, data):
    mount = LiteFSMount(tmp_path)
    mount.set_lag(ms)
    assert read(mount, ".lag") == data
    assert Node(mount.path).lag() == ms


def test_no_temporary_files_left(tmp_path):
    mount = LiteFSMount(tmp_path)
    mount.make_replica("node-a", 3)
    mount.set_position("app.db", 3)
    assert sorted(os.listdir(mount.path)) == [".lag", ".primary", "app.db-pos"]


def test_sync_follows_sqlite_change_counter(tmp_path):
    mount = LiteFSMount(tmp_path)
    assert mount.sync("app.db") == 0
    with sqlite3.connect(mount.db_path("app.db")) as conn:
        conn.execute("CREATE TABLE t (x)")
    first = mount.sync("app.db")
    assert first >= 1
    assert mount.position("app.db") == first
    for i in range(3):
        with sqlite3.connect(mount.db_path("app.db")) as conn:
            conn.execute("INSERT INTO t VALUES (?)", (i,))
    assert mount.sync("app.db") == first + 3
    assert mount.position("app.db") == first + 3


def test_replicate_copies_data_then_position(tmp_path):
    primary, replica = LiteFSMount(tmp_path / "a"), LiteFSMount(tmp_path / "b")
    assert replica.replicate(primary, "app.db") is None
    with sqlite3.connect(primary.db_path("app.db")) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES ('hello')")
    txid = primary.sync("app.db")
    assert replica.replicate(primary, "app.db") == txid
    assert replica.position("app.db") == txid
    assert read(replica, "app.db-pos") == read(primary, "app.db-pos")
    with sqlite3.connect(replica.db_path("app.db")) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [("hello",)]


def test_committing_moves_position_before_the_response_starts(tmp_path):
    mount = LiteFSMount(tmp_path)
    seen = []

    def app(environ, start_response):
        with sqlite3.connect(mount.db_path("app.db")) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
            conn.execute("INSERT INTO t VALUES (1)")
        before = mount.position("app.db")
        start_response("200 OK", [])
        seen.append((before, mount.position("app.db")))
        return [b""]

    wrapped = mount.committing(app)
    wrapped({}, lambda *args: None)
    wrapped({}, lambda *args: None)
    (before1, after1), (before2, after2) = seen
    assert before1 is None and after1 >= 1
    assert before2 == after1 and after2 == after1 + 1
