"""LiteFS's own proxy and litefs-wsgi side by side on a real cluster: the same requests get
the same status, the headers that matter and the same body.

On each node three fronts stand before the same app (tests/litefs_app.py): LiteFS's proxy
(``proxy:`` in the node's litefs.yml), the standalone proxy of litefs-wsgi reading that very
litefs.yml (``forward: fly-replay``, as LiteFS has no other way), and the app's own
LiteFSMiddleware with ``forward="fly-replay"``. litefs-wsgi's cookie also says
``SameSite=Lax``, on purpose (SPEC.md section 3): that attribute is left out of the comparison.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import email.utils
import os
import uuid
from http.cookies import SimpleCookie

import pytest
from litefs_cluster import wait_for
from servers import ROOT, form_request, gunicorn

pytestmark = [pytest.mark.litefs, pytest.mark.timeout(120)]

COMPARED_HEADERS = ("content-type", "content-length", "fly-replay", "x-content-type-options")


@pytest.fixture(scope="module")
def fronts(_litefs_session):
    """{node name: {front: base URL}} for LiteFS's proxy, ours, and the middleware."""
    cluster = _litefs_session
    result = {}
    with contextlib.ExitStack() as stack:
        for node in cluster.nodes:
            env = {
                "LITEFS_WSGI_CONFIG": str(node.config_path),  # the node's own litefs.yml
                "LITEFS_PROXY_FORWARD": "fly-replay",
                "GUNICORN_WORKERS": "1",
                "GUNICORN_THREADS": "8",
            }
            url, _proc = stack.enter_context(gunicorn(["-c", os.path.join(ROOT, "gunicorn.conf.py")], env=env))
            result[node.name] = {
                "LiteFS": node.proxy_url,
                "litefs-wsgi proxy": url,
                "LiteFSMiddleware": cluster.apps[node.name].fly_url,
            }
        yield result


def answer(url: str, method: str, path: str, body: str | None = None, cookie: str | None = None) -> dict:
    """What matters in an answer: status, body, the compared headers, the cookie's parts."""
    status, headers, text = form_request(url, method, path, body=body, cookie=cookie)
    compared = {name: headers.get(name) for name in COMPARED_HEADERS if headers.get(name) is not None}
    cookies = SimpleCookie()
    for value in headers.get_all("Set-Cookie") or []:
        cookies.load(value)
    cookie_parts = None
    if "__txid" in cookies:
        morsel = cookies["__txid"]
        expires = email.utils.parsedate_to_datetime(morsel["expires"])
        lifetime = (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        cookie_parts = {
            "value": morsel.value,
            "path": morsel["path"],
            "httponly": bool(morsel["httponly"]),
            "expires in 5 min": 290 <= lifetime <= 301,
        }
    return {"status": status, "body": text, "headers": compared, "cookie": cookie_parts}


def cookie_for(txid: int) -> str:
    return f"__txid={txid:016x}"


def each(fronts: dict[str, str], *args, **kwargs) -> dict[str, dict]:
    """The same request to every front, one after the other."""
    return {name: answer(url, *args, **kwargs) for name, url in fronts.items()}


def test_a_write_on_the_primary_gets_the_primarys_position_in_the_same_cookie(litefs, fronts):
    primary = litefs.primary
    wid = uuid.uuid4().hex  # the same row from each front: the same body
    body = f'{{"node":"{primary.name}","wid":"{wid}"}}\n'
    for name, url in fronts[primary.name].items():
        before = primary.pos()
        got = answer(url, "POST", "/rows", body=f"wid={wid}")
        assert got == {
            "status": 201,
            "body": body,
            "headers": {"content-type": "application/json", "content-length": str(len(body))},
            "cookie": {"value": f"{before + 1:016x}", "path": "/", "httponly": True, "expires in 5 min": True},
        }, name
        assert primary.pos() == before + 1


def test_a_write_on_a_replica_gets_the_same_fly_replay_answer(litefs, fronts):
    primary, replica = litefs.primary, litefs.replica
    before = primary.pos()
    answers = each(fronts[replica.name], "POST", "/rows", body=f"wid={uuid.uuid4().hex}")
    expected = {
        "status": 200,
        "body": "",
        "headers": {"content-length": "0", "fly-replay": f"instance={primary.hostname}"},
        "cookie": None,
    }
    assert answers == dict.fromkeys(answers, expected)
    assert primary.pos() == before  # nothing was written: Fly.io's edge would replay it


def test_reads_with_a_reached_cookie_and_without_one_get_the_same_answer(litefs, fronts):
    primary, replica = litefs.primary, litefs.replica
    wid = uuid.uuid4().hex
    status, _headers, _text = form_request(primary.raw_url, "POST", "/rows", body=f"wid={wid}")
    assert status == 201
    litefs.wait_replicated(primary.pos())
    body = f'{{"found":1,"served_by":"{replica.name}","wid":"{wid}","written_on":"{primary.name}"}}\n'
    expected = {"status": 200, "body": body, "headers": {"content-type": "application/json"}, "cookie": None}
    expected["headers"]["content-length"] = str(len(body))
    for cookie in (None, cookie_for(primary.pos())):
        answers = each(fronts[replica.name], "GET", f"/rows/{wid}", cookie=cookie)
        assert answers == dict.fromkeys(answers, expected)
    answers = each(fronts[replica.name], "GET", "/hello")
    assert {a["body"] for a in answers.values()} == {f"hello from node {replica.name}\n"}


def test_a_cookie_far_ahead_gets_the_same_504_on_both_nodes(litefs, fronts):
    far = cookie_for(litefs.primary.pos() + 1_000_000)
    requests = [(node, name, url) for node, urls in fronts.items() for name, url in urls.items()]
    # LiteFS waits its fixed 5 s (poll_timeout, not configurable there): all at once.
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = {(node, name): pool.submit(answer, url, "GET", "/hello", cookie=far) for node, name, url in requests}
        answers = {key: future.result() for key, future in futures.items()}
    expected = {
        "status": 504,
        "body": "Proxy timeout\n",
        "headers": {
            "content-type": "text/plain; charset=utf-8",
            "content-length": "14",
            "x-content-type-options": "nosniff",
        },
        "cookie": None,
    }
    assert answers == dict.fromkeys(answers, expected)


def test_health_gets_the_same_answers_from_the_real_lag(litefs, fronts):
    primary, replica = litefs.primary, litefs.replica  # max-lag: 2s for all (litefs.yml, conftest)
    text = "text/plain; charset=utf-8"
    ok = {"status": 200, "body": "OK\n", "headers": {"content-type": text, "content-length": "3"}, "cookie": None}
    exceeded = {
        "status": 503,
        "body": "Replication lag exceeded\n",
        "headers": {"content-type": text, "content-length": "25", "x-content-type-options": "nosniff"},
        "cookie": None,
    }

    def health(node) -> dict[str, dict]:
        return each(fronts[node.name], "GET", "/litefs/health")

    wait_for(lambda: (replica.lag() or 0) < 1500, 20, "the replica's .lag under 1.5 s")
    assert health(replica) == dict.fromkeys(fronts[replica.name], ok)
    primary.relay.pause()
    wait_for(lambda: (replica.lag() or 0) > 3000, 20, "the replica's .lag over 3 s")
    assert health(replica) == dict.fromkeys(fronts[replica.name], exceeded)
    assert health(primary) == dict.fromkeys(fronts[primary.name], ok)
    primary.relay.resume()
    wait_for(lambda: (replica.lag() or 0) < 1500, 20, "the replica's .lag back under 1.5 s")
    assert health(replica) == dict.fromkeys(fronts[replica.name], ok)
