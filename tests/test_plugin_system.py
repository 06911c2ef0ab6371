"""Plugin discovery, enabling, configuration and the hook contract, end to end."""

from __future__ import annotations

import logging
import sys

import pytest
from scripted_server import ScriptedServer, json_reply

import cometkit
from cometkit import ConfigError, PluginError, PluginSpec, RetryDecision

KEY = "sk-plugin-test-key"

FAKE_PLUGIN = '''
import cometkit
from cometkit import Option, PluginSpec, RetryDecision

CALLS = []

@cometkit.hookimpl
def cometkit_plugin_spec():
    return PluginSpec(options={"label": Option("str", default="none", help="a label"),
                               "retries": Option("int", default=1, minimum=0)},
                      summary="test plugin")

class Policy:
    def __init__(self, options):
        self.options = options
    def on_call_start(self, request):
        CALLS.append(("start", request.route))
    def decide(self, result):
        CALLS.append(("decide", result.attempt, result.status_code))
        if result.attempt <= self.options["retries"]:
            return RetryDecision(True, 0.0, "fake")
        return RetryDecision(False)

@cometkit.hookimpl
def cometkit_make_retry_policy(ctx):
    CALLS.append(("options", dict(ctx.options("fake_retry"))))
    return Policy(ctx.options("fake_retry"))
'''


def install_fake_distribution(tmp_path, monkeypatch, name, module_source, module="fake_plugin_mod",
                              dist="fake-cometkit-plugin"):
    """A fake installed ``*.dist-info`` on sys.path, as pip would leave it."""
    (tmp_path / f"{module}.py").write_text(module_source)
    info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[cometkit]\n{name} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(module, None)


@pytest.fixture
def flaky_server():
    """429 on every first attempt of a call, then success."""
    state = {"n": 0}

    def handler(seen):
        state["n"] += 1
        if state["n"] % 2 == 1:
            return json_reply(429, {"error": {"message": "slow down"}}, **{"Retry-After": "0"})
        return json_reply(200, {"id": "x", "model": "m"})

    with ScriptedServer(handler) as srv:
        yield srv


def test_entry_point_plugin_is_discovered_configured_and_called(tmp_path, monkeypatch,
                                                                flaky_server):
    install_fake_distribution(tmp_path, monkeypatch, "fake_retry", FAKE_PLUGIN)
    config = {"plugins": {"fake_retry": {"label": "hello", "retries": 2}, "limiter": False}}
    with cometkit.Client(KEY, flaky_server.base_url, config=config) as client:
        assert "fake_retry" in client.plugins
        client.request("POST", "/chat/completions", json={"model": "m"})
    module = sys.modules["fake_plugin_mod"]
    assert ("options", {"label": "hello", "retries": 2}) in module.CALLS
    # the third-party policy (not trylast) wins over the default backoff
    assert ("decide", 1, 429) in module.CALLS
    assert flaky_server.count == 2


def test_plugin_without_config_is_not_enabled_and_can_be_disabled(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, monkeypatch, "fake_retry", FAKE_PLUGIN)
    with cometkit.Client(KEY, "https://api.example.invalid/v1") as client:
        assert "fake_retry" not in client.plugins
        assert {"backoff", "limiter"} <= set(client.plugins)
    with cometkit.Client(KEY, "https://api.example.invalid/v1",
                         config={"plugins": {"backoff": False, "limiter": False}}) as client:
        assert "backoff" not in client.plugins and "limiter" not in client.plugins


def test_plugin_options_are_validated_with_key_path(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, monkeypatch, "fake_retry", FAKE_PLUGIN)
    config_file = tmp_path / "ck.yaml"
    config_file.write_text("plugins:\n  fake_retry:\n    retries: -1\n")
    with pytest.raises(ConfigError) as info:
        cometkit.Client(KEY, "https://api.example.invalid/v1", config=str(config_file))
    message = str(info.value)
    assert str(config_file) in message and "plugins.fake_retry.retries" in message
    config_file.write_text("plugins:\n  fake_retry:\n    lable: x\n")
    with pytest.raises(ConfigError, match="Did you mean 'label'"):
        cometkit.Client(KEY, "https://api.example.invalid/v1", config=str(config_file))


def test_unknown_plugin_lists_installed_ones():
    with pytest.raises(ConfigError) as info:
        cometkit.Client(KEY, "https://api.example.invalid/v1",
                        config={"plugins": {"backof": {"max_attempts": 3}}})
    message = str(info.value)
    assert "plugins.backof" in message and "Did you mean 'backoff'" in message
    assert "limiter" in message and "csv_metrics" in message


def test_broken_plugin_is_reported_with_its_package(tmp_path, monkeypatch, caplog):
    install_fake_distribution(tmp_path, monkeypatch, "broken_one", "raise ImportError('nope')\n",
                              module="broken_mod", dist="broken-cometkit-thing")
    caplog.set_level(logging.WARNING, logger="cometkit")
    with cometkit.Client(KEY, "https://api.example.invalid/v1") as client:
        assert "broken_one" not in client.plugins
    with pytest.raises(PluginError) as info:
        cometkit.Client(KEY, "https://api.example.invalid/v1",
                        config={"plugins": {"broken_one": True}})
    assert "broken-cometkit-thing" in str(info.value) and "nope" in str(info.value)


def test_env_controls(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, monkeypatch, "fake_retry", FAKE_PLUGIN)
    url = "https://api.example.invalid/v1"
    monkeypatch.setenv("COMETKIT_DISABLE_PLUGINS", "backoff")
    with cometkit.Client(KEY, url) as client:
        assert "backoff" not in client.plugins and "limiter" in client.plugins
    monkeypatch.delenv("COMETKIT_DISABLE_PLUGINS")
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "limiter")
    with cometkit.Client(KEY, url) as client:
        assert client.plugins == ["limiter"]
    monkeypatch.delenv("COMETKIT_LOAD_PLUGINS")
    monkeypatch.setenv("COMETKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    with pytest.raises(ConfigError, match="unknown plugin 'other'") as info:
        # not autoloaded, so with autoload off a third-party plugin is found only when named
        cometkit.Client(KEY, url, config={"plugins": {"other": True}})
    assert "fake_retry" not in str(info.value)
    with cometkit.Client(KEY, url, config={"plugins": {"fake_retry": True}}) as client:
        assert "fake_retry" in client.plugins


def test_trace_hooks_logs_every_hook_call(monkeypatch, caplog):
    monkeypatch.setenv("COMETKIT_TRACE_HOOKS", "1")
    caplog.set_level(logging.DEBUG, logger="cometkit.hooks")
    with cometkit.Client(KEY, "https://api.example.invalid/v1"):
        pass
    text = caplog.text
    for hook in ("cometkit_make_retry_policy", "cometkit_make_limiter",
                 "cometkit_make_metrics_sink"):
        assert hook in text


MODULE_PLUGIN = """
import cometkit
from cometkit import RetryDecision

class Policy:
    def on_call_start(self, request):
        pass
    def decide(self, result):
        return RetryDecision(result.attempt < 2, 0.0, "module-path plugin")

@cometkit.hookimpl
def cometkit_make_retry_policy(ctx):
    return Policy()
"""


def test_module_path_plugin_named_in_config(tmp_path, monkeypatch, flaky_server):
    package = tmp_path / "my_company"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "retry_policy.py").write_text(MODULE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    with cometkit.Client(KEY, flaky_server.base_url,
                         config={"plugins": {"my_company.retry_policy": True}}) as client:
        assert "my_company.retry_policy" in client.plugins
        client.request("POST", "/chat/completions", json={"model": "m"})
    assert flaky_server.count == 2
    # a bare name that is no installed entry point is refused, not imported
    with pytest.raises(ConfigError, match="unknown plugin"):
        cometkit.Client(KEY, flaky_server.base_url, config={"plugins": {"os": True}})


class ExplodingSink:
    __name__ = "exploding_sink"

    def __init__(self):
        self.calls = 0

    @cometkit.hookimpl
    def cometkit_make_metrics_sink(self, ctx):
        return self

    def record_attempt(self, record):
        self.calls += 1
        raise RuntimeError("disk full")

    def record_call(self, record):
        raise RuntimeError("disk full")

    def flush(self):
        raise RuntimeError("disk full")

    def close(self):
        pass


def test_failing_sink_never_fails_a_request(caplog):
    sink = ExplodingSink()
    caplog.set_level(logging.WARNING, logger="cometkit")
    with ScriptedServer() as srv:
        client = cometkit.Client(KEY, srv.base_url, extra_plugins=[sink])
        for _ in range(3):
            assert client.chat.completions.create(model="m", messages=[]).model == "m1"
        client.close()
    assert sink.calls == 3
    assert client.stats["sink_errors"] == 7  # 3 attempts + 3 calls + 1 flush
    warnings = [r for r in caplog.records if "metrics sink" in r.getMessage()]
    assert len(warnings) == 1  # logged once, then only counted


class NotALimiter:
    __name__ = "not_a_limiter"

    @cometkit.hookimpl
    def cometkit_make_limiter(self, ctx):
        return object()


def test_contract_breach_names_the_hook():
    with pytest.raises(PluginError, match="cometkit_make_limiter.*not_a_limiter.*acquire"):
        cometkit.Client(KEY, "https://api.example.invalid/v1", extra_plugins=[NotALimiter()])


def test_no_plugins_means_one_attempt_no_limit(monkeypatch, flaky_server):
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "")
    with cometkit.Client(KEY, flaky_server.base_url) as client:
        assert client.plugins == []
        with pytest.raises(cometkit.RateLimitError):
            client.chat.completions.create(model="m", messages=[])
    assert flaky_server.count == 1


def test_hookimpl_is_public_and_spec_types_exported():
    assert isinstance(PluginSpec(), PluginSpec)
    assert RetryDecision(False).retry is False
    assert cometkit.hookimpl.project_name == "cometkit"


OPTIONS_READING_PLUGIN = """
import cometkit
from cometkit import Option, PluginSpec

SEEN = []

@cometkit.hookimpl
def cometkit_plugin_spec():
    return PluginSpec(options={"path": Option("str", default="none", help="where")})

@cometkit.hookimpl
def cometkit_make_metrics_sink(ctx):
    # written for a distribution that registered it as "sink"; configured here by module path
    SEEN.append((dict(ctx.options("sink")), dict(ctx.options()), sorted(ctx.plugin_options)))
    return None
"""


def test_a_plugin_gets_its_own_section_whatever_it_is_called_and_only_its_own(
        tmp_path, monkeypatch):
    package = tmp_path / "thirdparty"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sink.py").write_text(OPTIONS_READING_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"plugins": {"thirdparty.sink": {"path": "b.jsonl"},
                          "redis_limiter": {"url": "redis://:hunter2@127.0.0.1:1/0"}}}
    with cometkit.Client(KEY, "https://api.example.invalid/v1", config=config) as client:
        import thirdparty.sink as sink

        assert sink.SEEN == [({"path": "b.jsonl"}, {"path": "b.jsonl"}, ["thirdparty.sink"])]
        # the program that made the client still reads any plugin's section
        assert client.context.options("thirdparty.sink") == {"path": "b.jsonl"}
