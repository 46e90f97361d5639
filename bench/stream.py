"""Benchmark: stream a large body up and down through the standalone proxy, against direct.

    python bench/stream.py              # 1 GiB each way
    python bench/stream.py --size 64M   # a quick run

Starts a target (gunicorn, sync worker, a WSGI app that counts what it is sent and sends
what it is asked for) and the proxy (``gunicorn -c gunicorn.conf.py`` on a LiteFS-style
primary mount), all on 127.0.0.1. Each transfer (an upload with a Content-Length, a chunked
upload, a download) runs direct to the target and through the proxy, alternately; the best
of ``--rounds`` is printed side by side, with the peak RSS (VmHWM) of the proxy's worker
processes. Everything stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import sys
import tempfile
import time

from common import ROOT, children, free_port, gunicorn, proxy_config, standalone_proxy

BLOCK = 1024 * 1024
PAYLOAD = bytes(range(256)) * (BLOCK // 256)
TIMEOUT = 120  # seconds; any single read or write stalling this long ends the run


# -- the target app, served by gunicorn as ``stream:target`` ------------------------------


def target(environ, start_response):
    """POST: read the body, answer how many bytes came. GET ?size=N: send N bytes."""
    if environ["REQUEST_METHOD"] == "POST":
        stream, received = environ["wsgi.input"], 0
        while chunk := stream.read(BLOCK):
            received += len(chunk)
        body = str(received).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    size = int(environ.get("QUERY_STRING", "size=0").partition("=")[2])

    def chunks():
        for start in range(0, size, BLOCK):
            yield PAYLOAD[: min(BLOCK, size - start)]

    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
    return chunks()


# -- running the servers -----------------------------------------------------------------


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# -- the transfers ---------------------------------------------------------------------


def upload(port: int, size: int, chunked: bool = False) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        started = time.perf_counter()
        conn.putrequest("POST", "/upload")
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        else:
            conn.putheader("Content-Length", str(size))
        conn.putheader("Content-Type", "application/octet-stream")
        conn.endheaders()
        for sent in range(0, size, BLOCK):
            block = PAYLOAD[: min(BLOCK, size - sent)]
            conn.send(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        if chunked:
            conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    if response.status != 200 or int(body) != size:
        raise SystemExit(f"upload to port {port}: {response.status} {body[:200]!r}")
    return elapsed


def upload_chunked(port: int, size: int) -> float:
    return upload(port, size, chunked=True)


def download(port: int, size: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        started = time.perf_counter()
        conn.request("GET", f"/download?size={size}")
        response = conn.getresponse()
        received = 0
        while chunk := response.read1(BLOCK):
            received += len(chunk)
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    if response.status != 200 or received != size:
        raise SystemExit(f"download from port {port}: {response.status}, {received} of {size} bytes")
    return elapsed


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--size", type=parse_size, default=1024**3, help="bytes each way, e.g. 64M, 1G (default 1G)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each transfer; the best is shown (default 2)")
    args = parser.parse_args(argv)

    from litefs_wsgi.testing import LiteFSMount

    with tempfile.TemporaryDirectory() as tmp:
        mount = LiteFSMount(os.path.join(tmp, "litefs"))
        mount.make_primary()
        mount.set_position("app.db", 1)
        target_port, proxy_port = free_port(), free_port()
        config = proxy_config(os.path.join(tmp, "litefs.yml"), mount.path, f"127.0.0.1:{target_port}")
        bench_dir = os.path.join(ROOT, "bench")
        target_args = ["-w", "1", "--timeout", str(TIMEOUT), "--pythonpath", bench_dir, "stream:target"]
        with contextlib.ExitStack() as stack:
            stack.enter_context(gunicorn([*target_args, "--log-level", "warning"], target_port, cwd=tmp))
            proxy = stack.enter_context(standalone_proxy(config, proxy_port, 8, ("--log-level", "warning")))
            # Warm up: the worker is forked and builds the app at its first request.
            upload(proxy_port, BLOCK)
            download(proxy_port, BLOCK)
            proxy_workers = children(proxy.pid)
            baseline_rss = {pid: peak_rss_kib(pid) for pid in proxy_workers}
            print(f"streaming {args.size / 2**20:.0f} MiB each way, best of {args.rounds} (MiB/s)")
            print(f"{'transfer':<10}{'direct':>10}{'proxy':>10}{'proxy/direct':>14}")
            for name, transfer in (("upload", upload), ("chunked", upload_chunked), ("download", download)):
                best = {"direct": float("inf"), "proxy": float("inf")}
                for _ in range(args.rounds):
                    for mode, port in (("direct", target_port), ("proxy", proxy_port)):
                        best[mode] = min(best[mode], transfer(port, args.size))
                rates = {mode: args.size / 2**20 / seconds for mode, seconds in best.items()}
                ratio = rates["proxy"] / rates["direct"]
                print(f"{name:<10}{rates['direct']:>10.0f}{rates['proxy']:>10.0f}{ratio:>14.2f}")
            for pid in proxy_workers:
                print(
                    f"proxy worker {pid}: peak RSS {peak_rss_kib(pid) / 1024:.1f} MiB "
                    f"(after a 1 MiB warm-up: {baseline_rss[pid] / 1024:.1f} MiB)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
