"""``python -m llavamed_core.train._torchrun ARGS``: torchrun, quiet about a child's failure.

The same as ``python -m torch.distributed.run ARGS``, except that when a training process fails
(its rank 0 has already printed ``Error: …``) it exits with that process's exit status instead of
printing torchrun's traceback and failure report. ``LLAVAMED_DEBUG=1`` keeps torchrun's report.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str]) -> int:
    """Run torchrun with ``argv``; return the exit status of the run."""
    debug = os.environ.get("LLAVAMED_DEBUG", "") not in ("", "0", "false")
    if not debug:
        os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torch.distributed.elastic's own log lines
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not debug:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        if debug:
            raise
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        if rank != 0:
            # Rank 0 reports errors; here another rank failed first, so say so.
            sys.stderr.write(f"Error: training process of rank {rank} failed (exit status {failure.exitcode})\n"
                             "Hint: rerun with LLAVAMED_DEBUG=1 to see every process's traceback\n")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
