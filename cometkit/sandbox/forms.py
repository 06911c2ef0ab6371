"""Reading an upload (``multipart/form-data``) in the sandbox, with the standard library's
MIME parser: the form fields as text, each file as ``(filename, bytes, content type)``."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from typing import Optional

__all__ = ["parse_form"]


def parse_form(content_type: Optional[str], body: bytes) -> Optional[dict]:
    """The fields of a ``multipart/form-data`` body (a file as a tuple), or ``None`` when the
    body is not one (another content type, no boundary, no parts)."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        return None
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
