"""The test project's two views."""

from django.urls import path

from . import views

urlpatterns = [path("items", views.items), path("fail", views.fail)]
