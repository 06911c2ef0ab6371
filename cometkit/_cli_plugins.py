"""``cometkit plugins`` and ``cometkit config check``: what a configuration turns on, checked
exactly as a client checks it, without building anything.

``plugins`` lists the installed plugins (entry points and module paths of the configuration)
and whether each is enabled; ``config check`` validates a configuration file, plugin sections
included, and prints it with its secrets redacted.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from ._cli_common import EXIT_OK, EXIT_USAGE, error, say
from ._exceptions import ConfigError, PluginError
from ._plugins import PluginInfo, configure_plugins, enabled_names, inspect_plugins
from ._transport import DEFAULT_BASE_URL, check_base_url
from .config import REDACTED, dump_yaml, load_config, redact

__all__ = ["add_parsers", "run_plugins", "run_config_check"]


def _plugin_section(config: Optional[str]) -> tuple[dict, Any]:
    loaded = load_config(config)
    return dict(loaded.data.get("plugins") or {}), loaded


def _check_plugins(infos: list[PluginInfo], section: dict, where: str) -> dict[str, Any]:
    """Each plugin's effective section (validated options, or ``False`` when off), checked
    exactly as a client checks it, but without building anything (no file is opened)."""
    enabled = configure_plugins(infos, section, where)
    return {info.name: enabled.get(info.name, False) for info in infos if info.error is None}


def run_config_check(args: argparse.Namespace) -> int:
    """``cometkit config check``; returns the exit code."""
    try:
        section, loaded = _plugin_section(args.file)
        where = loaded.where
        infos = inspect_plugins(section)
        plugins = _check_plugins(infos, section, where)
        data = dict(loaded.data)
        data["base_url"] = check_base_url(
            data.get("base_url") or os.environ.get("COMETAPI_BASE_URL") or DEFAULT_BASE_URL,
            allow_insecure_http=bool(data.get("allow_insecure_http")), where=where)
        if data.get("api_key") is None and os.environ.get("COMETAPI_KEY"):
            data["api_key"] = REDACTED  # from $COMETAPI_KEY: set, and never shown
        data["plugins"] = plugins
    except (ConfigError, PluginError) as exc:
        say(f"cometkit config check: {exc}")
        return EXIT_USAGE
    schemas = {info.name: info.spec.options for info in infos}
    shown = redact(data, plugin_schemas=schemas)
    sys.stdout.write(f"# effective configuration of {where} (secrets shown as {REDACTED})\n")
    sys.stdout.write(dump_yaml(shown))
    sys.stdout.flush()
    say(f"cometkit config check: {where}: OK")
    return EXIT_OK


def _enabled_label(info: PluginInfo, section: dict, enabled: set) -> str:
    if info.error is not None:
        return "broken"
    state = "yes" if info.name in enabled else "no"
    return f"{state} (config)" if info.name in section else f"{state} (default)"


def run_plugins(args: argparse.Namespace) -> int:
    """``cometkit plugins``; returns the exit code."""
    try:
        section, loaded = _plugin_section(args.config)
        infos = inspect_plugins(section)
    except (ConfigError, PluginError) as exc:
        return error(str(exc))
    enabled = set(enabled_names([i for i in infos if i.error is None], section))
    rows = [("NAME", "ENABLED", "PACKAGE", "MODULE", "HOOKS")]
    for info in sorted(infos, key=lambda i: (not i.first_party, i.name)):
        package = (f"{info.distribution} {info.version or ''}".strip() if info.distribution
                   else "(module path in config)")
        hooks = ", ".join(h.replace("cometkit_", "") for h in info.hooks) or "-"
        rows.append((info.name, _enabled_label(info, section, enabled), package, info.module,
                     hooks))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [f"{cell:<{width}}" for cell, width in zip(row, widths)]
        sys.stdout.write("  ".join(cells + [row[-1]]).rstrip() + "\n")
    notes = [(info.name, info.spec.summary) for info in infos if info.spec.summary]
    if notes:
        sys.stdout.write("\n")
        for name, text in sorted(notes):
            sys.stdout.write(f"{name}: {text}\n")
    for info in infos:
        if info.error is not None:
            sys.stdout.write(f"\n{info.name}: failed to import: {info.error}\n")
    sys.stdout.write(f"\nconfiguration: {loaded.path or 'none (defaults)'}\n")
    sys.stdout.flush()
    return EXIT_OK


def add_parsers(commands: Any) -> None:
    """Add ``cometkit plugins`` and ``cometkit config check`` to the subcommands
    ``commands`` (argparse's subparsers)."""
    plugins = commands.add_parser(
        "plugins", help="list installed plugins and whether the configuration enables them")
    plugins.add_argument("--config", metavar="FILE",
                         help="YAML configuration (default: $COMETKIT_CONFIG)")
    plugins.set_defaults(handler=run_plugins)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    config_commands.required = True
    check = config_commands.add_parser(
        "check", help="validate a configuration file and print it with secrets redacted")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=run_config_check)
