"""Agreeing on the outcome of a collective step: a failure on one rank becomes an error on every rank.

Every function here is collective over ``group`` (tasd's own gloo groups: see
:func:`tasd.managers.collectives.agreement_group`) and runs on the training thread. The common case
(no failure) costs one all_reduce of four integers; a failure adds the gathering of error texts.
"""

from __future__ import annotations

import logging
from typing import Any

from tasd.managers import collectives
from tasd.managers.errors import CheckpointingException, PeerUnreachableError

logger = logging.getLogger(__name__)


def agree(error: BaseException | None, iteration: int, what: str, group: Any,
          extra: int = 0) -> tuple[BaseException | None, collectives.Failures, int]:
    """One all_reduce: did any rank fail, did all ranks pass the same ``iteration``, and the maximum
    of every rank's ``extra`` (an int64). Returns (the local error, where a mismatch becomes one on
    every rank; the failed ranks and the first few messages (:class:`collectives.Failures`), empty
    when none failed; the agreed maximum).

    A local :class:`PeerUnreachableError` is raised at once without a collective: the peer that
    failed this rank would make the agreement wait for it again (the other ranks fail in their own
    agreement within the group's timeout). A peer that cannot be reached here raises
    PeerUnreachableError naming ``what``.
    """
    if isinstance(error, PeerUnreachableError):
        raise error
    rank = collectives.rank_and_size(group)[0]
    try:
        flag, hi, neg_lo, agreed = collectives.all_reduce_max([1 if error else 0, iteration, -iteration, extra],
                                                              group)
        if error is None and hi != -neg_lo:
            error = CheckpointingException(f"ranks passed different iterations ({-neg_lo} to {hi}); "
                                           f"rank {rank} passed {iteration}")
        failures = collectives.gather_failures(error, group) if flag or hi != -neg_lo else collectives.Failures()
    except Exception as e:
        raise PeerUnreachableError(f"{what}: rank {rank} could not reach the other ranks "
                                   f"(a peer died or timed out): {e}") from e
    return error, failures, agreed


def raise_agreed(failures: collectives.Failures, rank: int, local: BaseException | None, what: str) -> None:
    """Raise on every rank once ``failures`` (from :func:`agree`) is non-empty: the failing rank
    its own error (TypeError/ValueError/CheckpointingException as they are, anything else wrapped
    in a CheckpointingException), the others a CheckpointingException naming the failed ranks."""
    if not failures:
        return
    if local is not None:
        if isinstance(local, (TypeError, ValueError, CheckpointingException)):
            raise local
        raise CheckpointingException(f"{what} failed on rank {rank}: {type(local).__name__}: {local}") from local
    raise CheckpointingException(f"{what} failed on {failures.describe()}")


def agree_or_raise(error: BaseException | None, iteration: int, what: str, group: Any, extra: int = 0) -> int:
    """:func:`agree`, then :func:`raise_agreed`; returns the agreed maximum of ``extra``."""
    error, failures, agreed = agree(error, iteration, what, group, extra)
    raise_agreed(failures, collectives.rank_and_size(group)[0], error, what)
    return agreed
