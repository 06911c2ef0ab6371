"""YAML in and out, safely: the one way cometkit reads a configuration file, and shows one.

The loader is PyYAML's safe loader, hardened: a tag that would construct anything but plain
data (``!!python/object/apply``...) is refused before anything is built, a duplicate key is
an error rather than a silent overwrite, and a document whose aliases would expand past
:data:`MAX_CONFIG_VALUES` values or :data:`MAX_CONFIG_DEPTH` levels (a "billion laughs") is
refused from its node graph, before it is constructed. Every problem is a
:class:`~cometkit.ConfigError` naming the file, the line and the fix.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import yaml

from ._exceptions import ConfigError
from .options import Interpolated

__all__ = ["MAX_CONFIG_DEPTH", "MAX_CONFIG_VALUES", "parse_yaml", "read_yaml_file",
           "dump_yaml"]



class _UnsafeTag(yaml.MarkedYAMLError):
    pass


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


def _short_tag(tag: str) -> str:
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix):] if tag.startswith(prefix) else tag


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that names refused tags and rejects duplicate keys.

    PyYAML silently keeps the last of two equal keys; in a configuration that hides a mistake
    (two ``concurrency:`` lines, one forgotten), so it is an error here.
    """

    def construct_undefined(self, node: yaml.Node) -> Any:
        raise _UnsafeTag(None, None, f"tag {_short_tag(node.tag)} is not allowed",
                         node.start_mark)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                first = seen[ident].start_mark.line + 1
                raise _DuplicateKey(None, None, f"duplicate key {key_node.value!r} (first "
                                    f"given on line {first})", key_node.start_mark)
            seen[ident] = key_node
        return super().construct_mapping(node, deep=deep)

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open_anchors: set[str] = set()

    def compose_node(self, parent: Optional[yaml.Node], index: Any) -> Any:
        """Refuse what PyYAML would follow into a Python ``RecursionError``: an alias to an
        anchor whose node is not finished (a structure containing itself), and nesting deeper
        than :data:`MAX_CONFIG_DEPTH` (the composer recurses once per level)."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise _BadStructure(None, None, f"alias *{event.anchor} is inside its own anchor "
                                    f"&{event.anchor}, so the value would contain itself "
                                    "forever (a recursive alias)", event.start_mark)
            return super().compose_node(parent, index)
        if self._depth >= MAX_CONFIG_DEPTH:
            raise _BadStructure(None, None, f"values nested more than {MAX_CONFIG_DEPTH} levels "
                                "deep", event.start_mark)
        anchor = getattr(event, "anchor", None)
        self._depth += 1
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)

    def construct_document(self, node: yaml.Node) -> Any:
        size, depth = _expanded_shape(node)
        if size > MAX_CONFIG_VALUES:
            raise _BadStructure(None, None, f"the document expands to more than "
                                f"{MAX_CONFIG_VALUES} values (YAML aliases repeating aliases?)",
                                node.start_mark)
        if depth > MAX_CONFIG_DEPTH:
            raise _BadStructure(None, None, "once its aliases are expanded, the document nests "
                                f"values more than {MAX_CONFIG_DEPTH} levels deep (aliases of "
                                "aliases of nested values?)",
                                node.start_mark)
        return super().construct_document(node)


_ConfigLoader.add_constructor(None, _ConfigLoader.construct_undefined)

#: A configuration is small; a document that expands past this many values is refused before
#: it is built, so an alias bomb ("billion laughs") costs nothing.
MAX_CONFIG_VALUES = 100_000
#: Deepest nesting of mappings and lists accepted (a real configuration needs about five).
#: Everything that walks a configuration (YAML composing, ``${VAR}`` interpolation,
#: validation, redaction) recurses once per level, so a deeper document is refused up front
#: instead of ending in a ``RecursionError``.
MAX_CONFIG_DEPTH = 64


class _BadStructure(yaml.MarkedYAMLError):
    """Too large, too deep or recursive: refused before anything is built."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _expanded_shape(root: yaml.Node) -> tuple[int, int]:
    """``(values, depth)`` of ``root`` once aliases are expanded.

    Counted on the node graph, where an alias is a shared node, so the count is cheap even for
    an alias bomb; walked with an explicit stack, so a long chain of aliases cannot exhaust
    Python's recursion limit either. A node reached again while it is being walked (a cycle
    the composer let through) is refused.
    """
    shape: dict[int, tuple[int, int]] = {}
    walking: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            walking.discard(key)
            kids = [shape[id(child)] for child in _children(node)]
            size = 1 + sum(size for size, _ in kids)
            depth = 1 + max((depth for _, depth in kids), default=0)
            shape[key] = (size, depth)
            if size > MAX_CONFIG_VALUES or depth > MAX_CONFIG_DEPTH:
                return size, depth  # refused anyway: no need to finish the walk
            continue
        if key in shape:
            continue
        if key in walking:
            raise _BadStructure(None, None, "a value contains itself (a recursive alias)",
                                node.start_mark)
        walking.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in shape)
    return shape[id(root)]


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: no code runs
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        if isinstance(exc, _UnsafeTag):
            raise ConfigError(
                f"{where}: {at}: {exc.problem}. Configuration is read with YAML safe loading "
                "only: use plain mappings, lists, strings, numbers, booleans and null.",
                path=where) from None
        if isinstance(exc, _BadStructure):
            raise ConfigError(f"{where}: {at}: {exc.problem}.", path=where) from None
        if isinstance(exc, _DuplicateKey):
            raise ConfigError(f"{where}: {at}: {exc.problem}. Keep one of them.",
                              path=where) from None
        context = exc.context or ""
        if context and exc.context_mark is not None and exc.context_mark is not mark:
            context += (f" (which began at line {exc.context_mark.line + 1}, column "
                        f"{exc.context_mark.column + 1})")
        problem = "; ".join(p for p in (context, exc.problem) if p)
        raise ConfigError(f"{where}: {at}: invalid YAML: {problem}. Check the indentation and "
                          "quoting around that line.", path=where) from None
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML parse error is marked
        raise ConfigError(f"{where}: invalid YAML: {exc}", path=where) from None


def read_yaml_file(path: Union[str, os.PathLike], *, named_by: Optional[str] = None
                   ) -> tuple[Any, str]:
    """The YAML document at ``path`` (see :func:`parse_yaml`) and the file's name.

    :param named_by: the environment variable that named the file, if one did (errors then
        say so, and how to fix it).
    """
    name = os.fsdecode(os.fspath(path))
    origin = f" (named by ${named_by})" if named_by else ""
    try:
        with open(os.path.expanduser(name), encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        fix = f"Fix or unset ${named_by}." if named_by else "Check the path."
        raise ConfigError(f"{name}: configuration file not found{origin}. {fix}",
                          path=name) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: configuration file is not UTF-8 text{origin} (byte "
                          f"{exc.start}). Save it as UTF-8.", path=name) from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read the configuration file{origin}: "
                          f"{exc.strerror or exc}.", path=name) from None
    return parse_yaml(text, name), name


# -- writing it back ------------------------------------------------------------------------


class _ShowDumper(yaml.SafeDumper):
    pass


def _represent_tuple(dumper: yaml.SafeDumper, data: tuple) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", list(data), flow_style=True)


_ShowDumper.add_representer(tuple, _represent_tuple)
_ShowDumper.add_representer(Interpolated, yaml.SafeDumper.represent_str)


def dump_yaml(data: Any) -> str:
    """``data`` as YAML in its own key order; tuples such as ``timeout`` as ``[a, b]``.

    It does not redact: pass the result of :func:`redact`.
    """
    return yaml.dump(data, Dumper=_ShowDumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True)
