"""Sequence: the whole state of one generated sequence (one of a request's ``n``).

The engine works on token ids: ``token_ids`` is prompt + output so far. ``num_computed``
counts the leading tokens whose keys/values sit in the KV cache; the model's next forward
for this sequence computes ``token_ids[num_computed:]`` (the whole prompt at first, then
one token per decode step). After preemption ``num_computed`` drops to 0 and the prompt
plus everything generated so far is recomputed; nothing sampled is lost.
"""
from __future__ import annotations

import enum
from typing import Optional

import torch

from inference.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued (or preempted, or part-way through a chunked prefill)
    RUNNING = "running"  # prompt computed, decoding
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        seed: Optional[int] = None,
    ):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # 0..n-1 within the request
        self.params = params
        self.prompt_len = len(prompt_ids)
        self.token_ids: list[int] = list(prompt_ids)
        self.status = Status.WAITING
        self.num_computed = 0  # tokens with K/V in the target model's cache
        self.num_draft_computed = 0  # same for the draft model (speculative decoding)
        self.block_table: list[int] = []  # physical block ids, one per block_size tokens
        self.block_hashes: list[int] = []  # content hashes of the leading full blocks (prefix cache)
        self.num_cached_prompt_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.pending_forks = 0  # siblings (n > 1) to create when the prompt's first token is sampled
        self.finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error"
        self.error: Optional[str] = None
        self.logprobs: Optional[list] = [] if params.logprobs else None
        # Log-probabilities of prompt tokens 1.. (token 0 has no context), filled by the prefill
        # forwards when params.prompt_logprobs is set; reported once, with the first output.
        self.prompt_logprobs: Optional[list] = [] if params.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False
        self.num_emitted = 0  # output tokens already reported by the engine
        self.text = ""  # detokenized output (only when the engine has a tokenizer)
        self.detok = None  # incremental detokenizer state (inference/detokenizer.py)
        self.matcher = None  # grammar position when the output is constrained (inference/grammar.py)
        self.calculator = None  # CalculatorWatcher when params.calculator (inference/calculator.py)
        self.images = None  # ImageInputs (inference/images.py): the prompt's image embeddings, encoded once
        # A generator per sequence makes a seeded request reproducible whatever else is in the batch.
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    # ---- views -------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt log-probabilities were asked for and are not all computed yet: the prefill must
        run over every prompt position (no prefix-cache hit)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.prompt_len - 1

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def finish(self, reason: str, error: Optional[str] = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error

    def reset_for_recompute(self) -> None:
        """Preempted: the cache forgets this sequence; its tokens are kept and recomputed."""
        self.status = Status.WAITING
        self.num_computed = 0
        self.num_draft_computed = 0
        self.block_table = []
        self.block_hashes = []

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}.{self.index}, {self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed}, blocks={self.block_table})"
        )
