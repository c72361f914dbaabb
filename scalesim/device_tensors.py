"""Small tensors for the device without waiting for it.

On CUDA a copy from pageable host memory first synchronizes the stream: every index or parameter
tensor made with `torch.tensor(values, device=cuda)` after the forward is queued would wait for
the whole forward. Built in page-locked memory and copied asynchronously, it waits for nothing
(PyTorch keeps the page-locked buffer until its copy is done). On a CPU these are plain tensors.
"""

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`, queued behind the stream's work rather than waiting for it."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def device_tensor(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)
