"""The output file of ``cometkit batch`` as a journal: locked, repaired, resumed, appended to.

A batch run holds its output file open, with an exclusive lock, from
:meth:`~cometkit.batch.BatchRunner.prepare` to its close, so two runs never write into one
file. Opening it reads what an earlier run wrote there: the ``custom_id`` values already
answered (the resume set, a :class:`~cometkit._idset.DigestSet` of 8 bytes per id), a last line
torn by a killed process (cut off), and, when failed lines are to be sent again, a rewrite of
the file without them. Each result is then appended as one whole, unbuffered write: a crash
loses only the calls that were in flight, and after a failed write nothing more is written (a
torn line in the middle could not be repaired).

What a line says is :mod:`cometkit._batch_output`; the runner is :mod:`cometkit.batch`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
import threading
from typing import IO, Callable, Optional

from ._batch_input import read_lines
from ._batch_outcome import BatchOutputError, BatchPlan
from ._batch_output import count_usage, is_ok_record
from ._idset import DigestSet

__all__ = ["LineNotWritten", "OutputJournal"]

logger = logging.getLogger("cometkit.batch")


class LineNotWritten(Exception):
    """The output refused a line (disk full, file size limit, I/O error): the line was cut back
    off, and the journal writes nothing more. ``error`` is the write's ``OSError``."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class OutputJournal:
    """The output file of one batch run (see the module docstring).

    :param path: the JSONL output; appended to, so a rerun resumes.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        #: This run created the file (so :meth:`close` removes it if nothing was written).
        self.created = False
        self._lock = threading.Lock()
        #: The output, open for appending, unbuffered (each line is one write); ``None``
        #: before :meth:`open` and once closed or abandoned.
        self._out: Optional[IO[bytes]] = None
        #: Bytes of whole lines in the output: a failed write is cut back to this.
        self._size = 0
        #: A write failed: nothing more is written (under the lock).
        self._failed = False

    @property
    def closed(self) -> bool:
        """Not open (yet), closed, or abandoned: nothing can be appended."""
        return self._out is None

    # -- opening: lock, and read what an earlier run wrote ------------------------------------

    def open(self, plan: BatchPlan, input_ids: DigestSet, *, retry_failed: bool) -> DigestSet:
        """Open and lock the file, and read what an earlier run wrote there into ``plan``
        (its answered, failed and foreign lines, a torn last line cut off, failed lines
        removed when ``retry_failed``).

        :returns: the ``custom_id`` values of ``input_ids`` already answered (the resume set).
        :raises BatchOutputError: another run is writing the file, or it is not a batch output.
        :raises OSError: the file cannot be read or written.
        """
        self.created = not os.path.exists(self.path)
        self._open()
        try:
            answered = (DigestSet() if self.created
                        else self._scan(plan, input_ids, retry_failed=retry_failed))
            assert self._out is not None
            self._size = os.fstat(self._out.fileno()).st_size  # after any repair
        except BaseException:
            self.close()
            raise
        return answered

    def _open(self) -> None:
        # unbuffered: a line is on its way to the disk once written, and a failed write leaves
        # nothing behind in a buffer that a later flush (or close) would try again
        out = open(self.path, "ab", buffering=0)  # held until close()
        try:
            _lock_exclusively(out, self.path)
            self._size = os.fstat(out.fileno()).st_size
        except BaseException:
            out.close()
            raise
        self._out = out

    def _scan(self, plan: BatchPlan, input_ids: DigestSet, *, retry_failed: bool) -> DigestSet:
        """Count answered ids, repair a torn last line, drop failed lines when retrying them."""
        answered = DigestSet()
        offset = 0
        keep_until = 0  # end of the last whole record
        needs_newline = False
        failed_lines = 0
        with open(self.path, "rb") as handle:
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
                if not ok and retry_failed:
                    failed_lines += 1
                elif answered.add(custom_id):
                    if ok:
                        plan.done_ok += 1
                        count_usage(plan.earlier_usage, record["response"])
                    else:
                        plan.done_failed += 1
        if offset > keep_until:
            logger.info("%s: cutting a torn last line (%d bytes) left by an interrupted run",
                        self.path, offset - keep_until)
            with open(self.path, "r+b") as handle:
                handle.truncate(keep_until)
            plan.truncated_bytes = offset - keep_until
        elif needs_newline:  # a whole last record without its newline: keep it
            with open(self.path, "ab") as handle:
                handle.write(b"\n")
        if failed_lines:
            self._drop_failed_lines(input_ids)
            plan.retrying = failed_lines
            # the file at this path is a new one now: hold and lock it instead
            old, self._out = self._out, None
            if old is not None:
                old.close()
            self._open()
        return answered

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
            f"{self.path}:{number}: not a batch output line, so this file cannot be "
            "resumed. Choose another -o, or move the file away.")

    def _drop_failed_lines(self, input_ids: DigestSet) -> None:
        """Rewrite the output without the failed lines of this input (temp file + atomic
        rename), so that each ``custom_id`` ends up in the file exactly once."""
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, temp = tempfile.mkstemp(prefix=".cometkit-batch-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                for _, raw in read_lines(self.path):
                    record = json.loads(raw)
                    if is_ok_record(record) or record["custom_id"] not in input_ids:
                        out.write(raw)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.chmod(temp, os.stat(self.path).st_mode & 0o777)
            except OSError:  # pragma: no cover - best effort
                pass
            os.replace(temp, self.path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise

    # -- appending -------------------------------------------------------------------------

    def append(self, line: bytes, then: Optional[Callable[[], None]] = None) -> bool:
        """Append one result line, whole, or write nothing; ``then`` is called under the
        journal's lock once the line is written (one thread at a time).

        :returns: whether the line was written (not: the journal is closed, abandoned, or an
            earlier write failed).
        :raises LineNotWritten: this write failed; nothing is written after it.
        """
        with self._lock:
            out = self._out
            if out is None or self._failed:  # abandoned, or the output is unwritable
                return False
            try:
                _write_all(out, line)
            except OSError as exc:
                self._failed = True
                with contextlib.suppress(OSError):  # cut a partly written line back off
                    os.ftruncate(out.fileno(), self._size)
                raise LineNotWritten(exc) from exc
            self._size += len(line)
            if then is not None:
                then()
        return True

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the file (removing it if this run created it and wrote nothing)."""
        with self._lock:
            out, self._out = self._out, None
            if out is None:
                return
            try:
                empty = os.fstat(out.fileno()).st_size == 0
                if not empty:
                    os.fsync(out.fileno())
            except OSError as exc:  # the lines are written; only their durability is unsure
                empty = False
                logger.warning("%s: could not sync the output to disk: %s", self.path,
                               exc.strerror or exc)
            finally:
                out.close()
        if empty and self.created:
            try:
                os.unlink(self.path)
            except OSError:  # pragma: no cover - best effort
                pass

    def abandon(self, timeout_s: float = 5.0) -> None:
        """Write nothing more, waiting up to ``timeout_s`` for a write under way (the file is
        unbuffered: every line written is already in it)."""
        got = self._lock.acquire(timeout=timeout_s)
        try:
            self._out = None
        finally:
            if got:
                self._lock.release()


def _write_all(out: IO[bytes], data: bytes) -> None:
    """Write ``data`` to an unbuffered file, going on after a short write (which a file that
    reaches the disk's or the process's size limit makes before it fails)."""
    view = memoryview(data)
    while view:
        written = out.write(view)
        if not written:
            raise OSError(errno.EIO, "the output file accepted no more bytes")
        view = view[written:]


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
