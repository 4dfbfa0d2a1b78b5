"""Shared pieces for the server tests (no tests here): a tiny byte-level BPE tokenizer,
a fake engine with the LLMEngine interface, and a live uvicorn server on a free port."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import uvicorn

from utils.errors import UserError

CORPUS = [
    "Once upon a time there was a little robot who loved to count numbers.",
    "The cat sat on the mat and looked at the moon. It was a quiet night.",
    "Café crème, naïve façade, 中文字符, and emoji 🙂 make the bytes interesting.",
    "What is 12 plus 30? The answer is 42. Hello world, hello server!",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A small GPT-2-style byte-level BPE trained with HF tokenizers, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path))
    return path


class HFTokenizer:
    """encode/decode/eos_id/vocab_size over an HF tokenizer.json (stand-in for the project Tokenizer)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.eos_id = self.tok.token_to_id("<|endoftext|>")
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def render_chat(tok, messages, add_generation_prompt=True):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    ids = tok.tok.encode(text, add_special_tokens=False).ids
    return ids, [0] * len(ids)


def chat_stop_ids(tok):
    return [tok.tok.token_to_id("<|im_end|>")]


# ----------------------------------------------------------------------------- fake engine


@dataclass
class FakeOutput:
    request_id: str
    index: int
    new_token_ids: list
    output_token_ids: list
    finished: bool
    finish_reason: Optional[str]
    prompt_len: int
    logprobs: Optional[list] = None


@dataclass
class _Seq:
    request_id: str
    index: int
    ids: list
    prompt_len: int
    params: object
    blocks: int = 0
    out: list = field(default_factory=list)


class FakeEngine:
    """The LLMEngine interface with a deterministic toy 'model' (next = (7*last + 3*len + index) % V),
    one token per sequence per step, at most ``max_num_seqs`` running, KV blocks counted."""

    def __init__(self, vocab_size: int, max_model_len: int = 256, block_size: int = 4, num_blocks: int = 1024,
                 max_num_seqs: int = 8, step_delay: float = 0.002, eos_id: Optional[int] = None):
        self.vocab_size, self.max_model_len, self.block_size = vocab_size, max_model_len, block_size
        self.num_blocks = self.num_free_blocks = num_blocks
        self.max_num_seqs, self.step_delay, self.eos_id = max_num_seqs, step_delay, eos_id
        self.seqs: list[_Seq] = []
        self.aborted: list[FakeOutput] = []
        self.added = 0

    def add_request(self, prompt_ids, params, request_id=None):
        params.validate(self.max_model_len)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise UserError("prompt + max_tokens is longer than max_model_len")
        self.added += 1
        for i in range(params.n):
            self.seqs.append(_Seq(request_id, i, list(prompt_ids), len(prompt_ids), params))
        return request_id

    def abort(self, request_id):
        for s in [s for s in self.seqs if s.request_id == request_id]:
            self._free(s)
            self.aborted.append(FakeOutput(request_id, s.index, [], s.out, True, "abort", s.prompt_len))

    def has_unfinished(self):
        return bool(self.seqs) or bool(self.aborted)

    def _free(self, s):
        self.num_free_blocks += s.blocks
        s.blocks = 0
        self.seqs.remove(s)

    def step(self):
        time.sleep(self.step_delay)
        outputs, self.aborted = self.aborted, []
        for s in list(self.seqs[: self.max_num_seqs]):
            nxt = (7 * s.ids[-1] + 3 * len(s.ids) + s.index) % self.vocab_size
            s.ids.append(nxt)
            s.out = s.ids[s.prompt_len :]
            need = -(-len(s.ids) // self.block_size)
            self.num_free_blocks -= need - s.blocks
            s.blocks = need
            reason = None
            if nxt in s.params.stop_token_ids or (nxt == self.eos_id and not s.params.ignore_eos):
                reason = "stop"
            elif len(s.out) >= s.params.max_tokens:
                reason = "length"
            if reason:
                self._free(s)
            outputs.append(FakeOutput(s.request_id, s.index, [nxt], list(s.out), reason is not None, reason, s.prompt_len))
        return outputs


# ----------------------------------------------------------------------------- live server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """Runs an ASGI app under a real uvicorn server in a thread: ``with LiveServer(app) as url:``."""

    def __init__(self, app, graceful_timeout: float = 5.0):
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=graceful_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def assert_error_shape(response, status: int) -> dict:
    """The OpenAI error shape with the expected status; returns the inner error object."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]
