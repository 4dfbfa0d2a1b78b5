"""Shared pieces for the server tests (no tests here): a tiny byte-level BPE tokenizer,
a tiny random-weight model and engine, and a live uvicorn server on a free port."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

CORPUS = [
    "Once upon a time there was a little robot who loved to count numbers.",
    "The cat sat on the mat and looked at the moon. It was a quiet night.",
    "Café crème, naïve façade, 中文字符, and emoji 🙂 make the bytes interesting.",
    "What is 12 plus 30? The answer is 42. Hello world, hello server!",
] * 20


def train_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A small byte-level BPE with the project's special tokens (the data pipeline's trainer), saved as tokenizer.json."""
    from data_pipeline.tokenizer.train_tokenizer import train_hf

    train_hf(CORPUS, vocab_size, show_progress=False).save(str(path))
    return path


def load_tokenizer(path: Path):
    from data_pipeline.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_file(path)


# ----------------------------------------------------------------------------- tiny model


def tiny_model(vocab_size: int, max_seq_len: int = 256, seed: int = 0):
    """A 2-layer width-32 random-weight Llama-style Transformer (the engine's test size)."""
    import torch

    from model.config import ModelConfig
    from model.transformer import Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=max_seq_len)
    return Transformer(cfg).eval()


def tiny_engine(tok, max_seq_len: int = 256, **kw):
    from inference.engine import LLMEngine

    kw.setdefault("max_num_seqs", 8)
    return LLMEngine(tiny_model(tok.vocab_size, max_seq_len), tokenizer=tok, **kw)


def tiny_checkpoint(path: Path, tokenizer_json: Path, max_seq_len: int = 256) -> Path:
    """A checkpoint directory (weights, config, tokenizer.json) the CLI entry points can load."""
    from utils.checkpoint import save_checkpoint

    tok = load_tokenizer(tokenizer_json)
    return save_checkpoint(path, tiny_model(tok.vocab_size, max_seq_len), tokenizer_path=tokenizer_json)


def slow_down(engine, seconds: float):
    """Make every engine step take at least ``seconds`` (to hold requests in flight in a test)."""
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    engine.step = slow_step
    return engine


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
