"""Where a move's bytes travel: beside the model's compute, never in its way.

On a CPU the device and the host are the same memory, and a move's copies run inline on the
transfer thread that makes the move (the threads are the CPU's copy engine: memory/worker.py).

On CUDA every copy a move makes runs on a side stream of the thread making it, as the paper
intends (a load crosses PCIe while the model computes):
- the side stream first waits for the compute work already queued (`wait_stream`): pool pages
  a request just gave back may still be read or written by a kernel in flight, and pages about to
  be copied out may still be being written;
- the compute stream never waits for a move: the thread that made it waits for its own stream
  (which carries that thread's copies alone) before the move commits or is undone, and a request
  uses an object only after its move commits (`ready_on_device`). So a request waits on its own
  load alone.
- host copies are page-locked (`host_buffer`), so copies in both directions run asynchronously
  and at full PCIe bandwidth; a pageable source or target makes CUDA stage through a bounce
  buffer.

A copy starts after the compute queued before it was issued and overlaps the compute queued
after: in the engine, which waits for each step's tokens, a load issued during step N crosses
PCIe while step N+1 computes.

Contract: `with copies.moving():` around a move's transfer; what it copies is complete when the
block exits, also when it raises. Inside it, `moved(tensor, device)` is the way to copy a tensor
that is dropped after the copy (to the CPU from CUDA it lands in page-locked memory), or
`keep_until_copied` before a module's `.to(device, non_blocking=True)`.
`host_copy(tensor)` is a host copy of a device tensor, complete on return.
"""

import threading
from contextlib import contextmanager

import torch


class CopyStreams:
    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.async_copies = self.device.type == "cuda"
        self._local = threading.local()

    def _stream(self) -> "torch.cuda.Stream":
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream

    @contextmanager
    def moving(self):
        """Run the block's copies beside the compute stream; they are done when it exits."""
        if not self.async_copies:
            yield
            return
        stream = self._stream()
        stream.wait_stream(torch.cuda.default_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            stream.synchronize()  # this transfer thread waits for its own copies; compute does not


def keep_until_copied(tensors) -> None:
    """Mark CUDA tensors in use by the current stream: a move drops its source right after queuing
    the copy, and without the mark their memory could go to another stream while it is read."""
    for tensor in tensors:
        if tensor.is_cuda:
            tensor.record_stream(torch.cuda.current_stream(tensor.device))


def moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` copied to `device` on the current stream; the source may be dropped at once."""
    keep_until_copied([tensor])
    return tensor.to(device, non_blocking=True)


def host_buffer(like: torch.Tensor) -> torch.Tensor:
    """An empty host tensor shaped like `like`, page-locked where CUDA is present."""
    return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=torch.cuda.is_available())


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of `tensor`, complete on return: on CUDA copied into page-locked memory on the
    current stream (inside `moving`, the side stream), which this thread waits for."""
    if tensor.device.type == "cpu":  # the device is this memory: the tensor is its own host copy
        return tensor.pin_memory() if torch.cuda.is_available() else tensor
    host = host_buffer(tensor)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host
