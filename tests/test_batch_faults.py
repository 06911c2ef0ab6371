"""The batch fault fixture: every request ends as exactly one output line, whatever happens.

Faults come at seeded random points: ``kill -9``, Ctrl-C (SIGINT), and an output that cannot be
written (a file size limit set with ``RLIMIT_FSIZE`` in the child). The input is hostile but
valid (lone surrogates, a huge line, a byte order mark, CRLF endings, odd ids) or invalid
(non-JSON, wrong types, duplicate ids). Each scenario reruns the same command until it
completes and then checks the output line by line against the input, and the sandbox's count
of attempts against what was written.

Real subprocesses, a real sandbox on 127.0.0.1, bounded waits (``wait_for``, subprocess
timeouts, a bounded number of reruns). ``COMETKIT_FAULT_SEEDS=N`` runs the fault fixture with
N seeds instead of 4, to hunt for a rare failure.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from test_cli_batch import (
    TIMEOUT_S,
    assert_each_once,
    cli_env,
    config_for,
    count_lines,
    run_cli,
    wait_for,
    write_prompts,
)

import cometkit
from cometkit.batch import (
    BatchInputError,
    BatchRunError,
    BatchRunner,
    BatchWriteError,
    encode_record,
)

#: Reruns after the faulted ones before a scenario counts as stuck.
MAX_CLEAN_RUNS = 3
CONCURRENCY = 4
#: What may be sent without being written when a run dies: the pool's in-flight window.
IN_FLIGHT_MAX = 2 * CONCURRENCY
#: Requests left unwritten when a signal is sent, so that it reaches a run still sending
#: (a signal during the interpreter's own exit would test Python, not cometkit).
RUNNING_MARGIN = 2 * CONCURRENCY


def read_whole_lines(path: Path) -> list[dict]:
    """The output's records; it must be UTF-8 JSONL, each line whole (ends in a newline)."""
    data = path.read_bytes() if path.exists() else b""
    assert data == b"" or data.endswith(b"\n"), "output does not end in a newline"
    data.decode("utf-8")  # strict: every line readable by any JSON tool
    return [json.loads(line) for line in data.splitlines()]


# -------------------------------------------------------------------------------------------
# the encoding of a result line
# -------------------------------------------------------------------------------------------


def test_encode_record_keeps_utf8_and_escapes_only_what_utf8_cannot_hold():
    plain = {"custom_id": "q-é", "body": "日本語"}
    assert encode_record(plain) == json.dumps(plain, ensure_ascii=False,
                                              separators=(",", ":")).encode() + b"\n"
    half = {"custom_id": "q\ud83d", "body": {"text": "half \ud83d emoji"}}
    line = encode_record(half)
    assert line.endswith(b"\n") and b"\\ud83d" in line
    line.decode("ascii")
    assert json.loads(line) == half  # reads back to exactly the same values


def hostile_valid_lines(rng: random.Random, count: int) -> tuple[bytes, list[str]]:
    """``count`` valid requests in every awkward form the parser accepts, and their ids."""
    lines: list[bytes] = []
    ids: list[str] = []
    for index in range(count):
        kind = index % 8
        custom_id = f"r{index:03d}"
        obj: dict = {"custom_id": custom_id, "prompt": f"say {index}", "model": "m1"}
        if kind == 1:
            obj["prompt"] = "half an emoji: \ud83d"  # valid JSON, not encodable as UTF-8
        elif kind == 2:
            obj["custom_id"] = custom_id = f"id-\udc00-{index}"  # a lone surrogate in the id
        elif kind == 3:
            obj["custom_id"] = custom_id = f'q"uote\\back\nline {index} ✓'
        elif kind == 4:
            obj = {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
                   "body": {"model": "emb", "input": f"x{index}"}}
        elif kind == 5 and index < 8:
            obj["prompt"] = "huge " + "z" * rng.randrange(300_000, 600_000)
        # a lone surrogate can only be written escaped; other lines as raw UTF-8 or escaped
        line = json.dumps(obj, ensure_ascii=kind in (1, 2) or rng.random() < 0.5).encode()
        ending = b"\r\n" if rng.random() < 0.3 else b"\n"
        if index in (0, 9):  # a byte order mark, as some editors save it (9: files joined)
            line = b"\xef\xbb\xbf" + line
        lines.append(line + ending)
        if rng.random() < 0.1:
            lines.append(b"   \r\n")  # blank lines are skipped
        ids.append(custom_id)
    return b"".join(lines), ids


def test_lone_surrogates_are_written_once_and_a_rerun_pays_nothing(tmp_path, cometkit_sandbox):
    """The defect: a result holding a lone surrogate was paid for, then lost to its encoding,
    and every rerun paid for it again."""
    source = tmp_path / "in.jsonl"
    data, ids = hostile_valid_lines(random.Random(1), 16)
    source.write_bytes(data)
    output = tmp_path / "out.jsonl"
    with cometkit.Client("sk-test", cometkit_sandbox.base_url, concurrency=3) as client:
        with BatchRunner(source, output) as runner:
            result = runner.run(client)
        assert (result.ok, result.failed, result.complete) == (16, 0, True)
        records = read_whole_lines(output)
        assert_each_once(records, ids)
        by_id = {r["custom_id"]: r for r in records}
        answer = by_id["r001"]["response"]["body"]["choices"][0]["message"]["content"]
        assert answer == "echo: half an emoji: \ud83d"
        assert cometkit_sandbox.stats()["attempts"] == 16

        with BatchRunner(source, output) as again:
            assert again.prepare().pending == 0
            assert again.run(client).complete
    assert cometkit_sandbox.stats()["attempts"] == 16  # nothing paid twice
    assert_each_once(read_whole_lines(output), ids)


def test_an_exception_after_the_call_stops_the_run_instead_of_vanishing(tmp_path,
                                                                        cometkit_sandbox):
    source = tmp_path / "in.jsonl"
    ids = write_prompts(source, 40)
    output = tmp_path / "out.jsonl"
    seen: list[bool] = []

    def on_result(ok: bool) -> None:
        seen.append(ok)
        if len(seen) == 5:
            raise KeyError("progress bar broke")

    with cometkit.Client("sk-test", cometkit_sandbox.base_url, concurrency=2) as client:
        with BatchRunner(source, output) as runner, pytest.raises(BatchRunError) as caught:
            runner.run(client, on_result=on_result, max_in_flight=2)
        assert isinstance(caught.value.__cause__, KeyError)
        assert "KeyError" in str(caught.value) and "rerun" in str(caught.value)
        written = read_whole_lines(output)
        assert len(written) == len(seen) == caught.value.result.ok
        # admission stopped at once: at most the window was in flight after the failure
        assert cometkit_sandbox.stats()["attempts"] <= len(written) + 2

        with BatchRunner(source, output) as rerun:
            assert rerun.run(client).complete
    assert_each_once(read_whole_lines(output), ids)


def test_an_input_edited_during_the_run_stops_it_with_a_cometkit_error(tmp_path,
                                                                       cometkit_sandbox):
    source = tmp_path / "in.jsonl"
    write_prompts(source, 3)
    with cometkit.Client("sk-test", cometkit_sandbox.base_url) as client, \
            BatchRunner(source, tmp_path / "out.jsonl") as runner:
        runner.prepare()
        source.write_text('{"custom_id": "x", "prompt": 7, "model": "m"}\n')
        with pytest.raises(BatchRunError, match="changed during the run"):
            runner.run(client)
    assert cometkit_sandbox.stats()["attempts"] == 0


def test_lines_added_to_the_input_during_the_run_are_reported(tmp_path, cometkit_sandbox):
    source = tmp_path / "in.jsonl"
    ids = write_prompts(source, 3)
    output = tmp_path / "out.jsonl"
    with cometkit.Client("sk-test", cometkit_sandbox.base_url) as client:
        with BatchRunner(source, output) as runner:
            assert runner.prepare().pending == 3
            ids += write_prompts(tmp_path / "more.jsonl", 2, prefix="late")
            with open(source, "a") as handle:
                handle.write((tmp_path / "more.jsonl").read_text())
            with pytest.raises(BatchRunError, match="changed during the run: 3 .* 5 found"):
                runner.run(client)
        with BatchRunner(source, output) as rerun:
            assert rerun.run(client).complete
    assert_each_once(read_whole_lines(output), ids)


def test_runner_checks_model_and_on_result(tmp_path, cometkit_sandbox):
    source = tmp_path / "in.jsonl"
    write_prompts(source, 2)
    with pytest.raises(ValueError, match="model"):
        BatchRunner(source, tmp_path / "out.jsonl", model="")
    with cometkit.Client("sk-test", cometkit_sandbox.base_url) as client, \
            BatchRunner(source, tmp_path / "out.jsonl") as runner:
        with pytest.raises(TypeError, match="on_result"):
            runner.run(client, on_result="print")
    assert cometkit_sandbox.stats()["attempts"] == 0


@pytest.mark.parametrize("value, error", [(-1, ValueError), (0, ValueError),
                                          (2.5, TypeError), ("4", TypeError),
                                          (True, TypeError)])
def test_run_checks_max_in_flight_before_anything_is_sent(tmp_path, cometkit_sandbox, value,
                                                          error):
    source = tmp_path / "in.jsonl"
    write_prompts(source, 3)
    with cometkit.Client("sk-test", cometkit_sandbox.base_url) as client, \
            BatchRunner(source, tmp_path / "out.jsonl") as runner:
        with pytest.raises(error, match="max_in_flight"):
            runner.run(client, max_in_flight=value)
    assert cometkit_sandbox.stats()["attempts"] == 0
    assert not (tmp_path / "out.jsonl").exists()


# -------------------------------------------------------------------------------------------
# an output that cannot be written
# -------------------------------------------------------------------------------------------


def run_limited(args: tuple, *, cwd: Path, env: dict, limit_bytes: int
                ) -> subprocess.CompletedProcess:
    """The CLI with a file size limit: a write past it fails with EFBIG (Python ignores
    SIGXFSZ), as on a full disk."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "cometkit", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                          stdin=subprocess.DEVNULL, preexec_fn=limit)


def test_a_write_error_stops_at_once_with_one_line_and_the_rerun_resumes_exactly(
        tmp_path, cometkit_sandbox):
    source = tmp_path / "in.jsonl"
    ids = write_prompts(source, 300)
    output = tmp_path / "out.jsonl"
    env = cli_env(COMETAPI_KEY="sk-x")
    args = ("batch", source, "-o", output, "--config",
            config_for(tmp_path, cometkit_sandbox.base_url), "--concurrency",
            str(CONCURRENCY), "--no-progress")
    full = run_limited(args, cwd=tmp_path, env=env, limit_bytes=30_000)
    assert full.returncode == 1, full.stderr
    assert "Traceback" not in full.stderr
    errors = [line for line in full.stderr.splitlines() if "cannot write" in line]
    assert len(errors) == 1 and "File too large" in errors[0] and str(output) in errors[0]
    assert "run the same command again" in errors[0]
    written = read_whole_lines(output)  # no torn line left behind by the failed write
    assert 0 < len(written) < 300
    assert len({r["custom_id"] for r in written}) == len(written)
    sent = cometkit_sandbox.stats()["attempts"]
    assert sent <= len(written) + IN_FLIGHT_MAX + 1, "admission did not stop at the error"

    rerun = run_cli(*args, cwd=tmp_path, env=env)
    assert rerun.returncode == 0, rerun.stderr
    records = read_whole_lines(output)
    assert_each_once(records, ids)
    assert records[:len(written)] == written  # every answer written before is kept as it was
    assert cometkit_sandbox.stats()["attempts"] - sent == 300 - len(written)


# -------------------------------------------------------------------------------------------
# the fault fixture: kill -9, Ctrl-C and write errors at seeded random points
# -------------------------------------------------------------------------------------------


def faulted_run(kind: str, args: tuple, *, cwd: Path, env: dict, output: Path,
                rng: random.Random, total: int) -> Optional[int]:
    """One run hit by ``kind`` at a random point; its exit status (``None``: it ended before
    the fault could be applied)."""
    if kind == "write_error":
        limit = (output.stat().st_size if output.exists() else 0) + rng.randrange(2_000, 400_000)
        return run_limited(args, cwd=cwd, env=env, limit_bytes=limit).returncode
    before = count_lines(output)
    if before >= total - RUNNING_MARGIN:  # no room left for a fault while the run is sending
        return None
    # a new line is written: the run is sending (and handles Ctrl-C), and is far from done
    target = min(total - RUNNING_MARGIN, before + rng.randrange(1, 25))
    err = open(cwd / "stderr.txt", "wb")
    process = subprocess.Popen([sys.executable, "-m", "cometkit", *map(str, args)], cwd=cwd,
                               env=env, stdout=subprocess.DEVNULL, stderr=err,
                               stdin=subprocess.DEVNULL)
    try:
        try:
            wait_for(lambda: count_lines(output) >= target or process.poll() is not None,
                     timeout_s=TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGINT)
        process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT_S)
        err.close()
    if kind == "sigint" and process.returncode not in (0, 130):
        pytest.fail(f"Ctrl-C ended the run with {process.returncode}: "
                    f"{(cwd / 'stderr.txt').read_text()[-2000:]}")
    return process.returncode


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", range(int(os.environ.get("COMETKIT_FAULT_SEEDS", "4"))))
def test_batch_fault_fixture_each_request_ends_as_exactly_one_line(
        tmp_path, cometkit_sandbox_factory, seed):
    rng = random.Random(seed)
    total = 60
    data, ids = hostile_valid_lines(rng, total)
    source = tmp_path / "in.jsonl"
    source.write_bytes(data)
    output = tmp_path / "out.jsonl"
    sandbox = cometkit_sandbox_factory(latency_s=0.03, seed=seed)
    env = cli_env(COMETAPI_KEY="sk-x")
    args = ("batch", source, "-o", output, "--config", config_for(tmp_path, sandbox.base_url),
            "--concurrency", str(CONCURRENCY), "--no-progress")
    faults = [rng.choice(["kill", "sigint", "write_error"]) for _ in range(3)]
    lost_budget = 0  # sent but legitimately never written: in flight when a run died
    for kind in faults:
        sent_before = sandbox.stats()["attempts"]
        lines_before = count_lines(output)
        status = faulted_run(kind, args, cwd=tmp_path, env=env, output=output, rng=rng,
                             total=total)
        # what a dead run sent may still be arriving: count it for this run, not the next
        wait_for(lambda: sandbox.stats()["in_flight"] == 0, timeout_s=TIMEOUT_S)
        assert status != 2, f"{kind}: the hostile but valid input was refused"
        if kind != "kill":  # a killed run may leave a torn last line, for the rerun to cut
            records = read_whole_lines(output)
            assert len({r["custom_id"] for r in records}) == len(records)
        sent = sandbox.stats()["attempts"] - sent_before
        written = count_lines(output) - lines_before
        if kind == "sigint":
            assert sent == written, "Ctrl-C must finish and write every call it started"
        else:
            assert sent - written <= IN_FLIGHT_MAX + 1
        lost_budget += sent - written
    for _ in range(MAX_CLEAN_RUNS):
        done = run_cli(*args, cwd=tmp_path, env=env)
        if done.returncode == 0:
            break
    assert done.returncode == 0, done.stderr
    records = read_whole_lines(output)
    assert_each_once(records, ids)
    assert all(r["error"] is None for r in records)
    # each request was paid for once, plus only those in flight when a run died
    assert sandbox.stats()["attempts"] == total + lost_budget


def test_hostile_invalid_lines_are_each_reported_and_nothing_is_sent(tmp_path,
                                                                     cometkit_sandbox):
    good, ids = hostile_valid_lines(random.Random(7), 10)
    bad = [
        b"{not json}\n",
        b'{"custom_id": 12, "prompt": "x", "model": "m"}\n',
        b'{"custom_id": "w1", "prompt": ["x"], "model": "m"}\n',
        b'{"custom_id": "w2", "messages": "hi", "model": "m"}\n',
        b'{"custom_id": "w3", "method": "POST", "url": "/v1/embeddings", "body": []}\n',
        b'["custom_id", "r000"]\n',
        b'{"custom_id": "r000", "prompt": "again", "model": "m"}\n',  # a duplicate id
        b'{"custom_id": "nul", "prompt": "\x00", "model": "m"}\n',
        b'{"custom_id": "bytes", "prompt": "\xff\xfe", "model": "m"}\n',
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes(good + b"".join(bad))
    first_bad = good.count(b"\n") + 1
    with pytest.raises(BatchInputError) as caught:
        BatchRunner(source, tmp_path / "out.jsonl").prepare()
    assert [p.line for p in caught.value.problems] == list(range(first_bad,
                                                                 first_bad + len(bad)))
    config = config_for(tmp_path, cometkit_sandbox.base_url)
    done = run_cli("batch", source, "-o", "out.jsonl", "--config", config, cwd=tmp_path,
                   env=cli_env(COMETAPI_KEY="sk-x"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{len(bad)} invalid line(s)" in done.stderr
    assert cometkit_sandbox.stats()["attempts"] == 0
    assert not (tmp_path / "out.jsonl").exists()

    source.write_bytes(good)  # the fix: drop the bad lines; the rest runs exactly once
    done = run_cli("batch", source, "-o", "out.jsonl", "--config", config, cwd=tmp_path,
                   env=cli_env(COMETAPI_KEY="sk-x"))
    assert done.returncode == 0, done.stderr
    assert_each_once(read_whole_lines(tmp_path / "out.jsonl"), ids)
    assert cometkit_sandbox.stats()["attempts"] == 10


def test_write_error_in_process_is_a_batch_write_error(tmp_path, cometkit_sandbox):
    """The library raises the typed error itself (the CLI only prints it)."""
    source = tmp_path / "in.jsonl"
    write_prompts(source, 50)
    output = tmp_path / "out.jsonl"
    code = (
        "import resource, sys, cometkit\n"
        "from cometkit.batch import BatchRunner, BatchWriteError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))\n"
        f"with cometkit.Client('sk-x', {cometkit_sandbox.base_url!r}) as client, "
        f"BatchRunner({str(source)!r}, {str(output)!r}) as runner:\n"
        "    try:\n"
        "        runner.run(client)\n"
        "    except BatchWriteError as exc:\n"
        "        print(type(exc.__cause__).__name__, exc.__cause__.errno, exc.result.ok)\n"
        "        sys.exit(7)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=cli_env())
    assert done.returncode == 7, done.stderr
    name, number, ok = done.stdout.split()
    assert name == "OSError" and int(number) == 27  # EFBIG
    assert int(ok) == len(read_whole_lines(output)) > 0
    assert issubclass(BatchWriteError, BatchRunError)
