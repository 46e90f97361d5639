"""Recognise SQLite's read-only error, which a write raises on a LiteFS replica, for a replay.

On a replica LiteFS serves the database read-only: a write fails with
``sqlite3.OperationalError: attempt to write a readonly database`` (extended code
``SQLITE_READONLY_DIRECTORY`` on LiteFS 0.5). Frameworks wrap it: SQLAlchemy's
``OperationalError`` keeps it in ``.orig``, Django's in ``__cause__``. The Flask extension and
Django's ``ReplayOnPrimaryMiddleware`` then send such a GET to the primary, as if its view had
called ``require_primary()``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

READONLY_MESSAGE = "attempt to write a readonly database"  # sqlite3_errstr(SQLITE_READONLY)

# Set by LiteFSMiddleware on a read that may be replayed (replay_on_readonly, not forwarded
# already): its watcher, which tells at the time of the error whether this node is a replica.
REPLAY_ENVIRON_KEY = "litefs_wsgi.replay_watcher"


def is_readonly_error(exc: BaseException | None) -> bool:
    """True when ``exc``, or an error it wraps (``.orig``, ``__cause__``, ``__context__``
    unless suppressed by ``from None``), is SQLite's read-only error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.OperationalError):
            # sqlite_errorname is there from Python 3.11; the message in every version.
            name = getattr(exc, "sqlite_errorname", None) or ""
            if name.startswith("SQLITE_READONLY") or READONLY_MESSAGE in str(exc):
                return True
        orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError: the driver's own error
        if isinstance(orig, BaseException):
            exc = orig
        elif exc.__cause__ is not None or exc.__suppress_context__:  # "raise ... from None" hides it
            exc = exc.__cause__
        else:
            exc = exc.__context__
    return False


def should_replay(environ: Mapping, exc: BaseException) -> bool:
    """True when the view serving ``environ`` failed with ``exc`` so that the request must run
    on the primary instead: SQLite's read-only error in a GET or HEAD on a replica, which the
    middleware allows to be replayed (``replay_on_readonly``, and not forwarded already)."""
    watcher = environ.get(REPLAY_ENVIRON_KEY)
    return (
        watcher is not None
        and environ.get("REQUEST_METHOD") in ("GET", "HEAD")
        and is_readonly_error(exc)
        and not watcher.role()[0]
    )
