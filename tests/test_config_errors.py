"""Configuration errors say where the bad value was set and suggest the option meant."""

import pytest

from litefs_wsgi import Config, ConfigError
from litefs_wsgi.config import env_name


def write(tmp_path, text):
    path = tmp_path / "litefs.yml"
    path.write_text(text)
    return str(path)


def test_a_bad_value_in_the_file_names_its_key_and_file(tmp_path):
    path = write(tmp_path, "proxy:\n  db: app.db\n  poll-timeout: 3 seconds\n")
    with pytest.raises(ConfigError) as error:
        Config.load(env={"LITEFS_WSGI_CONFIG": path})
    assert str(error.value).startswith("poll_timeout: '3 seconds' is not a duration")
    assert str(error.value).endswith(f"(set by proxy.poll-timeout in {path})")


def test_a_bad_value_in_the_environment_names_its_variable():
    with pytest.raises(ConfigError, match=r"^max_lag: .*\(set by LITEFS_PROXY_MAX_LAG\)$"):
        Config.load(env={"LITEFS_PROXY_MAX_LAG": "soon"}, db="app.db")


def test_a_bad_keyword_argument_names_only_the_option():
    with pytest.raises(ConfigError) as error:
        Config.load(env={"LITEFS_PROXY_MAX_LAG": "soon"}, db="app.db", max_lag="later")
    assert str(error.value).startswith("max_lag: 'later'") and "set by" not in str(error.value)


def test_a_mistyped_key_in_the_file_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "proxy:\n  db: app.db\n  pol-timeout: 3s\n")
    with pytest.raises(ConfigError, match=r"unknown key proxy\.pol-timeout; did you mean 'poll-timeout'\?"):
        Config.load(env={"LITEFS_WSGI_CONFIG": path})


def test_a_mistyped_option_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown option 'pol_timeout'; did you mean 'poll_timeout'\?"):
        Config.load(env={}, db="app.db", pol_timeout=1)


def test_a_missing_db_says_every_way_to_set_it(tmp_path):
    path = write(tmp_path, "proxy:\n  target: localhost:8081\n")
    with pytest.raises(ConfigError, match=r"^db: .*proxy\.db in the config file, or LITEFS_PROXY_DB"):
        Config.load(env={"LITEFS_WSGI_CONFIG": path})


def test_a_mistyped_environment_variable_is_an_error_naming_it_and_the_option_meant():
    with pytest.raises(ConfigError) as error:
        Config.load(env={"LITEFS_PROXY_POLL_TIMOUT": "2s"}, db="app.db")
    assert str(error.value) == (
        "unknown environment variable LITEFS_PROXY_POLL_TIMOUT (no option 'poll_timout'); "
        "did you mean LITEFS_PROXY_POLL_TIMEOUT?"
    )
    with pytest.raises(ConfigError, match=r"^unknown environment variable LITEFS_PROXY_XYZZY .*the options are: db, "):
        Config.load(env={"LITEFS_PROXY_XYZZY": "1"}, db="app.db")
    # Every option has its variable, and other prefixes are not ours.
    config = Config.load(
        env={"LITEFS_PROXY_REQUIRE_MOUNT": "1", "LITEFS_PROXYISH": "x", "LITEFS_WSGI_X": "y"}, db="a.db"
    )
    assert config.require_mount is True


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("target", "localhost:99999", "the port must be a number from 1 to 65535"),
        ("target", "https://[::1", "Invalid IPv6 URL"),
        ("primary_url", "http://{hostname}:123456", "the port must be a number from 1 to 65535"),
        ("api_url", "http://[::1:20202", "Invalid IPv6 URL"),
    ],
)
def test_a_url_that_cannot_be_parsed_is_an_error_as_written(name, value, why):
    with pytest.raises(ConfigError) as error:
        Config.load(env={env_name(name): value}, db="app.db")
    assert str(error.value) == f"{name}: {value!r} is not a valid URL: {why} (set by {env_name(name)})"


@pytest.mark.parametrize(
    "url", ["http://primary.internal:8080", "https://db-primary.example.com", "http://10.0.0.5:{port}"]
)
def test_primary_url_may_be_a_fixed_address(url):
    # A static lease's one primary, or a name that always points at the primary.
    assert Config(db="app.db", primary_url=url).primary_url == url


@pytest.mark.parametrize(
    "template",
    ["http://{hostname.vm.myapp.internal}:{port}", "http://{hostname[vm]}:{port}", "http://{hostname}:{port.real}"],
)
def test_a_primary_url_template_with_more_than_plain_names_is_an_error_naming_it(template):
    # str.format raised AttributeError or TypeError for these, not a ConfigError.
    message = f"primary_url: {template!r} may only use {{hostname}} and {{port}} (e.g. 'http://{{hostname}}:{{port}}')"
    with pytest.raises(ConfigError) as error:
        Config(db="app.db", primary_url=template)
    assert str(error.value) == message
    with pytest.raises(ConfigError) as error:
        Config.load(env={"LITEFS_PROXY_PRIMARY_URL": template}, db="app.db")
    assert str(error.value) == f"{message} (set by LITEFS_PROXY_PRIMARY_URL)"
