"""Thin wrapper: the training stall of async saves against a plain copy, DCP async_save and NVRx now
live in ``tasd bench`` (package tasd/bench/, see docs/performance.md).

Equivalent to ``tasd bench --scenario save_stall [OPTIONS]``; OPTIONS are tasd bench's
(``--quick --json F --plots DIR --markdown F --dir DIR --repeats N``).

Run:  .venv/bin/python benchmarks/bench_async.py [OPTIONS]
"""

import sys

from tasd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--scenario", "save_stall", *sys.argv[1:]]))
