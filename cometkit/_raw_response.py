"""What ``<resource>.with_raw_response.<method>(...)`` answers: the HTTP answer itself.

openai users read the rate-limit headers (``x-ratelimit-remaining-requests``...) this way,
so the call is an ordinary cometkit call -- limiter, retries, sinks -- and only what it hands
back differs: status, headers and body of the answer that ended it, and :meth:`parse` for
the object the method returns otherwise.
"""

from __future__ import annotations

import json
from typing import Any, Optional

__all__ = ["RawResponse"]


class RawResponse:
    """The answer of one call, as openai's ``LegacyAPIResponse``: ``status_code``,
    ``headers`` (a case-insensitive mapping), ``content``/``text``/``json()`` of a complete
    answer, ``parse()`` for the usual :class:`~cometkit.ApiObject` or
    :class:`~cometkit.Stream`, ``request_id`` (the provider's) and ``retries_taken``.

    An error status still raises, as it does without ``with_raw_response``.
    """

    __slots__ = ("status_code", "headers", "request_id", "retries_taken", "_content",
                 "_parsed")

    def __init__(self, *, status_code: int, headers: Any, content: Optional[bytes],
                 parsed: Any, request_id: Optional[str], retries_taken: int) -> None:
        #: The HTTP status of the answer (a success: an error status raises).
        self.status_code = status_code
        #: The answer's headers, case-insensitive; the API key is blanked out of them.
        self.headers = headers
        #: The provider's request id (``x-request-id``), when it sent one.
        self.request_id = request_id
        #: Attempts made before the one that answered (as the openai SDK counts them).
        self.retries_taken = retries_taken
        self._content = content
        self._parsed = parsed

    @property
    def content(self) -> bytes:
        """The whole body as it arrived (decompressed). A stream has none: iterate
        :meth:`parse` instead."""
        if self._content is None:
            raise TypeError("this answer is a stream: iterate parse() to read its events")
        return self._content

    @property
    def text(self) -> str:
        """The body as text (UTF-8, as the API sends it)."""
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body decoded as JSON (plain dicts and lists)."""
        return json.loads(self.content) if self.content else None

    def parse(self) -> Any:
        """What the method returns without ``with_raw_response``: the same object on every
        call."""
        return self._parsed

    def __repr__(self) -> str:
        return f"<RawResponse {self.status_code} request_id={self.request_id}>"
