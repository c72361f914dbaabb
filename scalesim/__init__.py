"""ScaleSim: an LLM server for large multi-agent simulations."""

from scalesim.async_llm import AsyncLLM
from scalesim.errors import InvalidRequestError, ModelLoadError, RequestTooLargeError, ScaleSimError
from scalesim.llm import LLM
from scalesim.outputs import CompletionOutput, RequestOutput, SequenceDelta
from scalesim.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "SequenceDelta",
           "ScaleSimError", "InvalidRequestError", "RequestTooLargeError", "ModelLoadError"]
