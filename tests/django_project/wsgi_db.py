"""A wsgi.py passing ``db`` to get_wsgi_application itself, none in settings.LITEFS."""

import os

from litefs_wsgi.django import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
application = get_wsgi_application(db="db.sqlite3")
