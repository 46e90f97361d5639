"""A Flask app on a real LiteFS node: rows in ``app.db`` in the node's mount, for test_litefs*.py and bench/soak.py.

gunicorn serves it as ``litefs_app:application`` on several ports and the port a request came
in on picks the app: ``LITEFS_APP_RAW_PORT`` the bare Flask app (what LiteFS's own proxy
fronts), ``LITEFS_APP_FLY_PORT`` the app inside LiteFSMiddleware with ``forward="fly-replay"``,
any other port the app inside LiteFSMiddleware as the environment configures it
(``LITEFS_PROXY_*``). ``LITEFS_DIR`` is the node's mount, ``LITEFS_APP_NODE`` its name.

The database is opened without ``create``: on a node whose mount is gone, a write fails
instead of creating a stray database in the bare directory.
"""

from __future__ import annotations

import os
import sqlite3
import threading

from flask import Flask, jsonify, request

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.flask import replay_on_readonly
from litefs_wsgi.middleware import local_port

DB = "app.db"


def create_flask(mount_dir: str, node: str) -> Flask:
    app = Flask(__name__)
    path = os.path.join(mount_dir, DB)
    # One writer at a time in this process: SQLite's busy handler would make the others sleep
    # and poll for the lock, for up to a second or two under a few concurrent writers.
    write_lock = threading.Lock()

    def connect(mode: str) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=10)

    @app.post("/rows")
    def write():
        wid = request.form["wid"]
        db = connect("rw")
        try:
            with write_lock, db:
                db.execute("INSERT INTO rows (wid, node) VALUES (?, ?)", (wid, node))
        finally:
            db.close()
        return jsonify(wid=wid, node=node), 201

    @app.get("/rows/<wid>")
    def read(wid: str):
        db = connect("ro")
        try:
            found = db.execute("SELECT node FROM rows WHERE wid = ?", (wid,)).fetchall()
        finally:
            db.close()
        if not found:
            return jsonify(wid=wid, found=0, served_by=node), 404
        return jsonify(wid=wid, found=len(found), written_on=found[0][0], served_by=node)

    @app.get("/visits/<wid>")
    def visit(wid: str):
        # A GET that writes without asking: on a replica SQLite refuses it, and the error handler
        # of replay_on_readonly (below) sends it to the primary through the middleware.
        db = connect("rw")
        try:
            with write_lock, db:
                db.execute("INSERT INTO rows (wid, node) VALUES (?, ?)", (wid, node))
        finally:
            db.close()
        return jsonify(wid=wid, node=node)

    @app.get("/hello")
    def hello():
        return f"hello from node {node}\n"

    replay_on_readonly(app)  # acts only inside LiteFSMiddleware: the bare app fails as it is
    return app


def create(mount_dir: str, node: str, raw_port: str, fly_port: str | None = None):
    flask_app = create_flask(mount_dir, node)
    raw = flask_app.wsgi_app
    fly = LiteFSMiddleware(raw, forward="fly-replay") if fly_port else None
    wrapped = LiteFSMiddleware(raw)  # made last: is_primary() consults its watcher

    def application(environ, start_response):
        port = local_port(environ)
        if port == raw_port:
            return raw(environ, start_response)
        if port == fly_port:
            return fly(environ, start_response)
        return wrapped(environ, start_response)

    return application


application = (
    create(
        os.environ["LITEFS_DIR"],
        os.environ["LITEFS_APP_NODE"],
        os.environ["LITEFS_APP_RAW_PORT"],
        os.environ.get("LITEFS_APP_FLY_PORT"),
    )
    if os.environ.get("LITEFS_APP_NODE")
    else None
)
