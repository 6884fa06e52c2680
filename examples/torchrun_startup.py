"""A multi-process job start: the ranks of one node download the bundle once.

Under ``torchrun --nproc-per-node 8 examples/torchrun_startup.py`` every rank runs :func:`rank_main`
(torchrun sets ``LOCAL_RANK``); run directly, ``python examples/torchrun_startup.py --nproc 4``
starts the ranks itself, the way torchrun would, and checks the promise: every rank starts warm,
exactly one of them downloaded. Settings come from the environment, as in a real job:
``BUNDLER_REMOTE``, ``BUNDLER_REF`` (what ``bundler warm`` prebaked), and the cache folders, which
the ranks of one node share (``BUNDLER_CACHE_DIR``, ``TRITON_CACHE_DIR``). The first rank to take
the node's pull lock (``$BUNDLER_CACHE_DIR/pulled/``) downloads and unpacks; the others wait for
it, find the bundle in place and download nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys


class _Downloads(logging.Handler):
    """Counts this process's downloads: the transfer layer logs one line per bundle it fetched."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("pulled bundle "):
            self.count += 1


def rank_main() -> dict:
    import bundler

    downloads = _Downloads()
    transfer_log = logging.getLogger("bundler.remote.transfer")
    transfer_log.addHandler(downloads)
    transfer_log.setLevel(logging.INFO)
    session = bundler.begin_compile(code_hash="torchrun-startup-example")
    hit = session.hit  # waits for the fetch, within BUNDLER_PULL_BUDGET
    # ... build the model, torch.compile it, train: its kernels and configs are already local ...
    bundler.end_compile()
    return {"rank": int(os.environ.get("LOCAL_RANK", "0")), "hit": hit, "downloads": downloads.count,
            "digest": session.pulled.digest if session.pulled else None}


def launch(nproc: int) -> int:
    """Start ``nproc`` ranks at once, as torchrun does, and check that the node downloaded once."""
    ranks = [
        subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": str(nproc)})
        for rank in range(nproc)
    ]
    reports = []
    for proc in ranks:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode:
            print(f"rank failed with exit code {proc.returncode}", file=sys.stderr)
            return 1
        reports.append(json.loads(out.strip().splitlines()[-1]))
    downloads = sum(r["downloads"] for r in reports)
    warm = all(r["hit"] for r in reports)
    print(json.dumps({"ranks": nproc, "all_hit": warm, "downloads": downloads}))
    return 0 if warm and downloads == 1 else 1


def main() -> int:
    if "LOCAL_RANK" in os.environ:  # one rank, under torchrun or launch()
        print(json.dumps(rank_main()))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4, help="ranks to start on this node")
    return launch(parser.parse_args().nproc)


if __name__ == "__main__":
    sys.exit(main())
