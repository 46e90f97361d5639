"""Django integration: the WSGI application wrapped by LiteFSMiddleware, options from ``LITEFS``."""

from __future__ import annotations

from typing import Any

from .middleware import REPLAY_HEADER, LiteFSMiddleware, ReplayOnPrimary
from .readonly import should_replay


def get_wsgi_application(**options: Any) -> LiteFSMiddleware:
    """Django's WSGI application behind LiteFSMiddleware; for ``wsgi.py``:

    .. code-block:: python

        from litefs_wsgi.django import get_wsgi_application
        application = get_wsgi_application()

    Options come from the ``LITEFS`` setting (a dict, e.g. ``{"db": "db.sqlite3"}``);
    keyword arguments given here win.
    """
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application as django_application

    app = django_application()
    merged = dict(getattr(settings, "LITEFS", {}))
    merged.update(options)
    return LiteFSMiddleware(app, **merged)


class ReplayOnPrimaryMiddleware:
    """Django middleware: a view raising ``ReplayOnPrimary`` has its request sent to the
    primary. Add ``"litefs_wsgi.django.ReplayOnPrimaryMiddleware"`` to ``MIDDLEWARE``.

    With ``replay_on_readonly`` (the default), so does a GET or HEAD whose view fails on a
    replica with SQLite's read-only error (``django.db.utils.OperationalError``)."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

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
