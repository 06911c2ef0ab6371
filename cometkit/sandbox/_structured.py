"""Structured answers of the sandbox's chat: tool calls and ``response_format`` documents.

A tool call's arguments and a ``json_schema`` answer are made to fit the JSON schema the
request gave (:func:`example_value`), so a client's parsing of structured output is tested
offline; the values are made from the prompt's text, so runs repeat exactly.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from ._reading import BadRequest

__all__ = ["MAX_SCHEMA_DEPTH", "example_value", "tool_call_for", "formatted_reply"]

#: How deep :func:`example_value` follows a JSON schema (a recursive one would not end).
MAX_SCHEMA_DEPTH = 8


def example_value(schema: Any, text: str, root: Any = None, depth: int = 0) -> Any:
    """A value that fits the JSON ``schema``, made from ``text``: strings are ``text``,
    numbers its length, booleans true, arrays one item, objects every property; the first
    of an ``enum``/``anyOf``/``oneOf``; ``$ref`` into ``$defs`` (as pydantic writes them)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > MAX_SCHEMA_DEPTH:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return example_value(target, text, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return example_value(schema[key][0], text, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties")
        return {name: example_value(sub, text, root, depth + 1)
                for name, sub in (properties.items() if isinstance(properties, dict) else ())}
    if kind == "array":
        return [example_value(schema.get("items"), text, root, depth + 1)]
    return {"string": text, "integer": len(text), "number": float(len(text)),
            "boolean": True}.get(kind) if isinstance(kind, str) else None


def tool_call_for(body: dict, last_role: Optional[str], text: str) -> Optional[tuple[str, str]]:
    """``(function name, arguments JSON)`` when the answer is a tool call: ``tools`` were
    given, ``tool_choice`` is not ``"none"``, and the conversation does not end with a tool's
    result (unless a tool call is required). The function is the one ``tool_choice`` names,
    else the first; its arguments fit its ``parameters`` schema (:func:`example_value`)."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools or not all(
            isinstance(tool, dict) and tool.get("type") == "function"
            and isinstance(tool.get("function"), dict)
            and isinstance(tool["function"].get("name"), str) for tool in tools):
        raise BadRequest("Invalid 'tools': expected a non-empty array of "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}.", "tools")
    choice = body.get("tool_choice", "auto")
    functions = {tool["function"]["name"]: tool["function"] for tool in tools}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in functions:
            raise BadRequest("Invalid 'tool_choice': it names no function of 'tools'.",
                             "tool_choice")
    elif choice == "none" or (choice == "auto" and last_role == "tool"):
        return None
    elif choice in ("auto", "required"):
        name = next(iter(functions))
    else:
        raise BadRequest("Invalid 'tool_choice': expected 'none', 'auto', 'required' or a "
                         "named function.", "tool_choice")
    arguments = example_value(functions[name].get("parameters") or {"type": "object"}, text)
    return name, json.dumps(arguments if isinstance(arguments, dict) else {})


def formatted_reply(body: dict, text: str) -> Optional[str]:
    """The answer's content for ``response_format`` ``json_schema`` (a document fitting the
    schema) or ``json_object`` (``{"echo": text}``); ``None`` for plain text."""
    spec = body.get("response_format")
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "json_schema":
        schema = spec.get("json_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
            raise BadRequest("Invalid 'response_format.json_schema': expected an object with "
                             "a 'schema'.", "response_format")
        return json.dumps(example_value(schema["schema"], text), ensure_ascii=False)
    if kind == "json_object":
        return json.dumps({"echo": text}, ensure_ascii=False)
    if kind == "text":
        return None
    raise BadRequest("Invalid 'response_format.type': expected 'text', 'json_object' or "
                     "'json_schema'.", "response_format")
