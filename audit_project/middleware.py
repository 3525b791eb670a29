"""Whatever is typed into an admin URL gets a page, never a server error (issue 8).

Filters typed in by hand handle hostile text themselves (``audit_project.admin.InputFilter``).
Any other query parameter of a changelist can carry it too: a NUL in a choice filter
(PostgreSQL refuses NUL in text: DataError), or a year no date can hold in the date hierarchy
(OverflowError). Django answers a lookup it cannot use by showing the list again with "?e=1"
(ChangeList's IncorrectLookupParameters); these get the same answer.
"""

from __future__ import annotations

from django.contrib.admin.views.main import ERROR_FLAG
from django.db import DataError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse


class AdminLookupGuard:
    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        # Also called for errors raised while a TemplateResponse renders, which is where a
        # changelist's lazy query runs.
        if (
            request.method == "GET"
            and isinstance(exception, DataError | OverflowError)
            and request.path.startswith(reverse("admin:index"))
            and ERROR_FLAG not in request.GET
        ):
            return HttpResponseRedirect(f"{request.path}?{ERROR_FLAG}=1")
        return None
