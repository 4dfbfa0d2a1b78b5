"""LLMEngine: the loop. Requests in (token ids), tokens out, one scheduler step at a time.

    engine = LLMEngine(model, tokenizer=tok)
    engine.add_request(prompt_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): ...          # streaming
    engine.generate(list_of_prompt_ids, params) # batch: all prompts continuously batched

Each step the scheduler picks a batch (prefill or decode), the model runner computes
logits, the sampler picks tokens, and finished sequences give their blocks back. A request
with ``prompt_logprobs`` also gets its prompt scored in its prefill forwards (likelihood
evaluation); with ``max_tokens=0`` it stops there.
``add_request`` and ``abort`` may be called from another thread (a server's event loop)
while one thread drives ``step``; they are queued and applied at the start of a step.
"""
from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections import deque
from typing import Optional, Union

import torch

from inference import sampler
from inference.block_manager import BlockManager
from inference.detokenizer import IncrementalDetokenizer
from inference.model_runner import ModelRunner
from inference.outputs import Completion, CompletionOutput, RequestOutput, TokenLogprob
from inference.prompt_scoring import score_prefill
from inference.sampling_params import SamplingParams
from inference.scheduler import Batch, Scheduler
from inference.sequence import Sequence, Status
from utils.errors import UserError


def kv_bytes_per_token(model: torch.nn.Module, device: torch.device, kv_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes one token occupies in the KV cache (all layers), measured with a 1-token forward;
    stored in ``kv_dtype`` when given (else in the dtype the model hands to the cache)."""
    from model.cache import KVCache

    cache = KVCache(1)
    with torch.inference_mode():
        model(torch.zeros(1, 1, dtype=torch.long, device=device), cache=cache)
    n = cache.nbytes_per_token()
    stored = [t for bufs in cache.store.values() for t in bufs]
    if kv_dtype is not None and stored:
        n = n * kv_dtype.itemsize // stored[0].element_size()
    return max(1, n)


class LLMEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        tokenizer=None,
        block_size: int = 16,
        num_blocks: Optional[int] = None,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 2048,
        max_model_len: Optional[int] = None,
        enable_prefix_caching: bool = True,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[torch.dtype] = None,
        draft_model: Optional[torch.nn.Module] = None,
        num_speculative_tokens: int = 4,
        kv_cache_memory: Optional[int] = None,
        kv_cache_dtype: Optional[torch.dtype] = None,
        decode_kernel: Optional[bool] = None,
        cuda_graphs: Optional[bool] = None,
    ):
        """decode_kernel: decode steps read the KV pools through the block table with the paged Triton
        kernel (model/kernels) instead of gathering them; None: on CUDA when Triton is installed.
        cuda_graphs: decode steps replay a CUDA graph per batch bucket (inference/cuda_graphs.py);
        None: on CUDA when the kernel serves every layer; on CPU True runs the same static buffers
        without a graph (tests). kv_cache_dtype: the cache's storage dtype (None: the model's)."""
        self.device = torch.device(device)
        cfg = model.cfg
        if model.cache_kind == "recurrent":
            # A recurrent state per sequence, not per block: no prefix sharing, no rollback.
            enable_prefix_caching = False
            if draft_model is not None:
                raise UserError("engine: speculative decoding needs a KV-cache target; linear attention cannot roll back its state.")
        if draft_model is not None and draft_model.cache_kind == "recurrent":
            raise UserError("engine: the draft model uses linear attention, which cannot roll back rejected tokens; pick a softmax-attention draft.")
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len or cfg.max_seq_len
        if self.max_model_len > cfg.max_seq_len:
            raise UserError(f"engine: max_model_len={self.max_model_len} exceeds the model's max_seq_len={cfg.max_seq_len}; lower it.")
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or block_size < 1:
            raise UserError("engine: max_num_seqs, max_num_batched_tokens and block_size must be >= 1.")
        self.block_size = block_size
        self.kv_cache_dtype = kv_cache_dtype  # None: the model's dtype
        self.draft_model = None
        self.k = 0
        if draft_model is not None:
            if draft_model.cfg.vocab_size != cfg.vocab_size:
                raise UserError(
                    f"engine: the draft model's vocab_size={draft_model.cfg.vocab_size} differs from the target's "
                    f"{cfg.vocab_size}; speculative decoding needs the same tokenizer."
                )
            if draft_model.cfg.max_seq_len < self.max_model_len:
                raise UserError(f"engine: the draft model's max_seq_len={draft_model.cfg.max_seq_len} is shorter than max_model_len={self.max_model_len}.")
            self.draft_model = draft_model.to(device=self.device, dtype=dtype).eval()
            self.k = num_speculative_tokens
        self.num_blocks = num_blocks or self._derive_num_blocks(max_num_seqs, kv_cache_memory)
        self.bm = BlockManager(self.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, lookahead=self.k)
        from inference.cuda_graphs import decode_settings

        self.decode_kernel, cuda_graphs = decode_settings(self.model, self.device, decode_kernel, cuda_graphs)
        graphs_for = (self.bm.blocks_for(self.max_model_len + self.k), max_num_seqs) if cuda_graphs else None
        self.runner = ModelRunner(self.model, self.num_blocks, block_size, self.device, kv_cache_dtype,
                                  self.decode_kernel, graphs_for)
        self.draft_runner = (ModelRunner(self.draft_model, self.num_blocks, block_size, self.device, kv_cache_dtype,
                                         self.decode_kernel) if self.draft_model else None)
        self.eos_id = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        self.requests: dict[str, list[Sequence]] = {}
        self._pending: deque = deque()  # ("add", seq) / ("abort", request_id), from any thread
        self._pending_ids: set[str] = set()
        self._lock = threading.Lock()
        self.driven_by: Optional[str] = None  # set by a loop that steps this engine on its own thread
        self._early: list[RequestOutput] = []  # outputs decided outside a forward (errors, aborts)
        self._seq_ids = itertools.count()
        self._grammars: dict[str, object] = {}  # compiled grammars by spec (inference/grammar.py)
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "spec_proposed": 0, "spec_accepted": 0}

    def _derive_num_blocks(self, max_num_seqs: int, kv_cache_memory: Optional[int]) -> int:
        """Enough blocks for max_num_seqs full-length sequences, capped by a memory budget
        (``kv_cache_memory`` bytes; on CUDA default 90% of free memory)."""
        want = max_num_seqs * -(-(self.max_model_len + self.k) // self.block_size)
        per_token = kv_bytes_per_token(self.model, self.device, self.kv_cache_dtype)
        if self.draft_model is not None:
            per_token += kv_bytes_per_token(self.draft_model, self.device, self.kv_cache_dtype)
        budget = kv_cache_memory
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.9)
        if budget is None:
            return want
        return max(1, min(want, budget // (per_token * self.block_size)))

    @property
    def acceptance_rate(self) -> Optional[float]:
        """Share of draft tokens the target accepted (speculative decoding), None without a draft."""
        proposed = self.stats["spec_proposed"]
        return self.stats["spec_accepted"] / proposed if proposed else None

    @classmethod
    def from_checkpoint(cls, path: str, **kw) -> "LLMEngine":
        """Engine over a checkpoint directory (full model or adapter) and its tokenizer, loaded
        through model/load.py; ``device``/``dtype``, ``weights``/``group_size`` (a low-precision weight
        format, model/weight_formats.py) and the engine's other arguments as for __init__."""
        from model.load import load, load_model

        device, dtype = kw.pop("device", "cpu"), kw.pop("dtype", None)
        fmt = {"weights": kw.pop("weights", "full"), "group_size": kw.pop("group_size", 128)}
        if kw.get("tokenizer") is None:
            model, kw["tokenizer"] = load(path, device=device, dtype=dtype, expect="lm", **fmt)
        else:
            model = load_model(path, device=device, dtype=dtype, expect="lm", **fmt)
        return cls(model, device=next(model.parameters()).device, **kw)

    # ---- requests ---------------------------------------------------------------------------
    def request_error(self, prompt_ids: list[int], params: SamplingParams) -> Optional[str]:
        """Why this request can never run (a message for the user), or None if it can."""
        n = len(prompt_ids)
        if n == 0:
            return "the prompt is empty; send at least one token."
        if params.n > self.scheduler.max_num_seqs:  # its n sequences run together: it would wait forever
            return (f"n={params.n} exceeds the {self.scheduler.max_num_seqs} sequences this engine decodes at once "
                    "(max_num_seqs); lower n or start the engine with a larger max_num_seqs.")
        if n + params.max_tokens > self.max_model_len:
            return (
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds the "
                f"model's context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens."
            )
        blocks = self.bm.blocks_for(n + params.max_tokens + self.k)
        if blocks > self.num_blocks:
            return (
                f"the request needs {blocks} KV blocks but the cache has {self.num_blocks}; "
                f"lower max_tokens or start the engine with more num_blocks."
            )
        return None

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: Optional[str] = None,
                    images: Optional[torch.Tensor] = None) -> str:
        """Queue a request; returns its id. Bad sampling params or token ids raise UserError; a request
        that can never fit finishes at the next step with finish_reason "error" and a message.
        ``images`` (n, C, H, W) in [-1, 1]: a vision-language model's images, whose placeholder tokens
        the prompt holds (inference/images.py); encoded here, once."""
        self._validate(prompt_ids, params)
        image_inputs = self._images(prompt_ids, images)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._pending_ids or request_id in self.requests:
            raise UserError(f"request id {request_id!r} is already in use by a running request; use a unique id.")
        self._pending_ids.add(request_id)
        seq = Sequence(next(self._seq_ids), request_id, prompt_ids, params, index=0, seed=params.seed)
        seq.pending_forks = params.n - 1
        seq.images = image_inputs
        self._attach(seq)
        self._pending.append(("add", seq))
        self._try_apply_pending()
        return request_id

    def _attach(self, seq: Sequence) -> None:
        """A new sequence's text-side state: detokenizer, grammar position, calculator."""
        params = seq.params
        if self.tokenizer is not None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        if params.grammar is not None:
            seq.matcher = self._grammar(params).matcher()
        if params.calculator:
            from inference.calculator import CalculatorWatcher

            seq.calculator = CalculatorWatcher(self.tokenizer, seq.prompt_ids)

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate(self.max_model_len)
        V = self.model.cfg.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise UserError(f"prompt token ids must be integers in [0, {V}); got {bad[:5]}.")
        if any(t >= V for t in params.logit_bias):
            raise UserError(f"logit_bias names token ids beyond the vocabulary ({V}): {[t for t in params.logit_bias if t >= V][:5]}.")
        if (params.calculator or params.grammar is not None) and self.tokenizer is None:
            raise UserError("calculator and grammars read the generated text: give the engine its tokenizer.")

    def _images(self, prompt_ids: list[int], images: Optional[torch.Tensor]):
        from inference.images import prepare_images

        if images is not None and len(images) and (self.draft_model is not None or self.model.cache_kind == "recurrent"):
            raise UserError("images need a KV-cache model without speculative decoding; start the engine without a draft model.")
        return prepare_images(self.model, prompt_ids, images)

    def _grammar(self, params: SamplingParams):
        """The compiled grammar of a constrained request (cached: requests repeat their schemas)."""
        from inference.grammar import compile_grammar

        key = json.dumps(params.grammar, sort_keys=True)
        if key not in self._grammars:
            if len(self._grammars) >= 64:
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[key] = compile_grammar(self.tokenizer, params.grammar)
        return self._grammars[key]

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed (now, or at the start of the next step if a step
        is running in another thread) and it reports finish_reason "abort" once."""
        self._pending.append(("abort", request_id))
        self._try_apply_pending()

    def has_unfinished(self) -> bool:
        return bool(self.requests or self._pending or self._early)

    def _try_apply_pending(self) -> None:
        if self._lock.acquire(blocking=False):
            try:
                self._apply_pending()
            finally:
                self._lock.release()

    def _apply_pending(self) -> None:
        while self._pending:
            kind, item = self._pending.popleft()
            if kind == "add":
                seq: Sequence = item
                error = self.request_error(seq.token_ids, seq.params)
                if error:
                    seq.finish("error", error)
                    self._early.append(self._output(seq, []))
                else:
                    self.requests[seq.request_id] = [seq]  # before leaving _pending_ids (see add_request)
                    self.scheduler.add(seq)
                self._pending_ids.discard(seq.request_id)
            else:
                for seq in self.requests.pop(item, []):
                    if not seq.is_finished:
                        self.scheduler.remove(seq)
                        self.runner.drop_state(seq.seq_id)
                        seq.finish("abort")
                        self._early.append(self._output(seq, []))

    # ---- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler iteration. Returns an output for every sequence that got tokens or finished."""
        with self._lock, torch.inference_mode():
            self._apply_pending()
            outputs, self._early = self._early, []
            batch = self.scheduler.schedule()
            if batch is None:
                return outputs
            self.stats["steps"] += 1
            constrained = any(s.matcher is not None or s.params.logit_bias or s.calculator for s in batch.seqs)
            if batch.is_prefill or self.draft_runner is None or constrained:  # drafts would ignore the constraint
                outputs += self._run_plain(batch)
            else:
                outputs += self._run_speculative(batch)
            return outputs

    def _run_plain(self, batch: Batch) -> list[RequestOutput]:
        toks = [s.token_ids[st : st + q] for s, st, q in zip(batch.seqs, batch.starts, batch.q_lens)]
        tables = [s.block_table for s in batch.seqs]
        scored = [i for i, s in enumerate(batch.seqs) if s.needs_prompt_logprobs] if batch.is_prefill else []
        logits = self.runner.run(toks, tables, batch.starts, copies=batch.copies, seq_ids=[s.seq_id for s in batch.seqs],
                                 return_hidden=bool(scored), images=[s.images for s in batch.seqs])
        if scored:
            logits, hidden = logits
            score_prefill([(batch.seqs[i], batch.starts[i], batch.q_lens[i]) for i in scored], hidden[scored], self.model)
        if self.draft_runner is not None:  # keep the draft's cache in step with the target's
            self.draft_runner.run(toks, tables, batch.starts, copies=batch.copies)
        rows: list[tuple[Sequence, int]] = []  # (sequence to sample for, logits row)
        outputs = []
        for i, (s, q) in enumerate(zip(batch.seqs, batch.q_lens)):
            s.num_computed += q
            if self.draft_runner is not None:
                s.num_draft_computed = s.num_computed
            if batch.is_prefill:
                self.stats["prompt_tokens"] += q
            if s.num_computed < s.num_tokens:
                continue  # chunked prefill: more of the prompt next step
            if s.params.max_tokens == 0:  # score the prompt only: nothing to sample
                self.bm.commit(s)
                self._finish(s, "length")
                outputs.append(self._emit(s))
                continue
            if s.status == Status.WAITING:
                self.scheduler.started(s)
            rows.append((s, i))
            for child in self._fork(s):
                rows.append((child, i))
        if rows:
            seqs = [s for s, _ in rows]
            row_logits = logits[torch.tensor([i for _, i in rows], device=logits.device)]
            sample_logits = self._constrain(row_logits, seqs)
            tokens = sampler.sample(
                sample_logits,
                [s.params for s in seqs],
                [s.prompt_ids for s in seqs],
                [s.output_ids for s in seqs],
                [s.generator for s in seqs],
            )
            lps = self._logprobs(row_logits, tokens, seqs)
            for j, (s, tok) in enumerate(zip(seqs, tokens.tolist())):
                new = s.calculator.after(tok) if s.calculator is not None else [tok]  # a result replaces the token
                self._append(s, new, [lps[j]] if lps else None)
                outputs.append(self._emit(s))
        for s in batch.seqs:
            if not s.is_finished:
                self.bm.commit(s, min(s.num_computed, s.num_draft_computed) if self.draft_runner else None)
        return outputs

    def _run_speculative(self, batch: Batch) -> list[RequestOutput]:
        from inference.speculative import speculative_decode

        results = speculative_decode(batch.seqs, self.runner, self.draft_runner, self.k, self.max_model_len, batch.copies)
        outputs = []
        for s, (new, raw, proposed) in zip(batch.seqs, results):
            self.stats["spec_proposed"] += proposed
            self.stats["spec_accepted"] += len(new) - 1
            lps = None
            if s.params.logprobs:
                lps = sampler.token_logprobs(raw, torch.tensor(new, device=raw.device), s.params.top_logprobs)
            self._append(s, new, lps)
            outputs.append(self._emit(s))
            if not s.is_finished:
                self.bm.commit(s, min(s.num_computed, s.num_draft_computed))
        return outputs

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Rows of constrained sequences with their logit_bias added and the tokens their grammar
        forbids at -inf (a copy; logprobs are still reported from the model's raw logits)."""
        if not any(s.matcher is not None or s.params.logit_bias for s in seqs):
            return logits
        out = logits.clone()
        V = out.shape[-1]
        for row, s in enumerate(seqs):
            for token, bias in s.params.logit_bias.items():
                out[row, token] += bias
            if s.matcher is not None:
                out[row, ~s.matcher.allowed(V).to(out.device)] = float("-inf")
        return out

    def _fork(self, leader: Sequence) -> list[Sequence]:
        """n > 1: the prompt is computed once; siblings share its blocks and sample their own
        first token from the same logits."""
        children = []
        for i in range(1, leader.pending_forks + 1):
            seed = None if leader.params.seed is None else hash((leader.params.seed, i)) & 0x7FFF_FFFF_FFFF_FFFF
            child = Sequence(next(self._seq_ids), leader.request_id, leader.prompt_ids, leader.params, index=i, seed=seed)
            self._attach(child)
            child.prompt_logprobs = leader.prompt_logprobs  # the same prompt, computed once
            child.images = leader.images  # recompute after preemption needs them
            self.bm.fork(leader, child)
            self.runner.fork_state(leader.seq_id, child.seq_id)
            self.scheduler.add_running(child)
            self.requests[leader.request_id].append(child)
            children.append(child)
        leader.pending_forks = 0
        return children

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]):
        if not any(s.params.logprobs for s in seqs):
            return None
        top_n = max(s.params.top_logprobs for s in seqs)
        return sampler.token_logprobs(logits, tokens, top_n)

    # ---- stopping ---------------------------------------------------------------------------
    def _append(self, seq: Sequence, tokens: list[int], lps) -> None:
        """Append sampled tokens one by one, stopping at the first stop condition."""
        p = seq.params
        stop_ids = set(p.stop_token_ids)
        if self.eos_id is not None and not p.ignore_eos:
            stop_ids.add(self.eos_id)
        for j, tok in enumerate(tokens):
            seq.token_ids.append(tok)
            self.stats["generated_tokens"] += 1
            if seq.logprobs is not None and lps is not None:
                chosen, top = lps[j]
                seq.logprobs.append(TokenLogprob(tok, chosen, top[: p.top_logprobs]))
            if tok in stop_ids:
                if seq.detok is not None:
                    seq.detok.flush(seq.output_ids[:-1])
                self._finish(seq, "stop")
                return
            if seq.matcher is not None and self._grammar_done(seq, tok):
                return
            if seq.detok is not None and seq.detok.update(seq.output_ids) is not None:
                self._finish(seq, "stop")
                return
            if seq.num_output >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                if seq.detok is not None:
                    seq.detok.flush(seq.output_ids)
                self._finish(seq, "length")
                return

    def _grammar_done(self, seq: Sequence, tok: int) -> bool:
        """Advance a constrained sequence's grammar; True when that finished the sequence (the
        grammar is complete: "stop"; it refused the token, which the mask makes a bug: "error")."""
        if not seq.matcher.accept(tok):
            self._finish(seq, "error", f"the output left its grammar ({seq.matcher.error}); this is a bug, please report it.")
            return True
        if seq.matcher.done:
            if seq.detok is not None:
                seq.detok.flush(seq.output_ids)
            self._finish(seq, "stop")
            return True
        return False

    def _finish(self, seq: Sequence, reason: str, error: Optional[str] = None) -> None:
        seq.finish(reason, error)
        self.scheduler.remove(seq)
        self.runner.drop_state(seq.seq_id)
        live = self.requests.get(seq.request_id, [])
        if all(s.is_finished for s in live) and not any(s.pending_forks for s in live):
            self.requests.pop(seq.request_id, None)

    def _emit(self, seq: Sequence) -> RequestOutput:
        new = seq.output_ids[seq.num_emitted :]
        lps = seq.logprobs[seq.num_emitted :] if seq.logprobs is not None else None
        seq.num_emitted = seq.num_output
        prompt_lps = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            seq.prompt_logprobs_sent = True
            prompt_lps = [TokenLogprob(seq.token_ids[0], None)] + seq.prompt_logprobs
        return self._output(seq, new, lps, prompt_lps)

    def _output(self, seq: Sequence, new: list[int], lps=None, prompt_lps=None) -> RequestOutput:
        text = new_text = ""
        if seq.detok is not None:
            new_text = seq.detok.new_text(seq.is_finished)
            text = seq.detok.text
        return RequestOutput(
            request_id=seq.request_id,
            index=seq.index,
            new_token_ids=new,
            output_token_ids=seq.output_ids,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            error=seq.error,
            logprobs=lps,
            prompt_logprobs=prompt_lps,
            prompt_len=seq.prompt_len,
            num_cached_tokens=seq.num_cached_prompt_tokens,
            text=text,
            new_text=new_text,
        )

    # ---- batch API ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: Union[SamplingParams, list[SamplingParams], None] = None,
        use_tqdm: bool = False,
        images: Optional[list[Optional[torch.Tensor]]] = None,
    ) -> list[Completion]:
        """Generate for every prompt (continuously batched); returns completions in prompt order.
        ``images``: per prompt, its images' pixels (n, C, H, W) or None (``add_request``).

        Drives ``step`` itself: do not run it while another thread steps the same engine.
        A request that cannot fit comes back with finish_reason "error" and the reason in ``error``.
        """
        if self.driven_by is not None:
            raise UserError(f"generate: this engine is stepped by {self.driven_by}, which would take its outputs; "
                            "build a second LLMEngine over the same model for direct calls.")
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise UserError(f"generate: {len(prompts)} prompts but {len(plist)} sampling params.")
        for p, sp in zip(prompts, plist):  # all or nothing: a bad request queues none
            self._validate(list(p), sp)
        images = images or [None] * len(prompts)
        if len(images) != len(prompts):
            raise UserError(f"generate: {len(prompts)} prompts but {len(images)} image lists.")
        ids = [self.add_request(list(p), sp, images=im) for p, sp, im in zip(prompts, plist, images)]
        n_of = {rid: sp.n for rid, sp in zip(ids, plist)}
        want_lp = {rid: sp.logprobs for rid, sp in zip(ids, plist)}
        results: dict[str, dict[int, CompletionOutput]] = {rid: {} for rid in ids}
        logprobs: dict[tuple[str, int], list[TokenLogprob]] = {}
        prompt_logprobs: dict[str, list[TokenLogprob]] = {}
        todo = set(ids)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=sum(n_of.values()), desc="generate", unit="seq")
        while todo:
            for out in self.step():
                if out.request_id not in todo:
                    continue
                if out.logprobs:
                    logprobs.setdefault((out.request_id, out.index), []).extend(out.logprobs)
                if out.prompt_logprobs is not None:
                    prompt_logprobs[out.request_id] = out.prompt_logprobs
                if not out.finished:
                    continue
                # an error ends all n sequences of a request at once
                indices = range(n_of[out.request_id]) if out.finish_reason == "error" else [out.index]
                for i in indices:
                    results[out.request_id][i] = CompletionOutput(
                        i,
                        list(out.output_token_ids),
                        out.text if self.tokenizer is not None else None,
                        out.finish_reason,
                        logprobs.get((out.request_id, i), []) if want_lp[out.request_id] else None,
                        out.error,
                    )
                if bar is not None:
                    bar.update(len(indices))
                if len(results[out.request_id]) == n_of[out.request_id]:
                    todo.discard(out.request_id)
            if todo and not self.has_unfinished():
                raise RuntimeError(f"engine went idle with {len(todo)} requests unfinished")  # a bug, not a user error
        if bar is not None:
            bar.close()
        return [
            Completion(rid, list(p), [results[rid][i] for i in sorted(results[rid])], prompt_logprobs.get(rid))
            for rid, p in zip(ids, prompts)
        ]
