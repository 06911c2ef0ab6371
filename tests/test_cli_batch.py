"""The ``cometkit`` command, driven as a user would: a subprocess, real files, the sandbox.

Every subprocess call and every polling loop is bounded in time.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from cometkit.batch import BatchInputError, BatchRunner, parse_line

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "prompts.jsonl"
MARKER_KEY = "sk-MARKER-7f1e0c9d2b4a"
TIMEOUT_S = 90


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("COMETAPI_KEY", "COMETAPI_BASE_URL", "COMETKIT_CONFIG")}
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, env: Optional[dict] = None,
            timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cometkit", *map(str, args)], cwd=cwd,
                          env=env if env is not None else cli_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def start_cli(*args: str, cwd: Path, env: dict, stderr_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cometkit", *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.DEVNULL,
                            stderr=open(stderr_path, "wb"), stdin=subprocess.DEVNULL)


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def interrupt_once(*args: str, cwd: Path, env: dict, stderr_path: Path,
                   when: Callable[[], bool]) -> int:
    """Start ``cometkit *args``, press Ctrl-C once when ``when()`` holds, wait for the exit;
    the exit status."""
    process = start_cli(*args, cwd=cwd, env=env, stderr_path=stderr_path)
    try:
        wait_for(when)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT_S)
    return process.returncode


def write_prompts(path: Path, n: int, *, prefix: str = "item", model: Optional[str] = "m1"
                  ) -> list[str]:
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    with open(path, "w", encoding="utf-8") as handle:
        for custom_id in ids:
            line = {"custom_id": custom_id, "prompt": f"say {custom_id}"}
            if model:
                line["model"] = model
            handle.write(json.dumps(line) + "\n")
    return ids


def read_output(path: Path) -> list[dict]:
    """Every line, asserting the file is whole JSONL (each line ends in a newline)."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "output does not end in a newline"
    return [json.loads(line) for line in data.splitlines()]


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def assert_each_once(records: list[dict], ids: list[str]) -> None:
    seen = [r["custom_id"] for r in records]
    assert sorted(seen) == sorted(ids), "each custom_id must appear exactly once"


def config_for(tmp_path: Path, base_url: str, extra: str = "") -> Path:
    path = tmp_path / "cometkit.yaml"
    path.write_text(f"base_url: {base_url}\n{extra}", encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------
# parsing (in-process: the batch module works without the CLI)
# -------------------------------------------------------------------------------------------


class TestParseLine:
    def test_shorthand_prompt_becomes_a_chat_request(self):
        item = parse_line(b'{"custom_id": "a", "prompt": "hi", "temperature": 0}', 1,
                          model="m")
        assert item.url == "/v1/chat/completions" and item.route == "/chat/completions"
        assert item.body == {"messages": [{"role": "user", "content": "hi"}],
                             "temperature": 0, "model": "m"}

    def test_line_model_wins_over_default(self):
        item = parse_line(b'{"custom_id": "a", "messages": [{"role": "user", "content": "x"}],'
                          b' "model": "own"}', 1, model="default")
        assert item.body["model"] == "own"

    def test_batch_format_embeddings(self):
        item = parse_line(json.dumps({"custom_id": "e", "method": "post", "url": "/v1/embeddings",
                                      "body": {"model": "emb", "input": "x"}}).encode(), 3)
        assert (item.method, item.route, item.line) == ("POST", "/embeddings", 3)

    def test_blank_line_is_skipped(self):
        assert parse_line(b"  \n", 1) is None

    def test_byte_order_mark_of_the_first_line_is_ignored(self):
        line = b'\xef\xbb\xbf{"custom_id": "a", "prompt": "x", "model": "m"}\r\n'
        assert parse_line(line, 1).custom_id == "a"

    @pytest.mark.parametrize("line, message", [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"prompt": "x", "model": "m"}', "missing custom_id"),
        (b'{"custom_id": 7, "prompt": "x", "model": "m"}', "custom_id must be a string"),
        (b'{"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {}}',
         "method 'GET' is not allowed"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/images", "body": {"model": "m"}}',
         "unknown url '/v1/images'"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings"}', "missing body"),
        (b'{"custom_id": "a", "prompt": "x"}', "no model"),
        (b'{"custom_id": "a", "prompt": "x", "messages": [], "model": "m"}', "not both"),
        (b'{"custom_id": "a", "text": "x"}', "neither OpenAI Batch format"),
        (b'{"custom_id": "a", "prompt": "\xff"}', "not UTF-8"),
        (b'{"custom_id": "a", "prompt": "x", "model": "m", "stream": true}', "stream"),
    ])
    def test_invalid_lines(self, line, message):
        with pytest.raises(ValueError, match=message):
            parse_line(line, 1)


def test_runner_collects_every_problem_with_line_numbers(tmp_path):
    source = tmp_path / "in.jsonl"
    lines = ['{"custom_id": "a", "prompt": "x", "model": "m"}', "{oops"] + [
        '{"custom_id": "a", "prompt": "x", "model": "m"}'] * 60
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(BatchInputError) as caught:
        BatchRunner(source, tmp_path / "out.jsonl").prepare()
    assert caught.value.count == 61
    assert caught.value.problems[0].line == 2
    assert caught.value.problems[1].line == 3
    assert "duplicate custom_id 'a'" in caught.value.problems[1].message
    assert "and 11 more" in str(caught.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_runner_as_a_library(tmp_path, cometkit_sandbox):
    import cometkit

    source = tmp_path / "in.jsonl"
    ids = write_prompts(source, 30)
    output = tmp_path / "out.jsonl"
    with cometkit.Client("sk-test", cometkit_sandbox.base_url, concurrency=3) as client, \
            BatchRunner(source, output) as runner:
        plan = runner.prepare()
        assert plan.pending == 30
        seen = []
        result = runner.run(client, on_result=seen.append)
    assert (result.ok, result.failed, result.interrupted) == (30, 0, False)
    assert seen == [True] * 30
    records = read_output(output)
    assert_each_once(records, ids)
    first = next(r for r in records if r["custom_id"] == "item-0007")
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["choices"][0]["message"]["content"] == "echo: say item-0007"
    assert first["id"].startswith("batch_req_") and first["error"] is None


def test_cli_batch_sends_lines_for_every_batch_api_endpoint(tmp_path):
    lines = [
        {"custom_id": "r", "method": "POST", "url": "/v1/responses",
         "body": {"input": "Hi there"}},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "Once"}},
        {"custom_id": "mod", "method": "POST", "url": "/v1/moderations",
         "body": {"input": "I will kill it", "model": "omni-moderation-latest"}},
        {"custom_id": "img", "method": "POST", "url": "/v1/images/generations",
         "body": {"prompt": "a cat", "model": "dall-e-3", "response_format": "b64_json"}},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.jsonl"
    done = run_cli("batch", source, "-o", output, "--sandbox", "--model", "gpt-4o-mini",
                   "--metrics-csv", "m.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    by_id = {r["custom_id"]: r for r in read_output(output)}
    assert by_id["r"]["response"]["body"]["output"][0]["content"][0]["text"] == \
        "echo: Hi there"
    assert by_id["c"]["response"]["body"]["choices"][0]["text"] == "echo: Once"
    assert by_id["mod"]["response"]["body"]["results"][0]["flagged"] is True
    assert by_id["img"]["response"]["body"]["data"][0]["b64_json"]
    with open(tmp_path / "m.csv", newline="") as handle:
        operations = {row["route"]: row["operation"] for row in csv.DictReader(handle)}
    assert operations == {"/responses": "generate_content", "/completions": "text_completion",
                          "/moderations": "moderations", "/images/generations": "images"}


# -------------------------------------------------------------------------------------------
# cometkit batch
# -------------------------------------------------------------------------------------------


def test_sandbox_batch_of_the_example_file(tmp_path):
    """The README's first command, then a rerun that has nothing left to do."""
    output = tmp_path / "results.jsonl"
    done = run_cli("batch", EXAMPLE, "-o", output, "--sandbox", "--metrics-csv", "m.csv",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "built-in sandbox" in done.stderr and "nothing leaves" in done.stderr
    assert "Aggregated" in done.stderr  # the per-model summary table
    assert "300 ok, 0 failed" in done.stderr
    assert done.stdout == ""
    inputs = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    records = read_output(output)
    assert_each_once(records, [line["custom_id"] for line in inputs])
    by_id = {r["custom_id"]: r for r in records}
    for line in inputs:
        record = by_id[line["custom_id"]]
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = record["response"]["body"]
        if line.get("url") == "/v1/embeddings":
            assert body["data"][0]["embedding"]
        elif "prompt" in line:
            assert body["choices"][0]["message"]["content"] == f"echo: {line['prompt']}"
    models = {line.get("model") or line["body"]["model"] for line in inputs}
    assert len(models) >= 2 and all(m in done.stderr for m in models)
    with open(tmp_path / "m.csv", newline="") as handle:
        outcomes = [row["outcome"] for row in csv.DictReader(handle)]  # one row per attempt
    assert outcomes.count("ok") == 300 and set(outcomes) <= {"ok", "retry"}

    before = output.read_bytes()
    again = run_cli("batch", EXAMPLE, "-o", output, "--sandbox", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to send" in again.stderr
    assert output.read_bytes() == before


def test_model_flag_fills_lines_without_one(tmp_path, cometkit_sandbox):
    source = tmp_path / "in.jsonl"
    ids = write_prompts(source, 5, model=None)
    config = config_for(tmp_path, cometkit_sandbox.base_url)
    done = run_cli("batch", source, "-o", "out.jsonl", "--model", "gpt-4o-mini", "--config",
                   config, cwd=tmp_path, env=cli_env(COMETAPI_KEY="sk-x"))
    assert done.returncode == 0, done.stderr
    records = read_output(tmp_path / "out.jsonl")
    assert_each_once(records, ids)
    assert {r["response"]["body"]["model"] for r in records} == {"gpt-4o-mini"}


def test_invalid_input_is_reported_by_line_and_nothing_is_sent(tmp_path, cometkit_sandbox):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([
        '{"custom_id": "ok-1", "prompt": "x", "model": "m"}',
        '{"custom_id": "broken", ',
        '{"prompt": "no id", "model": "m"}',
        "",
        '{"custom_id": "ok-1", "prompt": "again", "model": "m"}',
        '{"custom_id": "u", "method": "POST", "url": "/v1/audio/speech", "body": {}}',
        '{"custom_id": "g", "method": "GET", "url": "/v1/chat/completions", "body": {}}',
        '{"custom_id": "nomodel", "prompt": "x"}',
    ]) + "\n")
    config = config_for(tmp_path, cometkit_sandbox.base_url)
    done = run_cli("batch", source, "-o", "out.jsonl", "--config", config, cwd=tmp_path,
                   env=cli_env(COMETAPI_KEY="sk-x"))
    assert done.returncode == 2
    err = done.stderr
    assert "6 invalid line(s)" in err
    for line, text in [(2, "invalid JSON"), (3, "missing custom_id"),
                       (5, "duplicate custom_id 'ok-1'"), (6, "unknown url"),
                       (7, "method 'GET'"), (8, "no model")]:
        assert f"in.jsonl:{line}: " in err and text in err
    assert "in.jsonl:1:" not in err and "in.jsonl:4:" not in err
    assert cometkit_sandbox.stats()["attempts"] == 0
    assert not (tmp_path / "out.jsonl").exists()


def test_without_a_key_says_how_to_set_one(tmp_path):
    source = tmp_path / "in.jsonl"
    write_prompts(source, 2)
    done = run_cli("batch", source, "-o", "out.jsonl", cwd=tmp_path)
    assert done.returncode == 2
    assert "COMETAPI_KEY" in done.stderr and "--sandbox" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_usage_errors_exit_2(tmp_path):
    assert run_cli("batch", "in.jsonl", cwd=tmp_path).returncode == 2  # no -o
    missing = run_cli("batch", "nope.jsonl", "-o", "o.jsonl", "--sandbox", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr
    source = tmp_path / "in.jsonl"
    write_prompts(source, 2)
    same = run_cli("batch", source, "-o", source, "--sandbox", cwd=tmp_path)
    assert same.returncode == 2 and "input file" in same.stderr
    zero = run_cli("batch", source, "-o", "o.jsonl", "--sandbox", "--concurrency", "0",
                   cwd=tmp_path)
    assert zero.returncode == 2


def test_input_and_output_that_are_not_files_are_one_line_exit_2(tmp_path):
    source = tmp_path / "in.jsonl"
    write_prompts(source, 2)
    piped = subprocess.run([sys.executable, "-m", "cometkit", "batch", "/dev/stdin", "-o",
                            "o.jsonl", "--sandbox"], cwd=tmp_path, env=cli_env(),
                           input=source.read_text(), capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    # read twice (checked, then sent): a pipe would have been sent nothing, and exited 0
    assert piped.returncode == 2 and "must be a regular file" in piped.stderr
    (tmp_path / "adir").mkdir()
    for args in (("adir", "-o", "o.jsonl"), (source, "-o", "adir"),
                 (source, "-o", tmp_path / "no" / "such" / "dir.jsonl")):
        done = run_cli("batch", *args, "--sandbox", cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "o.jsonl").exists()
    empty_model = run_cli("batch", source, "-o", "o.jsonl", "--model", " ", "--sandbox",
                          cwd=tmp_path)
    assert empty_model.returncode == 2 and "--model" in empty_model.stderr
    assert len(empty_model.stderr.splitlines()) == 1


def test_refuses_to_resume_into_a_file_that_is_not_batch_output(tmp_path):
    source = tmp_path / "in.jsonl"
    write_prompts(source, 2)
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my precious notes\nmore\n")
    done = run_cli("batch", source, "-o", foreign, "--sandbox", cwd=tmp_path)
    assert done.returncode == 2 and "notes.txt:1" in done.stderr
    assert foreign.read_text() == "my precious notes\nmore\n"


def test_failures_are_written_exit_1_and_retry_failed_sends_them_again(
        tmp_path, cometkit_sandbox_factory):
    source = tmp_path / "in.jsonl"
    ids = write_prompts(source, 12)
    output = tmp_path / "out.jsonl"
    guarded = cometkit_sandbox_factory(api_key="sk-right-key")
    config = config_for(tmp_path, guarded.base_url)
    wrong = run_cli("batch", source, "-o", output, "--config", config, cwd=tmp_path,
                    env=cli_env(COMETAPI_KEY=MARKER_KEY))
    assert wrong.returncode == 1, wrong.stderr
    assert "0 ok, 12 failed" in wrong.stderr and "--retry-failed" in wrong.stderr
    records = read_output(output)
    assert_each_once(records, ids)
    for record in records:
        assert record["response"]["status_code"] == 401
        assert record["error"]["code"] == "invalid_api_key"
        assert "401" in record["error"]["message"]
    assert guarded.stats()["attempts"] == 12  # a 401 is never retried
    assert MARKER_KEY not in output.read_text() + wrong.stderr + wrong.stdout

    # a plain rerun keeps the answers it has, failed ones included: nothing is sent
    rerun = run_cli("batch", source, "-o", output, "--config", config, cwd=tmp_path,
                    env=cli_env(COMETAPI_KEY=MARKER_KEY))
    assert rerun.returncode == 1 and "nothing to send" in rerun.stderr
    assert guarded.stats()["attempts"] == 12

    retried = run_cli("batch", source, "-o", output, "--config", config, "--retry-failed",
                      cwd=tmp_path, env=cli_env(COMETAPI_KEY="sk-right-key"))
    assert retried.returncode == 0, retried.stderr
    records = read_output(output)
    assert_each_once(records, ids)
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in records)
    assert guarded.stats()["attempts"] == 24


def test_retry_failed_resends_only_the_failed_ones(tmp_path, cometkit_sandbox_factory):
    source = tmp_path / "in.jsonl"
    ids = write_prompts(source, 60)
    output = tmp_path / "out.jsonl"
    faulty = cometkit_sandbox_factory(faults={"500": 0.3}, seed=3)
    first = run_cli("batch", source, "-o", output, "--config",
                    config_for(tmp_path, faulty.base_url), cwd=tmp_path,
                    env=cli_env(COMETAPI_KEY="sk-x"))
    assert first.returncode == 1, first.stderr
    records = read_output(output)
    assert_each_once(records, ids)
    failed = {r["custom_id"] for r in records if r["error"] is not None}
    assert failed and len(failed) < 60
    assert all(r["response"]["status_code"] == 500 for r in records
               if r["custom_id"] in failed)
    assert faulty.stats()["attempts"] == 60  # default backoff retries 429 only

    clean = cometkit_sandbox_factory()
    second = run_cli("batch", source, "-o", output, "--retry-failed", "--config",
                     config_for(tmp_path, clean.base_url), cwd=tmp_path,
                     env=cli_env(COMETAPI_KEY="sk-x"))
    assert second.returncode == 0, second.stderr
    assert clean.stats()["attempts"] == len(failed)
    records = read_output(output)
    assert_each_once(records, ids)
    assert all(r["error"] is None for r in records)
    assert f"60 ok, 0 failed ({60 - len(failed)} from earlier runs)" in second.stderr


def test_resume_after_sigkill_sends_each_request_exactly_once(tmp_path,
                                                              cometkit_sandbox_factory):
    source = tmp_path / "in.jsonl"
    ids = write_prompts(source, 200)
    output = tmp_path / "out.jsonl"
    slow = cometkit_sandbox_factory(latency_s=0.1)
    config = config_for(tmp_path, slow.base_url)
    env = cli_env(COMETAPI_KEY="sk-x")
    args = ("batch", source, "-o", output, "--config", config, "--concurrency", "4")
    process = start_cli(*args, cwd=tmp_path, env=env, stderr_path=tmp_path / "err1")
    try:
        wait_for(lambda: count_lines(output) >= 20)
        concurrent = run_cli(*args, cwd=tmp_path, env=env)  # a second run into the same file
        assert concurrent.returncode == 2
        assert "being written by another cometkit batch" in concurrent.stderr
    finally:
        process.kill()  # SIGKILL: no cleanup of any kind
        process.wait(timeout=TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL
    written = count_lines(output)
    assert 20 <= written < 200, "the batch should have been killed midway"
    # a kill can leave a line cut short; make sure one is there to be repaired
    with open(output, "ab") as handle:
        handle.write(b'{"id":"batch_req_torn","custom_id":"item-01')
    sent_before = slow.stats()["attempts"]

    rerun = run_cli(*args, cwd=tmp_path, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert "torn last line" in rerun.stderr and "resuming" in rerun.stderr
    records = read_output(output)
    assert_each_once(records, ids)
    assert all(r["error"] is None for r in records)
    # the rerun sent exactly what was missing
    assert slow.stats()["attempts"] - sent_before == 200 - written


def test_ctrl_c_finishes_in_flight_flushes_and_resumes(tmp_path, cometkit_sandbox_factory):
    source = tmp_path / "in.jsonl"
    ids = write_prompts(source, 100)
    output = tmp_path / "out.jsonl"
    metrics = tmp_path / "m.csv"
    slow = cometkit_sandbox_factory(latency_s=0.2)
    config = config_for(tmp_path, slow.base_url)
    env = cli_env(COMETAPI_KEY="sk-x")
    args = ("batch", source, "-o", output, "--config", config, "--concurrency", "4",
            "--metrics-csv", metrics)
    err = tmp_path / "err"
    status = interrupt_once(*args, cwd=tmp_path, env=env, stderr_path=err,
                            when=lambda: count_lines(output) >= 8)
    assert status == 130
    stderr = err.read_text()
    assert "To resume, run the same command again" in stderr
    assert f"cometkit batch {source} -o {output}" in stderr
    assert "Aggregated" in stderr  # the metrics were closed: the summary was printed
    records = read_output(output)
    assert 8 <= len(records) < 100
    assert len({r["custom_id"] for r in records}) == len(records)
    # every request that was started was finished and written; none was started after
    assert slow.stats()["attempts"] == len(records)
    assert metrics.read_text().count("\n") == 1 + len(records)

    rerun = run_cli(*args, cwd=tmp_path, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert_each_once(read_output(output), ids)
    assert slow.stats()["attempts"] == 100
    assert metrics.read_text().count("\n") == 1 + 100  # appended under the same header


def test_second_ctrl_c_abandons_in_flight_calls(tmp_path, cometkit_sandbox_factory):
    source = tmp_path / "in.jsonl"
    ids = write_prompts(source, 20)
    output = tmp_path / "out.jsonl"
    stuck = cometkit_sandbox_factory(latency_s=30)
    fast = cometkit_sandbox_factory()
    env = cli_env(COMETAPI_KEY="sk-x")
    err = tmp_path / "err"
    process = start_cli("batch", source, "-o", output, "--concurrency", "4", "--config",
                        config_for(tmp_path, stuck.base_url), cwd=tmp_path, env=env,
                        stderr_path=err)
    try:
        wait_for(lambda: stuck.stats()["in_flight"] >= 4)
        process.send_signal(signal.SIGINT)
        wait_for(lambda: "interrupted" in err.read_text())
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)  # well before the 30 s answers
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT_S)
    assert process.returncode == 130
    assert "abandoned" in err.read_text() and "To resume" in err.read_text()
    assert read_output(output) == []

    rerun = run_cli("batch", source, "-o", output, "--config",
                    config_for(tmp_path, fast.base_url), cwd=tmp_path, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert_each_once(read_output(output), ids)


# -------------------------------------------------------------------------------------------
# cometkit report
# -------------------------------------------------------------------------------------------


@pytest.fixture
def metrics_csv(tmp_path_factory, cometkit_sandbox_factory) -> Path:
    """A metrics CSV of a real run with some 429s and retries."""
    where = tmp_path_factory.mktemp("report")
    source = where / "in.jsonl"
    write_prompts(source, 40)
    with_faults = cometkit_sandbox_factory(faults={"500": 0.2}, seed=5)
    done = run_cli("batch", source, "-o", where / "out.jsonl", "--config",
                   config_for(where, with_faults.base_url), "--metrics-csv", "m.csv",
                   cwd=where, env=cli_env(COMETAPI_KEY="sk-x"))
    assert done.returncode == 1, done.stderr
    return where / "m.csv"


def test_report_prints_the_per_model_table(metrics_csv):
    done = run_cli("report", metrics_csv, cwd=metrics_csv.parent)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["Model", "Calls", "Fails"]
    row = next(line for line in lines if line.startswith("m1"))
    total = next(line for line in lines if line.startswith("Aggregated"))
    assert row.split()[1] == "40" and total.split()[1] == "40"
    failed = sum(1 for r in read_output(metrics_csv.parent / "out.jsonl") if r["error"])
    assert row.split()[2] == str(failed)

    as_json = run_cli("report", metrics_csv, "--json", cwd=metrics_csv.parent)
    assert json.loads(as_json.stdout)["total"]["calls"] == 40


def test_report_errors(tmp_path):
    assert run_cli("report", "missing.csv", cwd=tmp_path).returncode == 2
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    done = run_cli("report", other, cwd=tmp_path)
    assert done.returncode == 2 and "missing columns" in done.stderr
    assert done.stderr.count("other.csv") == 1
    directory = run_cli("report", tmp_path, cwd=tmp_path)
    assert directory.returncode == 2 and len(directory.stderr.splitlines()) == 1
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    done = run_cli("report", binary, cwd=tmp_path)
    assert done.returncode == 2 and "not utf-8 text" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_report_on_a_csv_torn_inside_a_quoted_cell_is_one_line_and_exit_2(metrics_csv):
    """A quote opened and never closed swallows the rest of the file: the csv module gives up
    (``_csv.Error``), which must reach the user as one line naming the file and line."""
    rows = metrics_csv.read_text().splitlines(keepends=True)
    torn = metrics_csv.parent / "torn.csv"
    cells = rows[3].split(",")
    cells[6] = '"' + cells[6]  # server_address opens a quote that never closes
    big = rows[1] * 2000  # enough rows after it to pass the csv module's field size limit
    torn.write_text("".join(rows[:3]) + ",".join(cells) + big)
    done = run_cli("report", torn, cwd=metrics_csv.parent)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1
    assert f"{torn}:4: unreadable CSV" in done.stderr and "never closed" in done.stderr


def test_report_plot_writes_a_png(metrics_csv):
    pytest.importorskip("matplotlib")
    png = metrics_csv.parent / "report.png"
    done = run_cli("report", metrics_csv, "--plot", png, cwd=metrics_csv.parent)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_report_plot_reads_the_csv_once_for_the_table_and_the_plot(metrics_csv):
    """A named pipe can be read only once: the table and the plot come from one read."""
    pytest.importorskip("matplotlib")
    pipe = metrics_csv.parent / "metrics.pipe"
    os.mkfifo(pipe)
    content = metrics_csv.read_bytes()

    def feed() -> None:
        with open(pipe, "wb") as handle:  # blocks until the report opens it
            handle.write(content)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    png = metrics_csv.parent / "once.png"
    done = run_cli("report", pipe, "--plot", png, cwd=metrics_csv.parent, timeout=60)
    writer.join(5)
    assert done.returncode == 0, done.stderr
    assert "Aggregated" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_plot_without_matplotlib_says_how_to_install_it(metrics_csv, tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = cli_env(PYTHONPATH=os.pathsep.join(
        p for p in (str(shim.parent), os.environ.get("PYTHONPATH")) if p))
    done = run_cli("report", metrics_csv, "--plot", tmp_path / "r.png", cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert "cometkit[plot]" in done.stderr
    assert not (tmp_path / "r.png").exists()


# -------------------------------------------------------------------------------------------
# cometkit config check / plugins
# -------------------------------------------------------------------------------------------


def test_config_check_prints_the_effective_config_with_secrets_redacted(tmp_path):
    config = tmp_path / "cometkit.yaml"
    config.write_text(
        "api_key: ${SECRET_FOR_TEST}\n"
        "base_url: https://api.example.com/v1?key=${SECRET_FOR_TEST}\n"
        "concurrency: 7\n"
        "plugins:\n"
        "  backoff: {max_attempts: 3}\n"
        "  csv_metrics: {path: never-created.csv}\n")
    done = run_cli("config", "check", config, cwd=tmp_path,
                   env=cli_env(SECRET_FOR_TEST=MARKER_KEY, COMETAPI_KEY=MARKER_KEY + "-env"))
    assert done.returncode == 0, done.stderr
    assert MARKER_KEY not in done.stdout + done.stderr
    import yaml

    shown = yaml.safe_load(done.stdout)
    assert shown["api_key"] == "***"
    assert shown["base_url"] == "https://api.example.com/v1?key=***"
    assert shown["concurrency"] == 7
    assert shown["plugins"]["backoff"]["max_attempts"] == 3
    assert shown["plugins"]["backoff"]["retry_on"] == [429]  # defaults filled in
    assert shown["plugins"]["csv_metrics"]["path"] == "never-created.csv"
    assert shown["plugins"]["stdout_metrics"] is False
    assert not (tmp_path / "never-created.csv").exists()  # checking opens nothing


@pytest.mark.parametrize("text, expected", [
    ("concurency: 3\n", "Did you mean 'concurrency'"),
    ("plugins:\n  bakoff: true\n", "Did you mean 'backoff'"),
    ("plugins:\n  backoff: {max_attempts: 0}\n", "plugins.backoff.max_attempts"),
    ("base_url: http://api.example.com/v1\n", "clear text"),
    ("x: !!python/object/apply:os.system ['true']\n", "not allowed"),
    ("plugins:\n  backoff:\n    retry_on: &a [429, *a]\n", "line 3, column 24: alias *a"),
    ("timeout: " + "[" * 3000 + "]" * 3000 + "\n", "line 1, column 73: values nested"),
])
def test_config_check_rejects_invalid_files(tmp_path, text, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    done = run_cli("config", "check", config, cwd=tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr and "bad.yaml" in done.stderr
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1  # no traceback


def test_plugins_lists_first_party_plugins_with_their_package(tmp_path):
    done = run_cli("plugins", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    for name in ("backoff", "limiter"):
        assert "yes (default)" in rows[name] and " cometkit " in rows[name]
        assert f"cometkit_plugins.{name}" in rows[name]
    assert "make_retry_policy" in rows["backoff"] and "make_limiter" in rows["limiter"]
    assert "no (default)" in rows["csv_metrics"]

    config = tmp_path / "c.yaml"
    config.write_text("plugins:\n  limiter: false\n  csv_metrics: {path: x.csv}\n")
    configured = run_cli("plugins", "--config", config, cwd=tmp_path)
    rows = {line.split()[0]: line for line in configured.stdout.splitlines() if line.strip()}
    assert "no (config)" in rows["limiter"] and "yes (config)" in rows["csv_metrics"]
    assert str(config) in configured.stdout


def test_version_and_help(tmp_path):
    version = run_cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("cometkit ")
    helped = run_cli("--help", cwd=tmp_path)
    assert helped.returncode == 0
    for command in ("batch", "report", "sandbox", "plugins", "config"):
        assert command in helped.stdout
