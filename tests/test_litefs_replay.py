"""Against a real LiteFS cluster: a GET that writes fails on the replica as LiteFS makes it
fail, and inside LiteFSMiddleware it is replayed on the primary.

The fixture ``litefs`` (conftest.py) runs two LiteFS nodes on 127.0.0.1 with the app of
tests/litefs_app.py on each; these tests skip without a litefs binary or FUSE.
"""

from __future__ import annotations

import json
import sqlite3
import uuid

import pytest
from servers import form_request
from test_litefs import read, txid_of

from litefs_wsgi.readonly import is_readonly_error

pytestmark = [pytest.mark.litefs, pytest.mark.timeout(120)]


def test_a_get_that_writes_on_a_real_replica_is_replayed_on_the_primary(litefs):
    primary, replica = litefs.primary, litefs.replica
    wid = uuid.uuid4().hex

    # The bare app on the replica: LiteFS refuses the write, the app's own 500. The database is
    # in WAL mode (tests/litefs_cluster.py's schema): LiteFS 0.5 fails the write to the -wal
    # file, and SQLite says "disk I/O error" (SQLITE_IOERR_WRITE), not "readonly database".
    status, _, _ = form_request(replica.raw_url, "GET", f"/visits/{wid}")
    assert status == 500
    assert "sqlite3.OperationalError: disk I/O error" in litefs.apps[replica.name].log_tail(200)

    # Inside the middleware: forwarded to the primary, which writes and answers with the cookie.
    before = primary.pos()
    status, headers, text = form_request(replica.app_url, "GET", f"/visits/{wid}")
    assert status == 200, text
    assert json.loads(text) == {"wid": wid, "node": primary.name}
    txid = txid_of(headers)
    assert txid == primary.pos() == before + 1
    status, text = read(replica.app_url, wid, txid)  # waits for real replication, then sees it
    assert status == 200 and json.loads(text)["found"] == 1

    # With fly-replay, the replica answers so that Fly.io's edge replays it on the primary.
    status, headers, text = form_request(litefs.apps[replica.name].fly_url, "GET", f"/visits/{uuid.uuid4().hex}")
    assert (status, text) == (200, "")
    assert headers["fly-replay"] == f"instance={primary.hostname}"


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_both_errors_of_a_real_replica_are_recognised(litefs, mode):
    """WAL mode written through a read-write connection gives SQLITE_IOERR_WRITE; a read-only
    connection SQLITE_READONLY."""
    path = litefs.replica.fuse_dir / "app.db"
    db = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=5)
    try:
        with pytest.raises(sqlite3.OperationalError) as info, db:
            db.execute("INSERT INTO rows (wid, node) VALUES ('refused', 'replica')")
    finally:
        db.close()
    assert is_readonly_error(info.value), info.value
