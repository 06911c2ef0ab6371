"""Server-sent-event streams of chat completion chunks.

A stream holds an HTTP connection and a limiter slot until it ends. It gives both back when it
is exhausted, closed, used as a context manager, or garbage-collected, so an abandoned stream
cannot leak a slot and stall every other thread.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any, Callable, Iterator, Optional

import requests

from ._exceptions import APIConnectionError, APIError
from ._objects import ApiObject

__all__ = ["Stream", "iter_sse_data"]

#: Called once when the stream ends: (error or None, usage dict or None, response model,
#: time to first chunk in seconds or None).
Finisher = Callable[[Optional[BaseException], Optional[dict], Optional[str], Optional[float]], None]


def iter_sse_data(chunks: Iterator[bytes]) -> Iterator[str]:
    """Yield the ``data`` payload of each server-sent event from raw byte chunks."""
    buffer = b""
    data_lines: list[str] = []
    for chunk in chunks:
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                break
            line = buffer[:newline].rstrip(b"\r").decode("utf-8")
            buffer = buffer[newline + 1 :]
            if not line:
                if data_lines:
                    yield "\n".join(data_lines)
                    data_lines = []
            elif line.startswith("data:"):
                data_lines.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])
            # event:, id:, retry: and comments (":") carry nothing we use.
    if buffer.strip().startswith(b"data:"):
        data_lines.append(buffer.strip()[5:].strip().decode("utf-8"))
    if data_lines:
        yield "\n".join(data_lines)


class _Closer:
    """The part of a stream that must run exactly once, also from the garbage collector."""

    def __init__(self, response: requests.Response, finisher: Finisher) -> None:
        self.response = response
        self.finisher = finisher
        self.lock = threading.Lock()
        self.done = False

    def __call__(
        self,
        error: Optional[BaseException] = None,
        usage: Optional[dict] = None,
        model: Optional[str] = None,
        ttfc_s: Optional[float] = None,
    ) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        try:
            self.response.close()
        finally:
            self.finisher(error, usage, model, ttfc_s)


class Stream:
    """Iterate for :class:`ApiObject` chunks; ``close()`` or ``with`` to stop early.

    ``stream.response`` is the underlying ``requests.Response``; ``stream.usage`` holds the
    usage block when the server sent one (``stream_options={"include_usage": True}``).
    """

    def __init__(
        self,
        response: requests.Response,
        finisher: Finisher,
        *,
        monotonic: Callable[[], float],
        started_at: float,
        request_id: Optional[str] = None,
    ) -> None:
        self.response = response
        self.request_id = request_id
        self.usage: Optional[ApiObject] = None
        self._monotonic = monotonic
        self._started_at = started_at
        self._closer = _Closer(response, finisher)
        self._finalizer = weakref.finalize(self, self._closer, APIConnectionError(
            "stream abandoned before its end", stage="read"))
        self._iterator: Optional[Iterator[ApiObject]] = None

    def __iter__(self) -> Iterator[ApiObject]:
        if self._iterator is None:
            self._iterator = self._iterate()
        return self._iterator

    def __next__(self) -> ApiObject:
        return next(iter(self))

    def _iterate(self) -> Iterator[ApiObject]:
        usage: Optional[dict] = None
        model: Optional[str] = None
        ttfc_s: Optional[float] = None
        error: Optional[BaseException] = None
        try:
            for data in iter_sse_data(self.response.iter_content(chunk_size=None)):
                if data.strip() == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError as exc:
                    raise APIError(f"invalid JSON in stream event: {data[:200]!r}",
                                   request_id=self.request_id) from exc
                if ttfc_s is None:
                    ttfc_s = self._monotonic() - self._started_at
                if isinstance(chunk, dict):
                    if "error" in chunk and not chunk.get("choices"):
                        err = chunk["error"]
                        message = err.get("message") if isinstance(err, dict) else str(err)
                        raise APIError(f"error in stream: {message}", request_id=self.request_id,
                                       body=chunk)
                    model = chunk.get("model") or model
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        self.usage = ApiObject(usage)
                yield ApiObject(chunk)
        except requests.exceptions.RequestException as exc:
            error = APIConnectionError(f"stream broken: {exc}", request_id=self.request_id)
            raise error from exc
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._finalizer.detach()
            self._closer(error, usage, model, ttfc_s)

    def close(self) -> None:
        """Stop reading, drop the connection and give back the limiter slot."""
        self._finalizer.detach()
        self._closer(None, None, None, None)
        if self._iterator is not None:
            self._iterator.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Stream request_id={self.request_id} closed={self._closer.done}>"
