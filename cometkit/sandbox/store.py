"""The sandbox's state: uploaded files, batches, stored responses -- in memory, bounded.

A batch is run when it is next looked at (``GET /v1/batches/{id}``): its input file is read
line by line, each request answered as the live route would answer it, and the answers
written to an output file (failed lines to an error file), so the whole Batch API round trip
-- upload, create, poll, download -- runs offline and repeats exactly. No thread runs in the
background; a batch cancelled before that look is never run.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional

from ._json import dumps

__all__ = ["BATCH_ENDPOINTS", "FILE_PURPOSES", "Store", "StoreError", "MAX_ITEMS"]

#: The endpoints a batch may name (the OpenAI Batch API's).
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions",
                   "/v1/responses", "/v1/moderations", "/v1/images/generations")
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
#: Most files, batches and responses kept of each; the oldest go first.
MAX_ITEMS = 10_000

#: Answers one request of a batch: ``(url, body, number) -> (status, body as a dict)``.
AnswerLine = Callable[[str, Any, int], "tuple[int, Any]"]


class StoreError(Exception):
    """A request the store refuses: its HTTP status and the error's fields."""

    def __init__(self, status: int, message: str, code: Optional[str] = None,
                 param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def _put(items: OrderedDict, key: str, value: Any) -> None:
    items[key] = value
    while len(items) > MAX_ITEMS:
        items.popitem(last=False)


def _get(items: OrderedDict, key: str, missing: str, param: str) -> Any:
    """``items[key]``, or a 404 :class:`StoreError` saying ``missing``, naming ``param``."""
    found = items.get(key)
    if found is None:
        raise StoreError(404, missing, param=param)
    return found


def _no_response(response_id: str) -> str:
    return f"Response with id '{response_id}' not found."


class Store:
    """Files, batches and stored responses of one sandbox. Thread-safe."""

    def __init__(self, answer_line: AnswerLine, time: Callable[[], float]) -> None:
        self._answer_line = answer_line
        self._time = time
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._files: OrderedDict = OrderedDict()  # id -> (object, bytes)
        self._batches: OrderedDict = OrderedDict()  # id -> object
        self._responses: OrderedDict = OrderedDict()  # id -> body

    def _now(self) -> int:
        return int(self._time())

    # -- files ------------------------------------------------------------------------------

    def _add_file(self, filename: str, content: bytes, purpose: str) -> dict:
        with self._lock:
            number = next(self._ids)
            meta = {"id": f"file-sandbox-{number}", "object": "file", "bytes": len(content),
                    "created_at": self._now(), "filename": filename, "purpose": purpose,
                    "status": "processed", "expires_at": None, "status_details": None}
            _put(self._files, meta["id"], (meta, content))
        return meta

    def upload(self, fields: Optional[dict]) -> bytes:
        """``POST /v1/files`` with the form's ``fields`` (``file`` a tuple)."""
        upload = (fields or {}).get("file")
        if not isinstance(upload, tuple):
            raise StoreError(400, "Missing required parameter: 'file' (a multipart upload).",
                             param="file")
        purpose = fields.get("purpose")
        if purpose not in FILE_PURPOSES:
            raise StoreError(400, f"Invalid 'purpose': one of {', '.join(FILE_PURPOSES)}.",
                             param="purpose")
        filename, content, _ = upload
        return dumps(self._add_file(filename, content, purpose))

    def _file(self, file_id: str) -> tuple[dict, bytes]:
        with self._lock:
            return _get(self._files, file_id, f"No such File object: {file_id}", "id")

    def file(self, file_id: str) -> bytes:
        return dumps(self._file(file_id)[0])

    def file_content(self, file_id: str) -> bytes:
        return self._file(file_id)[1]

    # -- batches ----------------------------------------------------------------------------

    def create_batch(self, document: Any) -> bytes:
        if not isinstance(document, dict):
            raise StoreError(400, "The request body must be a JSON object.")
        endpoint = document.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            raise StoreError(400, f"Invalid 'endpoint': one of {', '.join(BATCH_ENDPOINTS)}.",
                             param="endpoint")
        if document.get("completion_window") != "24h":
            raise StoreError(400, "Invalid 'completion_window': only '24h' is supported.",
                             param="completion_window")
        input_id = document.get("input_file_id")
        meta, content = self._file(input_id) if isinstance(input_id, str) else (None, b"")
        if meta is None or meta["purpose"] != "batch":
            raise StoreError(400, f"Invalid 'input_file_id': {input_id!r} is no file uploaded "
                             "with purpose 'batch'.", param="input_file_id")
        lines = [line for line in content.splitlines() if line.strip()]
        with self._lock:
            number = next(self._ids)
            now = self._now()
            batch = {"id": f"batch_sandbox_{number}", "object": "batch", "endpoint": endpoint,
                     "errors": None, "input_file_id": input_id, "completion_window": "24h",
                     "status": "in_progress", "output_file_id": None, "error_file_id": None,
                     "created_at": now, "in_progress_at": now, "expires_at": now + 86400,
                     "completed_at": None, "cancelling_at": None, "cancelled_at": None,
                     "failed_at": None, "expired_at": None, "finalizing_at": None,
                     "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                     "metadata": document.get("metadata")}
            _put(self._batches, batch["id"], batch)
        return dumps(batch)

    def _batch(self, batch_id: str) -> dict:
        return _get(self._batches, batch_id, f"No batch found with id '{batch_id}'.",
                    "batch_id")

    def retrieve_batch(self, batch_id: str) -> bytes:
        """The batch; one still in progress is run now (see the module docstring)."""
        with self._lock:
            batch = self._batch(batch_id)
            run = batch["status"] == "in_progress"
            if run:
                batch["status"] = "finalizing"  # a second look meanwhile does not run it too
        if run:
            self._run(batch)
        with self._lock:
            return dumps(batch)

    def _run(self, batch: dict) -> None:
        _, content = self._file(batch["input_file_id"])
        outputs, errors = [], []
        for line in content.splitlines():
            if not line.strip():
                continue
            record, ok = self._answer_record(line, batch["endpoint"])
            (outputs if ok else errors).append(dumps(record))
        output = self._add_file("batch_output.jsonl", b"\n".join(outputs) + b"\n",
                                "batch_output") if outputs else None
        error = self._add_file("batch_errors.jsonl", b"\n".join(errors) + b"\n",
                               "batch_output") if errors else None
        with self._lock:
            now = self._now()
            batch.update(status="completed", finalizing_at=now, completed_at=now,
                         output_file_id=output["id"] if output else None,
                         error_file_id=error["id"] if error else None)
            batch["request_counts"].update(completed=len(outputs), failed=len(errors))

    def _answer_record(self, line: bytes, endpoint: str) -> tuple[dict, bool]:
        """One output (or error) line of a batch, and whether it is an answer."""
        with self._lock:
            number = next(self._ids)
        record: dict = {"id": f"batch_req_sandbox_{number}", "custom_id": None,
                        "response": None, "error": None}
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("custom_id"), str):
            record["error"] = {"code": "invalid_json_line",
                               "message": "The line is no JSON object with a custom_id."}
            return record, False
        record["custom_id"] = request["custom_id"]
        if request.get("url") != endpoint or request.get("method") != "POST":
            record["error"] = {"code": "invalid_url", "message":
                               f"Each line must be a POST to the batch's endpoint {endpoint}."}
            return record, False
        status, body = self._answer_line(endpoint, request.get("body"), number)
        record["response"] = {"status_code": status,
                              "request_id": f"req_sandbox_batch_{number}", "body": body}
        return record, True

    def cancel_batch(self, batch_id: str) -> bytes:
        with self._lock:
            batch = self._batch(batch_id)
            if batch["status"] in ("completed", "finalizing"):
                raise StoreError(409, f"Cannot cancel a batch with status '{batch['status']}'.")
            if batch["status"] == "in_progress":
                now = self._now()
                batch.update(status="cancelled", cancelling_at=now, cancelled_at=now)
            return dumps(batch)

    def list_batches(self, after: Optional[str], limit: Optional[str]) -> bytes:
        try:
            count = 20 if limit is None else int(limit)
        except ValueError:
            count = 0
        if not 1 <= count <= 100:
            raise StoreError(400, "Invalid 'limit': a whole number from 1 to 100.",
                             param="limit")
        with self._lock:
            newest = list(reversed(self._batches.values()))
            if after is not None:
                ids = [batch["id"] for batch in newest]
                if after not in ids:
                    raise StoreError(400, f"Invalid 'after': no batch {after!r}.",
                                     param="after")
                newest = newest[ids.index(after) + 1:]
            page = newest[:count]
            body = {"object": "list", "data": page,
                    "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None,
                    "has_more": len(newest) > count}
            return dumps(body)

    # -- stored responses -------------------------------------------------------------------

    def keep_response(self, response_id: str, body: bytes) -> None:
        with self._lock:
            _put(self._responses, response_id, body)

    def response(self, response_id: str) -> bytes:
        with self._lock:
            return _get(self._responses, response_id, _no_response(response_id), "id")

    def delete_response(self, response_id: str) -> bytes:
        with self._lock:
            _get(self._responses, response_id, _no_response(response_id), "id")
            del self._responses[response_id]
        return dumps({"id": response_id, "object": "response.deleted", "deleted": True})
