"""The distributed tests' process groups (tests/test_distributed.py,
tests/test_contrastive_distributed.py): one definition of the gloo set-up.

``run_ranks(worker)`` spawns WORLD CPU processes (``torch.multiprocessing.spawn``)
in one gloo group with a file:// rendezvous in a temporary directory, one torch
thread each; rank r runs ``worker(r)``, which returns a dict of results
(anything ``torch.save`` takes).  After every rank has saved its dict, the
group is destroyed and ``run_ranks`` returns [rank 0's dict, rank 1's, ...].
A rank that raises fails the spawn (``torch.multiprocessing.ProcessRaisedException``).
``worker`` must be a module-level function (the spawned processes import it).

``single_process_group()`` is a world-size-1 gloo group for a ``with`` block,
for the checks that need a group but no second rank.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import timedelta
from typing import Callable, Dict, Iterator, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT = timedelta(seconds=60)  # a rank left waiting in a collective fails instead of hanging


def _rank_main(rank: int, worker: Callable[[int], Dict], world: int, init_file: str,
               out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    try:
        out = worker(rank)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(worker: Callable[[int], Dict], world: int = WORLD) -> List[Dict]:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_rank_main, args=(worker, world, init_file, tmp), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0,
                                world_size=1, timeout=TIMEOUT)
        try:
            yield
        finally:
            dist.destroy_process_group()
