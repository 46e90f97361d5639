"""Flask integration: ``LiteFS(app)`` wraps ``app.wsgi_app``, options from ``LITEFS_*`` config."""

from __future__ import annotations

import difflib
import importlib.util
import sqlite3
from typing import Any

from .config import Config, ConfigError
from .middleware import LiteFSMiddleware, ReplayOnPrimary, answer_replays
from .readonly import should_replay


class LiteFS:
    """Flask extension installing LiteFSMiddleware around ``app.wsgi_app``.

    .. code-block:: python

        app.config["LITEFS_DB"] = "app.db"
        litefs = LiteFS(app)          # or LiteFS() then litefs.init_app(app)

    Any option is read from ``LITEFS_<OPTION>`` in ``app.config`` (``LITEFS_DIR`` for
    ``mount_dir``); keyword arguments given here win.

    With ``replay_on_readonly`` (the default), a GET or HEAD whose view fails on a replica
    with SQLite's read-only error (``sqlite3`` or SQLAlchemy's ``OperationalError``) is sent
    to the primary, as if the view had called ``require_primary()``.
    """

    def __init__(self, app=None, **options: Any) -> None:
        self.options = options
        self.middleware: LiteFSMiddleware | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app) -> None:
        from_config = config_options(app.config)
        options = {**from_config, **self.options}
        try:
            self.middleware = LiteFSMiddleware(app.wsgi_app, **options)
        except ConfigError as exc:
            raise _named(exc, from_config, self.options) from None
        app.wsgi_app = self.middleware
        app.extensions["litefs"] = self
        answer_replays(app)  # done already unless app.wsgi_app was wrapped before
        if self.middleware.config.replay_on_readonly:
            replay_on_readonly(app)


def _readonly_error_types() -> list[type[BaseException]]:
    types: list[type[BaseException]] = [sqlite3.OperationalError]
    if importlib.util.find_spec("sqlalchemy") is not None:  # not imported when not installed
        from sqlalchemy.exc import OperationalError

        types.append(OperationalError)
    return types


def replay_on_readonly(app) -> None:
    """Make ``app`` turn SQLite's read-only error, in a GET or HEAD on a replica, into
    ReplayOnPrimary; any other error goes on as if this were not there.

    In ``app.handle_user_exception``, before Flask looks for an error handler: one registered on
    the app would lose to a blueprint's own for a base class (a JSON API's for Exception), Flask
    trying a blueprint's handlers first, and the request was then never replayed. It runs before
    the response has started, and a replayed request is not reported as an error
    (``got_request_exception`` is not sent).
    """
    from flask import request

    types = tuple(_readonly_error_types())
    handle_user_exception = app.handle_user_exception
    handle_exception = app.handle_exception

    def replay_or_not(error: Exception):
        if isinstance(error, types) and should_replay(request.environ, error):
            return ReplayOnPrimary().get_response(request.environ)
        return handle_user_exception(error)

    def replay_or_500(error: Exception):
        # An error outside the view (an after_request hook's "last seen" write, a session
        # saved at the end) skips handle_user_exception: Flask makes its 500 here, still
        # before the response has started.
        if isinstance(error, ReplayOnPrimary) or (isinstance(error, types) and should_replay(request.environ, error)):
            return ReplayOnPrimary().get_response(request.environ)
        return handle_exception(error)

    app.handle_user_exception = replay_or_not
    app.handle_exception = replay_or_500


def config_key(option: str) -> str:
    """The ``app.config`` key of ``option``."""
    return "LITEFS_DIR" if option == "mount_dir" else "LITEFS_" + option.upper()


def _named(exc: ConfigError, from_config: dict[str, Any], given: dict[str, Any]) -> ConfigError:
    """``exc`` saying which ``app.config`` key set the bad value, or how to set a missing db."""
    name = str(exc).partition(":")[0]
    if name == "db" and "db" not in from_config and "db" not in given and str(exc).startswith("db: name"):
        return ConfigError(
            'db: set app.config["LITEFS_DB"] to the database file in the LiteFS mount, e.g. '
            'app.config["LITEFS_DB"] = "app.db" (or LiteFS(app, db="app.db"), or LITEFS_PROXY_DB)'
        )
    if name in from_config and name not in given and "(set by " not in str(exc):
        return ConfigError(f'{exc} (set by app.config["{config_key(name)}"])')
    return exc


def config_options(config: dict) -> dict[str, Any]:
    """The LiteFS options set in a Flask config as ``LITEFS_<OPTION>``; a ``LITEFS_`` key
    that names no option is an error, so that a typo is not silently ignored."""
    names = Config.option_names()
    options = {}
    for key, value in config.items():
        if key == "LITEFS_DIR":
            options["mount_dir"] = value
        elif key.startswith("LITEFS_"):
            name = key[len("LITEFS_") :].lower()
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean LITEFS_{close[0].upper()}?" if close else ""
                raise ConfigError(f"app.config[{key!r}] names no litefs-wsgi option{hint}")
            options[name] = value
    return options
