"""Settings for the notes example: SQLite inside the LiteFS mount, litefs-wsgi options in LITEFS."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
LITEFS_DIR = os.environ.get("LITEFS_DIR", "/litefs")

SECRET_KEY = os.environ.get("SECRET_KEY", "example-only-set-SECRET_KEY-in-production")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,.fly.dev,.internal").split(",")

# No sessions, auth or admin: Django's database sessions write during GET requests, which a
# replica cannot do. Use signed-cookie sessions, or litefs_wsgi.require_primary() in such views.
INSTALLED_APPS = ["notes", "litefs_wsgi.django.LiteFSConfig"]  # manage.py check checks LITEFS
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    # Lets a view raise litefs_wsgi.ReplayOnPrimary to have a GET run on the primary.
    "litefs_wsgi.django.ReplayOnPrimaryMiddleware",
]
ROOT_URLCONF = "mysite.urls"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
WSGI_APPLICATION = "mysite.wsgi.application"

# The database lives in the LiteFS mount: LiteFS replicates only what is written there.
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.path.join(LITEFS_DIR, "db.sqlite3")}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# litefs-wsgi's options, by name (see the README's table); LITEFS_PROXY_* variables also work.
LITEFS = {"db": "db.sqlite3"}

# Behind Fly.io's edge (TLS ends there): trust its X-Forwarded-Proto, so the __txid cookie
# gets Secure and CSRF checks see https.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o]

USE_TZ = True
TIME_ZONE = "UTC"
