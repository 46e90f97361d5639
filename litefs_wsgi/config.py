"""Options: their defaults, checks, Go-style durations, litefs.yml files and the environment."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from werkzeug.http import is_hop_by_hop_header


class ConfigError(ValueError):
    """An option is unknown or has a bad value; the message names it and says how to fix it."""


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")  # ASCII digits, as Go
# Go's time.ParseDuration stops at 2**63-1 ns (2562047h47m16.854775807s); the whole seconds
# under it, since Python's waits and socket timeouts overflow on the float of Go's limit.
_MAX_SECONDS = 9223372036


def parse_duration(value: Any, name: str = "duration") -> float:
    """Return seconds from a number of seconds or a Go duration string ("250ms", "1m30s")."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a duration such as 5s or 250ms, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int of hundreds of digits
            seconds = math.inf
    elif isinstance(value, str):
        seconds = _parse_go_duration(value.strip(), name)
    else:
        raise ConfigError(f"{name}: expected a duration such as 5s or 250ms, got {value!r}")
    if math.isnan(seconds) or seconds < 0:
        raise ConfigError(f"{name}: must be a duration of zero or more, got {value!r}")
    if seconds > _MAX_SECONDS:
        raise ConfigError(f"{name}: {value!r} is too long (at most 2562047h47m16s)")
    return seconds


def _parse_go_duration(text: str, name: str) -> float:
    if text.isascii():  # float() would also take other scripts' digits
        try:
            return float(text)  # plain seconds, as a number written in a string
        except ValueError:
            pass
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text[1:] if text.startswith("+") else text)
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(body):
        part = _DURATION_PART.match(body, pos)
        if part is None:
            raise ConfigError(f"{name}: {text!r} is not a duration; write seconds (5) or Go-style (5s, 250ms, 1m30s)")
        total += float(part[1]) * _UNITS[part[2]]
        pos = part.end()
    if not body:
        raise ConfigError(f"{name}: empty duration; write seconds (5) or Go-style (5s, 250ms)")
    return sign * total


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    # y and n too: LiteFS's yaml.v3 reads them into a bool, PyYAML leaves them strings.
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "y", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "n", "off", ""):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _optional_bool(value: Any, name: str) -> bool | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    return _bool(value, name)


def _int(value: Any, name: str) -> int:
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < 0:
        raise ConfigError(f"{name}: expected a whole number of zero or more, got {value!r}")
    return number


def _count(value: Any, name: str) -> int:
    """A number of processes or threads, as written in the environment or on a command line:
    1 or more in ASCII digits (int() takes other scripts' digits; gunicorn serves nothing with
    0 workers, and its workers crash with 0 threads)."""
    text = value.strip() if isinstance(value, str) else ""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ConfigError(f"{name}: expected a whole number of 1 or more, got {value!r}")
    return int(text)


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def _optional_str(value: Any, name: str) -> str | None:
    return None if value in (None, "") else _str(value, name)


def _str_list(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):  # from the environment: comma separated
        value = [item.strip() for item in value.split(",") if item.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
    return tuple(value)


def _databases(value: Any, name: str) -> tuple[str, ...]:
    names = _str_list(value, name)
    if not names:
        raise ConfigError(f"{name}: name the database file in the LiteFS mount, e.g. db='app.db'")
    for db in names:
        if not db or "/" in db or db.startswith("."):
            raise ConfigError(f"{name}: {db!r} is not a database file name in the mount (e.g. 'app.db')")
    if len(set(names)) != len(names):
        raise ConfigError(f"{name}: {names!r} names a database twice")
    return names


def _forward(value: Any, name: str) -> str:
    if value not in ("fly-replay", "http"):
        raise ConfigError(f"{name}: expected 'fly-replay' or 'http', got {value!r}")
    return value


def _splice(value: Any, name: str) -> str:
    if value not in ("remote", "always", "never"):
        raise ConfigError(f"{name}: expected 'remote', 'always' or 'never', got {value!r}")
    return value


def _url(value: Any, name: str, *, template: bool = False, given: str | None = None) -> str:
    """Check an http(s) URL (``given``: the value as the user wrote it, for the message)."""
    text = _str(value, name)
    shown = text if given is None else given
    if template:
        try:
            probe = text.format(hostname="primary", port="8080")
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:  # {hostname.x}, {port[x]}
            raise ConfigError(
                f"{name}: {shown!r} may only use {{hostname}} and {{port}} (e.g. 'http://{{hostname}}:{{port}}')"
            ) from exc
    else:
        probe = text
    try:
        parts = urlsplit(probe)
        port = parts.port  # raises on a port that is not a number from 0 to 65535
    except ValueError as exc:  # "https://[::1", "localhost:99999", "host:http"
        why = "the port must be a number from 1 to 65535" if "port" in str(exc).lower() else str(exc)
        raise ConfigError(f"{name}: {shown!r} is not a valid URL: {why}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: expected an http:// or https:// URL, got {shown!r}")
    if port == 0:
        raise ConfigError(f"{name}: {shown!r} is not a valid URL: the port must be a number from 1 to 65535")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name}: {shown!r} must not have a query or fragment")
    return text.rstrip("/")


def _target(value: Any, name: str) -> str | None:
    if value in (None, ""):
        return None
    given = text = _str(value, name)
    if "://" not in text:  # LiteFS writes the target as host:port
        text = "http://" + ("localhost" + text if text.startswith(":") else text)
    return _url(text, name, given=given)


def _addr(value: Any, name: str) -> str:
    text = _str(value, name)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: expected [host]:port such as ':8080', got {text!r}")
    return text


def _api_url(value: Any, name: str) -> str | None:
    if value in (None, ""):
        return None
    given = text = _str(value, name)
    if "://" not in text:  # litefs.yml's http.addr is ":20202"
        text = "http://" + ("localhost" + text if text.startswith(":") else text)
    return _url(text, name, given=given)


def _metrics_path(value: Any, name: str) -> str | None:
    if value in (None, ""):
        return None
    text = _str(value, name)
    if not text.startswith("/") or any(c in text for c in "*?# "):
        raise ConfigError(f"{name}: expected a plain URL path such as '/litefs/metrics', got {text!r}")
    if text == "/litefs/health":
        raise ConfigError(f"{name}: {text!r} is the health check's path; use e.g. '/litefs/metrics'")
    return text


_HEADER_TOKEN = re.compile(r"[!#$%&'*+\-.^`|~0-9A-Za-z]+")  # RFC 9110's token, less "_" (see below)
# Headers that already mean something to a client, a server or this project: carrying the TXID
# in one of them would break it, or be dropped by a hop on the way.
_TAKEN_HEADERS = {
    "cookie",
    "set-cookie",
    "host",
    "content-length",
    "content-type",
    "date",
    "server",
    "location",
    "fly-replay",
    "fly-replay-src",
    "x-litefs-forwarded",
    "x-litefs-replay",
    "retry-after",
}


def _header_name(value: Any, name: str) -> str | None:
    if value in (None, ""):
        return None
    text = _str(value, name)
    if "_" in text:
        # gunicorn and nginx drop request headers with "_" in their names (in WSGI's environ
        # LiteFS_TXID and LiteFS-TXID would be one name): the header would never arrive.
        raise ConfigError(f"{name}: {text!r} has '_', which servers drop from request headers; use '-' (LiteFS-TXID)")
    if not _HEADER_TOKEN.fullmatch(text):
        raise ConfigError(f"{name}: {text!r} is not an HTTP header name; use letters, digits and '-' (LiteFS-TXID)")
    if is_hop_by_hop_header(text) or text.lower() in _TAKEN_HEADERS:
        raise ConfigError(f"{name}: {text!r} already has a meaning in HTTP; pick a name of your own (LiteFS-TXID)")
    return text


def _default_mount_dir() -> str:
    return os.environ.get("LITEFS_DIR") or "/litefs"


def _default_forward() -> str:
    return "fly-replay" if os.environ.get("FLY_APP_NAME") else "http"


def _default_require_mount() -> bool:
    return bool(os.environ.get("FLY_APP_NAME"))  # on Fly.io a node always runs under LiteFS


def _default_primary_url() -> str:
    app = os.environ.get("FLY_APP_NAME")
    if app and _HOST_LABEL.fullmatch(app):  # the primary machine over Fly.io's private network
        return f"http://{{hostname}}.vm.{app}.internal:{{port}}"
    return "http://{hostname}:{port}"


_HOST_LABEL = re.compile(r"[A-Za-z0-9-]{1,63}")


def _field(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, check: Callable, doc: str):
    kwargs = {"default": default} if factory is dataclasses.MISSING else {"default_factory": factory}
    return dataclasses.field(metadata={"check": check, "doc": doc}, **kwargs)


def _duration(default: float, doc: str):
    return _field(default, check=parse_duration, doc=doc)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every option of litefs-wsgi, with LiteFS's defaults. Build with ``Config(**options)``,
    ``Config.from_yaml(path)`` or ``Config.load(**options)``; bad values raise ConfigError."""

    db: tuple[str, ...] = _field(check=_databases, doc="database file(s) in the mount, e.g. 'app.db'")
    mount_dir: str = _field(factory=_default_mount_dir, check=_str, doc="LiteFS mount (fuse.dir)")
    target: str | None = _field(None, check=_target, doc="app behind the standalone proxy, e.g. localhost:8081")
    addr: str = _field(":8080", check=_addr, doc="address the standalone proxy listens on")
    passthrough: tuple[str, ...] = _field((), check=_str_list, doc="paths served as is, e.g. '/static/*'")
    always_forward: tuple[str, ...] = _field((), check=_str_list, doc="read paths handled as writes")
    max_lag: float = _duration(10.0, "lag over which /litefs/health answers 503 (0: off)")
    primary_redirect_timeout: float = _duration(5.0, "how long a write waits for a primary to be known")
    poll_interval: float = _duration(0.001, "how often a waiting read checks the position")
    poll_timeout: float = _duration(5.0, "how long a read waits for its TXID before 504")
    cookie_expiry: float = _duration(300.0, "lifetime of the __txid cookie")
    connect_timeout: float = _duration(30.0, "how long a refused connection is retried before 502")
    read_timeout: float = _duration(60.0, "longest silence from the primary or target before 504")
    websocket_idle_timeout: float = _duration(300.0, "a WebSocket with no traffic this long is closed")
    debug: bool = _field(False, check=_bool, doc="log each routing decision at DEBUG")
    forward: str = _field(factory=_default_forward, check=_forward, doc="'fly-replay' or 'http'")
    primary_url: str | None = _field(
        None,
        check=lambda v, n: None if v in (None, "") else _url(v, n, template=True),
        doc="where writes are forwarded over HTTP; default http://{hostname}:{port}, and on "
        "Fly.io http://{hostname}.vm.$FLY_APP_NAME.internal:{port}; or a fixed URL",
    )
    cookie_secret: str | None = _field(None, check=_optional_str, doc="signs the __txid cookie")
    api_url: str | None = _field(None, check=_api_url, doc="LiteFS HTTP API, e.g. http://localhost:20202")
    max_waiters: int = _field(
        0, check=_int, doc="requests allowed to wait at once per process, for a TXID or a primary"
    )
    require_mount: bool = _field(
        factory=_default_require_mount,
        check=_bool,
        doc="without LiteFS's mount (no .lag), never act as the primary: writes and health answer 503; "
        "default: on when FLY_APP_NAME is set",
    )
    metrics_path: str | None = _field(
        None, check=_metrics_path, doc="where the standalone proxy serves Prometheus metrics, e.g. /litefs/metrics"
    )
    txid_header: str | None = _field(
        None, check=_header_name, doc="header carrying the __txid value for clients without cookies, e.g. LiteFS-TXID"
    )
    replay_on_readonly: bool = _field(
        True, check=_bool, doc="on a replica, a GET/HEAD failing with SQLite's read-only error runs on the primary"
    )
    keep_pos_open: bool | None = _field(
        None,
        check=_optional_bool,
        doc="read DB-pos through a descriptor kept open (one pread per write) instead of opening it each time, "
        "let go after 0.1 s without a read; default (auto): on LiteFS's own mount and under its exec:",
    )
    splice: str = _field(
        "remote",
        check=_splice,
        doc="standalone proxy: answers of 256 KiB and more go to the client by splice(2), without a copy "
        "through Python: 'remote' (to a client on another host only), 'always' or 'never'",
    )

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            object.__setattr__(self, field.name, field.metadata["check"](value, field.name))
        if self.primary_url is None:
            object.__setattr__(self, "primary_url", _default_primary_url())
        if self.poll_interval <= 0:
            raise ConfigError(f"poll_interval: must be more than zero, got {self.poll_interval!r}")

    @classmethod
    def option_names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    @classmethod
    def create(cls, options: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Config:
        """Build from a mapping, with an error that names any unknown option and, from
        ``sources`` (option -> where it was set), where the bad value came from."""
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r}{_did_you_mean(unknown[0], cls.option_names())}")
        if "db" not in options:  # else a TypeError that does not say how to set it
            raise ConfigError(
                "db: name the database file in the LiteFS mount, e.g. db='app.db', proxy.db in the config "
                "file, or LITEFS_PROXY_DB"
            )
        try:
            return cls(**options)
        except ConfigError as exc:
            sourced = with_source(exc, sources or {})
            if sourced is not exc:
                raise sourced from None
            raise

    @classmethod
    def from_yaml(cls, path: str, env: Mapping[str, str] | None = None, expand_env: bool = True) -> Config:
        """Build from a litefs.yml-style file: ``fuse.dir``, ``http.addr`` and ``proxy:``."""
        options = read_yaml(path, env, expand_env)
        return cls.create(options, yaml_sources(options, path))

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **options: Any) -> Config:
        """Options from the file in ``LITEFS_WSGI_CONFIG``, then ``LITEFS_DIR`` and
        ``LITEFS_PROXY_<OPTION>`` from the environment, then ``options``; later ones win."""
        merged, sources = options_and_sources(os.environ if env is None else env)
        merged.update(options)
        for name in options:
            sources.pop(name, None)
        return cls.create(merged, sources)


def options_and_sources(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The options the file in ``LITEFS_WSGI_CONFIG``, then ``LITEFS_DIR`` and
    ``LITEFS_PROXY_<OPTION>`` set (later ones win), unchecked, and where each was set."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if env.get("LITEFS_WSGI_CONFIG"):
        merged.update(read_yaml(env["LITEFS_WSGI_CONFIG"], env))
        sources.update(yaml_sources(merged, env["LITEFS_WSGI_CONFIG"]))
    from_env = options_from_env(env)
    merged.update(from_env)
    sources.update({name: "LITEFS_DIR" if name == "mount_dir" else env_name(name) for name in from_env})
    return merged, sources


def with_source(exc: ConfigError, sources: Mapping[str, str]) -> ConfigError:
    """``exc``, or a copy saying where its option was set when ``sources`` knows."""
    name = str(exc).partition(":")[0]
    return ConfigError(f"{exc} (set by {sources[name]})") if name in sources else exc


def env_name(option: str) -> str:
    """The environment variable that sets ``option``."""
    return "LITEFS_PROXY_" + option.upper()


def yaml_sources(options: Mapping[str, Any], path: str) -> dict[str, str]:
    """Where each option read from the file ``path`` was written in it."""
    keys = {"mount_dir": "fuse.dir", "api_url": "proxy.api-url or http.addr"}
    return {name: f"{keys.get(name, 'proxy.' + name.replace('_', '-'))} in {path}" for name in options}


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; the options are: {', '.join(choices)}"


def options_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """Return the options set in the environment, as strings for Config to check; a
    ``LITEFS_PROXY_*`` variable that names no option is an error, not ignored."""
    options = {}
    if env.get("LITEFS_DIR"):
        options["mount_dir"] = env["LITEFS_DIR"]
    names = Config.option_names()
    for variable in sorted(env):
        if not variable.startswith("LITEFS_PROXY_"):
            continue
        name = variable[len("LITEFS_PROXY_") :].lower()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {env_name(close[0])}?" if close else f"; the options are: {', '.join(names)}"
            raise ConfigError(f"unknown environment variable {variable} (no option {name!r}){hint}")
        options[name] = env[variable]
    return options


def read_yaml(path: str, env: Mapping[str, str] | None = None, expand_env: bool = True) -> dict[str, Any]:
    """Return the options a litefs.yml-style file sets; unknown keys in ``proxy:`` are errors."""
    import yaml

    env = os.environ if env is None else env
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"config file {path!r}: {exc.strerror}") from exc
    if expand_env:
        text = expand(text, env)
    try:
        doc = yaml.safe_load(text) or {}
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int past Python's 4300 digits
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping at the top level")
    options: dict[str, Any] = {}
    proxy = doc.get("proxy") or {}
    if not isinstance(proxy, dict):
        raise ConfigError(f"config file {path!r}: 'proxy' must be a mapping")
    known = {name.replace("_", "-"): name for name in Config.option_names()}
    for key, value in proxy.items():
        if key not in known or key == "mount-dir":
            raise ConfigError(
                f"config file {path!r}: unknown key proxy.{key}"
                + _did_you_mean(str(key), [k for k in known if k != "mount-dir"])
            )
        if value is not None:  # "key:" with no value keeps the default, as in LiteFS (yaml.v3)
            options[known[key]] = value
    fuse, http = doc.get("fuse") or {}, doc.get("http") or {}
    if isinstance(fuse, dict) and fuse.get("dir"):
        options["mount_dir"] = fuse["dir"]
    if isinstance(http, dict) and http.get("addr") and "api_url" not in options:
        options["api_url"] = http["addr"]
    return options


_EXPR = re.compile(r"""^(\w+)\s*(==|!=)\s*(?:"(.*)"|'(.*)'|(\w+))$""", re.ASCII)
_SHELL_SPECIAL = set("*#$@!?-0123456789")
_ALNUM = set("_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Expand ``$VAR``, ``${VAR}``, ``${VAR == "value"}``, ``${VAR != 'value'}`` and
    ``${A == B}`` as LiteFS does (an expression becomes ``true`` or ``false``).

    This is Go's ``os.Expand``, which LiteFS uses, to the byte: ``$$``, ``$1`` and the
    other shell specials are one-character names, a ``$`` before anything else stays, and
    a ``${`` without its ``}`` is dropped.
    """
    out, literal, j = [], 0, 0
    while j < len(text):
        if text[j] == "$" and j + 1 < len(text):
            out.append(text[literal:j])
            name, width = _shell_name(text[j + 1 :])
            if name:
                out.append(_lookup(name, env))
            elif not width:
                out.append("$")
            j += width
            literal = j + 1
        j += 1
    return "".join(out) + text[literal:] if out else text


def _shell_name(s: str) -> tuple[str, int]:
    """Go's ``getShellName``: the name after a ``$`` and how many characters it spans."""
    if s[0] == "{":
        if len(s) > 2 and s[1] in _SHELL_SPECIAL and s[2] == "}":
            return s[1], 3
        end = s.find("}", 1)
        if end == -1:
            return "", 1  # bad syntax: "${" is dropped
        return s[1:end], end + 1  # "${}" gives no name: dropped
    if s[0] in _SHELL_SPECIAL:
        return s[0], 1
    width = 0
    while width < len(s) and s[width] in _ALNUM:
        width += 1
    return s[:width], width


def _lookup(name: str, env: Mapping[str, str]) -> str:
    name = name.strip()
    expr = _EXPR.match(name)
    if expr is None:
        return env.get(name, "")
    left = env.get(expr[1], "")
    if expr[3] is not None:
        right = expr[3]
    elif expr[4] is not None:
        right = expr[4]
    else:
        right = env.get(expr[5], "")
    return "true" if (left == right) == (expr[2] == "==") else "false"
