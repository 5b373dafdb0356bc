"""Background executors of :class:`AsyncRequest` (after NVRx's ``TemporalAsyncCaller`` and
``PersistentAsyncCaller``). Local objects: nothing here is collective; agreement between ranks is
:class:`tasd.managers.async_ckpt.AsyncCallsQueue`'s job.

Both callers have one interface: :meth:`schedule` starts a request (preload_fn, if any, runs here
in the calling process, then device work is synchronized); the non-blocking ``poll(call_idx)`` and
``wait(call_idx, timeout)`` return ``(done, error)``: ``error`` is None on success, else the
worker's formatted traceback, or ``"async worker died with exit code X"`` when the worker died
without reporting; ``retire(call_idx)`` forgets a finalized or dropped call (stopping its work if
it still runs).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import time
import traceback
import weakref
from collections import deque
from multiprocessing.reduction import ForkingPickler
from typing import Any

from tasd import device
from tasd.managers.async_ckpt.request import AsyncRequest
from tasd.managers.errors import CheckpointingException

logger = logging.getLogger(__name__)

_POLL_SLEEP_S = 0.01
_MAX_POLL_SLEEP_S = 0.1
_PARENT_CHECK_S = 1.0  # how often an idle persistent worker checks that its training process lives


def _run_call(fn: Any, args: tuple, kwargs: dict) -> tuple[bool, str | None]:
    gc.disable()
    try:
        if fn is not None:
            fn(*args, **kwargs)
        return True, None
    except BaseException:  # report everything to the parent
        return False, traceback.format_exc()


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"async worker died with exit code {exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return f"async worker died with exit code {exitcode}"


def _wait(poll: Any, timeout: float | None) -> tuple[bool, str | None]:
    deadline = None if timeout is None else time.monotonic() + timeout
    sleep = _POLL_SLEEP_S
    while True:
        done, err = poll()
        if done:
            return done, err
        if deadline is not None and time.monotonic() >= deadline:
            return False, None
        time.sleep(sleep)
        sleep = min(sleep * 2, _MAX_POLL_SLEEP_S)


# ----------------------------------------------------------------------------- temporal


def _temporal_main(fn: Any, args: tuple, kwargs: dict, conn: Any) -> None:
    ok, err = _run_call(fn, args, kwargs)
    try:
        conn.send((ok, err))
    finally:
        conn.close()


class TemporalAsyncCaller:
    """Runs one request at a time in a fresh process forked (``'fork'`` context) for it, so the
    request needs not pickle and the child sees the parent's memory as of the fork (copy-on-write).
    The child reports through a pipe; a child that exits without reporting (killed, crashed) is a
    failure. The process is not a daemon: interpreter exit waits for a running save to end.
    Reusable once the current call is done."""

    persistent = False

    def __init__(self) -> None:
        self._proc: Any = None
        self._conn: Any = None
        self._call_idx: int | None = None
        self._result: tuple[bool, str | None] | None = None

    @property
    def busy(self) -> bool:
        """A call is scheduled and its result not yet collected by :meth:`poll`."""
        return self._call_idx is not None and self._result is None

    def schedule(self, req: AsyncRequest) -> None:
        """Fork a worker running ``req``. Raises CheckpointingException when a call is still running."""
        if self.busy:
            raise CheckpointingException("TemporalAsyncCaller already runs a call; poll it until done first")
        args = req.resolved_args()
        device.synchronize()
        ctx = mp.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_temporal_main, args=(req.async_fn, args, req.async_fn_kwargs, send),
                           name=f"tasd-async-{req.call_idx}")
        proc.start()
        send.close()
        self._proc, self._conn, self._call_idx, self._result = proc, recv, req.call_idx, None
        logger.debug("call %d forked as pid %s", req.call_idx, proc.pid)

    def poll(self, call_idx: int | None = None) -> tuple[bool, str | None]:
        """(done, error) of the current call (``call_idx``, when given, must be it), without
        blocking. Raises CheckpointingException when nothing, or another call, was scheduled."""
        if self._call_idx is None:
            raise CheckpointingException("no call scheduled on this TemporalAsyncCaller")
        if call_idx is not None and call_idx != self._call_idx:
            raise CheckpointingException(f"call {call_idx} is not the one running on this caller")
        if self._result is not None:
            return True, self._result[1]
        alive = self._proc.is_alive()
        result = None
        try:
            if self._conn.poll():
                result = self._conn.recv()
        except (EOFError, OSError):
            alive = False
        if result is None and alive:
            return False, None
        if result is None:
            self._proc.join(timeout=5)
            result = (False, _died(self._proc.exitcode))
        else:
            self._proc.join(timeout=5)
        self._conn.close()
        self._result = result
        return True, result[1]

    def wait(self, call_idx: int | None = None, timeout: float | None = None) -> tuple[bool, str | None]:
        """Poll until the current call is done or ``timeout`` seconds passed ((False, None) then)."""
        return _wait(lambda: self.poll(call_idx), timeout)

    def retire(self, call_idx: int) -> None:
        """Forget ``call_idx``: a call dropped while still running has its worker killed."""
        if self.busy and call_idx == self._call_idx:
            self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        """Normal: wait for the current call to end. ``abort``: kill the worker now."""
        if self._proc is None:
            return
        if abort and self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        if self._result is None:
            self._result = (False, "call aborted" if abort else _died(self._proc.exitcode))
        if self._conn is not None:
            self._conn.close()


# ----------------------------------------------------------------------------- persistent


def _persistent_main(requests: Any, results: Any, parent_pid: int) -> None:
    gc.disable()
    while True:
        try:
            item = requests.get(timeout=_PARENT_CHECK_S)
        except queue_mod.Empty:
            if os.getppid() != parent_pid:  # the training process died: nobody will send or read
                results.cancel_join_thread()
                return
            continue
        if item is None:
            break
        try:
            call_idx, fn, args, kwargs = ForkingPickler.loads(item)
        except BaseException:
            results.put((-1, False, "cannot unpickle the request in the worker:\n" + traceback.format_exc()))
            continue
        del item
        ok, err = _run_call(fn, args, kwargs)
        del fn, args, kwargs
        results.put((call_idx, ok, err))
    results.close()
    results.join_thread()


def _stop_worker(proc: Any, requests: Any) -> None:
    """Finalizer of a garbage-collected caller: let the worker finish its queue and exit."""
    try:
        if proc.is_alive():
            requests.put(None)
    except Exception:  # interpreter shutdown: nothing more to do
        pass


class PersistentAsyncCaller:
    """One long-lived worker process (``'spawn'`` context: no inherited threads or process groups)
    started on the first request, running requests in the order scheduled and sending back
    ``(call_idx, ok, error_text)``. Requests are pickled here with the multiprocessing pickler
    (CPU tensors travel through shared memory) before being queued, so an unpicklable request
    raises CheckpointingException at :meth:`schedule` instead of hanging. The worker is a daemon:
    close the queue before exiting, or running calls are lost. If the training process dies, the
    worker finishes its current call and exits (an idle worker checks every _PARENT_CHECK_S). A
    dead worker fails every outstanding call; the next :meth:`schedule` starts a new worker."""

    persistent = True

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._requests: Any = None
        self._results: Any = None
        self._outstanding: deque[int] = deque()
        self._done: dict[int, str | None] = {}
        self._keep: dict[int, Any] = {}  # arguments kept alive until done (their shared memory)

    @property
    def busy(self) -> bool:
        """Some scheduled call has no result yet."""
        return any(i not in self._done for i in self._outstanding)

    def _start(self) -> None:
        self._requests = self._ctx.Queue()
        self._results = self._ctx.Queue()
        self._proc = self._ctx.Process(target=_persistent_main, args=(self._requests, self._results, os.getpid()),
                                       name="tasd-async-worker", daemon=True)
        self._proc.start()
        weakref.finalize(self, _stop_worker, self._proc, self._requests)
        logger.debug("persistent async worker started as pid %s", self._proc.pid)

    def schedule(self, req: AsyncRequest) -> None:
        """Queue ``req`` for the worker (starting it if needed). Raises CheckpointingException
        naming the reason when the request cannot be pickled."""
        args = req.resolved_args()
        device.synchronize()
        try:
            payload = bytes(ForkingPickler.dumps((req.call_idx, req.async_fn, args, req.async_fn_kwargs)))
        except Exception as e:
            raise CheckpointingException(
                f"request cannot be sent to the persistent worker: {type(e).__name__}: {e} (requests "
                "for a persistent queue must pickle: module-level functions, no lambdas, process "
                "groups or open files; use persistent=False to fork instead)") from e
        if self._proc is None or not self._proc.is_alive():
            self._fail_outstanding()
            self._start()
        self._requests.put(payload)
        self._keep[req.call_idx] = (args, req.async_fn_kwargs)
        self._outstanding.append(req.call_idx)

    def _drain(self) -> None:
        while True:
            try:
                call_idx, ok, err = self._results.get_nowait()
            except (queue_mod.Empty, EOFError, OSError):
                return
            if call_idx in self._outstanding:
                self._done[call_idx] = None if ok else err
                self._keep.pop(call_idx, None)
            elif call_idx == -1 and self._outstanding:
                first = next((i for i in self._outstanding if i not in self._done), None)
                if first is not None:
                    self._done[first] = err
            else:
                logger.debug("ignoring a result for a dropped call %d", call_idx)

    def _fail_outstanding(self) -> None:
        if self._proc is None:
            return
        reason = _died(self._proc.exitcode)
        for i in self._outstanding:
            self._done.setdefault(i, reason)
        self._keep.clear()

    def poll(self, call_idx: int | None = None) -> tuple[bool, str | None]:
        """(done, error) of ``call_idx`` (default: the oldest outstanding call), without blocking.
        Raises CheckpointingException for an unknown call."""
        if call_idx is None:
            if not self._outstanding:
                raise CheckpointingException("no call outstanding on this PersistentAsyncCaller")
            call_idx = self._outstanding[0]
        if call_idx not in self._outstanding:
            raise CheckpointingException(f"call {call_idx} is not outstanding on this caller")
        if call_idx not in self._done:
            alive = self._proc.is_alive()
            self._drain()
            if call_idx not in self._done and not alive:
                self._proc.join(timeout=5)
                self._drain()
                self._fail_outstanding()
        if call_idx in self._done:
            return True, self._done[call_idx]
        return False, None

    def retire(self, call_idx: int) -> None:
        """Forget ``call_idx`` (finalized or dropped); a later result for it is ignored."""
        if call_idx in self._outstanding:
            self._outstanding.remove(call_idx)
        self._done.pop(call_idx, None)
        self._keep.pop(call_idx, None)

    def wait(self, call_idx: int | None = None, timeout: float | None = None) -> tuple[bool, str | None]:
        """Poll until the call is done or ``timeout`` seconds passed ((False, None) then)."""
        return _wait(lambda: self.poll(call_idx), timeout)

    def close(self, abort: bool = False, timeout: float | None = None) -> None:
        """Normal: the worker finishes the calls queued so far, then exits (waits up to ``timeout``
        seconds, then kills it). ``abort``: kill the worker now. Outstanding calls without a result
        are marked failed."""
        proc = self._proc
        if proc is None:
            return
        if abort:
            if proc.is_alive():
                proc.kill()
        elif proc.is_alive():
            self._requests.put(None)
        proc.join(timeout=None if abort else timeout)
        if proc.is_alive():
            logger.warning("persistent async worker did not exit within %ss; killing it", timeout)
            proc.kill()
            proc.join()
        if not abort:
            self._drain()
        reason = "call aborted" if abort else _died(proc.exitcode)
        for i in self._outstanding:
            self._done.setdefault(i, reason)
        self._keep.clear()
        for q in (self._requests, self._results):
            q.close()
            q.cancel_join_thread()
        self._proc = self._requests = self._results = None
