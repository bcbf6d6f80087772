"""Inference engines. The interface lives in base; llama.cpp in meshnode.engine.llama
(import it explicitly: loading llama_cpp is slow and not every role needs it)."""

from meshnode.engine.base import (
    Engine,
    EngineError,
    EngineUnavailable,
    FinishReason,
    Generation,
    InvalidRequest,
    InvalidSamplingParams,
    ModelInfo,
    PromptTooLong,
    SamplingParams,
    TokenChunk,
    Usage,
)

__all__ = [
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "FinishReason",
    "Generation",
    "InvalidRequest",
    "InvalidSamplingParams",
    "ModelInfo",
    "PromptTooLong",
    "SamplingParams",
    "TokenChunk",
    "Usage",
]
