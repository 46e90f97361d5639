"""A Flask app behind LiteFSMiddleware that reports what reached it, for the forwarding tests.

Served by gunicorn as ``fwd_app:application`` (``FWD_MOUNT`` names the LiteFS-style mount,
``FWD_LOG`` a file that gets one line per request the app runs; other options come from
``LITEFS_PROXY_*``), or built in-process with :func:`create`. Paths under ``/fly`` go
through a second middleware whose ``forward`` is ``fly-replay``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sqlite3

from flask import Flask, Response, jsonify, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import litefs_wsgi
from litefs_wsgi import LiteFSMiddleware, ReplayOnPrimary
from litefs_wsgi.testing import LiteFSMount

GZIP_PLAIN = b"compress me " * 1000
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)


def create_flask(mount: LiteFSMount, log_path: str | None) -> Flask:
    app = Flask(__name__)

    def commit() -> None:
        # A real SQLite write in the mount; LiteFSMount.committing moves -pos to match.
        with sqlite3.connect(mount.db_path("app.db")) as db:
            db.execute("CREATE TABLE IF NOT EXISTS hits (path TEXT)")
            db.execute("INSERT INTO hits VALUES (?)", (request.path,))
        db.close()

    @app.before_request
    def record():
        if log_path:
            with open(log_path, "a") as f:
                f.write(f"{request.method} {request.environ.get('RAW_URI') or request.full_path}\n")

    @app.route("/echo", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    @app.route("/echo/<path:rest>", methods=["GET", "POST", "PUT"])
    def echo(rest=None):
        digest, length = hashlib.sha256(), 0
        while chunk := request.stream.read(64 * 1024):
            digest.update(chunk)
            length += len(chunk)
        if request.method not in ("GET", "HEAD"):
            commit()
        return jsonify(
            method=request.method,
            raw_uri=request.environ.get("RAW_URI"),
            query=request.environ.get("QUERY_STRING"),
            headers=[[k, v] for k, v in request.headers.items()],
            environ_keys=sorted(k for k in request.environ if k.startswith("HTTP_")),
            body_sha256=digest.hexdigest(),
            body_len=length,
            primary=litefs_wsgi.is_primary(),
        )

    @app.post("/body")
    def body():
        commit()
        return Response(request.get_data(), content_type="application/octet-stream")

    @app.post("/cookies")
    def cookies():
        commit()
        response = Response("two cookies")
        response.set_cookie("a", "1")
        response.set_cookie("b", "2", httponly=True)
        return response

    @app.post("/gzip")
    def gzipped():
        commit()
        return Response(GZIP_BODY, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    @app.post("/redirect")
    def redirect():
        commit()
        return Response("", status=302, headers={"Location": "/elsewhere"})

    @app.post("/session")
    def session():
        user = request.args.get("user")
        response = jsonify(cookie=request.headers.get("Cookie"))
        if user:
            response.set_cookie("session", user)
        commit()
        return response

    @app.get("/visit")
    def visit():
        # A write inside a GET (a visit counter): on a replica, ask for the primary.
        if not litefs_wsgi.is_primary():
            raise ReplayOnPrimary()
        commit()
        return "visited on the primary"

    @app.get("/whoami")
    def whoami():
        return jsonify(is_primary=litefs_wsgi.is_primary(), primary_hostname=litefs_wsgi.primary_hostname())

    return app


def create(mount_dir: str, log_path: str | None = None, **options):
    """The app in LiteFSMiddleware (``forward="http"``), and under ``/fly`` with ``fly-replay``."""
    mount = LiteFSMount(mount_dir)
    inner = mount.committing(create_flask(mount, log_path).wsgi_app)
    options = {"db": "app.db", "mount_dir": mount_dir, **options}
    fly = LiteFSMiddleware(inner, forward="fly-replay", **options)
    # Made last, so that is_primary() and primary_hostname() consult this one's watcher.
    http = LiteFSMiddleware(inner, forward="http", **options)
    return DispatcherMiddleware(http, {"/fly": fly})


application = create(os.environ["FWD_MOUNT"], os.environ.get("FWD_LOG")) if os.environ.get("FWD_MOUNT") else None
