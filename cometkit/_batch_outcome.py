"""What a batch run reports: its counts, and the errors that stop it.

:class:`BatchPlan` is what :meth:`~cometkit.batch.BatchRunner.prepare` found in the input and
in an earlier run's output, :class:`BatchResult` what the run then did; the errors say why a
run sent nothing (:class:`BatchFileError`, :class:`BatchOutputError`) or stopped before every
request had its line (:class:`BatchRunError`, :class:`BatchWriteError`, with the result so
far). Filled by the runner (:mod:`cometkit.batch`) and its output journal
(:mod:`cometkit._batch_journal`), read by the CLI for its messages and exit code; all are
public as :mod:`cometkit.batch` names.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Optional

from ._exceptions import CometError

__all__ = ["BatchPlan", "BatchResult", "BatchFileError", "BatchOutputError", "BatchRunError",
           "BatchWriteError"]


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


class BatchFileError(CometError, OSError):
    """The input or the output cannot be used as a file (missing, a directory, a pipe,
    unreadable); nothing was sent. An ``OSError`` too, for callers that catch those."""


class BatchOutputError(CometError):
    """The output file cannot be resumed (it is not an earlier run's output, or is locked)."""


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

    @classmethod
    def of(cls, path: str, exc: OSError) -> BatchWriteError:
        """The error of a failed write of ``exc`` to the output ``path``, saying what to fix."""
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free some space"
        elif exc.errno == errno.EFBIG:
            fix = "raise the file size limit (ulimit -f) or write to another file system"
        else:
            fix = "fix the cause"
        return cls(f"cannot write {path}: {reason}; stopped sending at the first failed write. "
                   f"Every answer written before it is kept: {fix}, then run the same command "
                   "again to send the rest.")
