"""Recognise SQLite's refusal to write on a LiteFS replica, so that the request can be replayed.

On a replica LiteFS refuses writes, and SQLite reports it in one of two ways (seen on LiteFS
0.5.14): with a rollback journal, ``attempt to write a readonly database``
(``SQLITE_READONLY_DIRECTORY``; a connection opened with ``?mode=ro`` says the same); in WAL
mode, where the write goes to the ``-wal`` file first, ``disk I/O error``
(``SQLITE_IOERR_WRITE``). Frameworks wrap the error: SQLAlchemy's ``OperationalError`` keeps it
in ``.orig``, Django's in ``__cause__``. The Flask extension and Django's
``ReplayOnPrimaryMiddleware`` then send such a GET to the primary, as if its view had called
``require_primary()``.
"""

from __future__ import annotations

from collections.abc import Mapping

READONLY_MESSAGE = "attempt to write a readonly database"  # sqlite3_errstr(SQLITE_READONLY)
IOERR_MESSAGE = "disk I/O error"  # sqlite3_errstr(SQLITE_IOERR), the WAL case

# Set by LiteFSMiddleware on a read that may be replayed (replay_on_readonly, not forwarded
# already): its watcher, which tells at the time of the error whether this node is a replica.
REPLAY_ENVIRON_KEY = "litefs_wsgi.replay_watcher"
# A list LiteFSMiddleware puts in a read's environ; Django's integration appends to it when the
# error came from outside the view (a middleware's), which Django answers with its 500 itself:
# the middleware then replays the request instead of that 500.
REPLAY_FAILED_KEY = "litefs_wsgi.replay_failed"


def is_readonly_error(exc: BaseException | None) -> bool:
    """True when ``exc``, or an error it wraps (``.orig``, ``__cause__``, ``__context__``
    unless suppressed by ``from None``), is SQLite refusing a write as on a LiteFS replica:
    ``SQLITE_READONLY*``, or ``SQLITE_IOERR_WRITE`` (WAL mode)."""
    import sqlite3  # here, not at the top: the standalone proxy never needs it

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.OperationalError):
            name = getattr(exc, "sqlite_errorname", None)  # from Python 3.11
            if name is not None:
                if name.startswith("SQLITE_READONLY") or name == "SQLITE_IOERR_WRITE":
                    return True
            elif READONLY_MESSAGE in str(exc) or IOERR_MESSAGE in str(exc):
                return True  # older Pythons: the message alone, which cannot tell writes apart
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
