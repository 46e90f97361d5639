"""The ``litefs-wsgi`` command: ``serve`` the standalone proxy, ``status`` of a node, ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="litefs-wsgi", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the standalone proxy under gunicorn")
    serve.add_argument("--config", help="litefs.yml-style file (default: $LITEFS_WSGI_CONFIG)")
    serve.add_argument("--bind", help="address to listen on (default: proxy.addr)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (default 2)")
    serve.add_argument("--threads", type=int, help="threads per worker (default 32)")

    status = commands.add_parser("status", help="print the node's role, the primary, positions and lag")
    status.add_argument("--config", help="litefs.yml-style file (default: $LITEFS_WSGI_CONFIG)")
    status.add_argument("--dir", help="LiteFS mount (default: fuse.dir, $LITEFS_DIR or /litefs)")
    status.add_argument("--db", action="append", help="database to report (default: proxy.db, else all)")
    status.add_argument("--api-url", help="LiteFS HTTP API, e.g. http://localhost:20202")

    from . import demo

    demo.add_arguments(commands.add_parser("demo", help="run a primary and a replica on 127.0.0.1"))

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return run_serve(args)
        if args.command == "status":
            return run_status(args)
        return demo.run(args)
    except ConfigError as exc:
        print(f"litefs-wsgi: {exc}", file=sys.stderr)
        return 2


def run_serve(args: argparse.Namespace) -> int:
    for name, value in (
        ("LITEFS_WSGI_CONFIG", args.config),
        ("GUNICORN_BIND", args.bind),
        ("GUNICORN_WORKERS", args.workers),
        ("GUNICORN_THREADS", args.threads),
    ):
        if value is not None:
            os.environ[name] = str(value)
    from gunicorn.app.base import BaseApplication

    from . import gunicorn_conf  # checks every option now: a bad one stops here, named

    class ProxyServer(BaseApplication):
        """gunicorn with the settings of ``gunicorn_conf``, serving the standalone proxy."""

        def load_config(self) -> None:
            for name in self.cfg.settings:
                if name != "wsgi_app" and hasattr(gunicorn_conf, name):
                    self.cfg.set(name, getattr(gunicorn_conf, name))

        def load(self):
            from . import proxy

            return proxy.application  # built in each worker, after post_fork sized its pool

    ProxyServer().run()
    return 0


def run_status(args: argparse.Namespace) -> int:
    from .config import _api_url, options_from_env, read_yaml
    from .node import Node
    from .watcher import Watcher

    options = (
        read_yaml(args.config or os.environ["LITEFS_WSGI_CONFIG"])
        if (args.config or os.environ.get("LITEFS_WSGI_CONFIG"))
        else {}
    )
    options.update(options_from_env(os.environ))
    mount_dir = args.dir or options.get("mount_dir") or "/litefs"
    dbs = args.db or options.get("db") or _databases_in(mount_dir)
    dbs = [dbs] if isinstance(dbs, str) else dbs
    api_url = _api_url(args.api_url or options.get("api_url"), "api_url")
    node = Node(mount_dir)
    info = _info(api_url) if api_url else None
    if isinstance(info, dict):
        # The API knows what the files cannot tell apart: this node being the primary, and
        # a replica during an election.
        is_primary, primary = _role_from_info(info)
        source, unknown = f"from {api_url}/info", "none (an election)"
    else:
        is_primary, primary = Watcher(node).role()
        source, unknown = "from the mount's .primary file", "unknown (.primary is not a plain host name)"
    if not isinstance(info, dict) and not os.path.isdir(mount_dir):
        # The files would read as "primary" (no .primary file): say what is really known.
        print(f"mount:    {mount_dir} (not found: is LiteFS running? set --dir, fuse.dir or LITEFS_DIR)")
        print("role:     unknown")
        return 1
    lag = node.lag()
    print(f"mount:    {mount_dir}")
    print(f"role:     {'primary' if is_primary else 'replica'} ({source})")
    print(f"primary:  {'this node' if is_primary else primary or unknown}")
    print(f"lag:      {'unreadable' if lag is None else f'{lag} ms'}")
    for db in dbs:
        pos = node.pos(db)
        exists = os.path.exists(os.path.join(mount_dir, db + "-pos"))
        print(
            f"db {db}: "
            + (
                f"TXID {pos.txid:016x} ({pos.txid}), checksum {pos.checksum:016x}"
                if pos
                else ("unreadable position" if exists else "no position")
            )
        )
    if api_url:
        print(f"api {api_url}/info: {json.dumps(info) if isinstance(info, dict) else info}")
    return 0


def _databases_in(mount_dir: str) -> list[str]:
    try:
        return sorted(name[:-4] for name in os.listdir(mount_dir) if name.endswith("-pos"))
    except OSError:
        return []


def _info(api_url: str) -> dict | str:
    """LiteFS's ``/info`` as a dict, or why it could not be had."""
    import urllib3

    try:
        response = urllib3.request("GET", api_url + "/info", timeout=urllib3.Timeout(connect=2, read=2), retries=False)
        if response.status != 200:
            return f"unreachable (HTTP {response.status})"
        info = json.loads(response.data)
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        return f"unreachable ({exc})"
    return info if isinstance(info, dict) else f"unexpected answer {info!r:.100}"


def _role_from_info(info: dict) -> tuple[bool, str | None]:
    """(is primary, the primary's hostname) from ``/info``; a bad hostname counts as none."""
    from .node import valid_hostname

    primary = info.get("primary")
    hostname = primary.get("hostname") if isinstance(primary, dict) else None
    if not (isinstance(hostname, str) and valid_hostname(hostname)):
        hostname = None
    is_primary = info.get("isPrimary") is True
    return is_primary, None if is_primary else hostname


if __name__ == "__main__":
    sys.exit(main())
