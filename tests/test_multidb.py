"""Several databases: the cookie carries each one's TXID and a read waits for all of them."""

from __future__ import annotations

import sqlite3

import pytest
from servers import answers, in_thread, recording_app, unreleased, wait_until
from werkzeug.test import Client

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.testing import LiteFSMount

DBS = ["a.db", "b.db"]


def writer(mount: LiteFSMount):
    """An app that commits one row to each database named in the path, then answers."""

    def app(environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            for db in environ["PATH_INFO"].strip("/").split("+"):
                with sqlite3.connect(mount.db_path(db)) as conn:
                    conn.execute("PRAGMA journal_mode=DELETE")
                    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
                    conn.execute("INSERT INTO t VALUES (1)")
                conn.close()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return mount.committing(app, DBS)


def reader(calls: list):
    return recording_app(calls, b"read")


def cookie_value(response) -> str:
    header = response.headers["Set-Cookie"]
    assert header.startswith("__txid=")
    return header.split(";")[0].split("=", 1)[1]


@pytest.fixture
def replica(replica):
    """conftest's replica of node-a, with a.db and b.db at TXID 1 instead of app.db."""
    replica.remove_position("app.db")
    for db in DBS:
        replica.set_position(db, 1)
    return replica


def test_the_cookie_carries_every_databases_txid_in_order(mount):
    mw = LiteFSMiddleware(writer(mount), db=DBS, mount_dir=mount.path, forward="http")
    client = Client(mw)
    cookie = cookie_value(client.post("/a.db+b.db"))
    a, b = mount.position("a.db"), mount.position("b.db")
    assert a and b
    assert cookie == f"{a:016x}-{b:016x}"
    cookie = cookie_value(client.post("/b.db"))
    assert cookie == f"{a:016x}-{b + 1:016x}"


def test_a_database_that_does_not_exist_yet_is_written_as_zero(mount):
    mw = LiteFSMiddleware(writer(mount), db=DBS, mount_dir=mount.path, forward="http")
    cookie = cookie_value(Client(mw).post("/b.db"))
    assert cookie == f"{0:016x}-{mount.position('b.db'):016x}"


def test_no_database_at_all_means_no_cookie(mount):
    mw = LiteFSMiddleware(reader([]), db=DBS, mount_dir=mount.path, forward="http")
    assert "Set-Cookie" not in Client(mw).post("/x").headers


def test_a_read_waits_until_every_database_has_caught_up(replica):
    calls: list = []
    mw = LiteFSMiddleware(reader(calls), db=DBS, mount_dir=replica.path, forward="http")
    client = Client(mw)
    client.set_cookie("__txid", f"{3:016x}-{5:016x}")
    thread, result = in_thread(client.get, "/items")
    wait_until(lambda: mw.watcher.waiting == 1, 10, "the read to wait")
    with answers(mw.watcher, "txid") as reads:
        replica.set_position("a.db", 3)  # a.db is there, b.db is not
        replica.set_position("b.db", 4)
        # b.db read at 4 three times (a.db is read in the same rounds, and was written first):
        # the watcher has weighed the read against both new positions at least once.
        wait_until(lambda: reads["b.db", 4] >= 3 or result, 10, "the watcher to read the new positions")
    assert result == [] and calls == []
    assert unreleased(mw.watcher) == [{"a.db": 3, "b.db": 5}]
    replica.set_position("b.db", 5)
    thread.join(20)
    assert result[0].status_code == 200 and calls == ["/items"]


def test_a_read_times_out_when_one_database_lags(replica):
    mw = LiteFSMiddleware(reader([]), db=DBS, mount_dir=replica.path, forward="http", poll_timeout=0.2)
    client = Client(mw)
    replica.set_position("a.db", 9)
    client.set_cookie("__txid", f"{3:016x}-{5:016x}")
    response = client.get("/items")
    assert response.status_code == 504 and response.get_data() == b"Proxy timeout\n"


def test_a_zero_for_one_database_waits_only_for_the_other(replica):
    calls: list = []
    mw = LiteFSMiddleware(reader(calls), db=DBS, mount_dir=replica.path, forward="http", poll_timeout=0.2)
    client = Client(mw)
    client.set_cookie("__txid", f"{0:016x}-{1:016x}")
    assert client.get("/now").status_code == 200
    client.set_cookie("__txid", f"{0:016x}-{2:016x}")
    assert client.get("/later").status_code == 504
    assert calls == ["/now"]


def test_a_database_missing_on_this_node_is_not_waited_for(replica):
    replica.remove_position("b.db")
    calls: list = []
    mw = LiteFSMiddleware(reader(calls), db=DBS, mount_dir=replica.path, forward="http", poll_timeout=0.2)
    client = Client(mw)
    client.set_cookie("__txid", f"{1:016x}-{7:016x}")
    assert client.get("/items").status_code == 200


@pytest.mark.parametrize(
    "value",
    [
        "0000000000000009",  # one database's format while two are tracked
        "0000000000000009-0000000000000009-0000000000000009",
        "0000000000000009-xyz",
        "0000000000000009_0000000000000009",
    ],
)
def test_a_cookie_of_the_wrong_shape_is_ignored(replica, value):
    calls: list = []
    mw = LiteFSMiddleware(reader(calls), db=DBS, mount_dir=replica.path, forward="http", poll_timeout=0.2)
    client = Client(mw)
    client.set_cookie("__txid", value)
    assert client.get("/items").status_code == 200  # served at once, as LiteFS does with a bad cookie


def test_a_replica_round_trip_reads_its_own_write(mount, replica):
    mw_primary = LiteFSMiddleware(writer(mount), db=DBS, mount_dir=mount.path, forward="http")
    calls: list = []
    mw_replica = LiteFSMiddleware(reader(calls), db=DBS, mount_dir=replica.path, forward="http")
    cookie = cookie_value(Client(mw_primary).post("/a.db+b.db"))
    client = Client(mw_replica)
    client.set_cookie("__txid", cookie)
    thread, result = in_thread(client.get, "/mine")
    wait_until(lambda: mw_replica.watcher.waiting == 1, 10, "the read to wait")
    replica.replicate(mount, "a.db")
    replica.replicate(mount, "b.db")
    thread.join(20)
    assert result[0].status_code == 200 and calls == ["/mine"]
