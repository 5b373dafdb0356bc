"""How an asynchronous call is doing, readable by the process that scheduled it whatever queue runs
it: :class:`CallStatus` (a few bytes of shared memory) and :class:`TrackedCall` (an ``async_fn``
wrapper that writes it).

tasd's :class:`~tasd.managers.async_ckpt.AsyncCallsQueue` knows how its own calls end. A queue tasd
does not hold (megatron-core's ``AsyncCallsQueue``, where Megatron-LM schedules the requests of its
local checkpoints) offers no way to ask about one call; a :class:`TrackedCall` reports to its
:class:`CallStatus` from the worker process itself, so the scheduling process can wait for that
call without the queue (see ``SaveJob.wait_for_writer``).

The status is a row of a shared-memory table (64 rows of 1 KiB, allocated once per process and
reused: a save allocates no shared memory of its own): a forked worker inherits it, and a spawned
worker receives it through torch's multiprocessing pickler (as it receives the staging buffer), so
both write where the scheduling process reads. Plain ``pickle`` copies it (then reports go
nowhere).
"""

from __future__ import annotations

import os
import threading
import traceback
from typing import Any, Callable

import numpy as np
import torch

NOT_STARTED, RUNNING, DONE, FAILED = 0, 1, 2, 3
_STATES = {NOT_STARTED: "not started", RUNNING: "running", DONE: "done", FAILED: "failed"}
_HEADER = 20  # int64 state, int64 pid, int32 text length
_TEXT = 1004  # longest error text kept (bytes of UTF-8; the end of a traceback is kept)
_ROWS = 64  # rows per shared table


class _Table:
    """A block of status rows in one shared-memory storage, and which rows are free."""

    def __init__(self) -> None:
        self.rows = torch.zeros(_ROWS, _HEADER + _TEXT, dtype=torch.uint8).share_memory_()
        self.free = list(range(_ROWS - 1, -1, -1))


_tables: list[_Table] = []
_tables_lock = threading.Lock()


def _acquire_row() -> tuple[_Table, int, torch.Tensor]:
    with _tables_lock:
        table = next((t for t in _tables if t.free), None)
        if table is None:
            table = _Table()
            _tables.append(table)
        slot = table.free.pop()
    row = table.rows[slot]
    row.zero_()
    return table, slot, row


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie, exited but not yet reaped by
    its parent, counts as exited: megatron-core joins its forked worker only when it finalizes)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


class CallStatus:
    """One call's state (:data:`NOT_STARTED`, :data:`RUNNING`, :data:`DONE`, :data:`FAILED`), the
    pid of the process running it and, after a failure, the end of its traceback, in a 1 KiB row of
    a process-wide shared-memory table. Written by :class:`TrackedCall` in the worker, read with
    :meth:`read` anywhere; :meth:`release` gives the row back once no process can write it any
    more. Local (no collective); creating and releasing are thread-safe."""

    SIZE = _HEADER + _TEXT

    def __init__(self) -> None:
        self._table: _Table | None
        self._table, self._slot, self._t = _acquire_row()

    def __getstate__(self) -> dict:
        return {"_t": self._row()}  # the row alone (torch's pickler shares its storage); the copy owns no row

    def __setstate__(self, state: dict) -> None:
        self._table, self._slot, self._t = None, -1, state["_t"]

    def release(self) -> None:
        """Give the row back for another call (call it only when no worker can still write it);
        the status cannot be used afterwards. Idempotent; a copy received by a worker owns no row."""
        table, self._table, self._t = self._table, None, None
        if table is not None:
            with _tables_lock:
                table.free.append(self._slot)

    def _row(self) -> torch.Tensor:
        if self._t is None:
            raise ValueError("this CallStatus was released")
        return self._t

    def _words(self) -> np.ndarray:
        return self._row().numpy()[:16].view(np.int64)

    def started(self) -> None:
        """Record that this process runs the call."""
        words = self._words()
        words[1] = os.getpid()
        words[0] = RUNNING

    def finished(self, error: str | None) -> None:
        """Record the call's end: success (``error`` None) or failure with ``error``'s text."""
        raw = self._row().numpy()
        if error is not None:
            text = error.encode("utf-8", "replace")[-_TEXT:]
            raw[_HEADER:_HEADER + len(text)] = np.frombuffer(text, dtype=np.uint8)
            raw[16:20].view(np.int32)[0] = len(text)
        self._words()[0] = FAILED if error is not None else DONE

    def read(self) -> tuple[int, int, str | None]:
        """(state, pid of the process that started it or 0, error text of a failure or None)."""
        raw = self._row().numpy()
        state, pid = (int(x) for x in raw[:16].view(np.int64))
        text = None
        if state == FAILED:
            n = int(raw[16:20].view(np.int32)[0])
            text = bytes(raw[_HEADER:_HEADER + max(0, min(n, _TEXT))]).decode("utf-8", "replace")
        return state, pid, text

    def outcome(self) -> tuple[bool, str | None]:
        """``(finished, error)`` as tasd's callers report it: (False, None) while the call has not
        started or runs in a live process; (True, None) after success; (True, text) after a
        failure, or when the process that started the call is gone without finishing it."""
        state, pid, text = self.read()
        if state == DONE:
            return True, None
        if state == FAILED:
            return True, text or "the async call failed"
        if state == RUNNING and not process_alive(pid):
            return True, f"the process running the async call (pid {pid}) died before finishing it"
        return False, None

    def __repr__(self) -> str:
        if self._t is None:
            return "CallStatus(released)"
        state, pid, _ = self.read()
        return f"CallStatus({_STATES.get(state, state)}, pid={pid})"


class TrackedCall:
    """``fn`` reporting to ``status``: :meth:`CallStatus.started` before it runs, then
    :meth:`CallStatus.finished` with the traceback of what it raised (which is raised again) or
    None. Picklable when ``fn`` is (a module-level class)."""

    def __init__(self, fn: Callable[..., Any], status: CallStatus):
        self.fn = fn
        self.status = status

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.status.started()
        try:
            result = self.fn(*args, **kwargs)
        except BaseException:
            self.status.finished(traceback.format_exc())
            raise
        self.status.finished(None)
        return result

    def __repr__(self) -> str:
        return f"TrackedCall({self.fn!r})"
