"""The batch runner behind ``cometkit batch``: JSONL in, JSONL out, resumable, flat memory.

The input format (what a line may say) is :mod:`cometkit._batch_input`. The runner works in
two streamed passes over the input and never holds its lines:

1. :meth:`BatchRunner.prepare` validates every line (JSON, ``custom_id`` present and unique,
   known URL and method, a model for every request) and collects *all* problems with their
   line numbers before anything is sent. It then reads the output file of an earlier run to
   learn which ``custom_id`` values are already answered, cutting off a last line torn by a
   killed process, and (with ``retry_failed``) rewrites the file without its failed lines.
2. :meth:`BatchRunner.run` reads the input again and sends each unanswered line through the
   client's worker pool, at most ``max_in_flight`` at a time. Each worker writes its own
   result line, whole and flushed, as soon as the call ends (completion order): a crash loses
   only the calls that were in flight, and a rerun sends exactly those again.

The only per-line state is two :class:`~cometkit._idset.DigestSet` (8 bytes per id): the
input's ids, for the duplicate check, and the answered ids, for resuming.

Input lines are the OpenAI Batch API format::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

or the shorthand for chat completions (any other key goes into the request body)::

    {"custom_id": "q1", "prompt": "Say hello.", "model": "gpt-4o-mini", "temperature": 0}
    {"custom_id": "q2", "messages": [{"role": "user", "content": "Hi"}]}

Output lines are the OpenAI Batch output format::

    {"id": "batch_req_...", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A failed call keeps its line: ``error`` is ``{"code", "message"}``, and ``response`` holds the
error answer when there was one (``null`` for a connection failure).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import tempfile
import threading
import uuid
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator, Optional

from ._batch_input import (
    ALLOWED_METHODS,
    ALLOWED_URLS,
    MAX_PROBLEMS,
    BatchInputError,
    BatchItem,
    LineError,
    Problem,
    parse_line,
    read_lines,
)
from ._client import check_count
from ._engine import usage_tokens
from ._exceptions import APIConnectionError, APIError, APIStatusError, APITimeoutError, CometError
from ._idset import DigestSet
from ._workers import Window
from .budget import Budget, Reservation

__all__ = [
    "ALLOWED_URLS",
    "ALLOWED_METHODS",
    "BatchItem",
    "BatchPlan",
    "BatchResult",
    "BatchRunner",
    "BatchInputError",
    "BatchOutputError",
    "BatchFileError",
    "BatchRunError",
    "BatchWriteError",
    "Problem",
    "parse_line",
    "is_ok_record",
    "encode_record",
]

logger = logging.getLogger("cometkit.batch")


class BatchOutputError(CometError):
    """The output file cannot be resumed (it is not an earlier run's output, or is locked)."""


class BatchFileError(CometError, OSError):
    """The input or the output cannot be used as a file (missing, a directory, a pipe,
    unreadable); nothing was sent. An ``OSError`` too, for callers that catch those."""


class BatchRunError(CometError):
    """The run stopped before every request had its line, on an error outside the calls
    themselves (the input changed under it, a callback raised, a result could not be written).

    Every line written before it is whole and kept; rerunning the same batch resumes.
    ``result`` holds the counts of this run up to the stop.
    """

    def __init__(self, message: str, result: Optional[BatchResult] = None) -> None:
        super().__init__(message)
        self.result = result


class BatchWriteError(BatchRunError):
    """The output file cannot be written (disk full, file size limit, I/O error): the run
    stopped admitting requests at the first failed write and wrote nothing after it."""


def is_ok_record(record: Any) -> bool:
    """Whether an output line records a successful answer."""
    if not isinstance(record, dict) or record.get("error") is not None:
        return False
    response = record.get("response")
    if not isinstance(response, dict):
        return False
    status = response.get("status_code")
    return isinstance(status, int) and 200 <= status < 300


def answer_usage(response: Any) -> tuple[Optional[str], Optional[int], Optional[int]]:
    """``(model, input tokens, output tokens)`` of an output line's ``response``, from its
    body's ``model`` and ``usage`` (``None`` for what it does not say)."""
    body = response.get("body") if isinstance(response, dict) else None
    if not isinstance(body, dict):
        return None, None, None
    model = body.get("model") if isinstance(body.get("model"), str) else None
    input_tokens, output_tokens = usage_tokens(body.get("usage"))
    return (model, input_tokens if _is_count(input_tokens) else None,
            output_tokens if _is_count(output_tokens) else None)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count_usage(usage_by_model: dict, response: Any) -> None:
    """Add one answer of an earlier run to :attr:`BatchPlan.earlier_usage`."""
    model, input_tokens, output_tokens = answer_usage(response)
    if input_tokens is None and output_tokens is None:
        return  # an answer without usage: what it cost is not known
    longest, inputs, outputs = usage_by_model.get(model, (0, 0, 0))
    usage_by_model[model] = (max(longest, output_tokens or 0), inputs + (input_tokens or 0),
                             outputs + (output_tokens or 0))


def encode_record(record: dict) -> bytes:
    """One output line, newline included, that reads back to exactly ``record``.

    UTF-8 as it is; but a string holding a lone surrogate (half an emoji: ``"\\ud83d"`` is
    valid JSON, from the input or echoed by the server, yet not encodable as UTF-8) makes the
    whole line ASCII with ``\\u`` escapes instead. Either way the line is valid JSON whose
    values are the record's own, so a result is never lost to its encoding.
    """
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


def _write_all(out: IO[bytes], data: bytes) -> None:
    """Write ``data`` to an unbuffered file, going on after a short write (which a file that
    reaches the disk's or the process's size limit makes before it fails)."""
    view = memoryview(data)
    while view:
        written = out.write(view)
        if not written:
            raise OSError(errno.EIO, "the output file accepted no more bytes")
        view = view[written:]


@dataclass
class BatchPlan:
    """What :meth:`BatchRunner.prepare` found."""

    #: Requests in the input.
    total: int = 0
    #: Of those, already answered successfully in the output.
    done_ok: int = 0
    #: Of those, already answered with an error (and not to be retried).
    done_failed: int = 0
    #: Failed lines removed from the output to be sent again (``retry_failed``).
    retrying: int = 0
    #: Bytes of a torn last line cut off the output.
    truncated_bytes: int = 0
    #: Output lines whose custom_id is not in the input (kept, not counted).
    foreign_lines: int = 0
    #: The models the input's requests name (each once).
    models: set = field(default_factory=set)
    #: What the answers already in the output spent, by the model they name:
    #: ``model -> (longest answer, input tokens, output tokens)`` from their ``usage``.
    earlier_usage: dict = field(default_factory=dict)

    @property
    def pending(self) -> int:
        """Requests this run will send."""
        return self.total - self.done_ok - self.done_failed


@dataclass
class BatchResult:
    """What a run did, and the state of the output afterwards."""

    plan: BatchPlan
    ok: int = 0
    failed: int = 0
    #: The run was stopped (:meth:`BatchRunner.stop`) before every request was sent.
    interrupted: bool = False
    #: The run's budget was reached before every request was sent: the rest were not.
    budget_reached: bool = False

    @property
    def total_ok(self) -> int:
        return self.plan.done_ok + self.ok

    @property
    def total_failed(self) -> int:
        return self.plan.done_failed + self.failed

    @property
    def complete(self) -> bool:
        """Every input request has a line in the output."""
        return self.total_ok + self.total_failed == self.plan.total

    @property
    def unanswered(self) -> int:
        """Input requests without a line in the output yet (a rerun sends them)."""
        return self.plan.total - self.total_ok - self.total_failed


_SKIPPED = object()


class BatchRunner:
    """Runs one batch file through a :class:`cometkit.Client`.

    Use it as a context manager (or call :meth:`close`): from :meth:`prepare` on it holds the
    output file open with an exclusive lock, so two runs never write into one file.

    :param input_path: the JSONL input.
    :param output_path: the JSONL output; appended to, so a rerun resumes.
    :param model: the model for lines that name none.
    :param retry_failed: send again the lines an earlier run answered with an error.
    :param priority: the priority lane of its requests, one of the client's ``priorities``
        (``None``: the client's batch lane, ``batch`` with the default lanes), so that a
        batch sharing a limiter with interactive calls gives way to them.
    """

    def __init__(self, input_path: str, output_path: str, *, model: Optional[str] = None,
                 retry_failed: bool = False, priority: Optional[str] = None) -> None:
        self.input_path = os.fspath(input_path)
        self.output_path = os.fspath(output_path)
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise ValueError(f"model must be a non-empty string or None, got {model!r}")
        self.model = model
        self.retry_failed = retry_failed
        self.priority = priority
        self._answered = DigestSet()
        self._plan: Optional[BatchPlan] = None
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        #: The output, open for appending, unbuffered (each line is one write); ``None``
        #: before :meth:`prepare` and once abandoned.
        self._out: Optional[IO[bytes]] = None
        #: Bytes of whole lines in the output: a failed write is cut back to this.
        self._out_size = 0
        self._created = False
        #: The first error that stopped the run (see :meth:`run`), set once.
        self._failure: Optional[BatchRunError] = None
        #: A write failed: nothing more is written (under the write lock).
        self._output_failed = False
        self._failure_lock = threading.Lock()

    def __enter__(self) -> BatchRunner:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the output (removing it if this run created it and wrote nothing)."""
        with self._write_lock:
            out, self._out = self._out, None
            if out is None:
                return
            try:
                empty = os.fstat(out.fileno()).st_size == 0
                if not empty:
                    os.fsync(out.fileno())
            except OSError as exc:  # the lines are written; only their durability is unsure
                empty = False
                logger.warning("%s: could not sync the output to disk: %s", self.output_path,
                               exc.strerror or exc)
            finally:
                out.close()
        if empty and self._created:
            try:
                os.unlink(self.output_path)
            except OSError:  # pragma: no cover - best effort
                pass

    # -- pass 1: validate, and find what an earlier run answered -----------------------------

    def prepare(self) -> BatchPlan:
        """Validate the input, then open and lock the output and read what an earlier run
        wrote there. Nothing is written when the input is invalid.

        :raises BatchInputError: invalid lines (all of them counted, the first ones listed).
        :raises BatchOutputError: the output is the input, is not a batch output, or another
            run is writing it.
        :raises BatchFileError: a file cannot be read or written, or the input is not a
            regular file.
        """
        try:
            return self._prepare()
        except OSError as exc:
            if isinstance(exc, BatchFileError):
                raise
            name = exc.filename if exc.filename is not None else self.output_path
            raise BatchFileError(f"{os.fsdecode(name)}: {exc.strerror or exc}") from None

    def _prepare(self) -> BatchPlan:
        if not stat.S_ISREG(os.stat(self.input_path).st_mode):
            raise BatchFileError(
                f"{self.input_path}: the input must be a regular file: it is read twice (all "
                "lines checked first, then sent), which a pipe or a device cannot do. Save it "
                "to a file first.")
        if os.path.exists(self.output_path) and os.path.samefile(self.input_path,
                                                                 self.output_path):
            raise BatchOutputError("the output file is the input file: choose another -o")
        input_ids = DigestSet()
        models: set = set()
        problems: list[Problem] = []
        count = 0
        total = 0
        for line, raw in read_lines(self.input_path):
            try:
                item = parse_line(raw, line, model=self.model)
            except ValueError as exc:
                message: Optional[str] = str(exc)
            else:
                if item is None:
                    continue
                models.add(item.body.get("model"))
                message = None
                if not input_ids.add(item.custom_id):
                    message = f"duplicate custom_id {item.custom_id!r} (seen on an earlier line)"
            if message is not None:
                count += 1
                if len(problems) < MAX_PROBLEMS:
                    problems.append(Problem(line, message))
                continue
            total += 1
        if count:
            raise BatchInputError(self.input_path, problems, count)
        plan = BatchPlan(total=total, models=models)
        self._created = not os.path.exists(self.output_path)
        self._open_output()
        try:
            if not self._created:
                self._scan_output(plan, input_ids)
            assert self._out is not None
            self._out_size = os.fstat(self._out.fileno()).st_size  # after any repair
        except BaseException:
            self.close()
            raise
        self._plan = plan
        return plan

    def _open_output(self) -> None:
        # unbuffered: a line is on its way to the disk once written, and a failed write leaves
        # nothing behind in a buffer that a later flush (or close) would try again
        out = open(self.output_path, "ab", buffering=0)  # held until close()
        try:
            _lock_exclusively(out, self.output_path)
            self._out_size = os.fstat(out.fileno()).st_size
        except BaseException:
            out.close()
            raise
        self._out = out

    def _scan_output(self, plan: BatchPlan, input_ids: DigestSet) -> None:
        """Count answered ids, repair a torn last line, drop failed lines when retrying them."""
        answered = DigestSet()
        offset = 0
        keep_until = 0  # end of the last whole record
        needs_newline = False
        failed_lines = 0
        with open(self.output_path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                offset += len(raw)
                complete = raw.endswith(b"\n")
                record = self._output_record(raw, number, last_and_torn=not complete)
                if record is None:  # a line cut short by a killed run: cut off below
                    break
                keep_until, needs_newline = offset, not complete
                custom_id = record["custom_id"]
                if custom_id not in input_ids:
                    plan.foreign_lines += 1
                    continue
                ok = is_ok_record(record)
                if not ok and self.retry_failed:
                    failed_lines += 1
                elif answered.add(custom_id):
                    if ok:
                        plan.done_ok += 1
                        _count_usage(plan.earlier_usage, record["response"])
                    else:
                        plan.done_failed += 1
        if offset > keep_until:
            logger.info("%s: cutting a torn last line (%d bytes) left by an interrupted run",
                        self.output_path, offset - keep_until)
            with open(self.output_path, "r+b") as handle:
                handle.truncate(keep_until)
            plan.truncated_bytes = offset - keep_until
        elif needs_newline:  # a whole last record without its newline: keep it
            with open(self.output_path, "ab") as handle:
                handle.write(b"\n")
        if failed_lines:
            self._drop_failed_lines(input_ids)
            plan.retrying = failed_lines
            # the file at this path is a new one now: hold and lock it instead
            old, self._out = self._out, None
            if old is not None:
                old.close()
            self._open_output()
        self._answered = answered

    def _output_record(self, raw: bytes, number: int, *, last_and_torn: bool) -> Optional[dict]:
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("custom_id"), str):
            return record
        if last_and_torn:
            return None
        raise BatchOutputError(
            f"{self.output_path}:{number}: not a batch output line, so this file cannot be "
            "resumed. Choose another -o, or move the file away.")

    def _drop_failed_lines(self, input_ids: DigestSet) -> None:
        """Rewrite the output without the failed lines of this input (temp file + atomic
        rename), so that each ``custom_id`` ends up in the file exactly once."""
        directory = os.path.dirname(os.path.abspath(self.output_path))
        fd, temp = tempfile.mkstemp(prefix=".cometkit-batch-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                for _, raw in read_lines(self.output_path):
                    record = json.loads(raw)
                    if is_ok_record(record) or record["custom_id"] not in input_ids:
                        out.write(raw)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.chmod(temp, os.stat(self.output_path).st_mode & 0o777)
            except OSError:  # pragma: no cover - best effort
                pass
            os.replace(temp, self.output_path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise

    # -- pass 2: send ------------------------------------------------------------------------

    def pending_items(self) -> Iterator[BatchItem]:
        """The input's requests not answered yet, read again line by line; stops early once
        :meth:`stop` was called."""
        for line, raw in read_lines(self.input_path):
            if self._stop.is_set():
                return
            item = parse_line(raw, line, model=self.model)
            if item is not None and item.custom_id not in self._answered:
                yield item

    def run(
        self,
        client: Any,
        *,
        max_in_flight: Optional[int] = None,
        on_result: Optional[Callable[[bool], None]] = None,
        budget: Optional[Budget] = None,
    ) -> BatchResult:
        """Send every pending request through ``client`` and write each result line.

        Results are written in completion order by the workers themselves. Up to
        ``max_in_flight`` requests (default: twice the client's concurrency) are submitted at
        once; unlike ``client.map``, a slow request (say, one waiting out a long
        ``Retry-After``) does not hold back those behind it.

        Every request sent ends as exactly one line, or the run stops: an error outside the
        call itself (the output cannot be written, ``on_result`` raises, the input changed
        since :meth:`prepare`) stops admitting requests at once and is raised once those in
        flight have finished. They are written, unless the output itself failed: then nothing
        is written after the failed write.

        With a ``budget`` (:class:`cometkit.budget.Budget`), a request is sent only while
        the job's spend -- earlier runs into this output included -- plus the reservations of
        the calls in flight plus its own estimate stays within it. The first request that
        would pass it, and every one after, is not sent: those in flight finish and are
        written, and the result says :attr:`BatchResult.budget_reached`. A rerun with a higher
        budget sends exactly the rest.

        :param on_result: called with ``True`` (ok) or ``False`` (failed) after each line is
            written, under the output lock, from a worker thread.
        :param budget: the ceiling on tokens or cost; one budget serves one run.
        :raises BatchWriteError: a line could not be written (disk full, file size limit).
        :raises BatchRunError: another error stopped the run; what was written is kept.
        :raises ConfigError: a cost budget without the price of a model of the input or of
            the answers already in the output; nothing was sent.
        """
        window = _check_window(max_in_flight, client)
        priority = self.lane(client)
        if on_result is not None and not callable(on_result):
            raise TypeError(f"on_result must be callable, got {type(on_result).__name__}")
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"budget must be a cometkit.budget.Budget or None, got "
                            f"{type(budget).__name__}")
        plan = self._plan if self._plan is not None else self.prepare()
        if budget is not None:
            self.check_budget(budget)
            budget.add_earlier(plan.earlier_usage)
        result = BatchResult(plan)
        counts = [0, 0]  # ok, failed; changed under the write lock
        in_flight = Window(client.workers, window)

        def settle(reservation: Optional[Reservation], response: Any = None, *,
                   answered: bool = False) -> None:
            """Replace a reservation with what the request spent (its answer's usage)."""
            if reservation is not None and budget is not None:
                _, input_tokens, output_tokens = answer_usage(response)
                budget.settle(reservation, (input_tokens, output_tokens), answered=answered)

        def work(item: BatchItem, reservation: Optional[Reservation]) -> Any:
            if self._stop.is_set():  # queued when the run was stopped: not started, not written
                settle(reservation)
                return _SKIPPED
            ok, record = False, {"response": None}
            try:
                ok, record = self._call(client, item, priority)
            finally:
                settle(reservation, record["response"] if ok else None, answered=ok)
            return self._write(item, encode_record(record), ok, counts, on_result)

        def finished(future: Future) -> None:
            try:
                error = future.exception()
            except CancelledError:  # the pool was shut down under the run
                error = None
                self._fail(BatchRunError("the client's worker pool was shut down during the "
                                         "run; rerun the same command to resume"))
            if error is not None:
                self._fail(BatchRunError(
                    f"the batch stopped: {type(error).__name__} while handling a result: "
                    f"{error}. The lines written so far are kept; rerun to resume."),
                    cause=error)

        if self._out is None:
            raise RuntimeError("BatchRunner.run() after close()")
        submitted = 0
        try:
            for item in self._pending_checked():
                while not in_flight.wait(in_flight.has_room):
                    pass
                if self._stop.is_set():
                    break
                reservation = None
                if budget is not None:
                    reservation = budget.admit(item.body, stopping=self._stop.is_set)
                    if reservation is None:  # reached (or stopped while waiting to know)
                        break
                try:
                    future = client.submit(work, item, reservation)
                except BaseException:
                    settle(reservation)
                    raise
                submitted += 1
                future.add_done_callback(finished)
                in_flight.add(future)  # after ``finished``: counted done once it has run
        except BaseException as exc:
            self._stop.set()  # e.g. KeyboardInterrupt without the CLI's handler: admit no more
            if isinstance(exc, CometError) or not isinstance(exc, Exception):
                raise
            self._fail(BatchRunError(f"the batch stopped: {type(exc).__name__}: {exc}. The "
                                     "lines written so far are kept; rerun to resume."),
                       cause=exc)
        finally:
            # wait for those in flight (each call is bounded by its timeouts)
            while not in_flight.wait(lambda: in_flight.unfinished == 0):
                pass
        result.ok, result.failed = counts
        reached = budget is not None and budget.reached
        result.budget_reached = reached and not result.complete
        result.interrupted = self._stop.is_set() and not reached and not result.complete
        if self._failure is not None:
            self._failure.result = result
            raise self._failure
        if not self._stop.is_set() and not reached:
            if submitted != plan.pending:
                raise BatchRunError(f"{self.input_path} changed during the run: {plan.pending} "
                                    f"request(s) to send were counted, {submitted} found. "
                                    "Rerun to send what is missing.", result)
            if result.ok + result.failed != submitted:
                # cannot happen by design; never let a request end without its line unnoticed
                raise BatchRunError(f"{submitted - result.ok - result.failed} request(s) ended "
                                    "without a line in the output; rerun to send them", result)
        return result

    def check_budget(self, budget: Budget) -> None:
        """Refuse a cost budget without the price of every model the job involves: the
        input's, and those of the answers already in the output (:meth:`prepare` first).

        :raises ConfigError: naming the model, the configuration file and the key to add.
        """
        plan = self._plan if self._plan is not None else self.prepare()
        budget.check_prices(plan.models, sent_from=self.input_path)
        budget.check_prices(plan.earlier_usage, sent_from=f"the answers already in "
                                                          f"{self.output_path}")

    def _pending_checked(self) -> Iterator[BatchItem]:
        """:meth:`pending_items`, with a line that no longer parses (the file was edited since
        :meth:`prepare`) or an unreadable input as a :class:`BatchRunError`."""
        items = self.pending_items()
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except LineError as exc:
                raise BatchRunError(f"{self.input_path} changed during the run and now has an "
                                    f"invalid line: {exc}. Fix it and rerun to resume.") from None
            except OSError as exc:
                raise BatchRunError(f"{self.input_path}: cannot read the input any more: "
                                    f"{exc.strerror or exc}. Rerun to resume.") from None
            yield item

    def _write(self, item: BatchItem, line: bytes, ok: bool, counts: list[int],
               on_result: Optional[Callable[[bool], None]]) -> Any:
        """Append one result line, whole, or write nothing: after the first failed write the
        run stops and no line follows it (a torn line in the middle could not be repaired).
        After another error that stopped the run, the calls in flight are still written."""
        with self._write_lock:
            out = self._out
            if out is None or self._output_failed:  # abandoned, or the output is unwritable
                return _SKIPPED
            try:
                _write_all(out, line)
            except OSError as exc:
                self._output_failed = True
                with contextlib.suppress(OSError):  # cut a partly written line back off
                    os.ftruncate(out.fileno(), self._out_size)
                self._fail(BatchWriteError(_write_error_message(self.output_path, exc)),
                           cause=exc)
                logger.debug("custom_id %r: result not written: %s", item.custom_id, exc)
                return _SKIPPED
            self._out_size += len(line)
            counts[0 if ok else 1] += 1
            if on_result is not None:
                on_result(ok)
        return ok

    def _fail(self, error: BatchRunError, *, cause: Optional[BaseException] = None) -> None:
        """Keep the first error that stops the run, and admit no more requests."""
        if cause is not None:
            error.__cause__ = cause
        with self._failure_lock:
            if self._failure is None:
                self._failure = error
        self._stop.set()

    def lane(self, client: Any) -> str:
        """The priority lane this run sends in through ``client``: :attr:`priority`, else the
        client's batch lane.

        :raises ConfigError: :attr:`priority` is not one of the client's lanes.
        """
        lanes = client.priorities
        return lanes.resolve(lanes.batch if self.priority is None else self.priority)[0]

    def _call(self, client: Any, item: BatchItem,
              priority: Optional[str] = None) -> tuple[bool, dict]:
        """Send one request; the output record, never an exception."""
        record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}",
                                  "custom_id": item.custom_id, "response": None, "error": None}
        try:
            value = client.request(item.method, item.route, json=item.body, priority=priority)
        except APIStatusError as exc:
            record["response"] = {"status_code": exc.status_code, "request_id": exc.request_id,
                                  "body": exc.response_body}
            record["error"] = {"code": exc.code or _status_code_name(exc.status_code),
                               "message": str(exc)}
            return False, record
        except APITimeoutError as exc:
            record["error"] = {"code": "timeout", "message": str(exc)}
            return False, record
        except APIConnectionError as exc:
            record["error"] = {"code": "connection_error", "message": str(exc)}
            return False, record
        except APIError as exc:
            record["error"] = {"code": exc.code or "api_error", "message": str(exc)}
            return False, record
        except Exception as exc:  # a line is never dropped, whatever went wrong
            logger.exception("custom_id %r failed unexpectedly", item.custom_id)
            record["error"] = {"code": "internal_error",
                               "message": f"{type(exc).__name__}: {exc}"}
            return False, record
        body = value.to_dict() if hasattr(value, "to_dict") else value
        request_id = getattr(value, "_request_id", None)
        record["response"] = {"status_code": 200, "request_id": request_id, "body": body}
        return True, record

    # -- interruption --------------------------------------------------------------------

    def stop(self) -> None:
        """Admit no more requests: queued ones are skipped (not written), in-flight ones
        finish and are written. Safe to call from a signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def abandon(self, timeout_s: float = 5.0) -> None:
        """Flush what is written and write nothing more (in-flight calls are abandoned).

        The caller is expected to exit the process right after.
        """
        self._stop.set()
        got = self._write_lock.acquire(timeout=timeout_s)
        try:
            self._out = None  # unbuffered: every line written is already in the file
        finally:
            if got:
                self._write_lock.release()


_STATUS_NAMES = {400: "bad_request", 401: "authentication_error", 403: "permission_denied",
                 404: "not_found", 409: "conflict", 422: "unprocessable_entity",
                 429: "rate_limit_exceeded"}


def _write_error_message(path: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space"
    elif exc.errno == errno.EFBIG:
        fix = "raise the file size limit (ulimit -f) or write to another file system"
    else:
        fix = "fix the cause"
    return (f"cannot write {path}: {reason}; stopped sending at the first failed write. "
            f"Every answer written before it is kept: {fix}, then run the same command again "
            "to send the rest.")


def _check_window(max_in_flight: Any, client: Any) -> int:
    """``max_in_flight`` checked (a whole number >= 1), or twice the client's concurrency."""
    if max_in_flight is None:
        return 2 * int(getattr(client, "concurrency", 4))
    return check_count("max_in_flight", max_in_flight)


def _status_code_name(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _STATUS_NAMES.get(status, f"http_{status}")


def _lock_exclusively(handle: IO[bytes], path: str) -> None:
    """Refuse to run two batches into one output file at once (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise BatchOutputError(f"{path} is being written by another cometkit batch; wait for "
                               "it to finish, or choose another -o") from None
