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

    serve = commands.add_parser(
        "serve",
        help="run the standalone proxy under gunicorn",
        description="Run the standalone proxy under gunicorn, with litefs_wsgi.gunicorn_conf's settings. "
        "Any other option is gunicorn's (e.g. --timeout 90, --access-logfile /var/log/proxy.log); "
        "GUNICORN_CMD_ARGS is read as gunicorn reads it. Precedence: the settings, then "
        "GUNICORN_CMD_ARGS, then the command line.",
    )
    serve.add_argument("--config", help="litefs.yml-style file (default: $LITEFS_WSGI_CONFIG)")
    serve.add_argument("--bind", help="address to listen on (default: proxy.addr)")
    serve.add_argument("--workers", help="gunicorn worker processes (default 2)")
    serve.add_argument("--threads", help="threads per worker (default 32)")

    status = commands.add_parser("status", help="print the node's role, the primary, positions and lag")
    status.add_argument("--config", help="litefs.yml-style file (default: $LITEFS_WSGI_CONFIG)")
    status.add_argument("--dir", help="LiteFS mount (default: fuse.dir, $LITEFS_DIR or /litefs)")
    status.add_argument("--db", action="append", help="database to report (default: proxy.db, else all)")
    status.add_argument("--api-url", help="LiteFS HTTP API, e.g. http://localhost:20202")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of lines")

    from . import __version__, demo

    demo.add_arguments(commands.add_parser("demo", help="run a primary and a replica on 127.0.0.1"))
    parser.add_argument("--version", action="version", version=f"litefs-wsgi {__version__}")

    args, gunicorn_args = parser.parse_known_args(argv)
    if gunicorn_args and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(gunicorn_args)}")
    try:
        if args.command == "serve":
            return run_serve(args, gunicorn_args)
        if args.command == "status":
            return run_status(args)
        return demo.run(args)
    except ConfigError as exc:
        print(f"litefs-wsgi: {exc}", file=sys.stderr)
        return 2


def run_serve(args: argparse.Namespace, gunicorn_args: list[str] = ()) -> int:
    """gunicorn with ``gunicorn_conf``'s settings, then ``GUNICORN_CMD_ARGS``, then
    ``gunicorn_args`` (the options ``serve`` does not own), then ``--bind/--workers/--threads``."""
    from .config import _count

    for option in ("workers", "threads"):
        if getattr(args, option) is not None:
            setattr(args, option, _count(getattr(args, option), "--" + option))
    for name, value in (
        ("LITEFS_WSGI_CONFIG", args.config),
        ("GUNICORN_BIND", args.bind),
        ("GUNICORN_WORKERS", args.workers),
        ("GUNICORN_THREADS", args.threads),
    ):
        if value is not None:
            os.environ[name] = str(value)
    from gunicorn.app.base import Application
    from gunicorn.config import Config as GunicornConfig

    from . import gunicorn_conf  # checks every option now: a bad one stops here, named

    cfg = GunicornConfig(prog="litefs-wsgi serve")
    parser = cfg.parser()
    layers = []  # (where, options) in gunicorn's order: its environment, then its command line
    for where, given in (("GUNICORN_CMD_ARGS", cfg.get_cmd_args_from_env()), ("the command line", gunicorn_args)):
        options = vars(parser.parse_args(list(given)))  # an unknown option exits 2 with gunicorn's usage
        if options.pop("args"):
            raise ConfigError(f"{where}: serve runs litefs_wsgi.proxy:application; it takes no app module")
        layers.append(options)
    gunicorn_file = layers[1].pop("config") or layers[0].pop("config", None)
    layers[0].pop("config", None)
    own = {"bind": args.bind, "workers": args.workers, "threads": args.threads}

    class ProxyServer(Application):
        """gunicorn with ``gunicorn_conf``'s settings, then a gunicorn ``-c`` file if one is
        given, then ``GUNICORN_CMD_ARGS``, the command line, and serve's own options."""

        def init(self, parser, opts, args):  # never called: load_config is ours
            raise NotImplementedError

        def load_config(self) -> None:
            for name in self.cfg.settings:
                if name != "wsgi_app" and hasattr(gunicorn_conf, name):
                    self.cfg.set(name, getattr(gunicorn_conf, name))
            if gunicorn_file:
                self.load_config_from_file(gunicorn_file)
            for options in (*layers, own):
                for name, value in options.items():
                    if value is not None:
                        self.cfg.set(name.lower(), value)

        def load(self):
            from . import proxy

            return proxy.application  # built in each worker, after post_fork sized its pool

    ProxyServer(prog="litefs-wsgi serve").run()
    return 0


def run_status(args: argparse.Namespace) -> int:
    """Print the node's state; exit 1 when the mount is not LiteFS's or the API cannot be reached."""
    from .config import _api_url, _databases, _str, options_and_sources, with_source
    from .node import Node, describe_mount_problem, mount_problem
    from .watcher import Watcher

    env = {**os.environ, "LITEFS_WSGI_CONFIG": args.config} if args.config else os.environ
    options, sources = options_and_sources(env)
    try:  # checked as Config checks them: a comma list in LITEFS_PROXY_DB is several databases
        mount_dir = args.dir or (_str(options["mount_dir"], "mount_dir") if "mount_dir" in options else "/litefs")
        dbs = args.db or (_databases(options["db"], "db") if "db" in options else _databases_in(mount_dir))
        api_url = _api_url(args.api_url, "--api-url") if args.api_url else _api_url(options.get("api_url"), "api_url")
    except ConfigError as exc:
        raise with_source(exc, sources) from None
    node = Node(mount_dir)
    info = _info(api_url) if api_url else None
    problem = mount_problem(mount_dir)  # as LiteFSMiddleware judges it at start-up
    report: dict = {"mount": mount_dir, "mount_problem": problem and describe_mount_problem(mount_dir, problem)}
    if isinstance(info, dict):
        # The API knows what the files cannot tell apart: this node being the primary, and
        # a replica during an election.
        is_primary, primary = _role_from_info(info)
        report.update(role="primary" if is_primary else "replica", role_source=f"{api_url}/info")
        report["primary"] = None if is_primary else primary
    elif problem is not None:
        # The files would read as "primary" (no .primary file): say what is really known.
        report.update(role="unknown", role_source=None, primary=None)
    else:
        is_primary, primary = Watcher(node).role()
        report.update(role="primary" if is_primary else "replica", role_source="the mount's .primary file")
        report["primary"] = None if is_primary else primary
    if problem is None:
        report["lag_ms"] = node.lag()
        report["databases"] = {}
        for db in dbs:
            pos = node.pos(db)
            if pos is not None:
                entry: dict | None = {"txid": f"{pos.txid:016x}", "checksum": f"{pos.checksum:016x}"}
            elif os.path.lexists(os.path.join(mount_dir, db + "-pos")):
                entry = {"error": "unreadable position"}
            else:
                entry = None
            report["databases"][db] = entry
    if api_url:
        report["api"] = {"url": api_url, "info": info if isinstance(info, dict) else None}
        if not isinstance(info, dict):
            report["api"]["error"] = info
    code = 1 if problem is not None or (api_url and not isinstance(info, dict)) else 0
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
    return code


def _print_status(report: dict) -> None:
    problem = report["mount_problem"]
    if problem:
        if "LiteFS is mounted at" not in problem:  # else it already says where to point --dir
            problem += "; is LiteFS running? set --dir, fuse.dir or LITEFS_DIR"
        print(f"mount:    {report['mount']} (not a LiteFS mount: {problem})")
    else:
        print(f"mount:    {report['mount']}")
    if report["role"] == "unknown":
        print("role:     unknown")
    else:
        is_primary = report["role"] == "primary"
        print(f"role:     {report['role']} (from {report['role_source']})")
        if is_primary:
            primary = "this node"
        elif report["primary"]:
            primary = report["primary"]
        elif report["role_source"].endswith("/info"):
            primary = "none (an election)"
        else:
            primary = "unknown (.primary is not a plain host name)"
        print(f"primary:  {primary}")
    if "lag_ms" in report:
        lag = report["lag_ms"]
        print(f"lag:      {'unreadable' if lag is None else f'{lag} ms'}")
        for db, entry in report["databases"].items():
            if entry is None:
                text = "no position"
            elif "error" in entry:
                text = entry["error"]
            else:
                txid = int(entry["txid"], 16)
                text = f"TXID {entry['txid']} ({txid}), checksum {entry['checksum']}"
            print(f"db {db}: {text}")
    if "api" in report:
        api = report["api"]
        print(f"api {api['url']}/info: {json.dumps(api['info']) if api['info'] is not None else api['error']}")


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
    # LiteFS's /info always says isPrimary: without it this is some other server's JSON.
    if isinstance(info, dict) and isinstance(info.get("isPrimary"), bool):
        return info
    return f"unexpected answer {info!r:.100} (is this LiteFS's HTTP API, its http.addr?)"


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
