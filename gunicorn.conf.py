# gunicorn settings for the standalone proxy: `gunicorn -c gunicorn.conf.py`.
#
# Every setting, with a comment saying why, is in litefs_wsgi/gunicorn_conf.py, so that
# `litefs-wsgi serve` runs with the very same ones. Override any of them below this line,
# or with GUNICORN_BIND, GUNICORN_WORKERS, GUNICORN_THREADS and GUNICORN_ACCESS_LOG ("-" for
# stdout; none by default) in the environment.
from litefs_wsgi.gunicorn_conf import *  # noqa: F401,F403
