"""Views writing and reading the ``items`` table with raw SQL through Django's connection."""

from django.db import connection, transaction
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt

from litefs_wsgi import require_primary


@csrf_exempt
def items(request):
    if request.method == "POST":
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("INSERT INTO items (name) VALUES (%s)", [request.POST["name"]])
        return HttpResponse("added\n", status=201, content_type="text/plain")
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM items ORDER BY id")
        names = [name for (name,) in cursor.fetchall()]
    return HttpResponse("".join(f"{name}\n" for name in names), content_type="text/plain")


@csrf_exempt
def fail(request):
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("INSERT INTO items (name) VALUES ('half')")
    raise RuntimeError("after the commit")


def visit(request):
    """A GET that writes (a visit counter): it must run on the primary."""
    require_primary()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("INSERT INTO items (name) VALUES ('visit')")
    return HttpResponse("counted\n", content_type="text/plain")


def touch(request):
    """A GET that writes without asking (a "last seen" column): on a replica it fails with
    SQLite's read-only error, and ReplayOnPrimaryMiddleware sends it to the primary."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("INSERT INTO items (name) VALUES ('touch')")
    return HttpResponse("touched\n", content_type="text/plain")
