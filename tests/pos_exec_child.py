"""Run by LiteFS as its exec: (tests/test_litefs.py): positions read through kept descriptors.

``python pos_exec_child.py MOUNT_DIR REPORT``: writes rows into ``MOUNT_DIR/app.db`` and after
each commit reads its position twice, through a Node left to choose (under LiteFS's exec: it
keeps descriptors) and by opening the file. Writes what it saw to ``REPORT`` as JSON, then
waits, its descriptors still open, for LiteFS to stop it (60 s at most): never let go while
idle here (IDLE_FOR of an hour), so that LiteFS must wait for this process to exit.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time

import litefs_wsgi.node as node_module
from litefs_wsgi.node import Node, _read
from litefs_wsgi.txid import parse_pos_txid

WRITES = 50


def main(mount_dir: str, report: str) -> None:
    node_module.IDLE_FOR = 3600.0
    node = Node(mount_dir)
    db = sqlite3.connect(os.path.join(mount_dir, "app.db"), isolation_level=None, timeout=10)
    db.executescript("PRAGMA journal_mode = WAL; CREATE TABLE IF NOT EXISTS rows (n INTEGER);")
    db.close()  # the test holds no database file open: only the position's descriptor stays
    kept, opened = [], []
    for n in range(WRITES):
        db = sqlite3.connect(os.path.join(mount_dir, "app.db"), isolation_level=None, timeout=10)
        db.execute("INSERT INTO rows VALUES (?)", (n,))
        db.close()
        kept.append(node.txid("app.db"))
        opened.append(parse_pos_txid(_read(os.path.join(mount_dir, "app.db-pos"))))
    pos = os.path.realpath(os.path.join(mount_dir, "app.db-pos"))
    fds = [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == pos]
    result = {"keep_open": node.keep_open, "kept": kept, "opened": opened, "descriptors": len(fds)}
    with open(report + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(report + ".tmp", report)
    time.sleep(60)  # LiteFS's SIGTERM ends this first


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
