"""What a move between host and device costs, and whether it hides behind compute.

Bandwidth: one buffer copied host -> device and device -> host, from pageable and (with CUDA)
page-locked host memory, interleaved over rounds; medians in GB/s. On a CPU the "device" is the
same memory, so this is a memory copy, and page-locked memory does not exist.

Overlap: the model's kind of work (steps of matmuls on the compute stream, each ended by a wait
for that stream, as the engine waits for each step's tokens) timed alone, the memory layer's
copies (through `CopyStreams.moving`, as a transfer thread makes them) timed alone, and both at
once from two threads. `overlap_ratio` = (compute alone + copies alone) / both:
2.0 means the copies hid completely, 1.0 that they ran one after the other. `compute_slowdown`
is how much longer the compute took with copies beside it.
"""

import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

from scalesim.memory.copy_stream import CopyStreams


@dataclass
class TransferBenchResult:
    device: str
    nbytes: int
    rounds: int
    gb_per_s: dict = field(default_factory=dict)        # "host_to_device.pinned" -> median GB/s
    seconds: dict = field(default_factory=dict)         # the same keys -> every round's seconds
    compute_alone_s: float = 0.0
    copies_alone_s: float = 0.0
    both_s: float = 0.0
    compute_beside_copies_s: float = 0.0
    overlap_ratio: float = 0.0
    compute_slowdown: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def _copy_cases(nbytes: int, device: torch.device) -> dict:
    """name -> a function making one copy of `nbytes` (complete when it returns)."""
    numel = nbytes // 4
    on_device = torch.empty(numel, device=device)
    hosts = {"pageable": torch.empty(numel)}
    if device.type == "cuda":
        hosts["pinned"] = torch.empty(numel, pin_memory=True)
    cases = {}
    for memory, host in hosts.items():
        cases[f"host_to_device.{memory}"] = lambda host=host: on_device.copy_(host, non_blocking=True)
        cases[f"device_to_host.{memory}"] = lambda host=host: host.copy_(on_device, non_blocking=True)
    return cases


def _overlap(device: torch.device, nbytes: int, matmul_dim: int, matmuls: int) -> tuple[float, float, float, float]:
    """Compute in steps as the engine runs them (a chain of matmuls, then a wait for the compute
    stream alone), copies through `CopyStreams.moving` from another thread, as a transfer thread
    makes them: alone, alone, and both at once."""
    a = torch.randn(matmul_dim, matmul_dim, device=device)
    copies = CopyStreams(device)
    numel = nbytes // 4
    host = torch.empty(numel, pin_memory=device.type == "cuda")
    target = torch.empty(numel, device=device)
    steps = 10

    def compute() -> None:
        for _ in range(steps):
            x = a
            for _ in range(max(1, matmuls // steps)):
                x = torch.tanh(x @ a)
            if device.type == "cuda":
                torch.cuda.default_stream(device).synchronize()  # the step's tokens: compute alone

    def move() -> None:
        for _ in range(4):
            with copies.moving():
                target.copy_(host, non_blocking=True)

    compute_alone = _timed(compute, device)
    copies_alone = _timed(move, device)
    beside = {}

    def timed_compute() -> None:
        started = time.perf_counter()
        compute()
        beside["s"] = time.perf_counter() - started

    def both() -> None:
        mover = threading.Thread(target=move)
        mover.start()
        timed_compute()
        mover.join()
    both_s = _timed(both, device)
    return compute_alone, copies_alone, both_s, beside["s"]


def run_transfer_bench(nbytes: int, rounds: int = 5, device: str | None = None,
                       matmul_dim: int | None = None, matmuls: int = 40) -> TransferBenchResult:
    """`matmul_dim` sizes the compute so that it takes about as long as the copies (default:
    4096 on CUDA, 512 on a CPU)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    matmul_dim = matmul_dim or (4096 if dev.type == "cuda" else 512)
    cases = _copy_cases(nbytes, dev)
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for name, copy in cases.items():  # warm-up: first-touch and the driver's lazy setup
        _timed(copy, dev)
    for r in range(rounds):
        order = list(cases.items())
        for name, copy in (order if r % 2 == 0 else reversed(order)):
            seconds[name].append(_timed(copy, dev))
    _overlap(dev, nbytes, matmul_dim, matmuls)  # warm-up
    runs = [_overlap(dev, nbytes, matmul_dim, matmuls) for _ in range(rounds)]
    compute_alone, copies_alone, both_s, beside = (statistics.median(column) for column in zip(*runs))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return TransferBenchResult(
        device=name, nbytes=nbytes, rounds=rounds,
        gb_per_s={k: round(nbytes / statistics.median(v) / 1e9, 2) for k, v in seconds.items()},
        seconds={k: [round(s, 5) for s in v] for k, v in seconds.items()},
        compute_alone_s=round(compute_alone, 4), copies_alone_s=round(copies_alone, 4), both_s=round(both_s, 4),
        compute_beside_copies_s=round(beside, 4),
        overlap_ratio=round((compute_alone + copies_alone) / both_s, 3),
        compute_slowdown=round(beside / compute_alone, 3))
