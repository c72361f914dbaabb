"""The multi-LoRA kernel (kernels/lora_ops.cpp) against the stacked plain-PyTorch path it replaces."""

from types import SimpleNamespace

import pytest
import torch

from scalesim.layers import kernel_build
from scalesim.layers.lora import SOURCE, LoRABatch, LoRAStackCache, stack_nbytes, uses_kernel

pytestmark = pytest.mark.skipif(not kernel_build.load(SOURCE), reason="the LoRA kernel does not build here")

IN, OUT = 48, 40


def _adapter(i: int, rank: int, dtype: torch.dtype, targets=("proj",)):
    g = torch.Generator().manual_seed(100 + i)
    weights = {(0, t): (torch.randn(rank, IN, generator=g).to(dtype), torch.randn(rank, OUT, generator=g).to(dtype))
               for t in targets}  # (A, B^T) as weights/lora.py keeps them
    return SimpleNamespace(key=f"adapter:{i}", version=0, rank=rank, scale=0.5 + i, weights=weights)


def _both(token_adapters, dtype, target="proj", column_slice=False):
    tokens = len(token_adapters)
    x = torch.randn(tokens, IN, generator=torch.Generator().manual_seed(7)).to(dtype)
    base = torch.randn(tokens, OUT + 8 if column_slice else OUT, generator=torch.Generator().manual_seed(8)).to(dtype)
    batch = LoRABatch(token_adapters, torch.device("cpu"), LoRAStackCache())
    plain = base[:, :OUT].clone()
    delta = batch.delta(0, target, x)
    if delta is not None:
        plain += delta
    fused = base.clone()
    batch.add_delta_(0, target, x, fused[:, :OUT])
    return fused, plain, base


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("pattern", ["decode", "prefill", "mixed"])
def test_the_kernel_adds_what_the_stacked_path_adds(dtype, tolerance, pattern):
    adapters = [_adapter(i, rank, dtype) for i, rank in enumerate((8, 4, 16))]
    owners = {"decode": [adapters[0], None, adapters[2], adapters[1], adapters[0], adapters[2]],
              "prefill": [adapters[1]] * 20 + [adapters[0]] * 9 + [None] * 10,
              "mixed": [adapters[2]] * 12 + [adapters[0], adapters[1], None] + [adapters[0]] * 3}[pattern]
    fused, plain, base = _both(owners, dtype)
    scale = plain.float().abs().max().item()
    assert (fused[:, :OUT].float() - plain.float()).abs().max().item() <= tolerance * max(scale, 1.0)
    changed = (fused[:, :OUT] != base[:, :OUT]).any(dim=1)
    assert changed.tolist() == [a is not None for a in owners]  # tokens of the base model are untouched


def test_a_column_slice_of_a_fused_output_is_written_in_place_and_nothing_beside_it():
    adapters = [_adapter(i, 8, torch.float32) for i in range(2)]
    fused, plain, base = _both([adapters[0], adapters[1]] * 3 + [adapters[1]] * 9, torch.float32, column_slice=True)
    assert torch.allclose(fused[:, :OUT], plain, atol=1e-4)
    assert torch.equal(fused[:, OUT:], base[:, OUT:])


def test_an_adapter_without_the_target_adds_nothing():
    with_target = _adapter(0, 8, torch.float32)
    without = _adapter(1, 8, torch.float32, targets=("other",))
    fused, plain, base = _both([with_target, without, without, with_target], torch.float32)
    assert torch.allclose(fused[:, :OUT], plain, atol=1e-4)
    assert torch.equal(fused[1:3, :OUT], base[1:3, :OUT])


def test_with_the_kernel_a_batch_reserves_no_room_for_stacks():
    adapter = SimpleNamespace(compute_device=torch.device("cpu"), dtype=torch.float32, nbytes=1234)
    assert uses_kernel(adapter.compute_device, adapter.dtype)
    assert stack_nbytes(adapter) == 0
    assert stack_nbytes(SimpleNamespace(compute_device=torch.device("cpu"), dtype=torch.float16, nbytes=1234)) == 1234
