"""The notes page: GET lists notes (on any node), POST adds one (always on the primary)."""

from django.shortcuts import redirect, render

import litefs_wsgi

from .models import Note


def index(request):
    if request.method == "POST":
        # litefs-wsgi runs every POST on the primary (a replica forwards it): this may write.
        text = request.POST.get("text", "").strip()[:500]
        if text:
            Note.objects.create(text=text)
        # The redirected GET carries the __txid cookie, so it waits for this write.
        return redirect("index")
    notes = Note.objects.order_by("-id")[:50]
    return render(request, "notes/index.html", {"notes": notes, "primary": litefs_wsgi.is_primary()})
