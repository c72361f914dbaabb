"""Batched multi-LoRA: one batch mixes tokens of many adapters (and of none).

For each (layer, target) the adapters used in the step are stacked once: A_cat [R, in] and
B^T_cat [R, out] with R the sum of their ranks (adapters keep B transposed, weights/lora.py). A per-token mask [T, R] holds the adapter's scale in
the columns of that token's own adapter and zero elsewhere, so the delta of every token is
`((x @ A_cat.T) * mask) @ B^T_cat`: two matmuls per projection, whatever the adapter mix, and no
Python loop over requests (the S-LoRA/Punica idea, in plain PyTorch). Stacks are reused across
steps while the set of adapters in the batch is unchanged, as it is through a decode run. The
stacks are copies: they double the device bytes of the batch's adapters, and the memory layer
reserves room for them (`stack_nbytes`).

On the CPU, where kernels/lora_ops.cpp builds, no stacks are made: the kernel reads each token's
own adapter where it lies (Punica's BGMV for decode tokens, a matmul pair per prompt chunk), so a
batch needs no device room beyond its adapters.
"""

import torch

from scalesim.layers import kernel_build
from scalesim.weights.lora import LoRAAdapter

SOURCE = "lora_ops.cpp"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_NONE = torch.empty(0)


def uses_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Deltas on this device and dtype are computed by the kernel, without stacks."""
    return torch.device(device).type == "cpu" and dtype in _KERNEL_DTYPES and kernel_build.load(SOURCE)


def stack_nbytes(adapter: LoRAAdapter) -> int:
    """Device room a step needs for `adapter`'s stacked copy beside the adapter itself."""
    return 0 if uses_kernel(adapter.compute_device, adapter.dtype) else adapter.nbytes


class LoRAStackCache:
    """Stacked A/B tensors of the last adapter set, kept between steps."""

    def __init__(self) -> None:
        self.signature: tuple = ()
        self.stacks: dict[tuple[int, str, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        self.signature, self.stacks = (), {}

    def keep_only(self, adapters) -> None:
        """Drop the stacks unless they are of exactly these adapters (the memory layer reserves
        device room for the stacks of the scheduled batch's adapters only)."""
        if {key for key, _ in self.signature} != {a.key for a in adapters}:
            self.clear()

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.stacks.values() for t in pair]

    def get(self, signature: tuple, key: tuple, build) -> tuple[torch.Tensor, torch.Tensor]:
        if signature != self.signature:
            self.signature, self.stacks = signature, {}
        if key not in self.stacks:
            self.stacks[key] = build()
        return self.stacks[key]


class LoRABatch:
    def __init__(self, token_adapters: list[LoRAAdapter | None], device: torch.device, cache: LoRAStackCache) -> None:
        """token_adapters: the adapter of every flattened token of the step (None = base model)."""
        self.used: list[LoRAAdapter] = list({id(a): a for a in token_adapters if a is not None}.values())
        position = {id(a): i for i, a in enumerate(self.used)}
        self.token_owner = torch.tensor([position[id(a)] if a is not None else -1 for a in token_adapters],
                                        device=device)
        self.device = device
        self.cache = cache
        self.signature = tuple((a.key, a.version) for a in self.used)
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}
        self._scales = [a.scale for a in self.used]
        self._kernel: bool | None = None  # whether the kernel computes this batch's deltas (its dtype decides)

    @property
    def active(self) -> bool:
        return bool(self.used)

    def _mask(self, members: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if members not in self._masks:
            owners = torch.cat([torch.full((self.used[i].rank,), i) for i in members]).to(self.device)
            scales = torch.cat([torch.full((self.used[i].rank,), self.used[i].scale) for i in members])
            match = self.token_owner.unsqueeze(1) == owners.unsqueeze(0)
            self._masks[members] = (match * scales.to(self.device).unsqueeze(0)).to(dtype)
        return self._masks[members]

    def add_delta_(self, layer: int, target: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out [T, out] += the LoRA delta of projection `target` in `layer` for input x [T, in]
        (`out` may be a column slice of a fused projection's output)."""
        if self._kernel is None:
            self._kernel = uses_kernel(x.device, x.dtype)
        if self._kernel and out.stride(-1) == 1:
            pairs = [a.weights.get((layer, target), (_NONE, _NONE)) for a in self.used]
            if any(p[0].numel() for p in pairs):
                rows = x.reshape(x.shape[0], -1)
                rows = rows if rows.stride(-1) == 1 else rows.contiguous()
                torch.ops.scalesim.lora_add_(out, rows, [p[0] for p in pairs],
                                             [p[1] for p in pairs], self._scales, self.token_owner)
            return
        delta = self.delta(layer, target, x)
        if delta is not None:
            out += delta

    def delta(self, layer: int, target: str, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA delta [T, out] of projection `target` in `layer` for input x [T, in], or None."""
        members = tuple(i for i, a in enumerate(self.used) if (layer, target) in a.weights)
        if not members:
            return None

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            pairs = [self.used[i].weights[(layer, target)] for i in members]
            return torch.cat([a for a, _ in pairs]), torch.cat([bt for _, bt in pairs])

        a_cat, bt_cat = self.cache.get(self.signature, (layer, target, members), build)
        return ((x @ a_cat.t()) * self._mask(members, x.dtype)) @ bt_cat
