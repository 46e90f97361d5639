"""The test project's views."""

from django.urls import path

from . import views

urlpatterns = [
    path("items", views.items),
    path("fail", views.fail),
    path("visit", views.visit),
    path("touch", views.touch),
    path("seen", views.items),  # the middleware writes first
    path("asks", views.items),  # the middleware calls require_primary(), then writes
]
