"""Which state folder (`<disk-dir>/replica-<k>`) an engine replica takes, and so which rank it
publishes to routers: the folder's number.

Serve numbers replicas, but its numbers do not name state. During a rolling update (every
`serve.run` deploys a new version) a new replica starts while the old one it replaces is still
stopping, and Serve frees the old replica's rank only once it has stopped, so the new one gets a
rank past the replica count; Serve renumbers ranks later, once the update is done, but records a
replica's metadata (the rank routers see) once, when it starts. So a replica takes a folder:

1. its Serve rank's folder, when that rank is below the replica count (`world_size`) and the
   folder is free: a replica Serve restarted after a crash finds its own state again;
2. else the lowest-numbered free folder below the replica count that exists on this node,
   waiting for one to free up (the old replica it replaces persists its tiers there as it stops:
   launch.GRACEFUL_SHUTDOWN_S). Folders of replicas that ran on other nodes are not here, so
   their numbers are not taken;
3. after `wait_s`, the lowest-numbered free folder of any number (which, on a cluster of several
   nodes, may be a number a replica on another node publishes).

A folder is free when no process holds its disk store's lock (a live or stopping replica, or a
replica taking the folder in: moves.py) and no other process holds its claim. The claim is a
lock of its own (`claim`), taken before the check and held for the replica's life, so two
replicas starting together never take one folder; a replica taking a folder in holds its claim
meanwhile (`claimed`).
"""

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from scalesim.memory.disk_store import state_dir_held, try_lock_file

CLAIM_FILE = "claim"
CLAIM_WAIT_S, CLAIM_POLL_S = 65.0, 0.25  # longer than launch.GRACEFUL_SHUTDOWN_S


def replica_dir(disk_dir: str | Path, rank: int) -> Path:
    return Path(disk_dir) / f"replica-{rank}"


@dataclass
class FolderClaim:
    """A replica's state folder and the rank it publishes; holds the folder's claim lock until
    `release` or the end of the process (a replica killed with -9 frees its folder)."""

    rank: int
    folder: Path | None
    lock_file: IO | None = None

    def release(self) -> None:
        if self.lock_file is not None:
            self.lock_file.close()  # closing the file drops its flock
            self.lock_file = None


@contextmanager
def claimed(folder: Path) -> Iterator[bool]:
    """Hold `folder`'s claim while the body runs and say so (True), or say that another process
    holds it (False): a live or starting replica, or another replica taking it in."""
    lock_file = _try_lock(folder)
    try:
        yield lock_file is not None
    finally:
        if lock_file is not None:
            lock_file.close()


def _try_lock(folder: Path) -> IO | None:
    """The folder's claim file, locked here; None when another holder has it."""
    folder.mkdir(parents=True, exist_ok=True)
    return try_lock_file(folder / CLAIM_FILE)


def _try_claim(disk_dir: str | Path, rank: int) -> FolderClaim | None:
    folder = replica_dir(disk_dir, rank)
    lock_file = _try_lock(folder)
    if lock_file is None:
        return None
    if state_dir_held(folder):
        lock_file.close()
        return None
    return FolderClaim(rank, folder, lock_file)


def claim_state_folder(disk_dir: str | Path | None, serve_rank: int, world_size: int,
                       wait_s: float = CLAIM_WAIT_S) -> FolderClaim:
    """The folder this replica keeps its state in, claimed (see the module docstring for the
    order). Without a disk dir there is no state to find: the Serve rank, no folder."""
    if not disk_dir:
        return FolderClaim(serve_rank, None)
    deadline_s = time.monotonic() + wait_s
    while True:
        preferred = [serve_rank] if serve_rank < world_size else []
        preferred += [rank for rank in range(world_size)
                      if rank != serve_rank and replica_dir(disk_dir, rank).is_dir()]  # ran on this node
        for rank in preferred:
            if (claim := _try_claim(disk_dir, rank)) is not None:
                return claim
        if time.monotonic() >= deadline_s:
            break
        time.sleep(CLAIM_POLL_S)
    for rank in itertools.count():
        if (claim := _try_claim(disk_dir, rank)) is not None:
            return claim
    raise AssertionError("unreachable: itertools.count() never ends")
