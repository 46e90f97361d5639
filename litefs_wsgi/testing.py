"""Lay out a directory exactly as a LiteFS mount, to test apps against a primary and a replica."""

from __future__ import annotations

import os
import sqlite3
import struct
import tempfile
from collections.abc import Iterable

from .txid import Pos, format_pos, parse_pos

_FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


def _checksum(txid: int) -> int:
    """A stand-in for LiteFS's post-apply checksum: any 64-bit value, stable per TXID."""
    return (txid * 0x9E3779B97F4A7C15 + _FNV_PRIME) & _MASK


class LiteFSMount:
    """A directory holding LiteFS's control files in LiteFS's formats: ``DB-pos``
    (``%016x/%016x\\n``, TXID and checksum), ``.primary`` (the primary's hostname, on a
    replica only) and ``.lag`` (``%+010d\\n`` milliseconds).

    .. code-block:: python

        primary, replica = LiteFSMount(tmp / "a"), LiteFSMount(tmp / "b")
        replica.make_replica("node-a")            # .primary: "node-a\\n"
        primary.set_position("app.db", 7)         # app.db-pos: "0000000000000007/…\\n"
        replica.replicate(primary, "app.db")      # copy the database, then its position

    Files are replaced atomically, so a reader never sees half of one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)

    def _write(self, name: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(self.path, name))

    def _remove(self, name: str) -> None:
        try:
            os.remove(os.path.join(self.path, name))
        except FileNotFoundError:
            pass

    def db_path(self, db: str) -> str:
        """Where the database file itself lives, as in a LiteFS mount."""
        return os.path.join(self.path, db)

    def set_position(self, db: str, txid: int, checksum: int | None = None) -> None:
        """Write ``DB-pos``: ``%016x/%016x\\n``."""
        self._write(db + "-pos", format_pos(Pos(txid, _checksum(txid) if checksum is None else checksum)))

    def position(self, db: str) -> int | None:
        """The TXID in ``DB-pos``, None when there is none."""
        try:
            with open(os.path.join(self.path, db + "-pos"), "rb") as f:
                pos = parse_pos(f.read())
        except FileNotFoundError:
            return None
        return pos.txid if pos else None

    def remove_position(self, db: str) -> None:
        self._remove(db + "-pos")

    def make_primary(self) -> None:
        """This node is the primary: no ``.primary`` file, and a lag of zero."""
        self._remove(".primary")
        self.set_lag(0)

    def make_replica(self, primary: str, lag_ms: int = 0) -> None:
        """This node replicates from ``primary``: ``.primary`` holds its hostname."""
        self._write(".primary", primary.encode() + b"\n")
        self.set_lag(lag_ms)

    def set_lag(self, ms: int) -> None:
        """Write ``.lag``: ``%+010d\\n`` milliseconds."""
        self._write(".lag", b"%+010d\n" % ms)

    def sync(self, db: str) -> int:
        """Set ``DB-pos`` from the SQLite file's change counter, which grows by one per
        committed transaction in rollback-journal mode, as LiteFS's TXID does."""
        try:
            with open(self.db_path(db), "rb") as f:
                header = f.read(28)
        except FileNotFoundError:
            return 0
        txid = struct.unpack(">I", header[24:28])[0] if len(header) == 28 else 0
        if txid != self.position(db):
            self.set_position(db, txid)
        return txid

    def replicate(self, source: LiteFSMount, db: str) -> int | None:
        """Copy ``db`` from ``source`` then its position: what a replica does on each sync."""
        # The position is read before the copy: a commit landing in between must not be
        # announced here before its data is (the copy is then at or past the position).
        txid = source.position(db)
        if os.path.exists(source.db_path(db)):
            src, dst = sqlite3.connect(source.db_path(db)), sqlite3.connect(self.db_path(db))
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()
        if txid is not None:
            self.set_position(db, txid)
        return txid

    def committing(self, app, dbs: Iterable[str] = ("app.db",)):
        """Wrap a WSGI app so that ``DB-pos`` follows its SQLite file when a response
        starts: LiteFS moves the position at commit, before the app can answer."""
        dbs = tuple(dbs)

        def wrapped(environ, start_response):
            def sync_then_start(status, headers, exc_info=None):
                for db in dbs:
                    self.sync(db)
                return start_response(status, headers, exc_info)

            return app(environ, sync_then_start)

        return wrapped
