"""What identifies a save and the job it belongs to (recorded in every part's header).

* ``save_id``: a random 62-bit number per save, agreed by all ranks (the maximum of every rank's
  draw, carried by the all_reduce the save makes anyway), as 16 hex digits. find_latest combines
  only parts with the same save id, so parts of two runs that saved the same iteration never mix.
* ``job_id``: the scheduler's id of the running job (``TASD_JOB_ID``, else torchelastic's
  ``TORCHELASTIC_RUN_ID``, else ``SLURM_JOB_ID``), "" when none is set. With the default session
  id ("") a manager loads only parts of its own job, so a new job on a node whose disk outlived
  the last one does not load that job's checkpoint; pass a ``session_id`` to share checkpoints
  across jobs on purpose.
"""

from __future__ import annotations

import os
import secrets

_JOB_ENV = ("TASD_JOB_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")


def job_id_from_env() -> str:
    """The job id from the environment (see the module docstring), "" when none is set. Local."""
    for name in _JOB_ENV:
        value = os.environ.get(name, "")
        if value and value.lower() != "none":  # torchrun's default run id is "none"
            # The environment may hold bytes that are not UTF-8 (surrogates): headers are UTF-8 JSON.
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:128]
    return ""


def save_nonce() -> int:
    """This rank's draw for a save id (< 2**62, so it fits an int64 all_reduce)."""
    return secrets.randbits(62)


def save_id(agreed_nonce: int) -> str:
    return f"{agreed_nonce:016x}"
