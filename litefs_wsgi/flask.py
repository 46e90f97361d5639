"""Flask integration: ``LiteFS(app)`` wraps ``app.wsgi_app``, options from ``LITEFS_*`` config."""

from __future__ import annotations

import difflib
from typing import Any

from .config import Config, ConfigError
from .middleware import LiteFSMiddleware


class LiteFS:
    """Flask extension installing LiteFSMiddleware around ``app.wsgi_app``.

    .. code-block:: python

        app.config["LITEFS_DB"] = "app.db"
        litefs = LiteFS(app)          # or LiteFS() then litefs.init_app(app)

    Any option is read from ``LITEFS_<OPTION>`` in ``app.config`` (``LITEFS_DIR`` for
    ``mount_dir``); keyword arguments given here win.
    """

    def __init__(self, app=None, **options: Any) -> None:
        self.options = options
        self.middleware: LiteFSMiddleware | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app) -> None:
        options = config_options(app.config)
        options.update(self.options)
        self.middleware = LiteFSMiddleware(app.wsgi_app, **options)
        app.wsgi_app = self.middleware
        app.extensions["litefs"] = self


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
