"""The batch runner behind ``cometkit batch``: JSONL in, JSONL out, resumable, flat memory.

The input format (what a line may say: OpenAI Batch API lines, or a shorthand for chat
completions) is :mod:`cometkit._batch_input`. The runner works in two streamed passes over the
input and never holds its lines:

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

The output lines, in the OpenAI Batch output format, are :mod:`cometkit._batch_output`; the
output file (its lock, the repair of a torn line, the resume set, appending) is
:mod:`cometkit._batch_journal`.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from concurrent.futures import CancelledError, Future
from typing import Any, Callable, Iterator, Optional

from ._batch_input import (
    ALLOWED_METHODS,
    ALLOWED_URLS,
    BatchInputError,
    BatchItem,
    LineError,
    Problem,
    check_input,
    parse_line,
    read_lines,
)
from ._batch_journal import LineNotWritten, OutputJournal
from ._batch_outcome import (
    BatchFileError,
    BatchOutputError,
    BatchPlan,
    BatchResult,
    BatchRunError,
    BatchWriteError,
)
from ._batch_output import answer_usage, call_record, encode_record, is_ok_record
from ._client_args import check_count
from ._exceptions import CometError
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
        self._journal = OutputJournal(self.output_path)
        #: The first error that stopped the run (see :meth:`run`), set once.
        self._failure: Optional[BatchRunError] = None
        self._failure_lock = threading.Lock()

    def __enter__(self) -> BatchRunner:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the output (removing it if this run created it and wrote nothing)."""
        self._journal.close()

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
        total, models, input_ids = check_input(self.input_path, model=self.model)
        plan = BatchPlan(total=total, models=models)
        self._answered = self._journal.open(plan, input_ids, retry_failed=self.retry_failed)
        self._plan = plan
        return plan

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
        counts = [0, 0]  # ok, failed; changed under the journal's lock
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
                ok, record = call_record(client, item, priority)
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

        if self._journal.closed:
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

        def written() -> None:  # under the journal's lock
            counts[0 if ok else 1] += 1
            if on_result is not None:
                on_result(ok)

        try:
            if not self._journal.append(line, written):  # abandoned, or unwritable
                return _SKIPPED
        except LineNotWritten as failed:
            exc = failed.error
            self._fail(BatchWriteError.of(self.output_path, exc), cause=exc)
            logger.debug("custom_id %r: result not written: %s", item.custom_id, exc)
            return _SKIPPED
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
        self._journal.abandon(timeout_s)


def _check_window(max_in_flight: Any, client: Any) -> int:
    """``max_in_flight`` checked (a whole number >= 1), or twice the client's concurrency."""
    if max_in_flight is None:
        return 2 * int(getattr(client, "concurrency", 4))
    return check_count("max_in_flight", max_in_flight)
