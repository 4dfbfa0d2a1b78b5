"""Shared fixtures: a tiny corpus, a tiny tokenizer, and one tiny run of the seven pipeline commands."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.synthetic import sft
from data_pipeline.synthetic.stories import generate_story

REPO = Path(__file__).resolve().parents[2]

# The seven seed commands, with tiny sizes; the flags are the real ones.
SEVEN = [
    ["data_pipeline/download/download_tinystories.py", "--source", "synthetic", "--n_stories", "300",
     "--n_val_stories", "30", "--n_sft", "200", "--n_sft_val", "20", "--n_preference", "60",
     "--n_preference_val", "10"],
    ["data_pipeline/tokenizer/train_tokenizer.py", "--vocab_size", "700", "--data_limit_mb", "100"],
    ["data_pipeline/processing/encode_stories.py", "--num_workers", "2", "--dedup", "--scrub_pii"],
    ["data_pipeline/processing/build_pretrain_bins.py"],
    ["data_pipeline/processing/build_sft_bins.py", "--num_workers", "1"],
    ["data_pipeline/processing/build_preference_bins.py", "--num_workers", "1"],
    ["data_pipeline/download/download_prompts.py", "--source", "synthetic", "--n_rl_train", "50",
     "--n_rl_test", "10", "--n_gsm8k_test", "20", "--n_mmlu_test", "20", "--n_mmlu_dev_per_subject", "2"],
]


def run_script(args: list[str], data_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a pipeline script from the repo root, as a user would."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    full_env.pop("PYTHONPATH", None)  # the scripts must bootstrap their own imports
    return subprocess.run([sys.executable, *args, "--data_dir", str(data_dir)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory) -> Path:
    """A data dir produced by the seven commands (tiny sizes)."""
    data_dir = tmp_path_factory.mktemp("data")
    for args in SEVEN:
        result = run_script(args, data_dir)
        assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return data_dir


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """~150 KB of synthetic stories and chat text."""
    rng = random.Random(0)
    texts = [generate_story(rng)[0] for _ in range(250)]
    texts += [m["content"] for c in sft.generate_conversations(rng, 60, "sft") for m in c["messages"]]
    return texts


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, corpus):
    """A project Tokenizer trained with the HF backend (vocab 600) in a tmp dir."""
    from data_pipeline.tokenizer.tokenizer import Tokenizer
    from data_pipeline.tokenizer.tokenizer import hf_config_files
    from data_pipeline.tokenizer.train_tokenizer import train_hf
    folder = tmp_path_factory.mktemp("tokenizer")
    train_hf(corpus, 600, show_progress=False).save(str(folder / "tokenizer.json"))
    hf_config_files(folder)
    return Tokenizer.from_file(folder / "tokenizer.json")
