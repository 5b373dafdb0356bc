"""Shared fixtures: ``ranks`` runs a test body on N real processes joined by gloo."""

from __future__ import annotations

import functools

import pytest

from tasd.launch import run_ranks


@pytest.fixture
def ranks():
    """``ranks(fn, world_size, *args, collective_timeout_s=20, timeout_s=120, **kw)`` calls the
    module-level ``fn(rank, world_size, *args, **kw)`` on every rank and returns the results in rank
    order; a failing, dying or hanging rank fails the test with each rank's report."""
    return functools.partial(run_ranks, collective_timeout_s=20, timeout_s=120)
