"""A minimal Django project for tests/test_django.py, run by gunicorn: one node per process."""
