"""Settings of the test project: its SQLite database lives in the LiteFS mount ``$LITEFS_DIR``."""

import json
import os

SECRET_KEY = "tests only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_project.urls"
INSTALLED_APPS = ["litefs_wsgi.django.LiteFSConfig"]  # manage.py check checks LITEFS
# last_seen: a middleware writing in a GET, before ReplayOnPrimaryMiddleware as the README lists it.
MIDDLEWARE = ["django_project.middleware.last_seen", "litefs_wsgi.django.ReplayOnPrimaryMiddleware"]
USE_TZ = True
_DB = os.path.join(os.environ["LITEFS_DIR"], "db.sqlite3")
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        # TEST_READONLY: opened read-only, as LiteFS serves the database on a replica.
        "NAME": "file:" + _DB + "?mode=ro" if os.environ.get("TEST_READONLY") else _DB,
        "OPTIONS": {"timeout": 10},
    }
}
# The mount comes from LITEFS_DIR, as on a real node.
LITEFS = {
    "db": "db.sqlite3",
    "forward": os.environ.get("TEST_FORWARD", "fly-replay"),
    "poll_timeout": os.environ.get("TEST_POLL_TIMEOUT", "30s"),
    "primary_url": os.environ.get("TEST_PRIMARY_URL"),
    "replay_on_readonly": os.environ.get("TEST_REPLAY_ON_READONLY", "true"),
}
# TEST_LITEFS: JSON merged into LITEFS, a null removing the option (tests of bad settings).
for _name, _value in json.loads(os.environ.get("TEST_LITEFS", "{}")).items():
    if _value is None:
        LITEFS.pop(_name, None)
    else:
        LITEFS[_name] = _value
