"""What a disk-tier read costs on this machine, with the page cache kept out (the default) and
with it left in (`--disk-page-cache`): the same files written through the real DiskStore
(atomic write, fsync) and read back through it (checksum verified), interleaved over rounds."""

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scalesim.memory.disk_store import DiskStore

DEFAULT_OBJECT_NBYTES = 8 * 2**20


@dataclass
class DiskBenchResult:
    objects: int
    object_nbytes: int
    rounds: int
    write_gb_per_s: float
    read_gb_per_s_page_cache_dropped: float
    read_gb_per_s_page_cache_kept: float
    read_seconds_page_cache_dropped: list
    read_seconds_page_cache_kept: list


def _round(root: Path, page_cache: bool, count: int, tensor: torch.Tensor) -> tuple[float, float]:
    store = DiskStore(root, budget_nbytes=2 * count * tensor.numel() * 4 + 2**20, page_cache=page_cache)
    try:
        started = time.perf_counter()
        for i in range(count):
            store.write(f"obj-{i}", "bench", {"kv": tensor}, {})
        written_s = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(count):
            store.read(f"obj-{i}")
        return written_s, time.perf_counter() - started
    finally:
        store.close()


def run_disk_bench(total_nbytes: int, object_nbytes: int = DEFAULT_OBJECT_NBYTES, rounds: int = 3) -> DiskBenchResult:
    count = max(1, total_nbytes // object_nbytes)
    tensor = torch.randn(object_nbytes // 4)
    writes, dropped, kept = [], [], []
    with tempfile.TemporaryDirectory(prefix="scalesim-disk-bench-", dir=Path.cwd()) as root:
        for r in range(rounds):  # interleaved: each round runs both, in alternating order
            for page_cache in ((False, True) if r % 2 == 0 else (True, False)):
                written_s, read_s = _round(Path(root) / f"{r}-{page_cache}", page_cache, count, tensor)
                writes.append(written_s)
                (kept if page_cache else dropped).append(read_s)
    nbytes = count * object_nbytes
    return DiskBenchResult(
        objects=count, object_nbytes=object_nbytes, rounds=rounds,
        write_gb_per_s=round(nbytes / statistics.median(writes) / 1e9, 3),
        read_gb_per_s_page_cache_dropped=round(nbytes / statistics.median(dropped) / 1e9, 3),
        read_gb_per_s_page_cache_kept=round(nbytes / statistics.median(kept) / 1e9, 3),
        read_seconds_page_cache_dropped=[round(s, 4) for s in dropped],
        read_seconds_page_cache_kept=[round(s, 4) for s in kept])
