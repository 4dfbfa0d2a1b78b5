"""inference/chat.py in a subprocess with piped stdin: replies stream, history is kept,
/reset forgets it, /exit quits."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.inference import test_server_helpers as H

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    return H.tiny_checkpoint(tmp / "ckpt", H.train_tokenizer(tmp / "tokenizer.json"))


def chat(ckpt: Path, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "inference/chat.py"), "--checkpoint", str(ckpt), "--temperature", "0",
         "--max-tokens", "12", "--stats", *extra],
        input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO,
    )


@pytest.mark.slow  # a fresh Python process imports torch: ~5 s idle, ~15 s on a busy 2-core box
def test_history_reset_and_exit(ckpt):
    result = chat(ckpt, "Hello there\nHow are you today?\n/reset\nHello there\n/exit\nnever read\n", "--system", "Be brief.")
    assert result.returncode == 0, result.stderr
    stats = [tuple(map(int, m)) for m in re.findall(r"\[(\d+) prompt tokens, (\d+) generated", result.stderr)]
    assert len(stats) == 3, result.stderr  # "never read" after /exit is not answered
    (p1, g1), (p2, _), (p3, g3) = stats
    assert p2 > p1 + g1, "the second prompt should contain the first exchange"
    assert p3 == p1 and g3 == g1, "/reset should start from the system message again"
    before, sep, after = result.stdout.partition("(conversation reset)\n")
    assert sep, result.stdout
    first_reply = before[: len(after)]
    assert after == first_reply, "same conversation after /reset, greedy: same reply"


def test_bad_checkpoint_is_one_line(tmp_path):
    missing = subprocess.run([sys.executable, str(REPO / "inference/chat.py"), "--checkpoint", str(tmp_path / "nope")],
                             input="", capture_output=True, text=True, timeout=120, cwd=REPO)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "does not exist" in missing.stderr
