"""Finding, enabling and configuring plugins.

Every plugin, first-party or not, arrives through the same door: the ``cometkit`` entry-point
group (or a module path named in the configuration). Each client builds its own
``pluggy.PluginManager`` with the plugins its configuration enables and validates each
plugin's section against the options the plugin declared; asking the factory hooks for the
objects that hold policy is :mod:`cometkit._plugin_build`.

Environment controls (as pytest and llm offer):

- ``COMETKIT_DISABLE_PLUGINS=a,b``: never load these plugins.
- ``COMETKIT_LOAD_PLUGINS=a,b``: load only these entry-point plugins (empty: none).
- ``COMETKIT_DISABLE_PLUGIN_AUTOLOAD=1``: load only cometkit's own plugins and those the
  configuration names, not every installed one.
- ``COMETKIT_TRACE_HOOKS=1``: log every hook call at DEBUG on ``cometkit.hooks``.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable, Mapping, Optional, Sequence

import pluggy

from . import hookspecs
from ._checkout import entry_points_from_setup_cfg
from ._exceptions import ConfigError, PluginError
from .options import PluginSpec, validate_section

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "configure_plugins",
    "discover_plugins",
    "enabled_names",
    "inspect_plugins",
    "registered_plugins",
]

logger = logging.getLogger("cometkit.plugins")
hook_logger = logging.getLogger("cometkit.hooks")

ENTRY_POINT_GROUP = "cometkit"
#: The distribution that ships the first-party plugins.
_OWN_DISTRIBUTION = "cometkit"

_reported_import_errors: set[str] = set()


@dataclass
class PluginInfo:
    """One plugin as discovered: where it comes from and whether it loaded."""

    name: str
    module: str
    distribution: Optional[str] = None
    version: Optional[str] = None
    plugin: Any = None
    error: Optional[str] = None
    spec: PluginSpec = field(default_factory=PluginSpec)
    hooks: list[str] = field(default_factory=list)

    @property
    def first_party(self) -> bool:
        return self.distribution == _OWN_DISTRIBUTION


def _env_names(var: str) -> Optional[set[str]]:
    value = os.environ.get(var)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _entry_points() -> Iterable[Any]:
    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        found = list(eps.select(group=ENTRY_POINT_GROUP))
    else:  # pragma: no cover - Python 3.9
        found = list(eps.get(ENTRY_POINT_GROUP, []))
    # A checkout that was never installed: its setup.cfg lists the first-party plugins.
    return found + entry_points_from_setup_cfg(ENTRY_POINT_GROUP)


def _distribution_of(entry_point: Any) -> tuple[Optional[str], Optional[str]]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def discover_plugins(configured: Iterable[str] = ()) -> list[PluginInfo]:
    """Installed and configured plugins, imported, honouring the environment controls.

    A plugin that fails to import is returned with ``error`` set (and logged once), naming
    its distribution so the user knows what to reinstall or remove.
    """
    configured = set(configured)
    disabled = _env_names("COMETKIT_DISABLE_PLUGINS") or set()
    only = _env_names("COMETKIT_LOAD_PLUGINS")
    no_autoload = os.environ.get("COMETKIT_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")
    found: dict[str, PluginInfo] = {}
    for entry_point in _entry_points():
        name = entry_point.name
        if name in found or name in disabled:
            continue
        dist, version = _distribution_of(entry_point)
        if only is not None and name not in only:
            continue
        if no_autoload and dist != _OWN_DISTRIBUTION and name not in configured:
            continue
        info = PluginInfo(name=name, module=entry_point.value, distribution=dist, version=version)
        try:
            info.plugin = entry_point.load()
        except Exception as exc:  # a broken plugin must not break every client
            info.error = f"{type(exc).__name__}: {exc}"
            if name not in _reported_import_errors:
                _reported_import_errors.add(name)
                logger.warning(
                    "cometkit plugin %r from package %r failed to import and was skipped: %s",
                    name, dist or "?", info.error,
                )
        found[name] = info
    # Plugins named in config by module path (``mycompany.cometkit_sink``) rather than by an
    # installed entry-point name.
    for name in sorted(configured - set(found) - disabled):
        if "." not in name:
            continue
        info = PluginInfo(name=name, module=name)
        try:
            info.plugin = importlib.import_module(name)
        except Exception as exc:
            info.error = f"{type(exc).__name__}: {exc}"
        found[name] = info
    return list(found.values())


def _plugin_spec(pm: pluggy.PluginManager, name: str) -> PluginSpec:
    """Ask one plugin alone for its spec."""
    caller = pm.subset_hook_caller(
        "cometkit_plugin_spec", [p for n, p in pm.list_name_plugin() if n != name]
    )
    results = [r for r in caller() if r is not None]
    if not results:
        return PluginSpec()
    spec = results[0]
    if not isinstance(spec, PluginSpec):
        raise PluginError(
            f"plugin {name!r}: cometkit_plugin_spec must return a cometkit.PluginSpec, "
            f"got {type(spec).__name__}"
        )
    return spec


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if os.environ.get("COMETKIT_TRACE_HOOKS", "") not in ("", "0"):
        def before(hook_name: str, impls: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
            hook_logger.debug("hook %s -> %s", hook_name, [i.plugin_name for i in impls])

        def after(outcome: Any, hook_name: str, impls: Sequence[Any], kwargs: Any) -> None:
            hook_logger.debug("hook %s returned %r", hook_name, outcome.get_result())

        pm.add_hookcall_monitoring(before, after)
    return pm


def _register(pm: pluggy.PluginManager, info: PluginInfo) -> None:
    try:
        pm.register(info.plugin, name=info.name)
    except Exception as exc:  # pluggy validates hook names and signatures here
        raise PluginError(
            f"plugin {info.name!r} from package {info.distribution or info.module!r} breaks the "
            f"hook contract: {exc}"
        ) from exc
    info.hooks = sorted(
        impl.name for impl in pm.get_hookcallers(info.plugin) or []
    )


def registered_plugins(section: Mapping[str, Any]
                       ) -> tuple[list[PluginInfo], pluggy.PluginManager]:
    """Every discoverable plugin (those ``section`` names by module path too), each that
    loaded registered on a new manager with its spec and hooks read."""
    infos = discover_plugins(section)
    pm = _new_manager()
    for info in infos:
        if info.error is None:
            _register(pm, info)
            info.spec = _plugin_spec(pm, info.name)
    return infos, pm


def inspect_plugins(section: Optional[Mapping[str, Any]] = None) -> list[PluginInfo]:
    """Every discoverable plugin with its spec and hooks (for ``cometkit plugins``)."""
    return registered_plugins(section or {})[0]


def enabled_names(infos: Sequence[PluginInfo], section: Mapping[str, Any]) -> list[str]:
    """Names of the plugins a ``plugins:`` section turns on (configured, or on by default)."""
    names = []
    for info in infos:
        value = section.get(info.name, None if info.name in section else "default")
        if value == "default":
            on = info.spec.enabled_by_default
        else:
            on = value is not False
        if on:
            names.append(info.name)
    return names


def configure_plugins(infos: Sequence[PluginInfo], section: Mapping[str, Any],
                      where: str) -> dict[str, dict[str, Any]]:
    """Check a ``plugins:`` section against the discovered plugins (specs filled in).

    :returns: the validated options (defaults filled in) of every plugin the section enables.
    :raises ConfigError: for an unknown plugin name (listing the installed ones) or a bad option.
    :raises PluginError: when the section enables a plugin that failed to import.
    """
    by_name = {info.name: info for info in infos}
    for name in section:
        info = by_name.get(name)
        if info is None:
            installed = sorted(by_name)
            close = difflib.get_close_matches(str(name), installed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: plugins.{name}: unknown plugin {name!r}.{hint} Installed plugins: "
                f"{', '.join(installed) or 'none'}. Install the package that provides it, or "
                f"remove the key.", path=where, key=f"plugins.{name}")
        if info.error is not None and section[name] is not False:
            package = info.distribution or info.module
            raise PluginError(f"{where}: plugins.{name}: the plugin from package "
                              f"{package!r} failed to import: {info.error}")
    loaded = [info for info in infos if info.error is None]
    options: dict[str, dict[str, Any]] = {}
    for name in enabled_names(loaded, section):
        raw = section.get(name)
        options[name] = validate_section(by_name[name].spec.options,
                                         {} if raw is True or raw is None else raw,
                                         where=where, key_path=f"plugins.{name}")
    return options
