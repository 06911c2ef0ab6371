"""``pip install .`` (not only ``-e``) yields a working install with every plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SMOKE = """
import importlib.metadata as md, json, sys
import cometkit, cometkit_plugins
eps = {e.name: e.value for e in md.entry_points(group="cometkit")}
client = cometkit.Client("k", "https://api.example.invalid/v1")
print(json.dumps({"file": cometkit.__file__, "plugins_pkg": cometkit_plugins.__file__,
                  "eps": eps, "active": client.plugins}))
client.close()
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, timeout=300,
                   cwd=str(out))
    (path,) = out.glob("cometkit-*.whl")
    return path


def test_wheel_contains_core_plugins_and_entry_points(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("cometkit/__init__.py", "cometkit/py.typed", "cometkit/hookspecs.py",
                   "cometkit_plugins/backoff.py", "cometkit_plugins/limiter.py",
                   "cometkit_plugins/csv_metrics.py", "cometkit_plugins/stdout_metrics.py",
                   "cometkit/sandbox/__init__.py"):
        assert module in names, module
    (eps,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(eps).decode()
    for line in ("backoff = cometkit_plugins.backoff", "limiter = cometkit_plugins.limiter",
                 "cometkit = cometkit.cli:main", "cometkit_sandbox = "):
        assert line in text


def test_installed_wheel_works_outside_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("COMETKIT_CONFIG", None)
    out = subprocess.run([sys.executable, "-c", SMOKE], env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    info = json.loads(out.stdout)
    assert info["file"].startswith(str(target)), "imported the source tree, not the install"
    assert info["plugins_pkg"].startswith(str(target))
    assert set(info["eps"]) >= {"backoff", "limiter", "csv_metrics", "stdout_metrics"}
    assert set(info["active"]) == {"backoff", "limiter"}
