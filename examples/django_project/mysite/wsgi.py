"""The WSGI entry point: Django behind litefs-wsgi (``gunicorn mysite.wsgi``)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

from litefs_wsgi.django import get_wsgi_application  # noqa: E402

application = get_wsgi_application()  # options from settings.LITEFS
