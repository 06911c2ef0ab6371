"""Every runnable example works against the sandbox, as its docstring says to run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cometkit.sandbox import Sandbox

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("script,expect", [
    ("quickstart.py", ["one call: echo: Say hello.", "pool: 20 answers, 0 failed"]),
    ("legacy_session.py", ["12 answers"]),
    ("openai_sdk.py", ["20 answers, stream: echo: Stream this."]),
    ("langchain_chat.py", ["invoke: echo: Say hello.", "stream: echo: Say it slowly.",
                           "calls through cometkit: 2"]),
])
def test_example_runs_against_the_sandbox(script, expect, tmp_path):
    run_example(script, expect, tmp_path)


def test_the_llamaindex_example_runs_against_the_sandbox(tmp_path):
    # llama-index-llms-openai pins an openai 2.x: .ci/run installs it apart, on PYTHONPATH
    pytest.importorskip("llama_index.llms.openai")
    run_example("llamaindex_complete.py", ["complete: echo: Say hello.",
                                           "calls through cometkit: 1"], tmp_path)


def run_example(script, expect, tmp_path):
    with Sandbox(api_key="sandbox") as sandbox:
        env = {**os.environ, "COMETAPI_BASE_URL": sandbox.base_url, "COMETAPI_KEY": "sandbox"}
        env.pop("COMETKIT_CONFIG", None)
        done = subprocess.run([sys.executable, str(EXAMPLES / script)], env=env,
                              cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
        attempts = sandbox.stats()["attempts"]
    assert done.returncode == 0, done.stderr
    for text in expect:
        assert text in done.stdout
    assert attempts > 0


def test_every_example_script_is_exercised_by_a_test():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    scripts = [p.name for p in EXAMPLES.glob("*.py")]
    assert scripts
    missing = [name for name in scripts if name not in tests]
    assert not missing, f"examples without a test: {missing}"
