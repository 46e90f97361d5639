"""Options: LiteFS's defaults, Go durations, litefs.yml files, the environment, errors naming the option."""

import dataclasses
import datetime
import os
import re
import textwrap
import threading
from email.utils import parsedate_to_datetime

import pytest
from servers import serve
from werkzeug.test import Client

from litefs_wsgi import Config, ConfigError, LiteFSMiddleware
from litefs_wsgi.config import expand, parse_duration, read_yaml


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No LiteFS or Fly.io variable from the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.startswith(("LITEFS_", "FLY_")):
            monkeypatch.delenv(name)


def write(tmp_path, text, name="litefs.yml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def app(environ, start_response):
    start_response("200 OK", [])
    return [b""]


def counting_writer(mount):
    """A write that moves app.db's position by one, as a committed transaction does."""

    def wrote(environ, start_response):
        txid = mount.position("app.db") + 1
        mount.set_position("app.db", txid)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"wrote %d" % txid]

    return wrote


# -- defaults ------------------------------------------------------------------------------


def test_defaults_are_litefs_defaults():
    config = Config(db="app.db")
    assert config.db == ("app.db",)
    assert config.mount_dir == "/litefs"
    assert config.target is None
    assert config.addr == ":8080"
    assert config.passthrough == ()
    assert config.always_forward == ()
    assert config.max_lag == 10.0
    assert config.primary_redirect_timeout == 5.0
    assert config.poll_interval == 0.001
    assert config.poll_timeout == 5.0
    assert config.cookie_expiry == 300.0
    assert config.connect_timeout == 30.0
    assert config.debug is False
    assert config.forward == "http"
    assert config.primary_url == "http://{hostname}:{port}"
    assert config.cookie_secret is None
    assert config.api_url is None
    assert config.max_waiters == 0
    assert config.require_mount is False
    assert config.metrics_path is None
    assert config.txid_header is None
    assert config.replay_on_readonly is True
    assert config.keep_pos_open is None  # auto: kept open on LiteFS's mount and under its exec:
    assert config.splice == "remote"  # ours: to clients on another host only


def test_every_option_is_tested_above():
    # A new option must get its default checked in test_defaults_are_litefs_defaults.
    assert set(Config.option_names()) == {
        "db", "mount_dir", "target", "addr", "passthrough", "always_forward", "max_lag",
        "primary_redirect_timeout", "poll_interval", "poll_timeout", "cookie_expiry",
        "connect_timeout", "read_timeout", "websocket_idle_timeout", "debug", "forward",
        "primary_url", "cookie_secret", "api_url", "max_waiters", "require_mount",
        "metrics_path", "txid_header", "replay_on_readonly", "keep_pos_open", "splice",
    }  # fmt: skip


def test_mount_dir_default_from_litefs_dir(monkeypatch):
    monkeypatch.setenv("LITEFS_DIR", "/mnt/dbs")
    assert Config(db="app.db").mount_dir == "/mnt/dbs"


def test_on_fly_forward_is_fly_replay_and_primary_url_is_the_private_network(monkeypatch):
    monkeypatch.setenv("FLY_APP_NAME", "my-app")
    config = Config(db="app.db")
    assert config.forward == "fly-replay"
    assert config.primary_url == "http://{hostname}.vm.my-app.internal:{port}"
    assert config.require_mount is True
    assert Config(db="app.db", forward="http").forward == "http"
    assert Config(db="app.db", require_mount=False).require_mount is False


def test_empty_fly_app_name_is_not_fly(monkeypatch):
    monkeypatch.setenv("FLY_APP_NAME", "")
    assert Config(db="app.db").forward == "http"


def test_several_databases():
    assert Config(db=["a.db", "b.db"]).db == ("a.db", "b.db")


# -- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (0.25, 0.25),
        (0, 0.0),
        ("5", 5.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("5s", 5.0),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("1h2m3s4ms", 3723.004),
        ("100us", 0.0001),
        ("100µs", 0.0001),
        ("1000000ns", 0.001),
        (".5s", 0.5),
        ("+5s", 5.0),
        (" 5s ", 5.0),
    ],
)
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        *["-5s", "-1", -1, -0.5, "5x", "5 s", "s", "", "-", "1m-30s", "abc", "inf", "nan", float("nan")],
        *[True, None, [5]],
        *["++5s", "+-5s", "--5s", "\u0665s", "\u0665", "1\u0665ms"],  # Go: one sign at most, ASCII digits only
        *["2562048h", "2562047h47m17s", 9223372037],  # past Go's longest
        pytest.param(10**400, id="400-digit-int"),
        pytest.param("1" * 400 + "ns", id="400-digit-ns"),
    ],
)
def test_bad_durations_are_errors_naming_the_option(value):
    with pytest.raises(ConfigError, match="^poll_timeout: "):
        Config(db="app.db", poll_timeout=value)


@pytest.mark.parametrize(
    "name",
    ["max_lag", "primary_redirect_timeout", "poll_interval", "poll_timeout", "cookie_expiry", "connect_timeout"],
)
def test_every_duration_option_takes_go_strings(name):
    assert getattr(Config(db="app.db", **{name: "1m30s"}), name) == 90.0
    with pytest.raises(ConfigError, match=f"^{name}: "):
        Config(db="app.db", **{name: "-1s"})


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Config) if f.type == "float"])
def test_a_duration_past_gos_longest_is_an_error_naming_the_option(name, tmp_path):
    # Go's time.ParseDuration stops at 2562047h47m16.854775807s; longer ones overflowed
    # Python's waits and socket timeouts at the first request, or formatting the cookie.
    for value in ("2562048h", "3000000h", "1000000000h", 10**12):
        with pytest.raises(ConfigError, match=f"^{name}: .* is too long \\(at most 2562047h47m16s\\)$"):
            Config(db="app.db", **{name: value})
    assert getattr(Config(db="app.db", **{name: "2562047h47m16s"}), name) == 9223372036
    # YAML reads an integer of 400 digits as an int: float() of it raised OverflowError.
    path = write(tmp_path, f"proxy:\n  db: app.db\n  {name.replace('_', '-')}: {'9' * 400}\n")
    with pytest.raises(ConfigError, match=f"^{name}: .* is too long"):
        Config.from_yaml(path)


def test_an_integer_past_pythons_digit_limit_in_yaml_is_a_config_error(tmp_path):
    path = write(tmp_path, f"proxy:\n  db: app.db\n  poll-timeout: {'9' * 5000}\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        Config.from_yaml(path)


def test_the_longest_durations_serve(mount, replica, tmp_path):
    """Every duration at its longest accepted value works where it is used: the read's wait,
    the cookie's Expires, the forward's connect and read timeouts."""
    longest = {f.name: "2562047h47m16s" for f in dataclasses.fields(Config) if f.type == "float"}
    longest.pop("poll_interval")  # how often a waiting read looks, not a bound
    mount.set_position("app.db", 1)
    primary = LiteFSMiddleware(counting_writer(mount), db="app.db", mount_dir=mount.path, **longest)
    with serve(primary) as url:
        node = LiteFSMiddleware(app, db="app.db", mount_dir=replica.path, forward="http", primary_url=url, **longest)
        client = Client(node)
        answer = client.post("/")
        assert answer.status_code == 200 and answer.text == "wrote 2"
        cookie = answer.headers["Set-Cookie"]
        expires = parsedate_to_datetime(re.search("Expires=([^;]+)", cookie)[1])
        assert expires.year > datetime.datetime.now(datetime.timezone.utc).year + 290
        # A read waiting for TXID 2 on the replica, which gets there a moment later.
        threading.Timer(0.2, replica.set_position, ("app.db", 2)).start()
        client.set_cookie("__txid", "0000000000000002")
        assert client.get("/").status_code == 200


def test_poll_interval_zero_is_an_error():
    with pytest.raises(ConfigError, match="^poll_interval: "):
        Config(db="app.db", poll_interval=0)


# -- other checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"db": ""}, "db"),
        ({"db": []}, "db"),
        ({"db": "sub/app.db"}, "db"),
        ({"db": ".hidden"}, "db"),
        ({"db": ["a.db", "a.db"]}, "db"),
        ({"db": 5}, "db"),
        ({"forward": "replay"}, "forward"),
        ({"primary_url": "http://{host}:{port}"}, "primary_url"),
        ({"primary_url": "ftp://{hostname}"}, "primary_url"),
        ({"primary_url": "http://{hostname}/?a=1"}, "primary_url"),
        ({"addr": "8080"}, "addr"),
        ({"addr": ":99999"}, "addr"),
        ({"target": "ftp://app"}, "target"),
        ({"target": "localhost:99999"}, "target"),
        ({"target": "localhost:0"}, "target"),
        ({"target": "https://[::1"}, "target"),
        ({"target": "http://app:http"}, "target"),
        ({"primary_url": "http://{hostname}:70000"}, "primary_url"),
        ({"primary_url": "http://[::1"}, "primary_url"),
        ({"api_url": ":99999"}, "api_url"),
        ({"require_mount": "maybe"}, "require_mount"),
        ({"api_url": "ftp://x"}, "api_url"),
        ({"debug": "maybe"}, "debug"),
        ({"max_waiters": -1}, "max_waiters"),
        ({"max_waiters": "many"}, "max_waiters"),
        ({"passthrough": [1]}, "passthrough"),
        ({"always_forward": 5}, "always_forward"),
        ({"cookie_secret": 5}, "cookie_secret"),
        ({"metrics_path": "metrics"}, "metrics_path"),
        ({"metrics_path": "/metrics/*"}, "metrics_path"),
        ({"metrics_path": "/litefs/health"}, "metrics_path"),
        ({"txid_header": "LiteFS TXID"}, "txid_header"),
        ({"txid_header": "Cookie"}, "txid_header"),
        ({"replay_on_readonly": "sometimes"}, "replay_on_readonly"),
        ({"keep_pos_open": "always"}, "keep_pos_open"),
        ({"splice": True}, "splice"),
        ({"splice": "sometimes"}, "splice"),
    ],
)
def test_bad_values_are_errors_naming_the_option(options, name):
    with pytest.raises(ConfigError, match=f"^{name}: "):
        Config(**{"db": "app.db", **options})


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ("auto", None), ("", None), ("true", True), (False, False)]
)
def test_keep_pos_open_is_auto_unless_set(value, expected):
    assert Config(db="app.db", keep_pos_open=value).keep_pos_open is expected


@pytest.mark.parametrize(("value", "expected"), [("auto", None), ("1", True), ("off", False)])
def test_keep_pos_open_from_the_environment(value, expected):
    env = {"LITEFS_PROXY_DB": "app.db", "LITEFS_PROXY_KEEP_POS_OPEN": value}
    assert Config.load(env=env).keep_pos_open is expected


def test_unknown_option_names_itself():
    with pytest.raises(ConfigError, match="unknown option 'poll_timout'"):
        Config.create({"db": "app.db", "poll_timout": 5})


def test_missing_db_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="db"):
        Config.create({})


def test_target_and_api_url_take_litefs_host_port():
    config = Config(db="app.db", target="localhost:8081", api_url=":20202")
    assert config.target == "http://localhost:8081"
    assert config.api_url == "http://localhost:20202"
    assert Config(db="app.db", target=":8081").target == "http://localhost:8081"


def test_middleware_raises_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="^poll_timeout: "):
        LiteFSMiddleware(app, db="app.db", mount_dir=str(tmp_path), poll_timeout="soon")
    with pytest.raises(ConfigError, match="unknown option 'pol_timeout'"):
        LiteFSMiddleware(app, db="app.db", mount_dir=str(tmp_path), pol_timeout=5)
    with pytest.raises(ConfigError, match="db"):
        LiteFSMiddleware(app, mount_dir=str(tmp_path))


# -- litefs.yml ----------------------------------------------------------------------------


def test_yaml_in_litefs_format(tmp_path):
    path = write(
        tmp_path,
        """
        fuse:
          dir: "/mnt/litefs"
        data:
          dir: "/var/lib/litefs"
        http:
          addr: ":20202"
        lease:
          type: "consul"
          candidate: true
        exec:
          - cmd: "gunicorn app:app"
        proxy:
          addr: ":8080"
          target: "localhost:8081"
          db: "app.db"
          passthrough: ["/static/*", "*.png"]
          always-forward: ["/login"]
          max-lag: "2s"
          primary-redirect-timeout: "250ms"
          poll-interval: 2ms
          poll-timeout: 1m30s
          cookie-expiry: 10m
          connect-timeout: 3
          debug: true
          forward: http
          primary-url: "http://{hostname}.internal:{port}"
          max-waiters: 50
          txid-header: LiteFS-TXID
          replay-on-readonly: false
        """,
    )
    config = Config.from_yaml(path)
    assert config.mount_dir == "/mnt/litefs"
    assert config.api_url == "http://localhost:20202"
    assert config.addr == ":8080"
    assert config.target == "http://localhost:8081"
    assert config.db == ("app.db",)
    assert config.passthrough == ("/static/*", "*.png")
    assert config.always_forward == ("/login",)
    assert config.max_lag == 2.0
    assert config.primary_redirect_timeout == 0.25
    assert config.poll_interval == 0.002
    assert config.poll_timeout == 90.0
    assert config.cookie_expiry == 600.0
    assert config.connect_timeout == 3.0
    assert config.debug is True
    assert config.forward == "http"
    assert config.primary_url == "http://{hostname}.internal:{port}"
    assert config.max_waiters == 50
    assert config.txid_header == "LiteFS-TXID"
    assert config.replay_on_readonly is False


def test_yaml_api_url_wins_over_http_addr(tmp_path):
    path = write(tmp_path, "http:\n  addr: ':20202'\nproxy:\n  db: app.db\n  api-url: http://127.0.0.1:3000\n")
    assert Config.from_yaml(path).api_url == "http://127.0.0.1:3000"


def test_yaml_without_http_section_has_no_api_url(tmp_path):
    assert Config.from_yaml(write(tmp_path, "proxy:\n  db: app.db\n")).api_url is None


def test_yaml_key_without_a_value_keeps_the_default(tmp_path):
    # LiteFS (yaml.v3) leaves an option at its default when its key has no value: a list whose
    # items are all commented out, a key left empty, "~" or null.
    path = write(
        tmp_path,
        """
        proxy:
          db: app.db
          passthrough:
            # - "/static/*"
          always-forward: ~
          max-lag:
          poll-timeout: null
          debug:
          forward:
          replay-on-readonly:
        """,
    )
    assert Config.from_yaml(path) == Config(db="app.db")


@pytest.mark.parametrize(
    ("written", "value"), [("y", True), ("Y", True), ("yes", True), ("On", True), ("n", False), ("N", False)]
)
def test_yaml_booleans_as_litefs_reads_them(tmp_path, written, value):
    # yaml.v3, which LiteFS uses, takes YAML 1.1's y/Y/n/N into a bool; PyYAML leaves them strings.
    path = write(tmp_path, f"proxy:\n  db: app.db\n  debug: {written}\n  replay-on-readonly: {written}\n")
    config = Config.from_yaml(path)
    assert config.debug is value and config.replay_on_readonly is value


@pytest.mark.parametrize("key", ["poll_timeout", "mount-dir", "dir", "bogus"])
def test_yaml_unknown_proxy_key_is_an_error_naming_it(tmp_path, key):
    path = write(tmp_path, f"proxy:\n  db: app.db\n  {key}: 5\n")
    with pytest.raises(ConfigError, match=f"proxy.{key}"):
        Config.from_yaml(path)


def test_yaml_bad_value_names_the_option(tmp_path):
    path = write(tmp_path, "proxy:\n  db: app.db\n  poll-timeout: -5s\n")
    with pytest.raises(ConfigError, match="^poll_timeout: "):
        Config.from_yaml(path)


@pytest.mark.parametrize("text", ["proxy: [1, 2\n", "- a\n- b\n", "proxy: 5\n"])
def test_yaml_malformed_is_an_error(tmp_path, text):
    with pytest.raises(ConfigError, match="config file"):
        Config.from_yaml(write(tmp_path, text))


def test_yaml_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yml"):
        Config.from_yaml(str(tmp_path / "nope.yml"))


# -- environment expansion, as LiteFS ------------------------------------------------------


ENV = {"FLY_REGION": "ams", "PRIMARY_REGION": "ams", "OTHER": "lhr", "APP": "my-app", "DIR": "/mnt/x"}


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("$APP", "my-app"),
        ("${APP}", "my-app"),
        ("${ APP }", "my-app"),
        ("http://$APP.internal", "http://my-app.internal"),
        ("litefs/${APP}/key", "litefs/my-app/key"),
        ("$MISSING", ""),
        ("${MISSING}", ""),
        ('${FLY_REGION == "ams"}', "true"),
        ('${FLY_REGION == "lhr"}', "false"),
        ("${FLY_REGION != 'lhr'}", "true"),
        ("${FLY_REGION != 'ams'}", "false"),
        ("${FLY_REGION == PRIMARY_REGION}", "true"),
        ("${FLY_REGION == OTHER}", "false"),
        ("${FLY_REGION != OTHER}", "true"),
        ("${FLY_REGION==PRIMARY_REGION}", "true"),
        ('${MISSING == ""}', "true"),
        ("no dollars", "no dollars"),
        # Go's os.Expand, under LiteFS's expressions, in its corners:
        ("price: 5$", "price: 5$"),  # a final $ stays
        ("a$/b", "a$/b"),  # $ before a non-name stays
        ("$$", ""),  # shell specials are one-character names
        ("$1abc", "abc"),
        ("${1}", ""),
        ("$-x", "x"),
        ("${}", ""),  # bad syntax is dropped
        ("x${APP", "xAPP"),
        ("$APP-$APP", "my-app-my-app"),
        ("${APP}${DIR}", "my-app/mnt/x"),
        ('${FLY_REGION == "x}y"}', 'y"}'),  # the name ends at the first }: no expression, no such variable
        ("${FLY_REGION == ams}", "false"),  # a bare word is a variable's name, and AMS is unset
    ],
)
def test_expand_as_litefs(text, expanded):
    assert expand(text, ENV) == expanded


def test_yaml_expands_environment(tmp_path):
    path = write(
        tmp_path,
        """
        fuse:
          dir: "${DIR}"
        lease:
          candidate: ${FLY_REGION == PRIMARY_REGION}
        proxy:
          db: "$APP.db"
          debug: ${FLY_REGION == "ams"}
          primary-url: "http://{hostname}.vm.${APP}.internal:{port}"
        """,
    )
    options = read_yaml(path, ENV)
    assert options == {
        "mount_dir": "/mnt/x",
        "db": "my-app.db",
        "debug": True,
        "primary_url": "http://{hostname}.vm.my-app.internal:{port}",
    }
    assert read_yaml(path, ENV, expand_env=False)["db"] == "$APP.db"


# -- environment overrides -----------------------------------------------------------------


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("LITEFS_DIR", "/mnt/dbs")
    monkeypatch.setenv("LITEFS_PROXY_DB", "app.db")
    monkeypatch.setenv("LITEFS_PROXY_TARGET", "localhost:9000")
    monkeypatch.setenv("LITEFS_PROXY_POLL_TIMEOUT", "250ms")
    monkeypatch.setenv("LITEFS_PROXY_PASSTHROUGH", "/static/*, *.png")
    monkeypatch.setenv("LITEFS_PROXY_DEBUG", "true")
    monkeypatch.setenv("LITEFS_PROXY_MAX_WAITERS", "7")
    config = Config.load()
    assert config.mount_dir == "/mnt/dbs"
    assert config.db == ("app.db",)
    assert config.target == "http://localhost:9000"
    assert config.poll_timeout == 0.25
    assert config.passthrough == ("/static/*", "*.png")
    assert config.debug is True
    assert config.max_waiters == 7


def test_bad_env_value_names_the_option(monkeypatch):
    monkeypatch.setenv("LITEFS_PROXY_MAX_LAG", "ten seconds")
    with pytest.raises(ConfigError, match="^max_lag: "):
        Config.load(db="app.db")


def test_precedence_file_then_env_then_arguments(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        "fuse:\n  dir: /from/file\nproxy:\n  db: file.db\n  poll-timeout: 1s\n  max-lag: 1s\n  cookie-expiry: 1s\n",
    )
    monkeypatch.setenv("LITEFS_WSGI_CONFIG", path)
    config = Config.load()
    assert (config.mount_dir, config.db, config.poll_timeout) == ("/from/file", ("file.db",), 1.0)

    monkeypatch.setenv("LITEFS_DIR", "/from/env")
    monkeypatch.setenv("LITEFS_PROXY_POLL_TIMEOUT", "2s")
    monkeypatch.setenv("LITEFS_PROXY_MAX_LAG", "2s")
    config = Config.load(max_lag=3)
    assert config.mount_dir == "/from/env"
    assert config.db == ("file.db",)
    assert config.poll_timeout == 2.0
    assert config.max_lag == 3.0
    assert config.cookie_expiry == 1.0


def test_middleware_reads_litefs_wsgi_config(tmp_path, monkeypatch):
    path = write(tmp_path, f"fuse:\n  dir: {tmp_path}\nproxy:\n  db: app.db\n  poll-timeout: 7s\n")
    monkeypatch.setenv("LITEFS_WSGI_CONFIG", path)
    middleware = LiteFSMiddleware(app)
    assert middleware.config.poll_timeout == 7.0
    assert middleware.config.mount_dir == str(tmp_path)


def test_middleware_refuses_config_and_options():
    with pytest.raises(TypeError):
        LiteFSMiddleware(app, Config(db="app.db"), db="app.db")


def test_splice_from_the_file_and_the_environment(tmp_path):
    path = tmp_path / "litefs.yml"
    path.write_text("proxy:\n  db: app.db\n  splice: never\n")
    assert Config.load(env={"LITEFS_WSGI_CONFIG": str(path)}).splice == "never"
    assert Config.load(env={"LITEFS_PROXY_DB": "app.db", "LITEFS_PROXY_SPLICE": "always"}).splice == "always"
