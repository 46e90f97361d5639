#!/usr/bin/env python
"""Django's command line for the notes example.

Run it on this machine, no LiteFS needed (with no .primary file the node is the primary):

    cd examples/django_project
    mkdir -p /tmp/litefs
    LITEFS_DIR=/tmp/litefs python manage.py migrate
    LITEFS_DIR=/tmp/litefs gunicorn --bind 127.0.0.1:8080 --threads 16 mysite.wsgi

Under LiteFS (see ../litefs.yml): migrate runs on the primary candidate only
(``if-candidate: true``), then gunicorn serves ``mysite.wsgi`` on every node. Note that
``manage.py runserver`` serves Django's own WSGI app, without litefs-wsgi: use gunicorn.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
