"""Background executors of :class:`AsyncRequest` (after NVRx's ``TemporalAsyncCaller`` and
``PersistentAsyncCaller``). Local objects: nothing here is collective; agreement between ranks is
:class:`tasd.managers.async_ckpt.AsyncCallsQueue`'s job.

Both callers have one interface, used on the scheduling (training) thread:

- :meth:`schedule` starts a request: its preload_fn (if any) runs here in the calling process and
  only then is device work synchronized (the preload's device-to-host copies may be in flight;
  without a preload_fn nothing waits for the device). It raises :class:`RequestRefused` for API
  misuse (a request a persistent worker cannot receive, a preload_fn without argument 1) and
  whatever starting the worker raised (fork or spawn failure) otherwise.
- ``poll(call_idx)`` (non-blocking) and ``wait(call_idx, timeout)`` return ``(done, error)``:
  ``error`` is None on success, else the worker's formatted traceback, or ``"async worker died
  with exit code X"`` when the worker died without reporting, or the reason given to :meth:`kill`.
- ``kill(reason)`` ends the worker now (SIGKILL, then a join bounded by ``_KILL_JOIN_S``; a worker
  still alive after it, stuck in the kernel, is logged as an error); every call it had not
  finished fails with ``reason``.
- ``retire(call_idx)`` forgets a finalized or dropped call; when the call may still run (queued
  or running), its worker is killed first, so that on return no worker runs it and its buffers
  may be reused (for a persistent worker this fails the calls queued behind it too).

Every worker runs a watchdog thread that ends the worker (``os._exit``) within
``_PARENT_CHECK_S`` seconds of its training process dying, even while a call is stuck (a hung
disk), so workers do not outlive the process that scheduled their calls. At interpreter exit a
running temporal call is waited for at most its caller's ``exit_wait_s``, then killed. The
persistent worker is spawned without importing the parent's ``__main__`` (a training script
without ``if __name__ == "__main__":`` is not run again in it).

Shared memory: the persistent caller pickles requests with multiprocessing's pickler, and torch
passes each CPU tensor's storage as a file descriptor registered in
``multiprocessing.resource_sharer`` until the worker fetches it. The entries registered for a call
are recorded while pickling it and released (closed) when the call is retired or its worker dies,
so a request the worker never unpickled does not keep its shared memory alive.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import logging
import multiprocessing as mp
import multiprocessing.spawn as mp_spawn
import multiprocessing.util  # noqa: F401  (its exit hook must be registered before ours, see below)
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from collections import deque
from multiprocessing import resource_sharer
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Iterator

from tasd import device
from tasd.managers.async_ckpt.request import AsyncRequest
from tasd.managers.errors import CheckpointingException

logger = logging.getLogger(__name__)

#: Wait bound (seconds) when neither a queue's ``wait_timeout_s`` nor the job's collective timeout
#: is known: torch.distributed's default collective timeout (30 minutes).
DEFAULT_WAIT_TIMEOUT_S = 1800.0

_POLL_SLEEP_S = 0.01
_MAX_POLL_SLEEP_S = 0.1
_PARENT_CHECK_S = 1.0  # how often a worker's watchdog checks that its training process lives
_KILL_JOIN_S = 10.0  # how long a killed worker is waited for (a process stuck in the kernel may linger)
_ORPHAN_EXIT_CODE = 70  # exit code of a worker whose training process died

_IMPORTABLE_HINT = (
    "async_fn must be importable by the persistent worker, and so must every function and class "
    "in its arguments: the worker does not import the training script's __main__ (define them in "
    "a module, or use a persistent=False queue, which forks)")


class RequestRefused(CheckpointingException):
    """A request refused at schedule time for API misuse: it cannot be pickled for the persistent
    worker, or it has a preload_fn but no argument 1 for its result."""


def _watch_parent(parent_pid: int) -> None:
    """In a worker: a daemon thread that ends this process as soon as its parent is gone (the
    worker was re-parented), whatever the main thread is doing."""

    def watch() -> None:
        while True:
            time.sleep(_PARENT_CHECK_S)
            if os.getppid() != parent_pid:
                os._exit(_ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="tasd-parent-watchdog", daemon=True).start()


def _run_call(fn: Any, args: tuple, kwargs: dict) -> tuple[bool, str | None]:
    gc.disable()
    try:
        if fn is not None:
            fn(*args, **kwargs)
        return True, None
    except BaseException:  # report everything to the parent
        return False, traceback.format_exc()


def _died(exitcode: int | None) -> str:
    if exitcode == _ORPHAN_EXIT_CODE:
        return f"async worker exited with code {exitcode} (its training process was gone)"
    if exitcode is not None and exitcode < 0:
        try:
            return f"async worker died with exit code {exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return f"async worker died with exit code {exitcode}"


def _wait(poll: Callable[[], tuple[bool, str | None]], timeout: float | None) -> tuple[bool, str | None]:
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


def _kill(proc: Any) -> None:
    """SIGKILL ``proc`` (if alive) and join it for at most _KILL_JOIN_S."""
    if proc.is_alive():
        proc.kill()
    proc.join(_KILL_JOIN_S)
    if proc.is_alive():
        logger.error("async worker pid %s did not exit within %ss of SIGKILL (stuck in the kernel?)",
                     proc.pid, _KILL_JOIN_S)


def _resolve(req: AsyncRequest) -> tuple:
    """``req``'s arguments with its preload_fn applied; synchronizes the device only when a
    preload_fn ran. Raises RequestRefused when the preload_fn has no argument 1 to replace."""
    try:
        req.check_args()
    except CheckpointingException as e:
        raise RequestRefused(str(e)) from e
    args = req.resolved_args()
    if req.preload_fn is not None:
        device.synchronize_stream()  # the preload's device-to-host copies may still be in flight
    return args


# ----------------------------------------------------------------------------- temporal


def _temporal_main(fn: Any, args: tuple, kwargs: dict, conn: Any, parent_pid: int) -> None:
    _watch_parent(parent_pid)
    ok, err = _run_call(fn, args, kwargs)
    try:
        conn.send((ok, err))
    finally:
        conn.close()


_running_temporal: "weakref.WeakSet[TemporalAsyncCaller]" = weakref.WeakSet()


def _bound_exit_wait() -> None:
    """At interpreter exit: multiprocessing joins non-daemon children without a bound, so a hung
    temporal call would keep the process alive forever. Wait for each one at most its caller's
    ``exit_wait_s``, then kill it. Registered after multiprocessing's own hook, so it runs first."""
    for caller in list(_running_temporal):
        proc = caller._proc
        if proc is not None and proc.is_alive():
            proc.join(caller.exit_wait_s)
            if proc.is_alive():
                logger.error("async call %s still runs at exit after %ss; killing it", caller._call_idx,
                             caller.exit_wait_s)
                _kill(proc)


atexit.register(_bound_exit_wait)


class TemporalAsyncCaller:
    """Runs one request in a fresh process forked (``'fork'`` context) for it, so the request
    needs not pickle and the child sees the parent's memory as of the fork (copy-on-write). The
    child reports through a pipe; a child that exits without reporting (killed, crashed) is a
    failure. The process is not a daemon: interpreter exit waits for a running call, at most
    ``exit_wait_s`` seconds, then kills it. One call per caller."""

    persistent = False

    def __init__(self, exit_wait_s: float = DEFAULT_WAIT_TIMEOUT_S) -> None:
        self.exit_wait_s = exit_wait_s
        self._proc: Any = None
        self._conn: Any = None
        self._call_idx: int | None = None
        self._result: tuple[bool, str | None] | None = None

    @property
    def busy(self) -> bool:
        """A call is scheduled and its result not yet collected by :meth:`poll`."""
        return self._call_idx is not None and self._result is None

    def schedule(self, req: AsyncRequest) -> None:
        """Fork a worker running ``req``. Raises CheckpointingException when this caller already
        has a call, RequestRefused for a preload_fn without argument 1, and what forking raised."""
        if self._call_idx is not None:
            raise CheckpointingException("a TemporalAsyncCaller runs one call; use a new one")
        args = _resolve(req)
        ctx = mp.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_temporal_main, name=f"tasd-async-{req.call_idx}",
                           args=(req.async_fn, args, req.async_fn_kwargs, send, os.getpid()))
        try:
            proc.start()
        except BaseException:
            recv.close()
            raise
        finally:
            send.close()
        self._proc, self._conn, self._call_idx, self._result = proc, recv, req.call_idx, None
        _running_temporal.add(self)
        logger.debug("call %d forked as pid %s", req.call_idx, proc.pid)

    def _check(self, call_idx: int | None) -> None:
        if self._call_idx is None:
            raise CheckpointingException("no call scheduled on this TemporalAsyncCaller")
        if call_idx is not None and call_idx != self._call_idx:
            raise CheckpointingException(f"call {call_idx} is not the one running on this caller")

    def _receive(self) -> tuple[bool, str | None] | None:
        """The child's report if one is ready (the pipe's only writer is the child: a dead child
        gives EOF, never a partial read)."""
        try:
            if self._conn.poll():
                return self._conn.recv()
        except (EOFError, OSError):
            pass
        return None

    def _finish(self, result: tuple[bool, str | None]) -> None:
        self._result = result
        self._conn.close()
        _running_temporal.discard(self)

    def poll(self, call_idx: int | None = None) -> tuple[bool, str | None]:
        """(done, error) of the current call (``call_idx``, when given, must be it), without
        blocking. Raises CheckpointingException when nothing, or another call, was scheduled."""
        self._check(call_idx)
        if self._result is None:
            alive = self._proc.is_alive()
            result = self._receive()
            if result is None and alive:
                return False, None
            self._proc.join(_KILL_JOIN_S)
            self._finish(result if result is not None else (False, _died(self._proc.exitcode)))
        return True, self._result[1]

    def wait(self, call_idx: int | None = None, timeout: float | None = None) -> tuple[bool, str | None]:
        """Poll until the current call is done or ``timeout`` seconds passed ((False, None) then)."""
        return _wait(lambda: self.poll(call_idx), timeout)

    def kill(self, reason: str) -> None:
        """Kill the worker now; an unfinished call fails with ``reason`` (a report the child sent
        before dying still counts)."""
        if self._proc is None or self._result is not None:
            return
        _kill(self._proc)
        result = self._receive()
        self._finish(result if result is not None else (False, reason))

    def retire(self, call_idx: int) -> None:
        """Forget ``call_idx``; a call that may still run has its worker killed first."""
        if call_idx == self._call_idx and self._result is None:
            self.poll(call_idx)
            self.kill(f"async call {call_idx} was dropped while running; its worker was killed")


# ----------------------------------------------------------------------------- persistent


def _persistent_main(requests: Any, results: Any, parent_pid: int) -> None:
    _watch_parent(parent_pid)
    gc.disable()
    while True:
        item = requests.get()
        if item is None:
            break
        call_idx, payload = item
        try:
            fn, args, kwargs = ForkingPickler.loads(payload)
        except BaseException:
            results.send((call_idx, False, f"the persistent worker cannot unpickle async call {call_idx}: "
                          f"{_IMPORTABLE_HINT}.\n{traceback.format_exc()}"))
            continue
        del item, payload
        ok, err = _run_call(fn, args, kwargs)
        del fn, args, kwargs
        results.send((call_idx, ok, err))
    results.close()


def _stop_worker(proc: Any, requests: Any) -> None:
    """Finalizer of a garbage-collected caller: let the worker finish its queue and exit."""
    try:
        if proc.is_alive():
            requests.put(None)
    except Exception:  # interpreter shutdown: nothing more to do
        pass


_spawn_lock = threading.Lock()


@contextlib.contextmanager
def _without_parent_main() -> Iterator[None]:
    """While inside, processes started with the spawn method do not import the parent's
    ``__main__``: a training script without ``if __name__ == "__main__":`` would otherwise run
    again in the worker. Holds a process-wide lock; a process another thread spawns meanwhile is
    started the same way."""
    with _spawn_lock:
        original = mp_spawn.get_preparation_data

        def preparation_data(name: str) -> dict:
            data = original(name)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        mp_spawn.get_preparation_data = preparation_data
        try:
            yield
        finally:
            mp_spawn.get_preparation_data = original


def _recording(reduce: Callable, shared: list) -> Callable:
    def reduce_and_record(obj: Any) -> Any:
        rv = reduce(obj)
        if isinstance(rv, tuple) and len(rv) > 1 and isinstance(rv[1], tuple):
            shared.extend(a._id for a in rv[1] if isinstance(a, resource_sharer.DupFd))
        return rv
    return reduce_and_record


class _RecordingPickler(ForkingPickler):
    """ForkingPickler that appends to ``shared`` the resource_sharer id of every file descriptor
    its reducers register (torch's CPU storages)."""

    def __init__(self, file: Any, shared: list) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.dispatch_table = {cls: _recording(reduce, shared) for cls, reduce in self.dispatch_table.items()}


def _dumps(obj: Any) -> tuple[bytes, list]:
    """(pickled ``obj``, ids of the resource_sharer entries pickling registered). On failure the
    entries are released and the exception propagates."""
    shared: list = []
    buf = io.BytesIO()
    try:
        _RecordingPickler(buf, shared).dump(obj)
    except BaseException:
        _release_shared(shared)
        raise
    return buf.getvalue(), shared


def _release_shared(ids: list) -> None:
    """Close the resource_sharer entries ``ids`` that no worker fetched (fetched ones are gone)."""
    if not ids:
        return
    sharer = resource_sharer._resource_sharer
    with sharer._lock:
        entries = [sharer._cache.pop(key, None) for address, key in ids if address == sharer._address]
    ids.clear()
    for entry in entries:
        if entry is not None:
            try:
                entry[1]()  # close the dup'ed descriptor
            except OSError:
                logger.debug("closing an unfetched shared descriptor failed", exc_info=True)


class PersistentAsyncCaller:
    """One long-lived worker process (``'spawn'`` context: no inherited threads or process
    groups; the parent's ``__main__`` is not imported in it) started on the first request,
    running requests in the order scheduled and sending back ``(call_idx, ok, error_text)``.

    Requests are pickled here with the multiprocessing pickler (CPU tensors travel through shared
    memory) before being queued, so an unpicklable request raises RequestRefused at
    :meth:`schedule` instead of hanging; a request the worker cannot unpickle (an async_fn defined
    in ``__main__``) fails that call. The worker is a daemon: close the queue before exiting, or
    queued calls are lost. A dead or killed worker fails every call it had not finished; the next
    :meth:`schedule` starts a new worker."""

    persistent = True

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._requests: Any = None
        self._results: Any = None  # receiving end of a pipe whose only writer is the worker
        self._finalizer: Any = None
        self._outstanding: deque[int] = deque()  # scheduled, not retired (maybe done)
        self._done: dict[int, str | None] = {}
        self._keep: dict[int, Any] = {}  # arguments of unfinished calls, kept alive until done
        self._shared: dict[int, list] = {}  # resource_sharer entries of each outstanding call

    @property
    def busy(self) -> bool:
        """Some scheduled call has no result yet."""
        return any(i not in self._done for i in self._outstanding)

    def _start(self) -> None:
        requests = self._ctx.Queue()
        recv, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_persistent_main, args=(requests, send, os.getpid()),
                                 name="tasd-async-worker", daemon=True)
        try:
            with _without_parent_main():
                proc.start()
        except BaseException:
            recv.close()
            requests.close()
            requests.cancel_join_thread()
            raise
        finally:
            send.close()
        self._proc, self._requests, self._results = proc, requests, recv
        self._finalizer = weakref.finalize(self, _stop_worker, proc, requests)
        logger.debug("persistent async worker started as pid %s", proc.pid)

    def schedule(self, req: AsyncRequest) -> None:
        """Queue ``req`` for the worker, starting one if none is alive. Raises RequestRefused
        naming the reason when the request cannot be pickled (nothing is sent then), and what
        starting the worker raised."""
        args = _resolve(req)
        try:
            payload, shared = _dumps((req.async_fn, args, req.async_fn_kwargs))
        except Exception as e:
            raise RequestRefused(
                f"request cannot be sent to the persistent worker: {type(e).__name__}: {e} (requests "
                "for a persistent queue must pickle: module-level functions, no lambdas, process "
                "groups or open files; use persistent=False to fork instead)") from e
        try:
            if self._proc is not None and not self._proc.is_alive():
                self._collect()
            if self._proc is None:
                self._start()
            self._requests.put((req.call_idx, payload))
        except BaseException:
            _release_shared(shared)
            raise
        self._outstanding.append(req.call_idx)
        self._keep[req.call_idx] = (args, req.async_fn_kwargs)
        self._shared[req.call_idx] = shared

    def _record(self, call_idx: int, error: str | None) -> None:
        self._done[call_idx] = error
        self._keep.pop(call_idx, None)
        _release_shared(self._shared.pop(call_idx, []))

    def _drain(self) -> None:
        while True:
            try:
                if not self._results.poll():
                    return
                call_idx, ok, err = self._results.recv()
            except (EOFError, OSError):
                return
            if call_idx in self._outstanding and call_idx not in self._done:
                self._record(call_idx, None if ok else err)
            else:
                logger.debug("ignoring a result for a dropped call %d", call_idx)

    def _reap(self, reason: str) -> None:
        """The worker is dead: collect its last results, fail its unfinished calls with
        ``reason`` and let go of its queues."""
        self._drain()
        for i in self._outstanding:
            if i not in self._done:
                self._record(i, reason)
        self._finalizer.detach()
        self._requests.close()
        self._requests.cancel_join_thread()
        self._results.close()
        self._proc = self._requests = self._results = self._finalizer = None

    def _collect(self) -> None:
        if self._proc is None:
            return
        alive = self._proc.is_alive()
        self._drain()
        if not alive:
            self._proc.join(_KILL_JOIN_S)
            self._reap(_died(self._proc.exitcode))

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
            self._collect()
        if call_idx in self._done:
            return True, self._done[call_idx]
        return False, None

    def wait(self, call_idx: int | None = None, timeout: float | None = None) -> tuple[bool, str | None]:
        """Poll until the call is done or ``timeout`` seconds passed ((False, None) then)."""
        return _wait(lambda: self.poll(call_idx), timeout)

    def kill(self, reason: str) -> None:
        """Kill the worker now; every call it had not finished fails with ``reason``. The next
        :meth:`schedule` starts a new worker."""
        if self._proc is None:
            return
        _kill(self._proc)
        self._reap(reason)

    def retire(self, call_idx: int) -> None:
        """Forget ``call_idx`` (finalized or dropped). A call that may still be queued or running
        has the worker killed first (failing the calls behind it), so no worker runs it on
        return; its unfetched shared-memory descriptors are released."""
        if call_idx not in self._outstanding:
            return
        if call_idx not in self._done:
            self._collect()
        if call_idx not in self._done:
            self.kill(f"async call {call_idx} was dropped while queued or running; the persistent "
                      "worker was killed")
        self._outstanding.remove(call_idx)
        self._done.pop(call_idx, None)

    def close(self, abort: bool = False, timeout: float | None = None) -> None:
        """Normal: the worker finishes the calls queued so far, then exits (waits up to
        ``timeout`` seconds, then kills it). ``abort``: kill the worker now. Calls without a
        result are marked failed. Local."""
        proc = self._proc
        if proc is None:
            return
        if abort:
            self.kill("call aborted")
            return
        if proc.is_alive():
            self._requests.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        while proc.is_alive() and (deadline is None or time.monotonic() < deadline):
            self._drain()  # a worker blocked on a full result pipe could not exit
            proc.join(_MAX_POLL_SLEEP_S)
        if proc.is_alive():
            logger.warning("persistent async worker did not exit within %ss; killing it", timeout)
            self.kill(f"the persistent worker did not finish its calls within {timeout}s of close; killed")
            return
        self._reap(_died(proc.exitcode))
