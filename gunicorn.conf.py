# gunicorn settings for the standalone proxy: `gunicorn -c gunicorn.conf.py`.
#
# Every setting, with a comment saying why, is in litefs_wsgi/gunicorn_conf.py, so that
# `litefs-wsgi serve` runs with the very same ones. Override any of them below this line,
# or with GUNICORN_BIND, GUNICORN_WORKERS and GUNICORN_THREADS in the environment (an access
# log, off by default: GUNICORN_CMD_ARGS="--access-logfile -").
from litefs_wsgi.gunicorn_conf import *  # noqa: F401,F403
