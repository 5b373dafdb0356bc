"""Thin wrapper: tasd save and restart against torch.save/torch.load, DCP and a raw write/read of the
same bytes now live in ``tasd bench`` (package tasd/bench/, see docs/performance.md).

Equivalent to ``tasd bench --scenario sync_save restart [OPTIONS]``; OPTIONS are tasd bench's
(``--quick --json F --plots DIR --markdown F --dir DIR --repeats N``).

Run:  .venv/bin/python benchmarks/bench_io.py [OPTIONS]
"""

import sys

from tasd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--scenario", "sync_save", "restart", *sys.argv[1:]]))
