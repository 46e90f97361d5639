"""Settings of the test project: its SQLite database lives in the LiteFS mount ``$LITEFS_DIR``."""

import os

SECRET_KEY = "tests only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["litefs_wsgi.django.ReplayOnPrimaryMiddleware"]
USE_TZ = True
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(os.environ["LITEFS_DIR"], "db.sqlite3"),
        "OPTIONS": {"timeout": 10},
    }
}
# The mount comes from LITEFS_DIR, as on a real node.
LITEFS = {"db": "db.sqlite3", "forward": "fly-replay", "poll_timeout": os.environ.get("TEST_POLL_TIMEOUT", "30s")}
