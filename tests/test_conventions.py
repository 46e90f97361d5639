"""What users of gunicorn and of Python packages expect: ``gunicorn -c python:litefs_wsgi.gunicorn_conf``
from any directory, ``litefs-wsgi serve`` passing gunicorn's options on, ``--version``, a wheel
with its licence and type hints."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import requests
from servers import ROOT, free_port, gunicorn, listening, proxy_config, serve, wait_until

from litefs_wsgi import __version__
from litefs_wsgi.testing import LiteFSMount


def target(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"target:" + environ["PATH_INFO"].encode()]


def litefs_wsgi(*args: str) -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "litefs-wsgi")
    return [beside, *args] if os.path.exists(beside) else [sys.executable, "-m", "litefs_wsgi.cli", *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITEFS_", "FLY_", "GUNICORN_"))}
    return {**env, **extra}


def test_gunicorn_config_module_works_from_any_directory_and_debug_keeps_gunicorn_at_info(tmp_path):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()  # no gunicorn.conf.py here, nor the package's source
    with serve(target) as target_url:
        config = proxy_config(tmp_path, mount, target_url.removeprefix("http://"), debug="true")
        env = clean_env(LITEFS_WSGI_CONFIG=config, GUNICORN_WORKERS="1", GUNICORN_THREADS="2")
        args = ["-c", "python:litefs_wsgi.gunicorn_conf"]
        with gunicorn(args, env=env, cwd=str(elsewhere)) as (url, proc):
            assert requests.get(url + "/x", timeout=20).text == "target:/x"
            wait_until(lambda: any(b"litefs-wsgi: GET /x: read" in line for line in list(proc.output)), 20, "debug")
            output = b"".join(proc.output).decode()
    assert not os.listdir(elsewhere)
    assert "[INFO] Listening at" in output
    assert "[DEBUG]" not in output  # debug is about routing decisions, not gunicorn's own log


def test_serve_reads_gunicorn_cmd_args_and_passes_other_options_to_gunicorn(tmp_path):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    access_log = tmp_path / "access.log"
    config = proxy_config(tmp_path, mount, "127.0.0.1:9")
    env = clean_env(GUNICORN_CMD_ARGS=f"--workers 3 --threads 5 --graceful-timeout 11 --access-logfile {access_log}")
    # Precedence: gunicorn_conf, then GUNICORN_CMD_ARGS, then the command line; serve's own last.
    proc = subprocess.run(
        litefs_wsgi("serve", "--config", config, "--timeout", "77", "--workers", "1", "--print-config"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    settings = {
        key.strip(): value.strip() for key, _, value in (line.partition("=") for line in proc.stdout.splitlines())
    }
    assert settings["workers"] == "1"  # serve's --workers over GUNICORN_CMD_ARGS
    assert settings["threads"] == "5"  # GUNICORN_CMD_ARGS over gunicorn_conf's 32
    assert settings["timeout"] == "77"  # a gunicorn option serve does not own
    assert settings["graceful_timeout"] == "11"
    assert settings["worker_class"] == "gthread" and settings["loglevel"] == "info"

    # And a real server: the access log goes where GUNICORN_CMD_ARGS says.
    port = free_port()
    with serve(target) as target_url:
        config = proxy_config(tmp_path, mount, target_url.removeprefix("http://"))
        command = litefs_wsgi("serve", "--config", config, "--bind", f"127.0.0.1:{port}", "--keep-alive", "1")
        with listening(command, port, env):
            assert requests.get(f"http://127.0.0.1:{port}/logged", timeout=20).text == "target:/logged"
            wait_until(lambda: access_log.exists() and b"GET /logged" in access_log.read_bytes(), 20, "the access log")


def test_serve_refuses_what_it_cannot_honour(tmp_path):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    config = proxy_config(tmp_path, mount, "127.0.0.1:9")
    for args, message in (
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["myapp:app"], "litefs-wsgi: the command line: serve runs litefs_wsgi.proxy:application"),
    ):
        proc = subprocess.run(
            litefs_wsgi("serve", "--config", config, *args), env=clean_env(), capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    proc = subprocess.run(
        litefs_wsgi("status", "--dir", mount.path, "--timeout", "5"), env=clean_env(), capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unrecognized arguments: --timeout 5" in proc.stderr


def test_workers_and_threads_that_are_not_counts_are_errors_naming_them(tmp_path):
    # gunicorn served nothing with 0 workers, crashed its workers with 0 threads, and a
    # GUNICORN_WORKERS of "x" was a traceback.
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    config = proxy_config(tmp_path, mount, "127.0.0.1:9")
    port = free_port()
    for args in (["--workers", "0"], ["--threads", "0"], ["--workers", "-1"], ["--threads", "two"]):
        command = litefs_wsgi("serve", "--config", config, "--bind", f"127.0.0.1:{port}", *args)
        proc = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=60)
        message = f"litefs-wsgi: {args[0]}: expected a whole number of 1 or more, got {args[1]!r}"
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    settings = ["-c", "python:litefs_wsgi.gunicorn_conf", "--bind", f"127.0.0.1:{port}"]
    for variable, value in (("GUNICORN_WORKERS", "0"), ("GUNICORN_WORKERS", "x"), ("GUNICORN_THREADS", "1.5")):
        env = clean_env(LITEFS_WSGI_CONFIG=config, **{variable: value})
        proc = subprocess.run(
            [sys.executable, "-m", "gunicorn", *settings],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(tmp_path),
        )
        message = f"litefs-wsgi: {variable}: expected a whole number of 1 or more, got {value!r}"
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_version():
    proc = subprocess.run(litefs_wsgi("--version"), capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"litefs-wsgi {__version__}\n")


def test_the_wheel_holds_the_licence_and_the_type_hints_marker(tmp_path):
    # pyproject.toml declares the build (setuptools, in pip's isolated build environment); the
    # metadata stays in setup.cfg. Built from a copy: a build leaves build/ and *.egg-info behind.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "setup.py", "LICENSE", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(
        os.path.join(ROOT, "litefs_wsgi"), source / "litefs_wsgi", ignore=shutil.ignore_patterns("__pycache__")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = glob.glob(str(tmp_path / "litefs_wsgi-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "litefs_wsgi/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") or name.endswith(".dist-info/LICENSE") for name in names)
    assert f"Version: {__version__}" in metadata
    assert "License: Apache-2.0" in metadata or "License-Expression: Apache-2.0" in metadata
    with open(os.path.join(ROOT, "LICENSE")) as f:
        head = f.read(300)
    assert "Apache License" in head and "Version 2.0, January 2004" in head
