"""A checkout works as a checkout: ``python -m cometkit`` and ``pytest`` from the root load the
checkout's own first-party plugins, installed or not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import cometkit
from cometkit import _checkout

ROOT = Path(cometkit.__file__).resolve().parent.parent


def test_setup_cfg_lists_exactly_the_entry_points_an_install_registers(monkeypatch):
    installed = {(ep.name, ep.value) for ep in metadata.entry_points().select(group="cometkit")
                 if ep.dist is not None and ep.dist.metadata["Name"] == "cometkit"}
    assert installed, "the suite runs on an installed cometkit (README's test command)"

    def not_installed(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_checkout.metadata, "distribution", not_installed)
    from_cfg = {(ep.name, ep.value) for ep in _checkout.entry_points_from_setup_cfg("cometkit")}
    assert from_cfg == installed


def test_an_installed_cometkit_reads_no_entry_points_from_setup_cfg():
    assert _checkout.entry_points_from_setup_cfg("cometkit") == []


@pytest.mark.timeout(120)
def test_a_copied_checkout_runs_its_own_plugins(tmp_path):
    """A second checkout beside the installed one: its ``python -m cometkit`` must load its
    own ``plugins/`` (never the installed copy's), with no import warnings."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("cometkit", "plugins"):
        shutil.copytree(ROOT / name, copy / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", copy / "setup.cfg")
    probe = ("import cometkit, cometkit_plugins.backoff as b; "
             "print(cometkit.__file__); print(b.__file__)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=copy, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    core, plugin = done.stdout.split()
    assert Path(core).is_relative_to(copy) and Path(plugin).is_relative_to(copy / "plugins")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"custom_id": "a", "model": "m", "prompt": "hi"}\n', encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "cometkit", "batch", str(prompts), "-o",
                          str(tmp_path / "out.jsonl"), "--sandbox"], cwd=copy,
                         capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr
    assert "failed to import" not in run.stderr
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8").count("\n") == 1
