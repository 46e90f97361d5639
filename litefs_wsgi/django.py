"""Django integration: the WSGI application wrapped by LiteFSMiddleware, options from ``LITEFS``."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from django.apps import AppConfig

from .config import Config, ConfigError, options_and_sources
from .middleware import REPLAY_HEADER, LiteFSMiddleware, ReplayOnPrimary, standalone_only
from .readonly import REPLAY_FAILED_KEY, should_replay

# get_wsgi_application's keyword options, which win over settings.LITEFS, for check_settings;
# None while this process has not called it (manage.py check does not import wsgi.py).
_given: dict[str, Any] | None = None


def get_wsgi_application(**options: Any) -> LiteFSMiddleware:
    """Django's WSGI application behind LiteFSMiddleware; for ``wsgi.py``:

    .. code-block:: python

        from litefs_wsgi.django import get_wsgi_application
        application = get_wsgi_application()

    Options come from the ``LITEFS`` setting (a dict, e.g. ``{"db": "db.sqlite3"}``);
    keyword arguments given here win. A bad one raises ConfigError naming
    ``settings.LITEFS[...]``; with ``LiteFSConfig`` in ``INSTALLED_APPS``, ``manage.py check``
    reports it too.
    """
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application as django_application

    global _given
    _given = dict(options)
    app = django_application()
    litefs = setting(settings)
    try:
        return LiteFSMiddleware(app, **{**litefs, **options})
    except ConfigError as exc:
        raise _named(exc, litefs, options) from None


def setting(settings) -> dict[str, Any]:
    """The ``LITEFS`` setting: a dict of options by name (none when it is not set)."""
    litefs = getattr(settings, "LITEFS", {})
    if not isinstance(litefs, Mapping):
        raise ConfigError(f"settings.LITEFS: expected a dict of options such as {{'db': 'db.sqlite3'}}, got {litefs!r}")
    return dict(litefs)


def _named(exc: ConfigError, litefs: Mapping[str, Any], given: Mapping[str, Any]) -> ConfigError:
    """``exc`` naming ``settings.LITEFS`` where the bad value or the unknown option came from it."""
    text = str(exc)
    name = text.partition(":")[0]
    if name in litefs and name not in given:
        return ConfigError(f"settings.LITEFS[{name!r}]{text[len(name) :]}")
    if text.startswith("unknown option ") and text.split("'")[1] in litefs:
        return ConfigError(f"settings.LITEFS: {text}")
    if name == "db" and "db" not in litefs and "db" not in given and text.startswith("db: name"):
        return ConfigError(
            "settings.LITEFS: no 'db': name the database file in the LiteFS mount, e.g. "
            "LITEFS = {'db': 'db.sqlite3'} (or LITEFS_PROXY_DB)"
        )
    return exc


def check_settings(app_configs=None, **kwargs) -> list:
    """Django system check: a bad ``LITEFS`` setting is an error of ``manage.py check`` (and of
    runserver, migrate...), found before the first request rather than at it. Options given to
    ``get_wsgi_application`` in this process win over it, as they do there; a ``db`` missing
    where none were given is only a warning, as wsgi.py may pass it."""
    from django.conf import settings
    from django.core.checks import Error, Warning

    given = _given
    litefs: dict[str, Any] = {}
    try:
        litefs = setting(settings)
        options = {**litefs, **(given or {})}
        try:
            Config.load(**options)
        except ConfigError:
            if given is not None or "db" in {**options_and_sources(os.environ)[0], **options}:
                raise
            # Whatever else is wrong is still an error: checked with a stand-in for the db.
            Config.load(**options, db="db.sqlite3")
            return [
                Warning(
                    "settings.LITEFS: no 'db': name the database file in the LiteFS mount here, e.g. "
                    "LITEFS = {'db': 'db.sqlite3'}, or pass it to get_wsgi_application(db=...) in wsgi.py "
                    "(or set LITEFS_PROXY_DB)",
                    hint="this check cannot see the options wsgi.py passes to get_wsgi_application",
                    obj="settings.LITEFS",
                    id="litefs_wsgi.W001",
                )
            ]
    except ConfigError as exc:
        message = str(_named(exc, litefs, given or {}))
        return [
            Error(
                message, hint="LITEFS holds litefs-wsgi's options by name", obj="settings.LITEFS", id="litefs_wsgi.E001"
            )
        ]
    ignored = standalone_only(litefs)
    if ignored:
        return [
            Warning(
                f"settings.LITEFS: {', '.join(map(repr, ignored))} only the standalone proxy reads "
                "(litefs-wsgi serve); in Django the app is the target and its server listens: remove "
                + ("it" if len(ignored) == 1 else "them"),
                obj="settings.LITEFS",
                id="litefs_wsgi.W002",
            )
        ]
    return []


class LiteFSConfig(AppConfig):
    """Add ``"litefs_wsgi.django.LiteFSConfig"`` to ``INSTALLED_APPS``: ``manage.py check``
    (and runserver, migrate...) then reports a bad ``LITEFS`` setting, error ``litefs_wsgi.E001``
    (a missing ``db``, warning ``litefs_wsgi.W001``)."""

    name = "litefs_wsgi"
    label = "litefs_wsgi"
    verbose_name = "litefs-wsgi"

    def ready(self) -> None:
        from django.core import checks

        checks.register(check_settings)


class ReplayOnPrimaryMiddleware:
    """Django middleware: a view raising ``ReplayOnPrimary`` has its request sent to the
    primary. Add ``"litefs_wsgi.django.ReplayOnPrimaryMiddleware"`` to ``MIDDLEWARE``.

    With ``replay_on_readonly`` (the default), so does a GET or HEAD whose view fails on a
    replica with SQLite's read-only error (``django.db.utils.OperationalError``)."""

    def __init__(self, get_response) -> None:
        from django.core.signals import got_request_exception

        self.get_response = get_response
        got_request_exception.connect(_note_readonly_error, dispatch_uid="litefs_wsgi.replay_on_readonly")

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        # getattr: an ASGI request has no WSGI environ (and no LiteFSMiddleware around it).
        if isinstance(exception, ReplayOnPrimary) or should_replay(getattr(request, "environ", {}), exception):
            from django.http import HttpResponse

            response = HttpResponse(ReplayOnPrimary.description, status=503, content_type="text/plain")
            response[REPLAY_HEADER] = "1"
            return response
        return None


def _note_readonly_error(sender, request=None, **kwargs) -> None:
    """A write in a middleware (a "last seen" column, a session saved in process_response) fails
    outside the view, where process_exception never sees it (so does ``require_primary()`` in a
    middleware): Django makes its 500 at once. It sends got_request_exception first, inside its
    ``except``: the request is then marked for LiteFSMiddleware to replay it instead of that 500."""
    failed = getattr(request, "environ", {}).get(REPLAY_FAILED_KEY)  # an ASGI request has no environ
    exception = sys.exc_info()[1]
    if failed is not None and (isinstance(exception, ReplayOnPrimary) or should_replay(request.environ, exception)):
        failed.append(True)
