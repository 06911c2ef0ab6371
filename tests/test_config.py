"""YAML configuration: finding, safe loading, ${VAR} references, validation, redaction, docs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from cometkit import ConfigError
from cometkit._docgen import extract_block, reference_markdown, replace_block
from cometkit.config import (
    CONFIG_ENV,
    CORE_OPTIONS,
    DEFAULT_TIMEOUT_S,
    LoadedConfig,
    dump_yaml,
    load_config,
    redact,
)
from cometkit.options import Option

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = {
    "base_url": None,
    "api_key": None,
    "timeout": DEFAULT_TIMEOUT_S,
    "deadline": None,
    "priorities": ["interactive", "default", "batch"],
    "priority": None,
    "concurrency": 5,
    "verify": True,
    "allow_insecure_http": False,
    "prices": {},
    "plugins": {},
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in (CONFIG_ENV, "COMETAPI_KEY", "COMETAPI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str, name: str = "cometkit.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(source, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(source, **kw)
    return info.value


# -- reading files ---------------------------------------------------------------------------


def test_full_file_is_validated_and_normalised(tmp_path):
    ca = write(tmp_path, "not really a certificate", "ca.pem")
    path = write(tmp_path, f"""
base_url: https://proxy.example.com/v1
api_key: sk-literal
timeout: {{connect: 3, read: 45.5}}
deadline: 1m30s
priorities: [urgent, normal, bulk]
priority: bulk
concurrency: 32
verify: {ca}
allow_insecure_http: false
prices:
  gpt-4o-mini: {{input: 0.15, output: 0.6}}
  text-embedding-3-small: {{input: 0.02, output: 0}}
plugins:
  backoff: {{max_attempts: 3, retry_on: [429, 503]}}
  limiter: false
  stdout_metrics: true
  csv_metrics:
""")
    loaded = load_config(str(path))
    assert isinstance(loaded, LoadedConfig)
    assert loaded.path == str(path) and loaded.where == str(path)
    assert loaded.data == {
        "base_url": "https://proxy.example.com/v1",
        "api_key": "sk-literal",
        "timeout": (3.0, 45.5),
        "deadline": 90.0,
        "priorities": ["urgent", "normal", "bulk"],
        "priority": "bulk",
        "concurrency": 32,
        "verify": str(ca),
        "allow_insecure_http": False,
        "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.6},
                   "text-embedding-3-small": {"input": 0.02, "output": 0.0}},
        "plugins": {"backoff": {"max_attempts": 3, "retry_on": [429, 503]}, "limiter": False,
                    "stdout_metrics": True, "csv_metrics": None},
    }
    assert list(loaded.data) == list(CORE_OPTIONS)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path, text):
    assert load_config(write(tmp_path, text)).data == DEFAULTS


def test_no_source_and_no_env_gives_defaults():
    loaded = load_config()
    assert loaded.data == DEFAULTS and loaded.path is None and loaded.where == "<defaults>"


def test_pathlike_source(tmp_path):
    assert load_config(write(tmp_path, "concurrency: 2\n")).data["concurrency"] == 2


def test_cometkit_config_names_the_default_file(tmp_path, monkeypatch):
    path = write(tmp_path, "concurrency: 7\n")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    loaded = load_config()
    assert loaded.data["concurrency"] == 7 and loaded.path == str(path)
    # an explicit source wins over the environment
    assert load_config({"concurrency": 3}).data["concurrency"] == 3


def test_missing_file_named_by_cometkit_config(tmp_path, monkeypatch):
    missing = tmp_path / "nope.yaml"
    monkeypatch.setenv(CONFIG_ENV, str(missing))
    error = error_of(None)
    assert str(missing) in str(error) and CONFIG_ENV in str(error)
    assert "not found" in str(error) and error.path == str(missing)


def test_missing_explicit_file(tmp_path):
    missing = tmp_path / "absent.yaml"
    error = error_of(str(missing))
    assert str(error).startswith(f"{missing}: configuration file not found")
    assert CONFIG_ENV not in str(error)


def test_directory_is_not_a_file(tmp_path):
    assert "cannot read the configuration file" in str(error_of(str(tmp_path)))


def test_dict_source_is_labelled_in_errors():
    loaded = load_config({"concurrency": 4})
    assert loaded.data["concurrency"] == 4 and loaded.path is None and loaded.where == "<dict>"
    error = error_of({"concurrency": "four"})
    assert str(error).startswith("<dict>: concurrency: must be an integer")
    assert error.path is None and error.key == "concurrency"


def test_source_of_the_wrong_type():
    assert "must be a path to a YAML file or a mapping" in str(error_of(42))


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    message = str(error_of(path))
    assert message.startswith(f"{path}: top level: must be a mapping") and kind in message


# -- YAML errors and safety ------------------------------------------------------------------


def test_yaml_syntax_error_gives_file_line_and_column(tmp_path):
    path = write(tmp_path, "concurrency: 5\nbase_url: a: b\n")
    error = error_of(path)
    assert str(error).startswith(f"{path}: line 2, column 12: invalid YAML: mapping values")
    assert error.path == str(path)


def test_unclosed_flow_sequence_points_at_both_ends(tmp_path):
    message = str(error_of(write(tmp_path, "concurrency: 5\ntimeout: [1, 2\nplugins: {}\n")))
    assert "line 3, column 8" in message and "began at line 2, column 10" in message


@pytest.mark.parametrize("tag, args", [
    ("!!python/object/apply:os.system", '["touch {marker}"]'),
    ("!!python/object/apply:builtins.open", '["{marker}", "w"]'),
    ("!!python/object/new:builtins.open", '["{marker}", "w"]'),
])
def test_unsafe_tags_are_refused_and_never_run(tmp_path, tag, args):
    marker = tmp_path / "hacked"
    path = write(tmp_path, "concurrency: 5\nplugins:\n  x: " + tag + " "
                 + args.format(marker=marker) + "\n")
    message = str(error_of(path))
    assert message.startswith(f"{path}: line 3, column 6: tag {tag} is not allowed")
    assert "safe loading only" in message
    assert not marker.exists()


def test_python_name_and_custom_tags_are_refused(tmp_path):
    assert "tag !!python/name:os.system is not allowed" in str(
        error_of(write(tmp_path, "api_key: !!python/name:os.system ''\n")))
    assert "tag !secret is not allowed" in str(error_of(write(tmp_path, "api_key: !secret x\n")))


def test_duplicate_keys_are_an_error(tmp_path):
    message = str(error_of(write(tmp_path, "concurrency: 5\nbase_url: x\nconcurrency: 50\n")))
    assert "line 3, column 1: duplicate key 'concurrency' (first given on line 1)" in message


@pytest.mark.parametrize("text, line, words", [
    ("retry_on: &a [429, *a]\n", 1, "alias *a is inside its own anchor &a"),
    ("concurrency: 3\nplugins:\n  backoff:\n    retry_on: &a\n      - 429\n      - *a\n", 6,
     "recursive alias"),
    ("x: &m\n  y: *m\n", 2, "recursive alias"),
    ("timeout: " + "[" * 5000 + "]" * 5000 + "\n", 1, "nested more than 64 levels"),
    ("plugins:\n  backoff:\n    retry_on: " + "[" * 70 + "]" * 70 + "\n", 3,
     "nested more than 64 levels"),
    # short in the file, deep once aliases are expanded: each anchor wraps the previous one
    ("".join(f"a{i}: &a{i} " + "[" * 30 + (f"*a{i - 1}" if i else "1") + "]" * 30 + "\n"
             for i in range(40)), 1, "once its aliases are expanded"),
])
def test_recursive_or_too_deep_yaml_is_a_config_error_with_file_and_line(tmp_path, text, line,
                                                                         words):
    """Not a RecursionError, from the loader or from anything that walks the values later."""
    path = write(tmp_path, text)
    error = error_of(path)
    assert str(error).startswith(f"{path}: line {line}, column ")
    assert words in str(error) and error.path == str(path)


def test_nesting_up_to_the_limit_is_accepted(tmp_path):
    from cometkit._yaml import MAX_CONFIG_DEPTH

    # the top-level mapping is one level, `timeout` holds the rest
    nested = "[" * (MAX_CONFIG_DEPTH - 1) + "]" * (MAX_CONFIG_DEPTH - 1)
    assert "must be" in str(error_of(write(tmp_path, f"timeout: {nested}\n")))  # not too deep
    shared = "a: &a [1, 2]\nb: [*a, *a, *a]\nconcurrency: 3\n"  # aliases without a cycle
    with pytest.raises(ConfigError, match="unknown key 'a'"):
        load_config(write(tmp_path, shared, "shared.yaml"))


# -- ${VAR} references -----------------------------------------------------------------------


def test_env_references_both_forms_and_escape(tmp_path, monkeypatch):
    monkeypatch.setenv("CK_HOST", "gw.example.com")
    monkeypatch.setenv("CK_KEY", "sk-from-env")
    monkeypatch.setenv("CK_EMPTY", "")
    monkeypatch.delenv("CK_UNSET", raising=False)
    path = write(tmp_path, """
base_url: https://${CK_HOST}/v1
api_key: ${CK_KEY}
plugins:
  csv_metrics:
    path: ${CK_UNSET:-metrics.csv}
    label: ${CK_EMPTY:-fallback}
    literal: price $${NOT_A_VAR} and $5
    set_but_empty: "${CK_EMPTY}"
    items: ["${CK_HOST}", "${CK_UNSET:-}", 3]
""")
    data = load_config(path).data
    assert data["base_url"] == "https://gw.example.com/v1"
    assert data["api_key"] == "sk-from-env"
    assert data["plugins"]["csv_metrics"] == {
        "path": "metrics.csv",
        "label": "fallback",
        "literal": "price ${NOT_A_VAR} and $5",
        "set_but_empty": "",
        "items": ["gw.example.com", "", 3],
    }


def test_unset_variable_names_file_key_path_and_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("CK_METRICS_DIR", raising=False)
    path = write(tmp_path, "plugins:\n  csv_metrics:\n    path: ${CK_METRICS_DIR}/m.csv\n")
    error = error_of(path)
    assert str(error) == (
        f"{path}: plugins.csv_metrics.path: environment variable CK_METRICS_DIR is not set. "
        "Export it, or write ${CK_METRICS_DIR:-default} to give a default.")
    assert error.key == "plugins.csv_metrics.path"


def test_unset_variable_inside_a_list_names_the_index(tmp_path, monkeypatch):
    monkeypatch.delenv("CK_CODE", raising=False)
    text = 'plugins:\n  backoff:\n    retry_on: [429, "${CK_CODE}"]\n'
    message = str(error_of(write(tmp_path, text)))
    assert "plugins.backoff.retry_on[1]: environment variable CK_CODE is not set" in message


@pytest.mark.parametrize("text", ["${1BAD}", "${}", "${OPEN", "${A:B}"])
def test_malformed_reference(tmp_path, text):
    message = str(error_of({"base_url": f"x{text}"}))
    assert message.startswith("<dict>: base_url: malformed environment reference")


def test_whole_value_references_take_the_type_the_key_wants(tmp_path, monkeypatch):
    monkeypatch.setenv("CK_WORKERS", "8")
    monkeypatch.setenv("CK_TIMEOUT", "2.5")
    monkeypatch.setenv("CK_INSECURE", "true")
    monkeypatch.setenv("CK_KEY", "12345")
    monkeypatch.setenv("CK_CSV_ON", "false")
    path = write(tmp_path, """
concurrency: ${CK_WORKERS}
timeout: {connect: "${CK_TIMEOUT}", read: "${CK_READ:-90s}"}
allow_insecure_http: ${CK_INSECURE}
api_key: ${CK_KEY}
base_url: ${CK_BASE:-}
plugins:
  csv_metrics: ${CK_CSV_ON}
  stdout_metrics: ${CK_STDOUT:-true}
""")
    data = load_config(path).data
    assert data["concurrency"] == 8 and isinstance(data["concurrency"], int)
    assert data["timeout"] == (2.5, 90.0)
    assert data["allow_insecure_http"] is True
    assert data["api_key"] == "12345" and type(data["api_key"]) is str  # str option keeps text
    assert data["base_url"] is None  # empty whole reference to a nullable key
    assert data["plugins"] == {"csv_metrics": False, "stdout_metrics": True}


def test_reference_inside_longer_text_stays_text(monkeypatch):
    monkeypatch.setenv("CK_N", "8")
    error = error_of({"concurrency": "${CK_N}0 workers"})
    assert "concurrency: must be an integer" in str(error)


def test_bad_value_from_the_environment_names_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("CK_WORKERS", "many")
    path = write(tmp_path, "concurrency: ${CK_WORKERS}\n")
    assert str(error_of(path)) == (f"{path}: concurrency: must be an integer between 1 and "
                                   "1024, got 'many' (from ${CK_WORKERS})")


def test_interpolated_plugin_values_reach_plugin_validation_as_numbers(monkeypatch):
    """Plugin sections stay raw here; the plugin manager's validate_section reads them."""
    from cometkit.options import validate_section

    monkeypatch.setenv("CK_ATTEMPTS", "6")
    monkeypatch.setenv("CK_CODES", "503")
    raw = load_config({"plugins": {"backoff": {"max_attempts": "${CK_ATTEMPTS}",
                                               "retry_on": [429, "${CK_CODES}"]}}}).data
    schema = {"max_attempts": Option("int", default=5, minimum=1),
              "retry_on": Option("list", default=[429], choices=[429, 500, 503])}
    assert validate_section(schema, raw["plugins"]["backoff"]) == {"max_attempts": 6,
                                                                    "retry_on": [429, 503]}


# -- validation messages ---------------------------------------------------------------------


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "concurency: 8\n")
    error = error_of(path)
    assert str(error).startswith(
        f"{path}: concurency: unknown key 'concurency'. Did you mean 'concurrency'? Allowed keys:")
    assert error.key == "concurency" and error.path == str(path)


@pytest.mark.parametrize("text, key, words", [
    ("concurrency: lots\n", "concurrency", "must be an integer between 1 and 1024, got 'lots'"),
    ("concurrency: 0\n", "concurrency", "got 0"),
    ("concurrency: 5000\n", "concurrency", "got 5000"),
    ("concurrency: 2.5\n", "concurrency", "got 2.5"),
    ("allow_insecure_http: 1\n", "allow_insecure_http", "must be true or false, got 1"),
    ("base_url: [a]\n", "base_url", "must be a string or null, got ['a']"),
    ("plugins: [backoff]\n", "plugins", "must be a mapping of plugin names"),
    ("plugins: {backoff: 3}\n", "plugins.backoff", "must be true (enable with defaults), false"),
    ("plugins: {backoff: [1]}\n", "plugins.backoff", "or a mapping of the plugin's options"),
    ("verify: 3\n", "verify", "must be true, false (warns loudly) or the path of a CA bundle"),
    ("verify: /no/such/ca.pem\n", "verify", "CA bundle '/no/such/ca.pem' does not exist"),
])
def test_wrong_values_name_file_and_key_path(tmp_path, text, key, words):
    path = write(tmp_path, text)
    error = error_of(path)
    assert str(error).startswith(f"{path}: {key}: ")
    assert words in str(error)
    assert error.key == key


def test_secret_values_never_appear_in_errors(tmp_path):
    error = error_of(write(tmp_path, "api_key: 987654321123\n"))
    assert "api_key: must be a string or null" in str(error)
    assert "987654321123" not in str(error) and "value hidden" in str(error)


# -- timeout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (30, (30.0, 30.0)),
    (0.5, (0.5, 0.5)),
    ("90s", (90.0, 90.0)),
    ("2m", (120.0, 120.0)),
    ({"connect": 2}, (2.0, DEFAULT_TIMEOUT_S[1])),
    ({"read": "1m"}, (DEFAULT_TIMEOUT_S[0], 60.0)),
    ({"connect": 1, "read": 2}, (1.0, 2.0)),
    ([4, 40], (4.0, 40.0)),
    ((4, 40), (4.0, 40.0)),
])
def test_timeout_forms(value, expected):
    assert load_config({"timeout": value}).data["timeout"] == expected


@pytest.mark.parametrize("value, key, words", [
    (0, "timeout", "seconds > 0"),
    (-3, "timeout", "got -3"),
    (True, "timeout", "got True"),
    ("soon", "timeout", "got 'soon'"),
    (float("inf"), "timeout", "got inf"),
    ([1, 2, 3], "timeout", "a list of 3 items"),
    ({"read": 0}, "timeout.read", "must be seconds > 0"),
    ({"connect": "x"}, "timeout.connect", "got 'x'"),
    ({"conect": 1}, "timeout.conect", "Did you mean 'connect'?"),
])
def test_timeout_errors(value, key, words):
    error = error_of({"timeout": value})
    assert str(error).startswith(f"<dict>: {key}: ") and words in str(error)


# -- overrides -------------------------------------------------------------------------------


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, """
concurrency: 4
timeout: 30
plugins: {backoff: {max_attempts: 2}, csv_metrics: {path: a.csv}}
""")
    data = load_config(path, overrides={"concurrency": 12, "timeout": {"read": 5},
                                        "api_key": None,
                                        "plugins": {"csv_metrics": {"path": "b.csv"}}}).data
    assert data["concurrency"] == 12
    assert data["timeout"] == (DEFAULT_TIMEOUT_S[0], 5.0)
    assert data["api_key"] is None  # None means "not given", not "override to null"
    assert data["plugins"] == {"backoff": {"max_attempts": 2}, "csv_metrics": {"path": "b.csv"}}


def test_unknown_override_suggests_the_closest():
    error = error_of(None, overrides={"concurency": 3})
    assert str(error).startswith("<keyword arguments>: concurency: unknown key 'concurency'. "
                                 "Did you mean 'concurrency'?")


def test_invalid_override_is_named_as_an_argument():
    assert str(error_of({}, overrides={"concurrency": 0})).startswith(
        "<keyword arguments>: concurrency: must be an integer")


# -- redaction and display -------------------------------------------------------------------


def test_redact_hides_the_key_everywhere(tmp_path, monkeypatch):
    marker = "sk-UNIQUE-MARKER-7f3a9c"
    monkeypatch.setenv("CK_SECRET", marker)
    path = write(tmp_path, """
api_key: ${CK_SECRET}
base_url: https://gw.example.com/v1?key=${CK_SECRET}
plugins:
  csv_metrics: {path: "/tmp/${CK_SECRET}.csv", note: "${CK_SECRET}"}
  redis_limiter: {password: hunter2-hunter2, url: redis://x}
""")
    data = load_config(path).data
    schemas = {"redis_limiter": {"password": Option("str", secret=True),
                                 "url": Option("str")}}
    shown = redact(data, plugin_schemas=schemas)
    text = dump_yaml(shown)
    assert marker not in text and "hunter2-hunter2" not in text
    assert shown["api_key"] == "***"
    assert shown["base_url"] == "https://gw.example.com/v1?key=***"
    assert shown["plugins"]["csv_metrics"] == {"path": "/tmp/***.csv", "note": "***"}
    assert shown["plugins"]["redis_limiter"] == {"password": "***", "url": "redis://x"}
    # the input is left untouched
    assert data["api_key"] == marker


def test_redact_hides_the_environment_key_and_keeps_unset_visible(monkeypatch):
    marker = "sk-ENV-ONLY-MARKER-1b2c"
    monkeypatch.setenv("COMETAPI_KEY", marker)
    data = load_config({"plugins": {"csv_metrics": {"path": f"{marker}.csv"}}}).data
    shown = redact(data)
    assert shown["api_key"] is None  # unset is worth seeing
    assert marker not in dump_yaml(shown)


def test_redact_extra_secrets_and_short_values():
    data = load_config({"api_key": "abc", "base_url": "https://abc.example.com"}).data
    shown = redact(data, secrets=["example"])
    assert shown["api_key"] == "***"
    # a short key is hidden where it is the whole value, not inside every other string
    assert shown["base_url"] == "https://abc.***.com"


def test_dump_yaml_round_trips_the_effective_config(tmp_path, monkeypatch):
    monkeypatch.setenv("CK_W", "9")
    data = load_config({"concurrency": "${CK_W}", "timeout": {"connect": 2, "read": 20},
                        "plugins": {"backoff": {"label": "${CK_W}"}}}).data
    text = dump_yaml(data)
    assert "timeout: [2.0, 20.0]\n" in text
    assert text.index("base_url") < text.index("concurrency") < text.index("plugins")
    assert load_config(yaml.safe_load(text)).data == data


# -- the example file and the docs -----------------------------------------------------------


def test_example_file_loads_and_shows_every_key(monkeypatch):
    monkeypatch.setenv("COMETAPI_KEY", "sk-example-test")
    path = REPO / "examples" / "cometkit.yaml"
    data = load_config(path).data
    assert data["api_key"] == "sk-example-test"
    assert data["base_url"] == "https://api.cometapi.com/v1"
    assert data["timeout"] == DEFAULT_TIMEOUT_S and data["concurrency"] == 5
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == set(CORE_OPTIONS)
    assert {"backoff", "limiter", "csv_metrics"} <= set(data["plugins"])
    text = path.read_text()
    for key in ("retry_on", "max_attempts", "base_delay", "max_delay", "jitter",
                "max_retry_after", "deadline", "budget_ratio", "max_concurrency",
                "requests_per_minute", "tokens_per_minute", "burst", "adaptive", "models",
                "path", "format", "summary"):
        assert f"{key}:" in text, key


@pytest.mark.parametrize("plugin", ["backoff", "limiter", "csv_metrics", "stdout_metrics"])
def test_example_file_shows_and_fits_each_first_party_plugin(monkeypatch, plugin):
    """Every option a first-party plugin declares is in the example, and its section is valid."""
    from cometkit.options import validate_section

    module = pytest.importorskip(f"cometkit_plugins.{plugin}")
    options = module.cometkit_plugin_spec().options
    monkeypatch.setenv("COMETAPI_KEY", "sk-example-test")
    path = REPO / "examples" / "cometkit.yaml"
    section = load_config(path).data["plugins"].get(plugin)
    if isinstance(section, dict):
        validate_section(options, section, where=str(path), key_path=f"plugins.{plugin}")
    text = path.read_text()
    missing = [name for name in options if f"{name}:" not in text]
    assert not missing, f"examples/cometkit.yaml does not show plugins.{plugin}: {missing}"


def test_example_file_needs_the_key_in_the_environment():
    path = REPO / "examples" / "cometkit.yaml"
    assert "api_key: environment variable COMETAPI_KEY is not set" in str(error_of(path))


def test_configuration_doc_holds_the_generated_core_table():
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    block = extract_block(doc, "core-options")
    assert block is not None, "docs/configuration.md lost its core-options markers"
    assert block == reference_markdown(CORE_OPTIONS, ""), (
        "docs/configuration.md is stale: run `python -m cometkit._docgen`")
    for name in CORE_OPTIONS:
        assert f"| `{name}` |" in block


def test_reference_markdown_recurses_into_children():
    schema = {
        "models": Option("mapping", help="per model", children={
            "burst": Option("int", default=3, minimum=1, help="a | b")}),
        "tls": Option("section", children={"ca": Option("str", default="x`y", example="/ca")}),
        "token": Option("str", secret=True, nullable=True),
    }
    text = reference_markdown(schema, "Example", level=2)
    lines = text.splitlines()
    assert lines[0] == "## Example"
    assert "| `models.<name>.burst` | an integer >= 1 | `3` | a \\| b |  |" in lines
    assert "| `tls.ca` | a string | `` x`y `` |  | `/ca` |" in lines
    assert "| `token` | a string or null | `null` |  |  |" in lines


def test_replace_block_rewrites_only_between_markers():
    text = "a\n<!-- t:start -->\nold\n<!-- t:end -->\nb\n"
    updated = replace_block(text, "t", "new\n")
    assert updated == "a\n<!-- t:start -->\nnew\n<!-- t:end -->\nb\n"
    assert extract_block(updated, "t") == "new\n"
    with pytest.raises(ValueError):
        replace_block("no markers", "t", "x")


def test_docgen_check_mode_reports_a_stale_doc(tmp_path):
    import shutil

    from cometkit import _docgen

    shutil.copytree(Path(__file__).resolve().parent.parent / "docs", tmp_path / "docs")
    doc = tmp_path / "docs" / "configuration.md"
    doc.write_text("<!-- core-options:start -->\nstale\n<!-- core-options:end -->\n")
    assert _docgen.main(["--check", str(tmp_path)]) == 1
    assert "stale" in doc.read_text()
    assert _docgen.main([str(tmp_path)]) == 0
    assert _docgen.main(["--check", str(tmp_path)]) == 0
    assert os.path.getsize(doc) > 100


@pytest.mark.parametrize("text, expected", [
    ("prices:\n  gpt-4o-mini: {input: 0.15}\n",
     "prices.gpt-4o-mini.output: required key missing; add it: a number >= 0."),
    ("prices:\n  gpt-4o-mini:\n",
     "prices.gpt-4o-mini.input: required key missing; add it: a number >= 0."),
    ("prices:\n  gpt-4o-mini: {input: -1, output: 1}\n",
     "prices.gpt-4o-mini.input: must be a number >= 0, got -1"),
    ("prices:\n  gpt-4o-mini: {inptu: 1, output: 1}\n",
     "prices.gpt-4o-mini.inptu: unknown key 'inptu'. Did you mean 'input'?"),
    ("prices: [0.15, 0.6]\n", "prices: must be a mapping of names to sections"),
])
def test_prices_are_checked_per_model_naming_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: {expected}")
    assert info.value.path == str(path)
