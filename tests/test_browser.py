"""A real browser (headless Chromium) posts a note on the replica and reads it back there.

Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe`` (JSON
messages separated by NUL bytes on file descriptors 3 and 4): no WebSocket, no new
dependency. The ``__txid`` cookie is stored and sent by the browser itself.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
import uuid

import pytest

from litefs_wsgi.demo import DB, Cluster

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--remote-debugging-pipe",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium; .ci/run installs it when CI=true)"
)


class DevTools:
    """Chromium with its DevTools protocol on a pipe; every wait is bounded."""

    def __init__(self, user_data_dir: str, log_path: str) -> None:
        # Chromium reads commands on fd 3 and writes answers on fd 4. Our ends are moved
        # above 10 first, so that the shell's redirections cannot clobber one another.
        commands_r, self._commands = os.pipe()
        self._answers, answers_w = os.pipe()
        child_r, child_w = fcntl.fcntl(commands_r, fcntl.F_DUPFD, 10), fcntl.fcntl(answers_w, fcntl.F_DUPFD, 10)
        os.close(commands_r)
        os.close(answers_w)
        argv = [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$0" "$@" 3<&{child_r} 4>&{child_w} {child_r}<&- {child_w}>&-', *argv],
                pass_fds=(child_r, child_w),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        os.close(child_r)
        os.close(child_w)
        self._buffer = b""
        self._events: list[dict] = []
        self._next_id = 0
        self.session: str | None = None

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from Chromium in time")
            ready, _, _ = select.select([self._answers], [], [], remaining)
            if ready:
                data = os.read(self._answers, 1 << 20)
                if not data:
                    raise EOFError("Chromium closed its DevTools pipe")
                self._buffer += data
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, timeout: float = 20, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._receive(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self._events.append(answer)

    def event(self, method: str, timeout: float = 30) -> dict:
        """The next event named ``method`` (earlier ones of other names are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            while self._events:
                message = self._events.pop(0)
                if message.get("method") == method:
                    return message.get("params", {})
            self._events.append(self._receive(deadline))

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open_page(self) -> None:
        deadline = time.monotonic() + 20
        while True:  # the first tab appears shortly after start-up
            pages = [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        target = pages[0]["targetId"] if pages else self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError, EOFError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self._commands)
        os.close(self._answers)


@pytest.fixture
def cluster():
    # A lag long enough that reading right after the write would surely be stale.
    nodes = Cluster(port=0, lag=1.0, directory=None, poll_timeout=10.0, quiet=True)
    nodes.start()
    yield nodes
    nodes.stop()


def test_browser_reads_its_own_note_on_the_replica(cluster, browser, tmp_path):
    replica = cluster.replica_base + "/"
    browser.call("Page.navigate", url=replica)
    browser.event("Page.loadEventFired")
    assert "served by the replica" in browser.evaluate("document.getElementById('node').innerText")
    before = cluster.primary.position(DB)

    note = f"written in Chromium {uuid.uuid4().hex[:8]}"
    browser.evaluate(
        f"document.querySelector('textarea[name=text]').value = {json.dumps(note)};"
        "document.querySelector('button[type=submit]').click(); true"
    )
    # The POST goes to the replica, which forwards it to the primary; the 303 brings the
    # browser back to the replica's page, which waits for replication before it loads.
    browser.event("Page.loadEventFired")
    page = browser.evaluate(
        "({url: location.href, node: document.getElementById('node').innerText,"
        " cookie: document.getElementById('cookie').innerText,"
        " notes: document.getElementById('notes').innerText, jsCookie: document.cookie})"
    )
    shot = tmp_path / "replica.png"
    shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    assert shot.read_bytes().startswith(b"\x89PNG"), "screenshot saved"

    assert page["url"] == replica
    assert "served by the replica" in page["node"]
    assert note in page["notes"], page
    # The browser stored the primary's cookie and sent it with the redirected GET, and the
    # replica had replicated that write before it answered.
    cookies = {c["name"]: c for c in browser.call("Network.getCookies", urls=[replica])["cookies"]}
    txid = cookies["__txid"]["value"]
    assert re.fullmatch(r"[0-9a-f]{16}", txid) and cookies["__txid"]["httpOnly"]
    assert page["cookie"] == txid and "__txid" not in page["jsCookie"]
    assert int(txid, 16) > before and cluster.replica.position(DB) >= int(txid, 16)
