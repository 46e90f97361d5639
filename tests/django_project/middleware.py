"""A middleware writing during a GET, as a "last seen" column is kept (or asking for the primary
first): before the view, outside it, where ReplayOnPrimaryMiddleware's process_exception never
sees its error."""

from django.db import connection, transaction

from litefs_wsgi import require_primary


def last_seen(get_response):
    def middleware(request):
        if request.path == "/asks":
            require_primary()  # as a view may, but in a middleware
        if request.path in ("/seen", "/asks"):
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("INSERT INTO items (name) VALUES ('seen')")
        return get_response(request)

    return middleware
