"""A real browser (headless Chromium) on another origin reads its own write through ``txid_header``.

The page is served from one origin, the API (a Flask app on a primary and a replica, each in
LiteFSMiddleware with ``txid_header="LiteFS-TXID"``) from others: cross-origin ``fetch`` sends
no ``__txid`` cookie, so only the header can carry the position. The API answers CORS as the
README says: ``Access-Control-Expose-Headers`` so that the page can read the header, and
``Access-Control-Allow-Headers`` so that it can send it.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from contextlib import closing
from urllib.parse import urlsplit

import pytest
from flask import Flask, jsonify, request
from servers import serve, wait_until
from test_browser import CHROMIUM

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.testing import LiteFSMount

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium; .ci/run installs it when CI=true)"
)
HEADER = "LiteFS-TXID"


def create_api(mount: LiteFSMount, page_origin: str) -> Flask:
    app = Flask(__name__)
    path = mount.db_path("app.db")

    @app.post("/notes")
    def add():
        with closing(sqlite3.connect(path, timeout=10)) as conn, conn:
            conn.execute("INSERT INTO notes (text) VALUES (?)", (request.get_json()["text"],))
        return jsonify(ok=True), 201

    @app.get("/notes")
    def notes():
        with closing(sqlite3.connect(path, timeout=10)) as conn:
            return jsonify([text for (text,) in conn.execute("SELECT text FROM notes ORDER BY id")])

    @app.after_request
    def cors(response):
        response.headers["Access-Control-Allow-Origin"] = page_origin
        if request.args.get("expose") != "no":
            response.headers["Access-Control-Expose-Headers"] = HEADER
        if request.method == "OPTIONS":  # the preflight of a request sending the header
            response.headers["Access-Control-Allow-Headers"] = f"Content-Type, {HEADER}"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
        return response

    return app


def page(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
    return [b"<!doctype html><title>another origin</title><p>the page</p>"]


def test_a_cross_origin_page_reads_its_own_write_with_the_header(tmp_path, browser):
    primary, replica = LiteFSMount(tmp_path / "primary"), LiteFSMount(tmp_path / "replica")
    primary.make_primary()
    replica.make_replica("127.0.0.1")
    with closing(sqlite3.connect(primary.db_path("app.db"))) as conn, conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    primary.sync("app.db")
    replica.replicate(primary, "app.db")

    with serve(page) as page_url:
        options = {"db": "app.db", "txid_header": HEADER, "forward": "http", "poll_timeout": "30s"}
        primary_app = create_api(primary, page_url)
        primary_app.wsgi_app = LiteFSMiddleware(
            primary.committing(primary_app.wsgi_app), mount_dir=primary.path, **options
        )
        with serve(primary_app) as primary_url:
            replica_app = create_api(replica, page_url)
            middleware = LiteFSMiddleware(
                replica.committing(replica_app.wsgi_app),
                mount_dir=replica.path,
                primary_url=f"http://{{hostname}}:{urlsplit(primary_url).port}",
                **options,
            )
            replica_app.wsgi_app = middleware
            with serve(replica_app) as api:
                browser.call("Page.navigate", url=page_url + "/")
                browser.event("Page.loadEventFired")
                note = f"from another origin {uuid.uuid4().hex[:8]}"

                # The write: a JSON POST, so preflighted; the replica forwards both to the primary.
                write = browser.evaluate(
                    f"fetch({json.dumps(api + '/notes')}, {{method: 'POST', headers: {{'Content-Type': "
                    f"'application/json'}}, body: JSON.stringify({{text: {json.dumps(note)}}})}})"
                    f".then(r => ({{status: r.status, txid: (window.txid = r.headers.get({json.dumps(HEADER)}))}}))"
                )
                assert write == {"status": 201, "txid": f"{primary.position('app.db'):016x}"}
                assert replica.position("app.db") < primary.position("app.db")  # not replicated yet

                # Without Access-Control-Expose-Headers the page cannot see the header at all.
                hidden = browser.evaluate(
                    f"fetch({json.dumps(api + '/notes?expose=no')}).then(r => r.headers.get({json.dumps(HEADER)}))"
                )
                assert hidden is None
                # Without the header, the replica answers at once: stale.
                stale = browser.evaluate(f"fetch({json.dumps(api + '/notes')}).then(r => r.json())")
                assert note not in stale

                # With it, the read waits on the replica until the write has arrived.
                browser.evaluate(
                    f"window.read = fetch({json.dumps(api + '/notes')}, {{headers: {{{json.dumps(HEADER)}: "
                    "window.txid}}).then(r => r.json()); true"
                )
                wait_until(lambda: middleware.watcher.waiting == 1, 20, "the browser's read to wait on the replica")
                replica.replicate(primary, "app.db")  # what LiteFS does
                assert note in browser.evaluate("window.read")
