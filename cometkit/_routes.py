"""The rest of the OpenAI surface on ``cometkit.Client``, with the ``openai`` SDK's names:
``responses``, ``completions`` (legacy), ``moderations``, ``images``, ``files``,
``batches`` and ``audio``.

Like the resources of :mod:`cometkit._resources` they only shape the request: every method
goes through ``Client._call``, so through the same limiter, retry policy and sinks as a chat
completion, under the operation name of its route (see ``docs/metrics.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

from ._call_options import with_extra_body
from ._objects import ApiObject
from ._resources import Deadline, Priority, Timeout, _Resource, path_id

if TYPE_CHECKING:  # pragma: no cover
    from ._client import Client

__all__ = ["Audio", "Batches", "Files", "Images", "Moderations", "Response", "Responses",
           "Speech", "TextCompletions", "Transcriptions"]

#: ``response_format`` values of a transcription answered as plain text, not JSON.
_TEXT_TRANSCRIPTS = ("text", "srt", "vtt")


class Response(ApiObject):
    """A Responses API answer: an :class:`ApiObject` with the SDK's ``output_text``."""

    __slots__ = ()

    @property
    def output_text(self) -> str:
        """The text of every ``output_text`` part of every output item, joined in order
        (``""`` when there is none, as in the ``openai`` SDK)."""
        texts = []
        for item in self.get("output") or ():
            if item.get("type") != "message":
                continue
            for part in item.get("content") or ():
                if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part.get("text"))
        return "".join(texts)


class _Route(_Resource):
    """A resource of the rest of the surface: its methods take the per-call options of every
    ``create()`` (``priority``, ``extra_headers``, ``extra_query``, and ``extra_body`` where
    they send a body) through the one :meth:`_Resource._send`."""

    def _send(self, method: str, route: str, body: Any = None, *,
              extra_body: Optional[Mapping[str, Any]] = None, **options: Any) -> Any:
        if extra_body is not None:
            body = with_extra_body(body, extra_body)
        return super()._send(method, route, body, **options)


class Responses(_Route):
    def create(self, *, model: str, input: Any = None, stream: bool = False,
               timeout: Timeout = None, deadline: Deadline = None,
               priority: Priority = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None,
               extra_body: Optional[Mapping[str, Any]] = None, **params: Any) -> Any:
        """``POST /responses``: a :class:`Response` (``.output_text``), or a
        :class:`Stream` of the API's events (``response.created``,
        ``response.output_text.delta``, ..., ``response.completed``) when ``stream=True``."""
        body = {"model": model, **({} if input is None else {"input": input}), **params}
        if stream:
            body["stream"] = True
        return self._send("POST", "/responses", body, operation="generate_content",
                          model=model, stream=stream, timeout=timeout, deadline=deadline,
                          extra_headers=extra_headers, extra_query=extra_query, priority=priority,
                          extra_body=extra_body, answer_type=Response)

    def retrieve(self, response_id: str, *, timeout: Timeout = None,
                 deadline: Deadline = None, priority: Priority = None,
                 extra_headers: Optional[Mapping[str, str]] = None,
                 extra_query: Optional[Mapping[str, Any]] = None) -> Any:
        """``GET /responses/{id}``: a stored :class:`Response`."""
        return self._send("GET", f"/responses/{path_id('response_id', response_id)}",
                          operation="responses", timeout=timeout, deadline=deadline,
                          extra_headers=extra_headers,
                          extra_query=extra_query, priority=priority, answer_type=Response)

    def delete(self, response_id: str, *, timeout: Timeout = None, deadline: Deadline = None,
               priority: Priority = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None) -> None:
        """``DELETE /responses/{id}``; returns ``None``, as the ``openai`` SDK does."""
        self._send("DELETE", f"/responses/{path_id('response_id', response_id)}",
                   operation="responses", timeout=timeout, deadline=deadline,
                   extra_headers=extra_headers, extra_query=extra_query, priority=priority)


class TextCompletions(_Route):
    def create(self, *, model: str, prompt: Any, stream: bool = False,
               timeout: Timeout = None, deadline: Deadline = None,
               priority: Priority = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None,
               extra_body: Optional[Mapping[str, Any]] = None, **params: Any) -> Any:
        """``POST /completions`` (legacy): an :class:`ApiObject` whose ``choices[i].text``
        hold the answers, or a :class:`Stream` of completion chunks when ``stream=True``."""
        body = {"model": model, "prompt": prompt, **params}
        if stream:
            body["stream"] = True
        return self._send("POST", "/completions", body, operation="text_completion",
                          model=model, stream=stream, timeout=timeout, deadline=deadline,
                          extra_headers=extra_headers, extra_query=extra_query, priority=priority,
                          extra_body=extra_body)


class Moderations(_Route):
    def create(self, *, input: Any, model: Optional[str] = None, timeout: Timeout = None,
               deadline: Deadline = None, priority: Priority = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None,
               extra_body: Optional[Mapping[str, Any]] = None,
               **params: Any) -> Any:
        """``POST /moderations``: ``results[i].flagged`` and ``.categories`` per input."""
        body = {"input": input, **({} if model is None else {"model": model}), **params}
        return self._send("POST", "/moderations", body, operation="moderations", model=model,
                          timeout=timeout, deadline=deadline, extra_headers=extra_headers,
                          extra_query=extra_query, priority=priority,
                          extra_body=extra_body)


class Images(_Route):
    def generate(self, *, prompt: str, model: Optional[str] = None, timeout: Timeout = None,
                 deadline: Deadline = None, priority: Priority = None,
                 extra_headers: Optional[Mapping[str, str]] = None,
                 extra_query: Optional[Mapping[str, Any]] = None,
                 extra_body: Optional[Mapping[str, Any]] = None,
                 **params: Any) -> Any:
        """``POST /images/generations``: ``data[i].url`` or ``data[i].b64_json``
        (``response_format="b64_json"``)."""
        body = {"prompt": prompt, **({} if model is None else {"model": model}), **params}
        return self._send("POST", "/images/generations", body, operation="images",
                          model=model, timeout=timeout, deadline=deadline,
                          extra_headers=extra_headers, extra_query=extra_query, priority=priority,
                          extra_body=extra_body)


class Files(_Route):
    def create(self, *, file: Any, purpose: str, timeout: Timeout = None,
               deadline: Deadline = None, priority: Priority = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None,
               extra_body: Optional[Mapping[str, Any]] = None) -> Any:
        """``POST /files``, an upload: ``file`` is bytes, a binary file, a path or
        ``(filename, content[, content_type])``. Returns the file object (``.id``)."""
        return self._send("POST", "/files", operation="files", files={"file": file},
                          data={"purpose": purpose}, timeout=timeout, deadline=deadline,
                          extra_headers=extra_headers, extra_query=extra_query, priority=priority,
                          extra_body=extra_body)

    def content(self, file_id: str, *, timeout: Timeout = None, deadline: Deadline = None,
                priority: Priority = None,
                extra_headers: Optional[Mapping[str, str]] = None,
                extra_query: Optional[Mapping[str, Any]] = None) -> Any:
        """``GET /files/{id}/content``: a :class:`BinaryAnswer` of the file's bytes."""
        return self._send("GET", f"/files/{path_id('file_id', file_id)}/content",
                          operation="files", raw=True, timeout=timeout, deadline=deadline,
                          extra_headers=extra_headers, extra_query=extra_query, priority=priority)


class Batches(_Route):
    def create(self, *, input_file_id: str, endpoint: str, completion_window: str = "24h",
               timeout: Timeout = None, deadline: Deadline = None,
               priority: Priority = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None,
               extra_body: Optional[Mapping[str, Any]] = None, **params: Any) -> Any:
        """``POST /batches``: a batch of the requests in an uploaded ``batch`` file."""
        body = {"input_file_id": input_file_id, "endpoint": endpoint,
                "completion_window": completion_window, **params}
        return self._send("POST", "/batches", body, operation="batches", timeout=timeout,
                          deadline=deadline, extra_headers=extra_headers,
                          extra_query=extra_query, priority=priority,
                          extra_body=extra_body)

    def retrieve(self, batch_id: str, *, timeout: Timeout = None, deadline: Deadline = None,
                 priority: Priority = None,
                 extra_headers: Optional[Mapping[str, str]] = None,
                 extra_query: Optional[Mapping[str, Any]] = None) -> Any:
        """``GET /batches/{id}``: its ``status``, ``request_counts`` and, once completed,
        ``output_file_id``."""
        return self._send("GET", f"/batches/{path_id('batch_id', batch_id)}",
                          operation="batches", timeout=timeout, deadline=deadline,
                          extra_headers=extra_headers, extra_query=extra_query, priority=priority)

    def list(self, *, after: Optional[str] = None, limit: Optional[int] = None,
             timeout: Timeout = None, deadline: Deadline = None,
             priority: Priority = None,
             extra_headers: Optional[Mapping[str, str]] = None,
             extra_query: Optional[Mapping[str, Any]] = None) -> Any:
        """``GET /batches``: newest first; ``.data``, ``.has_more``, ``after=`` the last id
        seen for the next page."""
        params = {key: value for key, value in (("after", after), ("limit", limit))
                  if value is not None}
        return self._send("GET", "/batches", operation="batches", params=params or None,
                          timeout=timeout, deadline=deadline, extra_headers=extra_headers,
                          extra_query=extra_query, priority=priority)

    def cancel(self, batch_id: str, *, timeout: Timeout = None, deadline: Deadline = None,
               priority: Priority = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None) -> Any:
        """``POST /batches/{id}/cancel``: the batch, cancelled."""
        return self._send("POST", f"/batches/{path_id('batch_id', batch_id)}/cancel",
                          operation="batches", timeout=timeout, deadline=deadline,
                          extra_headers=extra_headers, extra_query=extra_query, priority=priority)


class Transcriptions(_Route):
    def create(self, *, file: Any, model: str, timeout: Timeout = None,
               deadline: Deadline = None, priority: Priority = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None,
               extra_body: Optional[Mapping[str, Any]] = None,
               **params: Any) -> Any:
        """``POST /audio/transcriptions``, an upload of ``file`` (as for ``files.create``):
        an :class:`ApiObject` with ``.text``, or the text itself (a ``str``) for
        ``response_format`` ``text``, ``srt`` or ``vtt``, as in the ``openai`` SDK."""
        text = params.get("response_format") in _TEXT_TRANSCRIPTS
        answer = self._send("POST", "/audio/transcriptions", operation="audio.transcriptions",
                            model=model, files={"file": file}, data={"model": model, **params},
                            raw=text, timeout=timeout, deadline=deadline,
                            extra_headers=extra_headers, extra_query=extra_query, priority=priority,
                          extra_body=extra_body)
        return answer.text if text else answer


class Speech(_Route):
    def create(self, *, input: str, model: str, voice: str, timeout: Timeout = None,
               deadline: Deadline = None, priority: Priority = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None,
               extra_body: Optional[Mapping[str, Any]] = None,
               **params: Any) -> Any:
        """``POST /audio/speech``: a :class:`BinaryAnswer` of the audio (``.content``,
        ``.write_to_file(path)``, ``.iter_bytes()``)."""
        body = {"model": model, "input": input, "voice": voice, **params}
        return self._send("POST", "/audio/speech", body, operation="audio.speech", model=model,
                          raw=True, timeout=timeout, deadline=deadline,
                          extra_headers=extra_headers, extra_query=extra_query, priority=priority,
                          extra_body=extra_body)


class Audio(_Resource):
    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.transcriptions = Transcriptions(client)
        self.speech = Speech(client)
