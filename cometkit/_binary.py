"""An answer that is bytes, not JSON: synthesized speech, a file's content, any raw answer.

Shaped like the ``openai`` SDK's ``HttpxBinaryResponseContent``, so ported code reads the same
(``.content``, ``.read()``, ``.write_to_file(path)``, ``.iter_bytes()``). The body is read
whole inside the attempt -- the limiter slot is free and a cut-short body is retried like any
other failure -- so these only hand out bytes already held.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Union

__all__ = ["BinaryAnswer"]

#: Bytes per piece of :meth:`BinaryAnswer.iter_bytes` when no size is asked for.
DEFAULT_CHUNK_BYTES = 64 * 1024


class BinaryAnswer:
    """The bytes of an answer with its status, headers and the provider's request id."""

    def __init__(self, content: bytes, *, status_code: int, headers: Any,
                 request_id: Optional[str] = None) -> None:
        #: The whole body, as the server sent it (decoded from gzip if it was).
        self.content = content
        self.status_code = status_code
        #: The answer's headers (case-insensitive names).
        self.headers = headers
        #: The provider's request id (``x-request-id``).
        self.request_id = request_id

    @property
    def content_type(self) -> Optional[str]:
        return self.headers.get("content-type")

    @property
    def text(self) -> str:
        """The body as text (UTF-8, undecodable bytes replaced)."""
        return self.content.decode("utf-8", "replace")

    def read(self) -> bytes:
        """The whole body."""
        return self.content

    def iter_bytes(self, chunk_size: Optional[int] = None) -> Iterator[bytes]:
        """The body in pieces of ``chunk_size`` bytes (64 KiB by default), the last shorter."""
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
                chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a whole number of bytes >= 1, got "
                             f"{chunk_size!r}")
        size = chunk_size or DEFAULT_CHUNK_BYTES
        content = self.content
        for start in range(0, len(content), size):
            yield content[start:start + size]

    def write_to_file(self, file: Union[str, os.PathLike]) -> None:
        """Write the body to the file at ``file`` (replacing it)."""
        with open(file, "wb") as handle:
            handle.write(self.content)

    def __repr__(self) -> str:
        return (f"<BinaryAnswer {self.status_code} {self.content_type or 'no content-type'} "
                f"{len(self.content)} bytes>")
