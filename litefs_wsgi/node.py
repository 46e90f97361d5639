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

    def primary(self) -> str | None:
        """The primary's hostname from ``.primary``; None on the primary itself, during an
        election, or when the file holds something that is not a plain host name."""
        try:
            data = _read(os.path.join(self.mount_dir, ".primary"))
        except OSError as exc:
            self._report(logging.WARNING, ".primary", str(exc), "cannot read .primary: %s", exc)
            return None
        if data is None:
            return None
        name = data.decode("ascii", "replace").strip()
        if not valid_hostname(name):
            self._report(logging.ERROR, ".primary", data, "ignoring .primary: %r is not a plain host name", data[:64])
            return None
        return name

    def is_primary(self) -> bool:
        """True when no ``.primary`` file exists: how LiteFS's users read the files (SPEC.md 1)."""
        try:
            return _read(os.path.join(self.mount_dir, ".primary")) is None
        except OSError:
            return False

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
