"""The example third-party plugin (examples/plugin-example), installed the way users install it.

It is built and ``pip install``ed (offline, no build isolation) into a temporary directory,
then used from fresh interpreters with that directory on ``PYTHONPATH``: cometkit must find it
through its entry point, validate its YAML section, and call it. Nothing imports it from the
source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scripted_server import ScriptedServer

from cometkit import CALL_FIELDS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plugin-example"

#: Builds a client from the YAML file in argv[1] against the server in argv[2], makes three
#: calls, and reports where the plugin came from; a ConfigError is reported, not raised.
CALLER = """
import importlib.metadata, json, sys
import cometkit

yaml_path, base_url = sys.argv[1], sys.argv[2]
try:
    client = cometkit.Client.from_config(yaml_path, base_url=base_url, api_key="k")
except cometkit.ConfigError as exc:
    print(json.dumps({"error": str(exc), "path": exc.path, "key": exc.key}))
    sys.exit(0)
with client:
    for _ in range(3):
        client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    import cometkit_jsonl_sink
    print(json.dumps({
        "plugins": client.plugins,
        "module": cometkit_jsonl_sink.__file__,
        "version": importlib.metadata.version("cometkit-jsonl-sink"),
        "sink_errors": client.stats["sink_errors"],
    }))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the example: setuptools leaves build/ and *.egg-info next to the sources."""
    copy = tmp_path_factory.mktemp("plugin-example") / "project"
    shutil.copytree(EXAMPLE, copy,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    return copy


@pytest.fixture(scope="module")
def site(project):
    """The example installed with pip into a temporary directory (its ``--target``)."""
    work = project.parent
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "-q", "--target", str(target),
         str(project)],
        check=True, timeout=300, cwd=str(work),
    )
    return target


def run_python(args, site, cwd):
    """Run a fresh interpreter that sees ``site`` and none of the caller's cometkit settings."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("COMETKIT_", "COMETAPI_", "PYTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], env=env, cwd=str(cwd),
                          capture_output=True, text=True, timeout=120)


def run_caller(site, tmp_path, yaml_text, base_url="http://127.0.0.1:9/v1"):
    config = tmp_path / "cometkit.yaml"
    config.write_text(yaml_text, encoding="utf-8")
    out = run_python(["-c", CALLER, str(config), base_url], site, tmp_path)
    assert out.returncode == 0, out.stderr
    return config, json.loads(out.stdout.strip().splitlines()[-1])


def test_installed_plugin_is_discovered_configured_from_yaml_and_called(site, tmp_path):
    calls = tmp_path / "out" / "calls.jsonl"
    calls.parent.mkdir()
    yaml_text = f"plugins:\n  jsonl_sink:\n    path: {json.dumps(str(calls))}\n"
    with ScriptedServer() as server:
        _, report = run_caller(site, tmp_path, yaml_text, server.base_url)
        assert server.count == 3
    assert report["module"].startswith(str(site)), "used the source tree, not the install"
    assert report["version"] == "0.1.0"
    assert "jsonl_sink" in report["plugins"]
    assert report["sink_errors"] == 0
    lines = [json.loads(line) for line in calls.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert list(line) == ["record", *CALL_FIELDS]
        assert line["record"] == "call" and line["outcome"] == "ok"
        assert line["status_code"] == 200 and line["attempts"] == 1
        assert line["operation"] == "chat" and line["route"] == "/chat/completions"
        assert line["model"] == "m1" and line["server_address"] == "127.0.0.1"
        assert (line["input_tokens"], line["output_tokens"]) == (3, 2)
    assert len({line["request_id"] for line in lines}) == 3


def test_unknown_option_of_the_installed_plugin_names_file_key_and_suggestion(site, tmp_path):
    config, report = run_caller(site, tmp_path, "plugins:\n  jsonl_sink:\n    pth: x\n")
    assert report["key"] == "plugins.jsonl_sink.pth"
    assert report["path"] == str(config)
    assert str(config) in report["error"] and "plugins.jsonl_sink.pth" in report["error"]
    assert "Did you mean 'path'?" in report["error"]


def test_cli_lists_the_installed_plugin_with_its_distribution(site, tmp_path):
    out = run_python(["-m", "cometkit", "plugins"], site, tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if "jsonl_sink" in line]
    assert rows, out.stdout
    assert "cometkit-jsonl-sink" in rows[0] and "0.1.0" in rows[0]


def test_the_example_passes_its_own_tests_against_the_sandbox(project, site, tmp_path):
    # Run from elsewhere so the sources next to the tests cannot shadow the installed plugin.
    tests = project / "tests"
    out = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)], site,
                     tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " passed" in out.stdout and "skipped" not in out.stdout
