"""The test project's WSGI entry point, as a user writes it, plus LiteFS's part played by the tests."""

import os

from litefs_wsgi.django import get_wsgi_application
from litefs_wsgi.testing import LiteFSMount

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
application = get_wsgi_application()

# In a plain directory nobody moves ``-pos`` at commit as LiteFS does: the test mount does.
application.app = LiteFSMount(application.config.mount_dir).committing(application.app, application.config.db)
