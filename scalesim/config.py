"""Engine configuration: one typed place for every knob and its default."""

import logging
from dataclasses import dataclass

import torch

from scalesim.units import parse_nbytes

logger = logging.getLogger(__name__)

DEFAULT_KV_CACHE_MEMORY = "1GiB"
DEFAULT_BLOCK_SIZE_TOKENS = 16
DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_MAX_NUM_BATCHED_TOKENS = 4096  # as vLLM; a burst of prefills at 512 ran 2.3x slower
DEFAULT_MAX_LORA_RANK = 64
DEFAULT_POLICY = "scalesim"
DEFAULT_HOST_MEMORY = "4GiB"
DEFAULT_DISK_MEMORY = "100GiB"
DEFAULT_TRANSFER_THREADS = 2
DEFAULT_DTYPE = "auto"
DEFAULT_NUM_SPECULATIVE_TOKENS = 4  # where `num_speculative_tokens` None (auto) speculates
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_CHOICES = sorted(DTYPES) + ["auto"]
ATTENTION_CHOICES = ("auto", "gather", "flex")
QUANTIZATION_CHOICES = ("auto", "none", "fp16", "int8")
# Formats that store the weights smaller and compute in float32 on the CPU (layers/weight_only.py).
WEIGHT_ONLY = ("fp16", "int8")


def auto_device(quantization: str, gpu_available: bool) -> str:
    """The device `auto` picks: CUDA where there is a GPU, except under a weight-only format,
    which runs on the CPU only (layers/weight_only.py)."""
    return "cuda" if gpu_available and quantization not in WEIGHT_ONLY else "cpu"


def auto_quantization(device: str, dtype: str) -> str:
    """The weight format `auto` picks: fp16 weights where the engine computes float32 on a CPU
    because it was left to choose (`dtype` auto) and the weight-only kernel runs here, else none
    (a dtype named, fp32 included, means that dtype's weights). On SmolLM2-135M fp16 weights kept
    all three greedy test texts equal to fp32's, with a largest logit error of 0.11% of the
    logits' spread (accuracy-fp16.json), and on the AVX2 machine decode ran 1.5-2.0x and the feed
    trace 1.11-1.37x as fast as over fp32 weights (medians of two runs, peer-weights-avx2.json and
    peer-default-avx2.json)."""
    if device != "cpu" or dtype != "auto" or auto_dtype(device) != "fp32":
        return "none"
    from scalesim.layers import weight_only

    if weight_only.available():
        return "fp16"
    # kernel_build has said why the build failed (or that kernels are off); this says what it means here
    logger.warning("fp16 weights, the default on this CPU, need the weight-only kernel, which is unavailable here: "
                   "the model runs on its fp32 weights, and KV saved under fp16 weights is not served to it")
    return "none"


def auto_dtype(device: str) -> str:
    """The dtype `auto` picks: bfloat16 where the hardware computes it natively (a CPU with
    AVX512-BF16 or AMX, a CUDA device with bf16), else float32. Weights are bf16 and every matmul
    accumulates in fp32 (oneDNN on the CPU); norms, RoPE and sampling run in fp32."""
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return "bf16" if native else "fp32"
    return "fp32"


@dataclass
class EngineConfig:
    """Settings of one engine.

    `device_memory` (alias `kv_cache_memory`) is the exact byte budget of the device tier: the KV
    pool, in which adapters and private models on the device reserve their bytes too.
    `host_memory` bounds the host tier; `disk_dir` enables the disk tier (bounded by
    `disk_memory`); its reads bypass the page cache unless `disk_page_cache`, and with
    `persist_on_exit` (default: on when there is a disk tier) a clean shutdown writes the device
    and host KV there for the next start. `transfer_threads` move state between tiers.
    `policy` is one of memory.policies.POLICIES. `quantization`: "fp16" stores the base model's
    linear weights in float16, "int8" in int8 with one scale per output channel; both compute in
    float32 (layers/weight_only.py; CPU only: `device` auto then means the CPU, `dtype` auto fp32);
    private models keep their float32 weights. "auto" is `auto_quantization`'s pick. `attention`: "flex" runs a step's attention as
    one flex_attention call per layer over the page table (compiled on CUDA; on a CPU an eager
    reference, for tests only); "auto"/"gather": the CPU kernels, or on CUDA a gather of each
    decode context (engine/model_runner.py). `num_speculative_tokens`: greedy requests verify up
    to that many tokens drafted by prompt lookup in each decode step (engine/speculation.py; 0:
    off); None: DEFAULT_NUM_SPECULATIVE_TOKENS where the CPU attention kernels serve the model
    (a draft is then a few more rows of one batched kernel call, as measured), else 0 (elsewhere
    each drafting sequence's attention is a call of its own, not measured).
    """

    model: str
    dtype: str = DEFAULT_DTYPE
    device: str = "auto"
    kv_cache_memory: str | int = DEFAULT_KV_CACHE_MEMORY
    block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_model_len: int | None = None
    seed: int = 0
    kv_cache_dtype: str = "auto"
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    policy: str = DEFAULT_POLICY
    device_memory: str | int | None = None
    host_memory: str | int = DEFAULT_HOST_MEMORY
    disk_dir: str | None = None
    disk_memory: str | int = DEFAULT_DISK_MEMORY
    disk_page_cache: bool = False
    persist_on_exit: bool | None = None
    transfer_threads: int = DEFAULT_TRANSFER_THREADS
    attention: str = "auto"
    quantization: str = "auto"
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        from scalesim.memory.policies import POLICIES

        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        device = parse_nbytes(self.device_memory if self.device_memory is not None else self.kv_cache_memory)
        self.host_nbytes = parse_nbytes(self.host_memory)
        if POLICIES[self.policy].unbounded_device:
            # The limit of unbounded memory: the device holds all that device and host hold together.
            device, self.host_nbytes = device + self.host_nbytes, 0
        self.kv_cache_nbytes = self.device_nbytes = device
        self.disk_nbytes = parse_nbytes(self.disk_memory)
        if self.persist_on_exit is None:
            self.persist_on_exit = self.disk_dir is not None
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be at least 0, got {self.num_speculative_tokens}")
        if self.transfer_threads < 1:
            raise ValueError("transfer_threads must be at least 1")
        if self.block_size_tokens <= 0 or self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("block_size_tokens, max_num_seqs and max_num_batched_tokens must be positive")
        if self.device == "auto":
            self.device = auto_device(self.quantization, torch.cuda.is_available())
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_CHOICES}, got {self.quantization!r}")
        if self.quantization == "auto":
            self.quantization = auto_quantization(self.device, self.dtype)
        if self.quantization in WEIGHT_ONLY:
            if self.device != "cpu":
                raise ValueError(f"quantization {self.quantization} runs on the CPU only, not on {self.device!r}")
            if self.dtype not in ("auto", "fp32", "float32"):
                raise ValueError(f"quantization {self.quantization} computes in float32: use dtype fp32 or auto, "
                                 f"not {self.dtype!r}")
            self.dtype = "fp32"
        if self.dtype == "auto":
            self.dtype = auto_dtype(self.device)
        if self.kv_cache_dtype == "auto":
            # The weights' dtype, as vLLM does. On the CPU the decode kernel reads a bf16 cache in
            # place (layers/paged_decode.py); measured on an AVX-512 EPYC with bf16 weights, a
            # decode step at batch 16 over 1,024-token contexts took 64-72 ms with a bf16 cache
            # against 88-95 ms with fp32 (parity at 8 x 600 tokens), and the cache holds twice the
            # tokens. (Without the kernel, decode gathers contexts; over a bf16 cache it was 3-4x
            # slower than over fp32 when it ran in bf16, not measured since it upcasts to fp32.)
            self.kv_cache_dtype = self.dtype
        if self.kv_cache_dtype not in DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.kv_cache_dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_kv_cache_dtype(self) -> torch.dtype:
        return DTYPES[self.kv_cache_dtype]
