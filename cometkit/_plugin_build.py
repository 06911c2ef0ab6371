"""Building one client's plugin objects: its retry policy, limiter and metrics sinks.

Once :mod:`cometkit._plugins` has found and configured the plugins, each client asks the
factory hooks once, each plugin with its own context, and checks that what came back keeps
the contract (the methods the engine calls). A failure names the plugin, and what was built
before it is closed again, so a client that cannot be built leaves nothing open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import pluggy

from ._exceptions import ConfigError, PluginError
from ._plugins import PluginInfo, configure_plugins, registered_plugins
from .context import ClientContext
from .plugin_api import Limiter, MetricsSink, RetryPolicy

__all__ = ["PluginSet", "build_plugins"]

logger = logging.getLogger("cometkit.plugins")


@dataclass
class PluginSet:
    """What a client got from its plugins."""

    manager: pluggy.PluginManager
    context: ClientContext
    infos: list[PluginInfo]
    retry_policy: Optional[RetryPolicy]
    limiter: Optional[Limiter]
    sinks: list[MetricsSink]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.manager.list_name_plugin()]

    def close(self) -> None:
        """Close the limiter and the sinks (best effort, each failure logged): for a client
        whose construction failed after its plugins were built."""
        _close_built([self.retry_policy, self.limiter, *self.sinks])


def _close_built(objects: Sequence[Any]) -> None:
    """Close what factories built, the last built first; never raises (the caller is already
    handling the error that made this necessary)."""
    for obj in reversed(objects):
        close = getattr(obj, "close", None)
        if not callable(close):
            continue
        try:
            close()
        except Exception:
            logger.warning("closing %r after a failed client construction failed too", obj,
                           exc_info=True)


def _check_section(section: Any, where: str) -> dict[str, Any]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: plugins: must be a mapping of plugin names to true, false "
                          f"or options, got {section!r}", path=where, key="plugins")
    return section


def _call_factory(pm: pluggy.PluginManager, hook_name: str, ctx: ClientContext, *,
                  plugin: Any) -> Any:
    """Call ``plugin``'s implementation of a factory hook with that plugin's own context; a
    failure is a :class:`PluginError` naming the plugin."""
    name = pm.get_name(plugin) or repr(plugin)
    caller = pm.subset_hook_caller(hook_name, [p for p in pm.get_plugins() if p is not plugin])
    try:
        made = caller(ctx=ctx.for_plugin(name))
    except (ConfigError, PluginError):
        raise
    except Exception as exc:
        raise PluginError(f"{hook_name} failed in plugin(s) {[name]}: "
                          f"{type(exc).__name__}: {exc}") from exc
    if caller.spec is not None and caller.spec.opts.get("firstresult"):
        return made
    return next((one for one in made if one is not None), None)  # one plugin: one result


def _factories(pm: pluggy.PluginManager, hook_name: str, ctx: ClientContext) -> list[Any]:
    """The plugins implementing ``hook_name``, in pluggy's call order (tryfirst first). With
    none, the hook is still called once (answering nothing), so COMETKIT_TRACE_HOOKS shows
    that it was asked."""
    caller = getattr(pm.hook, hook_name)
    plugins = [impl.plugin for impl in reversed(caller.get_hookimpls())]
    if not plugins:
        caller(ctx=ctx)
    return plugins


def _make_one(pm: pluggy.PluginManager, hook_name: str, ctx: ClientContext) -> Any:
    """A ``firstresult`` factory hook, asked plugin by plugin (each with its own context)
    until one returns something."""
    for plugin in _factories(pm, hook_name, ctx):
        made = _call_factory(pm, hook_name, ctx, plugin=plugin)
        if made is not None:
            return made
    return None


def _make_sinks(pm: pluggy.PluginManager, ctx: ClientContext, built: list[Any]) -> list[Any]:
    """Ask each sink factory on its own, in pluggy's call order, appending each sink to
    ``built`` as soon as it exists: one pluggy call would drop the sinks already made when a
    later factory raises, and they could not be closed (a metrics port left bound)."""
    hook_name = "cometkit_make_metrics_sink"
    sinks = []
    for plugin in _factories(pm, hook_name, ctx):
        sink = _call_factory(pm, hook_name, ctx, plugin=plugin)
        if sink is not None:
            built.append(sink)
            sinks.append(sink)
    return sinks


def _require(obj: Any, methods: Sequence[str], what: str, hook_name: str,
             pm: pluggy.PluginManager) -> None:
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        owners = [impl.plugin_name for impl in getattr(pm.hook, hook_name).get_hookimpls()]
        raise PluginError(f"{hook_name} (plugins {owners}) returned {type(obj).__name__}, "
                          f"which is not a {what}: missing {', '.join(missing)}()")


def build_plugins(
    section: Any,
    *,
    where: str,
    context_args: Mapping[str, Any],
    extra_plugins: Sequence[Any] = (),
) -> PluginSet:
    """Discover, enable, validate and instantiate the plugins of one client.

    :param section: the raw ``plugins:`` mapping from the configuration.
    :param where: the config file name (or ``<dict>``) for error messages.
    :param context_args: the :class:`ClientContext` fields other than ``plugin_options``.
    :param extra_plugins: plugin objects registered directly (programmatic use and tests);
        they are always enabled.
    """
    section = _check_section(section, where)
    infos, pm = registered_plugins(section)
    options: dict[str, Mapping[str, Any]] = dict(configure_plugins(infos, section, where))
    for info in infos:
        if info.error is None and info.name not in options:
            pm.unregister(name=info.name)
    for index, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{index}"
        pm.register(plugin, name=name)
        options.setdefault(name, {})
    ctx = ClientContext(plugin_options=options, enabled_plugins=frozenset(options),
                        **context_args)
    built: list[Any] = []  # closed again if a later factory or check fails
    try:
        policy = _make_one(pm, "cometkit_make_retry_policy", ctx)
        built.append(policy)
        if policy is not None:
            _require(policy, ("decide", "on_call_start"), "RetryPolicy",
                     "cometkit_make_retry_policy", pm)
        limiter = _make_one(pm, "cometkit_make_limiter", ctx)
        built.append(limiter)
        if limiter is not None:
            _require(limiter, ("acquire", "release", "close"), "Limiter",
                     "cometkit_make_limiter", pm)
        sinks = _make_sinks(pm, ctx, built)
        for sink in sinks:
            _require(sink, ("record_attempt", "record_call", "flush", "close"), "MetricsSink",
                     "cometkit_make_metrics_sink", pm)
    except BaseException:
        _close_built(built)
        raise
    return PluginSet(pm, ctx, infos, policy, limiter, sinks)
