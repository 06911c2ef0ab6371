"""The body of an upload (``multipart/form-data``): files and form fields, encoded once
(and decoded, where an upload is read rather than sent).

A file object can be read only once, and a retry must send the very bytes the first attempt
sent: so the whole body is built before the first attempt and every attempt sends it as it
is. The shapes a file takes are those ``requests`` and the ``openai`` SDK accept.
"""

from __future__ import annotations

import mimetypes
import os
from email import policy
from email.parser import BytesParser
from typing import Any, Mapping, Optional

from urllib3.filepost import encode_multipart_formdata

__all__ = ["decode_upload", "encode_upload"]

#: What one file of ``files=`` may be (see :func:`encode_upload`).
_FILE_SHAPES = ("bytes, a file opened in binary mode, a path, or a tuple (filename, content"
                "[, content_type]) of those")


def _read(name: str, content: Any) -> tuple[Optional[str], bytes]:
    """``(filename it suggests, bytes)`` of one file's content."""
    if isinstance(content, (bytes, bytearray, memoryview)):
        return None, bytes(content)
    if isinstance(content, os.PathLike):
        path = os.fspath(content)
        try:
            with open(path, "rb") as handle:
                return os.path.basename(path), handle.read()
        except OSError as exc:
            raise ValueError(f"files[{name!r}]: cannot read {path!r}: {exc.strerror}") from None
    read = getattr(content, "read", None)
    if callable(read):
        data = read()
        if isinstance(data, str):
            raise TypeError(f"files[{name!r}]: the file is open in text mode: open it with "
                            "'rb'")
        if not isinstance(data, bytes):
            raise TypeError(f"files[{name!r}]: read() returned {type(data).__name__}, not bytes")
        filename = getattr(content, "name", None)
        return (os.path.basename(filename) if isinstance(filename, str) else None), data
    raise TypeError(f"files[{name!r}] must be {_FILE_SHAPES}; got {type(content).__name__}")


def _file_field(name: str, value: Any) -> tuple[str, bytes, str]:
    """``(filename, bytes, content type)`` of one entry of ``files=``."""
    given_type: Optional[str] = None
    filename: Optional[str] = None
    if isinstance(value, tuple):
        if not 2 <= len(value) <= 3 or not isinstance(value[0], (str, type(None))) or (
                len(value) == 3 and not isinstance(value[2], str)):
            raise TypeError(f"files[{name!r}] as a tuple must be (filename, content"
                            "[, content_type]) with strings for the names")
        filename, given_type = value[0], value[2] if len(value) == 3 else None
        value = value[1]
    suggested, data = _read(name, value)
    filename = filename or suggested or name
    content_type = given_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return filename, data, content_type


def _field_text(name: str, value: Any) -> str:
    """A form field's value as text (numbers and booleans as JSON writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise TypeError(f"data[{name!r}] must be a string, number or boolean (or a list of them), "
                    f"got {type(value).__name__}")


def encode_upload(files: Mapping[str, Any], data: Optional[Mapping[str, Any]]
                  ) -> tuple[bytes, str]:
    """``(body, content type)`` of a ``multipart/form-data`` upload of ``files`` (field name
    -> file) with the form fields ``data`` (field name -> value, or a list of values sent as
    that many fields, as ``timestamp_granularities[]`` is).

    :raises TypeError: for a file or a value of a shape it cannot send, naming the field.
    :raises ValueError: for a path that cannot be read.
    """
    if not isinstance(files, Mapping) or not files:
        raise TypeError("files must be a non-empty mapping of field name -> file")
    if data is not None and not isinstance(data, Mapping):
        raise TypeError(f"data must be a mapping of form fields, got {type(data).__name__}")
    fields: list[tuple[str, Any]] = []
    for name, value in (data or {}).items():
        if value is None:
            continue  # an optional parameter not given, as in a JSON body
        for item in value if isinstance(value, (list, tuple)) else (value,):
            fields.append((str(name), _field_text(str(name), item)))
    for name, value in files.items():
        fields.append((str(name), _file_field(str(name), value)))
    return encode_multipart_formdata(fields)


def decode_upload(content_type: Optional[str], body: Any) -> Optional[dict]:
    """The fields of a ``multipart/form-data`` body: text, a list of texts for a name ending
    in ``[]``, or ``(filename, bytes, content type)`` for a file; ``None`` when the body is
    not one (another content type, not bytes, no boundary, no parts). The inverse of
    :func:`encode_upload`, for the sandbox and for reading facts (the model) out of an
    upload that is passed on as it is."""
    if not isinstance(body, bytes) or not content_type or \
            not content_type.lower().startswith("multipart/form-data"):
        return None
    try:
        return _parts(content_type, body)
    except Exception:
        return None


def _parts(content_type: str, body: bytes) -> Optional[dict]:
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        return None
    fields: dict = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        content = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            fields[name] = (filename, content, part.get_content_type())
        elif name.endswith("[]"):
            fields.setdefault(name, []).append(content.decode("utf-8", "replace"))
        else:
            fields[name] = content.decode("utf-8", "replace")
    return fields or None
