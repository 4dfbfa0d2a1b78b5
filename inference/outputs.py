"""What the engine hands back: per-step RequestOutput (streaming) and per-request Completion."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TokenLogprob:
    """Log-probability of a generated token under the model's raw distribution (before
    temperature / penalties / filters), and the ``top_logprobs`` most likely alternatives."""

    token_id: int
    logprob: Optional[float]  # None only for a prompt's first token (nothing comes before it)
    top: list[tuple[int, float]] = field(default_factory=list)  # [(token_id, logprob)], most likely first


@dataclass
class RequestOutput:
    """One sequence's progress in one ``step()``.

    ``new_token_ids`` are the tokens generated this step (a stop token is included, as vLLM
    does; its text is not). ``logprobs`` is aligned with ``new_token_ids`` (None unless asked).
    ``text`` / ``new_text`` are filled only when the engine has a tokenizer: ``new_text`` is the
    not-yet-streamed piece (held back while it could be the start of a stop string).
    ``finish_reason``: "stop" (stop token or string), "length" (max_tokens or the model's
    context), "abort", or "error" (``error`` says why, e.g. the request can never fit).
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    output_token_ids: list[int]
    finished: bool
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    logprobs: Optional[list[TokenLogprob]] = None
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    prompt_len: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    text: str = ""
    new_text: str = ""


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: Optional[str]  # None without a tokenizer
    finish_reason: Optional[str]
    logprobs: Optional[list[TokenLogprob]] = None
    error: Optional[str] = None


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: Optional[list[TokenLogprob]] = None  # when asked (SamplingParams.prompt_logprobs)
