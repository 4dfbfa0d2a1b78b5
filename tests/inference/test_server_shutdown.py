"""SIGTERM to a real server process: it stops accepting connections, lets the requests in
flight (running and queued) finish, then exits."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.inference import test_server_helpers as H

REPO = Path(__file__).resolve().parents[2]


# Long enough that, with one sequence at a time, a request cannot finish before the next arrives
# (at 60 tokens a quiet machine finished each one between polls, so in_flight never reached 3).
MAX_TOKENS = 600


def stream_completion(url: str, record: dict) -> None:
    body = {"model": "ckpt", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                record["chunks"] = record.get("chunks", 0) + 1
                record["usage"] = chunk.get("usage") or record.get("usage")
            elif line == "data: [DONE]":
                record["done"] = True


@pytest.mark.slow  # a fresh Python process imports torch: ~5 s idle, ~15 s on a busy 2-core box
def test_sigterm_finishes_in_flight_requests(tmp_path):
    ckpt = H.tiny_checkpoint(tmp_path / "ckpt", H.train_tokenizer(tmp_path / "tokenizer.json"), max_seq_len=1024)
    port = H.free_port()
    url = f"http://127.0.0.1:{port}"
    # --max-num-seqs 1: the engine runs one request at a time, so two of the three still wait in
    # its queue when SIGTERM arrives.
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "inference/server.py"), "--checkpoint", str(ckpt), "--port", str(port),
         "--max-num-seqs", "1", "--shutdown-timeout", "60", "--log-level", "warning"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not start"
            time.sleep(0.1)
        records = [{} for _ in range(3)]
        threads = [threading.Thread(target=stream_completion, args=(url, rec)) for rec in records]
        t_start = time.time()
        for t in threads:
            t.start()
        # SIGTERM once all three are inside the engine (one generating, two queued)
        while httpx.get(url + "/health", timeout=5).json()["in_flight"] < 3:
            assert time.time() - t_start < 30, records
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        assert sum(bool(rec.get("done")) for rec in records) < 3, "requests finished before SIGTERM; the test proves nothing"
        refused_while_busy = None
        deadline = time.time() + 10
        while refused_while_busy is None and time.time() < deadline:
            busy = not all(rec.get("done") for rec in records)
            try:
                httpx.get(url + "/health", timeout=2)
                time.sleep(0.05)
            except httpx.HTTPError:
                refused_while_busy = busy
        assert refused_while_busy, "new connections were still accepted while requests were in flight"
        for t in threads:
            t.join(timeout=60)
        for rec in records:
            assert rec.get("done") and rec["usage"]["completion_tokens"] == MAX_TOKENS, rec
        # uvicorn re-raises the captured SIGTERM after its clean shutdown, so the exit status is
        # "terminated by SIGTERM" (what process managers expect), or 0.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_server(ckpt: Path, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(REPO / "inference/server.py"), "--checkpoint", str(ckpt), "--port", str(port),
                             "--log-level", "warning", *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "server did not start"
        time.sleep(0.1)


def stream_until_end(url: str, record: dict) -> None:
    body = {"model": "ckpt", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                record["error"] = chunk.get("error") or record.get("error")
                record["chunks"] = record.get("chunks", 0) + 1
            elif line == "data: [DONE]":
                record["done"] = True


@pytest.mark.slow
def test_a_short_shutdown_timeout_ends_streams_in_band(tmp_path):
    """Found under test: SIGTERM with --shutdown-timeout 0.5 cut streams without an error or [DONE]
    and logged a CancelledError traceback."""
    ckpt = H.tiny_checkpoint(tmp_path / "ckpt", H.train_tokenizer(tmp_path / "tokenizer.json"), max_seq_len=1024)
    port = H.free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(ckpt, port, "--max-num-seqs", "1", "--shutdown-timeout", "0.5")
    try:
        records = [{} for _ in range(2)]
        threads = [threading.Thread(target=stream_until_end, args=(url, rec)) for rec in records]
        for t in threads:
            t.start()
        t_start = time.time()
        while httpx.get(url + "/health", timeout=5).json()["in_flight"] < 2 or not any(rec.get("chunks") for rec in records):
            assert time.time() - t_start < 30, records
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        out, err = proc.communicate(timeout=60)
        for rec in records:
            assert rec.get("done") and rec.get("error") and "shutting down" in rec["error"]["message"], rec
        assert "Traceback" not in err and "CancelledError" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
