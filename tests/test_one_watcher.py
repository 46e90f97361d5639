"""One watcher per process and mount (SPEC.md section 3), whatever each middleware's settings."""

from servers import in_thread, wait_until
from werkzeug.test import Client

from litefs_wsgi import LiteFSMiddleware


def ok(environ, start_response):
    start_response("200 OK", [])
    return [b"ok"]


def test_middlewares_on_one_mount_share_one_watcher_each_with_its_own_bound(replica):
    bounded = LiteFSMiddleware(ok, db="app.db", mount_dir=replica.path, max_waiters=1, poll_timeout="30s")
    free = LiteFSMiddleware(ok, db="app.db", mount_dir=replica.path, poll_interval="5ms", poll_timeout="30s")
    assert bounded.watcher is free.watcher
    assert free.watcher.poll_interval == 0.001  # the shortest asked for

    def read(app):
        c = Client(app)
        c.set_cookie("__txid", "0000000000000002")
        return c.get("/")

    first, first_result = in_thread(read, free)
    wait_until(lambda: free.watcher.waiting == 1, 10, "the first read to wait")
    # One read waits in the process: the bounded middleware refuses the next at once...
    refused = read(bounded)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    # ...while the unbounded one lets it wait too.
    second, second_result = in_thread(read, free)
    wait_until(lambda: free.watcher.waiting == 2, 10, "the second read to wait")
    replica.set_position("app.db", 2)
    first.join(10)
    second.join(10)
    assert [r[0].status_code for r in (first_result, second_result)] == [200, 200]
