"""The input of ``cometkit batch``: what one line may say, checked before anything is sent.

Lines are the OpenAI Batch API's format (``custom_id``, ``method``, ``url``, ``body``)::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

or the shorthand for chat completions (``prompt`` or ``messages``, any other key goes into the
request body)::

    {"custom_id": "q1", "prompt": "Say hello.", "model": "gpt-4o-mini", "temperature": 0}
    {"custom_id": "q2", "messages": [{"role": "user", "content": "Hi"}]}

A line that is not valid becomes a :class:`Problem` naming its line number and the fix;
:func:`check_input` collects them all before anything is sent, and the runner
(:mod:`cometkit.batch`) then reads only the lines that passed.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Iterator, Optional

from ._exceptions import CometError
from ._idset import DigestSet

__all__ = ["ALLOWED_URLS", "ALLOWED_METHODS", "MAX_PROBLEMS", "BatchInputError", "BatchItem",
           "LineError", "Problem", "check_input", "parse_line", "read_lines"]


#: Routes a batch line may name (the OpenAI Batch API's endpoints, as it spells them).
ALLOWED_URLS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses",
                "/v1/moderations", "/v1/images/generations")


#: The Batch API sends every line as a POST.
ALLOWED_METHODS = ("POST",)


#: The prefix of :data:`ALLOWED_URLS` that the client's ``base_url`` already ends in.
_API_PREFIX = "/v1"


_BATCH_KEYS = frozenset({"method", "url", "body"})


#: Problems kept for the report; the rest are only counted.
MAX_PROBLEMS = 50


class BatchInputError(CometError):
    """The input has invalid lines; nothing was sent. ``problems`` lists the first ones."""

    def __init__(self, path: str, problems: list[Problem], count: int) -> None:
        self.path = path
        self.problems = problems
        self.count = count
        lines = [f"{path}:{p.line}: {p.message}" for p in problems]
        if count > len(problems):
            lines.append(f"... and {count - len(problems)} more problem(s)")
        super().__init__(f"{count} invalid line(s) in {path}; nothing was sent:\n"
                         + "\n".join(lines))


@dataclass(frozen=True)
class Problem:
    """One invalid input line."""

    line: int
    message: str


@dataclass(frozen=True)
class BatchItem:
    """One request of the batch, as sent."""

    line: int
    custom_id: str
    method: str
    url: str
    body: dict

    @property
    def route(self) -> str:
        """The path below the client's ``base_url`` (which ends in ``/v1``)."""
        return self.url[len(_API_PREFIX):]


class LineError(ValueError):
    """One line is not a valid request (its message says why and how to fix it)."""


def _batch_item(obj: dict, line: int, model: Optional[str]) -> BatchItem:
    missing = [key for key in ("method", "url", "body") if key not in obj]
    if missing:
        raise LineError("OpenAI Batch format needs custom_id, method, url and body; missing "
                         + ", ".join(missing))
    method, url, body = obj["method"], obj["url"], obj["body"]
    if not isinstance(method, str) or method.upper() not in ALLOWED_METHODS:
        raise LineError(f"method {method!r} is not allowed: use "
                         + " or ".join(ALLOWED_METHODS))
    if url not in ALLOWED_URLS:
        raise LineError(f"unknown url {url!r}: allowed are {', '.join(ALLOWED_URLS)}")
    if not isinstance(body, dict):
        raise LineError(f"body must be a JSON object, got {type(body).__name__}")
    if not body.get("model"):
        if not model:
            raise LineError("body has no model and no --model was given")
        body = {"model": model, **body}
    _check_body(body)
    return BatchItem(line, obj["custom_id"], method.upper(), url, body)


def _check_body(body: dict) -> None:
    if body.get("stream"):
        raise LineError("stream: true is not supported in a batch (each answer is written "
                         "whole); remove it")


def _shorthand_item(obj: dict, line: int, model: Optional[str]) -> BatchItem:
    body = {key: value for key, value in obj.items() if key != "custom_id"}
    if "prompt" in body:
        if "messages" in body:
            raise LineError("give either prompt or messages, not both")
        prompt = body.pop("prompt")
        if not isinstance(prompt, str):
            raise LineError(f"prompt must be a string, got {type(prompt).__name__}")
        body["messages"] = [{"role": "user", "content": prompt}]
    elif not isinstance(body["messages"], list) or not body["messages"]:
        raise LineError("messages must be a non-empty list of {role, content} objects")
    if not body.get("model"):
        if not model:
            raise LineError("shorthand line has no model and no --model was given")
        body["model"] = model
    _check_body(body)
    return BatchItem(line, obj["custom_id"], "POST", "/v1/chat/completions", body)


def parse_line(raw: bytes, line: int, *, model: Optional[str] = None) -> Optional[BatchItem]:
    """One input line as a :class:`BatchItem`; ``None`` for a blank line.

    :param model: the model for lines that name none (``--model``).
    :raises ValueError: what is wrong with the line (without its line number).
    """
    if not raw.strip():
        return None
    if line == 1 and raw.startswith(codecs.BOM_UTF8):  # files saved by some Windows editors
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise LineError(f"not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:
        raise LineError(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LineError(f"must be a JSON object, got {type(obj).__name__}")
    custom_id = obj.get("custom_id")
    if custom_id is None or custom_id == "":
        raise LineError("missing custom_id")
    if not isinstance(custom_id, str):
        raise LineError(f"custom_id must be a string, got {json.dumps(custom_id)}")
    if _BATCH_KEYS & obj.keys():
        return _batch_item(obj, line, model)
    if "prompt" in obj or "messages" in obj:
        return _shorthand_item(obj, line, model)
    raise LineError("neither OpenAI Batch format (custom_id, method, url, body) nor shorthand "
                     "(custom_id with prompt or messages)")


def read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        yield from enumerate(handle, start=1)


def check_input(path: str, *, model: Optional[str] = None) -> tuple[int, set, DigestSet]:
    """Check every line of the input (JSON, ``custom_id`` present and unique, known URL and
    method, a model for every request), collecting *all* problems before anything is sent.

    :param model: the model for lines that name none (``--model``).
    :returns: the number of requests, the models they name (each once) and their
        ``custom_id`` values.
    :raises BatchInputError: invalid lines (all of them counted, the first ones listed).
    :raises OSError: the input cannot be read.
    """
    input_ids = DigestSet()
    models: set = set()
    problems: list[Problem] = []
    count = 0
    total = 0
    for line, raw in read_lines(path):
        try:
            item = parse_line(raw, line, model=model)
        except ValueError as exc:
            message: Optional[str] = str(exc)
        else:
            if item is None:
                continue
            models.add(item.body.get("model"))
            message = None
            if not input_ids.add(item.custom_id):
                message = f"duplicate custom_id {item.custom_id!r} (seen on an earlier line)"
        if message is not None:
            count += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(Problem(line, message))
            continue
        total += 1
    if count:
        raise BatchInputError(path, problems, count)
    return total, models, input_ids
