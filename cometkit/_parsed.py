"""Structured outputs: ``client.chat.completions.parse(response_format=<pydantic model>)``.

As the ``openai`` SDK does, the model's JSON schema goes out as a strict ``json_schema``
response format, and each answer's content comes back validated into the model, as
``choices[i].message.parsed``. pydantic is needed only here (``pip install pydantic``; the
``openai`` extra brings it); the core never imports it.
"""

from __future__ import annotations

from typing import Any, Optional

from ._exceptions import APIError
from ._objects import ApiObject

__all__ = ["ParsedMessage", "response_format_for", "parse_choices"]


class ParsedMessage(ApiObject):
    """A message of a ``parse()`` answer: ``.parsed`` holds its content validated into the
    requested model (``None`` for a refusal, a tool call or no content)."""

    __slots__ = ("parsed",)

    def __init__(self, data: dict, request_id: Optional[str] = None,
                 parsed: Any = None) -> None:
        super().__init__(data, request_id)
        object.__setattr__(self, "parsed", parsed)

    def __reduce__(self) -> tuple:
        return type(self), (self._data, self._request_id, self.parsed)


def _pydantic_model(response_format: Any) -> Any:
    try:
        import pydantic
    except ImportError:  # pragma: no cover - pydantic comes with the openai extra
        raise ImportError("chat.completions.parse() needs pydantic: pip install pydantic "
                          "(or: pip install 'cometkit[openai]')") from None
    if not (isinstance(response_format, type) and issubclass(response_format, pydantic.BaseModel)):
        raise TypeError(f"response_format must be a pydantic model class for parse(), got "
                        f"{response_format!r}; for a JSON schema of your own, pass "
                        "response_format={'type': 'json_schema', ...} to create()")
    return response_format


def _strict(schema: Any) -> Any:
    """A JSON schema as strict structured outputs want it: every object closed
    (``additionalProperties: false``), every property required."""
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        if out.get("type") == "object" and "properties" in out:
            out["additionalProperties"] = False
            out["required"] = list(out["properties"])
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def response_format_for(model: Any) -> dict:
    """The ``response_format`` a pydantic ``model`` class is sent as."""
    model = _pydantic_model(model)
    return {"type": "json_schema",
            "json_schema": {"name": model.__name__, "schema": _strict(model.model_json_schema()),
                            "strict": True}}


def parse_choices(completion: Any, model: Any) -> Any:
    """``completion`` with each choice's message a :class:`ParsedMessage`.

    :raises APIError: an answer's content does not fit ``model`` (its validation error
        chained).
    """
    if not isinstance(completion, ApiObject):
        return completion
    for choice in completion.choices or ():
        message = choice._data.get("message")
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        parsed = None
        if isinstance(content, str) and content and not message.get("refusal"):
            try:
                parsed = model.model_validate_json(content)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise APIError(f"the answer does not fit {model.__name__}: {exc}",
                               request_id=completion._request_id) from exc
        choice._children["message"] = ParsedMessage(message, completion._request_id, parsed)
    return completion
