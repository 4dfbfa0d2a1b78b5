"""eval/visual_qa.py end to end on a tiny random VLM: the prompts carry their images to the engine,
answers are scored exactly, and a text-only model given images fails with one paragraph."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.images import encode_png_data_url
from data_pipeline.jsonl import write_jsonl
from data_pipeline.synthetic import visual
from model import ModelConfig, Transformer
from tests.inference import test_server_helpers as H
from utils.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[2]
VISION = {"image_size": 24, "patch_size": 8, "d_model": 32, "n_heads": 4, "n_layers": 1, "d_ff": 64, "image_token_id": 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    tok_path = H.train_tokenizer(root / "tokenizer.json")
    vocab = H.load_tokenizer(tok_path).vocab_size
    (root / "images").mkdir()
    rows = []
    for i, row in enumerate(visual.make_examples(2, "eval", "qa")):
        (root / f"images/{i}.png").write_bytes(base64.b64decode(encode_png_data_url(row["image"]).split(",", 1)[1]))
        rows.append({"messages": row["messages"], "images": [f"images/{i}.png"]})
    write_jsonl(root / "qa.jsonl", rows)
    torch.manual_seed(0)
    for name, vision in (("vlm", VISION), ("text", None)):
        model = Transformer(ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=4, max_seq_len=256, vision=vision))
        save_checkpoint(root / name, model, tokenizer_path=tok_path)
    return root


def run(root: Path, checkpoint: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "eval/visual_qa.py"), "--checkpoint", str(root / checkpoint),
                           "--data_path", str(root / "qa.jsonl"), "--out_dir", str(root / "out" / checkpoint),
                           "--progress", "false", "--max_new_tokens", "4", "--device", "cpu", *extra],
                          capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


def test_scores_every_question_with_its_image(setup):
    out = run(setup, "vlm")
    assert out.returncode == 0, out.stderr
    summary = json.loads((setup / "out/vlm/visual_qa_summary.json").read_text())
    records = [json.loads(x) for x in (setup / "out/vlm/visual_qa_records.jsonl").read_text().splitlines()]
    assert summary["n"] == len(records) == 12 and summary["with_images"]
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 12
    assert set(summary["by_kind"]) == {"count", "count colour", "count+k", "is there", "what colour", "what shape"}


def test_a_text_only_model_needs_with_images_false(setup):
    out = run(setup, "text")
    assert out.returncode == 2 and "no vision encoder" in out.stderr and "Traceback" not in out.stderr
    out = run(setup, "text", "--with_images", "false")
    assert out.returncode == 0, out.stderr


def test_the_question_is_found_before_or_after_the_image(tmp_path):
    import random

    from eval.visual_qa import load_rows, question_kind

    image = visual.render(visual.random_scene(random.Random(0)))
    (tmp_path / "a.png").write_bytes(base64.b64decode(encode_png_data_url(image).split(",", 1)[1]))
    q = "How many red shapes are there?"
    rows = [{"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "1"}], "images": ["a.png"]}
            for parts in ([{"type": "image"}, {"type": "text", "text": q}], [{"type": "text", "text": q}, {"type": "image"}])]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    assert [question_kind(r["question"]) for r in load_rows(str(tmp_path / "qa.jsonl"))] == ["count colour"] * 2
