"""Documentation that cannot drift from the code it describes."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from cometkit import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def hook_names():
    return sorted(name for name, obj in vars(hookspecs).items()
                  if name.startswith("cometkit_") and inspect.isfunction(obj))


def test_every_hook_is_documented_with_its_signature_as_heading():
    text = (ROOT / "docs" / "plugins.md").read_text()
    headings = re.findall(r"^### `(cometkit_\w+)\((.*?)\)", text, flags=re.M)
    documented = {name: params for name, params in headings}
    assert hook_names(), "no hookspecs found"
    for name in hook_names():
        assert name in documented, f"hook {name} is not documented in docs/plugins.md"
        params = list(inspect.signature(getattr(hookspecs, name)).parameters)
        for param in params:
            assert param in documented[name], f"{name}: parameter {param} missing from heading"


def test_every_hookspec_has_a_pytest_style_docstring():
    for name in hook_names():
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert doc.splitlines()[0].endswith("."), name
        assert ":returns:" in doc, name
        for param in inspect.signature(getattr(hookspecs, name)).parameters:
            assert f":param {param}:" in doc, f"{name}: :param {param}: missing"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S)
    assert block and readme.index("```bash") < 200, "README must open with the commands"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert "cometkit batch" in lines[0] and "--sandbox" in lines[0]
    assert "pytest" in lines[1]
    assert lines[1] in (ROOT / ".ci" / "run").read_text()


def test_generated_reference_tables_are_up_to_date():
    from cometkit._docgen import DOC_BLOCKS, extract_block

    for relative, name, render in DOC_BLOCKS:
        text = (ROOT / relative).read_text()
        block = extract_block(text, name)
        assert block is not None, f"{relative}: markers for {name} missing"
        assert block == render().strip() + "\n", (
            f"{relative}: {name} is stale; run python -m cometkit._docgen")


def test_mkdocs_strict_build_passes(tmp_path):
    pytest.importorskip("mkdocs")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "index.html").exists()
