"""Thin wrapper: replica exchange, recovery of a lost rank and save cost against tensor count now live
in ``tasd bench`` (package tasd/bench/, see docs/performance.md).

Equivalent to ``tasd bench --scenario exchange recovery tensor_sweep [OPTIONS]``; OPTIONS are tasd bench's
(``--quick --json F --plots DIR --markdown F --dir DIR --repeats N``).

Run:  .venv/bin/python benchmarks/bench_replication.py [OPTIONS]
"""

import sys

from tasd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--scenario", "exchange", "recovery", "tensor_sweep", *sys.argv[1:]]))
