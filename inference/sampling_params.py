"""SamplingParams: how one request wants its tokens chosen and when it stops."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from utils.errors import UserError

MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


@dataclass
class SamplingParams:
    """Per-request sampling settings (the OpenAI / vLLM names).

    temperature 0 means greedy. top_k 0 and top_p 1.0 switch those filters off.
    Penalties follow the OpenAI / CTRL definitions (see inference/sampler.py).
    ``stop`` strings need a tokenizer on the engine; ``stop_token_ids`` work on ids alone,
    and the tokenizer's EOS stops generation unless ``ignore_eos``.
    ``logprobs`` returns the chosen token's log-probability under the model (raw logits,
    before temperature and filters) plus the ``top_logprobs`` most likely alternatives.
    ``logit_bias`` adds a value in [-100, 100] to a token's logit before sampling (OpenAI's);
    ``grammar`` constrains the output (inference/grammar.py: json_schema, json_object, regex, lark).
    ``prompt_logprobs`` (vLLM's name; None = off) returns every prompt token's log-probability
    given the tokens before it, with that many most likely alternatives (0 = none): what
    likelihood scoring needs (an OpenAI ``echo`` with ``logprobs``). ``max_tokens=0`` scores the
    prompt and generates nothing.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: Optional[dict] = None
    prompt_logprobs: Optional[int] = None
    calculator: bool = False  # answer "<<expression=" with the computed result (inference/calculator.py)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, max_model_len: Optional[int] = None) -> "SamplingParams":
        """Raise UserError naming the bad field and its valid range; returns self."""

        def bad(msg: str) -> None:
            raise UserError(f"sampling: {msg}")

        if isinstance(self.stop, str):  # OpenAI allows a single string
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            bad(f"max_tokens must be an integer >= 0 (0: score the prompt, generate nothing), got {self.max_tokens!r}.")
        if max_model_len is not None and self.max_tokens > max_model_len:
            bad(f"max_tokens={self.max_tokens} exceeds the model's context of {max_model_len} tokens; lower it.")
        if not 0.0 <= self.temperature <= 100.0:
            bad(f"temperature must be between 0 (greedy) and 100, got {self.temperature!r}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}.")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}.")
        if self.repetition_penalty <= 0.0:
            bad(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty!r}.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(f"{name} must be between -2 and 2, got {getattr(self, name)!r}.")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an integer or null, got {self.seed!r}.")
        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}.")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop must be a list of non-empty strings, got {self.stop!r}.")
        # Each stop string is searched in every new piece of text: bound the work a request can cause.
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            bad(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters, got "
                f"{len(self.stop)} (longest {max(map(len, self.stop), default=0)}).")
        for t, b in self.logit_bias.items():
            if not isinstance(t, int) or t < 0 or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                bad(f"logit_bias maps token ids (>= 0) to values in [-100, 100], got {t!r}: {b!r}.")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}.")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            bad(f"top_logprobs must be an integer between 0 and 20, got {self.top_logprobs!r}.")
        if self.top_logprobs and not self.logprobs:
            bad("top_logprobs needs logprobs=True.")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= 20):
            bad(f"prompt_logprobs must be null or an integer between 0 and 20, got {self.prompt_logprobs!r}.")
        if self.calculator and (self.logprobs or self.grammar is not None):
            bad("calculator cannot be combined with logprobs or a grammar (its results are not sampled).")
        if self.max_tokens == 0 and self.n != 1:
            bad(f"max_tokens=0 scores the prompt only, so every choice would be the same; send n=1 (got n={self.n}).")
        return self
