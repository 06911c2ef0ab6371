"""``jsonl_sink``: a third-party cometkit metrics sink that writes one JSON line per call.

A complete example of a cometkit plugin published as its own distribution
(``cometkit-jsonl-sink``) under the ``cometkit`` entry-point group. It imports only public
names from ``cometkit``, like the first-party plugins do.

Each line is one JSON object: ``"record": "call"`` followed by the fields of
:class:`cometkit.CallRecord` in :data:`cometkit.CALL_FIELDS` order (``timestamp`` in seconds
since the epoch, missing values as ``null``). With ``include_attempts: true`` every attempt is
written too, as ``"record": "attempt"`` with the fields of :data:`cometkit.ATTEMPT_FIELDS`, just
before the line of the call it belongs to. Records never hold the API key, prompts or
completions, so neither does the file.

Lines are appended: each is encoded first, then written with a single ``write`` and flushed
under a lock, so lines of concurrent threads never interleave and a crash loses at most the
line being written. A file that ends in a line cut short by such a crash gets a newline first,
so the broken line stays one unreadable line instead of corrupting the next one.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Optional, Sequence

from cometkit import (
    ATTEMPT_FIELDS,
    CALL_FIELDS,
    AttemptRecord,
    CallRecord,
    ClientContext,
    ConfigError,
    Option,
    PluginSpec,
    hookimpl,
)

__all__ = ["JsonLinesSink", "cometkit_plugin_spec", "cometkit_make_metrics_sink"]

#: The entry-point name, i.e. the key under ``plugins:`` in the configuration.
PLUGIN_NAME = "jsonl_sink"
DEFAULT_PATH = "cometkit-calls.jsonl"


def _line(kind: str, record: Any, fields: Sequence[str]) -> str:
    data = {"record": kind}
    data.update((name, getattr(record, name)) for name in fields)
    # allow_nan=False: a non-finite number must fail loudly (cometkit counts it as a sink
    # error) rather than produce a line that JSON parsers reject.
    return json.dumps(data, allow_nan=False, separators=(",", ":")) + "\n"


class JsonLinesSink:
    """Appends call (and optionally attempt) records to ``path`` as JSON lines. Thread-safe.

    The file is opened at once, so an unusable path fails when the client is built rather
    than at its first call.

    :param path: the file to append to (``~`` is expanded).
    :param include_attempts: also write one line per attempt.
    :param config_path: the configuration file the options came from, for error messages.
    :raises ConfigError: the file cannot be opened for appending.
    """

    def __init__(self, path: str, *, include_attempts: bool = False,
                 config_path: Optional[str] = None) -> None:
        self.path = os.path.expanduser(os.fspath(path))
        self.include_attempts = include_attempts
        self._lock = threading.Lock()
        try:
            self._handle = open(self.path, "a", encoding="utf-8", newline="\n")
            if self._ends_mid_line():
                self._handle.write("\n")
                self._handle.flush()
        except OSError as exc:
            key = f"plugins.{PLUGIN_NAME}.path"
            prefix = f"{config_path}: " if config_path else ""
            raise ConfigError(f"{prefix}{key}: cannot append to {self.path!r}: "
                              f"{exc.strerror or exc}", path=config_path, key=key) from exc

    def _ends_mid_line(self) -> bool:
        with open(self.path, "rb") as existing:
            existing.seek(0, os.SEEK_END)
            if existing.tell() == 0:
                return False
            existing.seek(-1, os.SEEK_END)
            return existing.read(1) != b"\n"

    def _write(self, line: str) -> None:
        with self._lock:
            if self._handle.closed:
                raise RuntimeError(f"{self!r} is closed")
            self._handle.write(line)
            self._handle.flush()

    def record_attempt(self, record: AttemptRecord) -> None:
        if self.include_attempts:
            self._write(_line("attempt", record, ATTEMPT_FIELDS))

    def record_call(self, record: CallRecord) -> None:
        self._write(_line("call", record, CALL_FIELDS))

    def flush(self) -> None:
        with self._lock:
            if not self._handle.closed:
                self._handle.flush()

    def close(self) -> None:
        """Flush and close the file (once; later calls do nothing)."""
        with self._lock:
            self._handle.close()

    def __repr__(self) -> str:
        return f"JsonLinesSink(path={self.path!r}, include_attempts={self.include_attempts})"


@hookimpl
def cometkit_plugin_spec() -> PluginSpec:
    return PluginSpec(
        summary="Write one JSON line per finished call (and optionally per attempt).",
        enabled_by_default=False,
        options={
            "path": Option("str", default=DEFAULT_PATH,
                           help="JSON Lines file to append to, relative to the current "
                                "directory.",
                           example="calls.jsonl"),
            "include_attempts": Option("bool", default=False,
                                       help="Also write one line per attempt "
                                            '("record": "attempt").'),
        },
    )


@hookimpl
def cometkit_make_metrics_sink(ctx: ClientContext) -> JsonLinesSink:
    # cometkit calls this only while the plugin is enabled. The options come validated with
    # defaults filled in; .get() keeps the defaults when the module is registered directly
    # (Client(extra_plugins=[cometkit_jsonl_sink])), where it has no section of its own.
    options = ctx.options()
    return JsonLinesSink(options.get("path", DEFAULT_PATH),
                         include_attempts=options.get("include_attempts", False),
                         config_path=ctx.config_path)
