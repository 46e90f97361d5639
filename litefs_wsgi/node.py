"""Read a LiteFS node's state from the control files in its mount (SPEC.md section 1)."""

from __future__ import annotations

import logging
import os
import re

from .txid import Pos, parse_pos

log = logging.getLogger("litefs_wsgi")

# Letters, digits, "-" and "." with an optional port: nothing that could split a header or
# change a URL's meaning when it is written into "fly-replay" or primary_url.
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})(?::[0-9]{1,5})?")
_LAG = re.compile(rb"[+-][0-9]{1,10}\n?")
_MAX_CONTROL_FILE = 4096  # a real control file is tens of bytes; never read a huge one whole


def valid_hostname(name: str) -> bool:
    """True if ``name`` is a plain host name (optionally ``:port``) safe to put in a header."""
    return bool(_HOSTNAME.fullmatch(name))


def _read(path: str) -> bytes | None:
    """Return a control file's bytes, or None when it is absent; other errors raise OSError."""
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_CONTROL_FILE)
    except (FileNotFoundError, NotADirectoryError):
        return None


class Node:
    """The control files of one LiteFS mount: positions, the primary and the lag."""

    def __init__(self, mount_dir: str) -> None:
        self.mount_dir = mount_dir
        self._reported: dict[str, object] = {}

    def _report(self, level: int, name: str, problem: object, message: str, *args: object) -> None:
        """Log a bad control file once per distinct problem, not on every read."""
        if self._reported.get(name) != problem:
            self._reported[name] = problem
            log.log(level, message, *args)

    def pos(self, db: str) -> Pos | None:
        """The database's position; None when it does not exist yet or cannot be read."""
        try:
            data = _read(os.path.join(self.mount_dir, db + "-pos"))
        except OSError as exc:  # a directory, no permission, the mount going away
            self._report(logging.WARNING, db, str(exc), "cannot read the position of %s: %s", db, exc)
            return None
        if data is None:
            return None
        pos = parse_pos(data)
        if pos is None:
            self._report(logging.WARNING, db, data, "ignoring a malformed position file for %s: %r", db, data[:64])
        return pos

    def role(self) -> tuple[bool, str | None]:
        """(this node is the primary, the primary's hostname), from one read of ``.primary``.

        No file means this node is the primary: how LiteFS's users read the files (SPEC.md
        section 1). A file that cannot be read or is not a plain host name means a replica
        that knows no primary."""
        try:
            data = _read(os.path.join(self.mount_dir, ".primary"))
        except OSError as exc:
            self._report(logging.WARNING, ".primary", str(exc), "cannot read .primary: %s", exc)
            return False, None
        if data is None:
            return True, None
        name = data.decode("ascii", "replace").strip()
        if not valid_hostname(name):
            self._report(logging.ERROR, ".primary", data, "ignoring .primary: %r is not a plain host name", data[:64])
            return False, None
        return False, name

    def primary(self) -> str | None:
        """The primary's hostname; None on the primary itself or when no primary is known."""
        return self.role()[1]

    def is_primary(self) -> bool:
        """True when no ``.primary`` file exists."""
        return self.role()[0]

    def lag(self) -> int | None:
        """Replication lag in milliseconds: 0 with no ``.lag`` file, None when it is garbled."""
        try:
            data = _read(os.path.join(self.mount_dir, ".lag"))
        except OSError as exc:
            self._report(logging.WARNING, ".lag", str(exc), "cannot read .lag: %s", exc)
            return None
        if data is None:
            return 0
        if not _LAG.fullmatch(data):
            self._report(logging.WARNING, ".lag", data, "ignoring a malformed .lag file: %r", data[:64])
            return None
        return int(data)
