"""Running from a source checkout that was never installed.

The first-party plugins live in the checkout's top-level ``plugins/`` folder and are installed
as the package ``cometkit_plugins`` (``package_dir`` in ``setup.cfg``), registered through the
``cometkit`` entry points that ``setup.cfg`` lists. A checkout that was not installed has
neither the package name nor the entry points, so ``pytest`` or ``python -m cometkit`` from the
root would find no first-party plugin. When ``cometkit`` is imported from a checkout, this maps
``cometkit_plugins`` onto that checkout's ``plugins/`` (ahead of any installed copy, so the core
and its plugins are always the same version) and, when no installed ``cometkit`` distribution
lists entry points, reads them from ``setup.cfg``: the one list of them.
"""

from __future__ import annotations

import configparser
import importlib.abc
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

__all__ = ["checkout_root", "installed", "map_plugins_package", "entry_points_from_setup_cfg"]

#: The package name the ``plugins/`` folder is installed as.
PLUGINS_PACKAGE = "cometkit_plugins"
_ROOT = Path(__file__).resolve().parent.parent


def checkout_root() -> Optional[Path]:
    """The checkout ``cometkit`` was imported from, or ``None`` for an installed copy."""
    if (_ROOT / "setup.cfg").is_file() and (_ROOT / "plugins" / "__init__.py").is_file():
        return _ROOT
    return None


def installed() -> bool:
    """Whether a ``cometkit`` distribution is installed (perhaps editable): its metadata then
    lists the entry points."""
    try:
        metadata.distribution("cometkit")
    except metadata.PackageNotFoundError:
        return False
    return True


class _PluginsFolder(importlib.abc.MetaPathFinder):
    """Finds ``cometkit_plugins`` in the checkout's ``plugins/``; its submodules are found
    through the package's ``__path__`` as usual."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != PLUGINS_PACKAGE:
            return None
        return importlib.util.spec_from_file_location(
            name, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)])


def map_plugins_package() -> None:
    """Make ``import cometkit_plugins`` load the checkout's ``plugins/`` (once; a no-op for
    an installed copy of cometkit)."""
    root = checkout_root()
    if root is None or any(isinstance(f, _PluginsFolder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PluginsFolder(root / "plugins"))


def entry_points_from_setup_cfg(group: str) -> list:
    """The checkout's ``[options.entry_points]`` of ``group`` as entry points, when no
    installed ``cometkit`` distribution provides them; else ``[]``."""
    root = checkout_root()
    if root is None or installed():
        return []
    parser = configparser.ConfigParser()
    try:
        parser.read(root / "setup.cfg", encoding="utf-8")
        lines = parser.get("options.entry_points", group, fallback="")
    except (OSError, configparser.Error):
        return []
    points = []
    for line in lines.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() and value.strip():
            points.append(metadata.EntryPoint(name.strip(), value.strip(), group))
    return points
