"""A notes app for a LiteFS cluster: Flask, SQLite in the LiteFS mount, litefs-wsgi in front.

Run it on this machine, no LiteFS needed (with no .primary file the node is the primary):

    mkdir -p /tmp/litefs
    LITEFS_DIR=/tmp/litefs flask --app examples/flask_app/app.py run --port 8080

Without LiteFS nothing writes ``app.db-pos``, so writes get no ``__txid`` cookie: to see the
cookie and the wait for replication, run ``litefs-wsgi demo``.

Under LiteFS (see ../litefs.yml, ../Dockerfile, ../fly.toml), LiteFS starts it after joining
the cluster:

    gunicorn --bind :8080 --threads 16 --chdir /app/flask_app app:app

Options come from ``LITEFS_*`` keys in ``app.config`` or ``LITEFS_PROXY_*`` variables, e.g.
``LITEFS_PROXY_PRIMARY_URL=http://{hostname}:8080`` outside Fly.io.
"""

import os
import sqlite3

from flask import Flask, redirect, render_template_string, request, url_for

from litefs_wsgi.flask import LiteFS

# Open the database inside the mount: LiteFS replicates only what is written there.
DATABASE = os.path.join(os.environ.get("LITEFS_DIR", "/litefs"), "app.db")

app = Flask(__name__)
app.config["LITEFS_DB"] = "app.db"  # the database whose position the __txid cookie carries
LiteFS(app)  # writes go to the primary; a read after a write waits for replication

PAGE = """<!doctype html><title>Notes</title>
<form method="post" action="{{ url_for('add_note') }}">
  <input name="text" required maxlength="500" placeholder="Write a note"> <button>Post</button>
</form>
<ul>{% for text, created in notes %}<li>{{ text }} <small>{{ created }}</small></li>
{% else %}<li>No notes yet.</li>{% endfor %}</ul>
"""


def connect() -> sqlite3.Connection:
    return sqlite3.connect(DATABASE, timeout=10)


@app.get("/")
def index():
    conn = connect()
    try:
        notes = conn.execute("SELECT text, created FROM notes ORDER BY id DESC LIMIT 50").fetchall()
    except sqlite3.OperationalError:  # no note written yet: the table does not exist
        notes = []
    finally:
        conn.close()
    return render_template_string(PAGE, notes=notes)


@app.post("/notes")
def add_note():
    # A POST always runs on the primary (a replica forwards it), so this may write.
    text = request.form.get("text", "").strip()[:500]
    if text:
        conn = connect()
        try:
            with conn:
                conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT, created TEXT)")
                conn.execute("INSERT INTO notes (text, created) VALUES (?, datetime('now'))", (text,))
        finally:
            conn.close()
    # 303: the browser follows with a GET, carrying the __txid cookie set on this answer.
    return redirect(url_for("index"), 303)
