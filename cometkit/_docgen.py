"""Configuration reference tables rendered from :class:`~cometkit.options.Option` schemas.

The validator and these tables read the same objects, so the documentation cannot claim a key,
a default or a range that the code does not have. ``docs/*.md`` hold generated blocks between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers; a test compares them with what this
module renders, and ``python -m cometkit._docgen`` rewrites them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from .options import Option, describe_kind

__all__ = ["reference_markdown", "replace_block", "extract_block", "DOC_BLOCKS"]

_HEADER = ("| Key | Type | Default | Description | Example |\n"
           "|-----|------|---------|-------------|---------|")


def _literal(value: Any) -> str:
    """``value`` spelled as in a YAML file (flow style), for a table cell."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    text = _literal(value)
    # A backtick inside the value would end the code span early.
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return _cell(f"{fence}{pad}{text}{pad}{fence}")


def _rows(schema: Mapping[str, Option], prefix: str) -> Iterator[str]:
    for name, option in schema.items():
        path = f"{prefix}{name}"
        default = "" if option.default is None and not option.nullable else _code(option.default)
        if option.secret and option.default is not None:
            default = "(secret)"
        if option.required:
            default = "(required)"
        example = "" if option.example is None else _code(option.example)
        yield (f"| `{path}` | {_cell(describe_kind(option))} | {default} | "
               f"{_cell(option.help)} | {example} |")
        if option.kind == "section" and option.children:
            yield from _rows(option.children, f"{path}.")
        elif option.kind == "mapping" and option.children:
            yield from _rows(option.children, f"{path}.<name>.")


def reference_markdown(schema: Mapping[str, Option], title: str, *, level: int = 3) -> str:
    """A Markdown heading and table of every key in ``schema``, children included.

    Columns: dotted key path (``models.<name>.burst`` below a ``mapping``), what it accepts
    (:func:`~cometkit.options.describe_kind`), default, description and example.

    :param title: heading text; empty for a table without a heading.
    :param level: heading level (number of ``#``).
    """
    parts = [f"{'#' * level} {title}\n"] if title else []
    parts.append(_HEADER)
    parts.extend(_rows(schema, ""))
    return "\n".join(parts) + "\n"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def extract_block(text: str, name: str) -> Optional[str]:
    """The text between the ``name`` markers (without them, stripped), or ``None``."""
    start, end = _markers(name)
    match = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), text, re.DOTALL)
    return match.group(1).strip() + "\n" if match else None


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with the block between the ``name`` markers replaced by ``content``.

    :raises ValueError: when the markers are missing.
    """
    start, end = _markers(name)
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"markers {start} ... {end} not found")
    return pattern.sub(lambda _: f"{start}\n{content.strip()}\n{end}", text, count=1)


def _core_block() -> str:
    from .config import CORE_OPTIONS

    return reference_markdown(CORE_OPTIONS, "")


#: Generated blocks: (document path relative to the repository, marker name, renderer).
def _plugin_block(name: str) -> Callable[[], str]:
    """Render a plugin's options table from the spec it declares (found through its entry
    point, as the client finds it: the core never imports a plugin directly)."""

    def render() -> str:
        from ._plugins import inspect_plugins

        for info in inspect_plugins():
            if info.name == name and info.error is None:
                return reference_markdown(info.spec.options, "")
        raise LookupError(f"plugin {name!r} is not installed")

    return render


DOC_BLOCKS = [
    ("docs/configuration.md", "core-options", _core_block),
    ("docs/plugins/backoff.md", "backoff-options", _plugin_block("backoff")),
    ("docs/plugins/limiter.md", "limiter-options", _plugin_block("limiter")),
    ("docs/metrics.md", "csv-metrics-options", _plugin_block("csv_metrics")),
    ("docs/metrics.md", "stdout-metrics-options", _plugin_block("stdout_metrics")),
    ("docs/metrics.md", "prometheus-metrics-options", _plugin_block("prometheus_metrics")),
    ("docs/metrics.md", "otel-metrics-options", _plugin_block("otel_metrics")),
    ("docs/deployment.md", "redis-limiter-options", _plugin_block("redis_limiter")),
]


def main(argv: Optional[list[str]] = None) -> int:
    """Rewrite every generated block; ``--check`` only reports the stale ones (exit 1)."""
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    root = Path(next((a for a in args if not a.startswith("-")), "."))
    stale = []
    for relative, name, render in DOC_BLOCKS:
        path = root / relative
        text = path.read_text(encoding="utf-8")
        updated = replace_block(text, name, render())
        if updated != text:
            stale.append(relative)
            if not check:
                path.write_text(updated, encoding="utf-8")
    for relative in stale:
        sys.stderr.write(f"{'stale' if check else 'updated'}: {relative}\n")
    return 1 if check and stale else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
