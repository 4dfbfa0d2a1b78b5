"""The README's "Stage by stage" block and the seed's command sequence, as a user runs them.

Fast: the seed's eleven commands stand in the README's block, in order, and every README command
agrees with the generated recipes (the commands a recipe's header says to run first come earlier).
Slow: the block runs top to bottom in a fresh copy of the repository (as a new user's clone: no
data/, runs/ or .venv), each command as written plus small sizes, on the embedded synthetic
default, and ends with one chat request to the server it starts.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from demo import ask_server
from tests.utils.test_classic_recipes import header_commands
from utils.setup_classic_models import OUT_DIR, generate

ROOT = Path(__file__).resolve().parents[1]
# The seed's command sequence (DeepSeek-V3 nano), verbatim.
SEED = [
    "python data_pipeline/download/download_tinystories.py",
    "python data_pipeline/tokenizer/train_tokenizer.py --vocab_size 4096 --data_limit_mb 100",
    "python data_pipeline/processing/encode_stories.py",
    "python data_pipeline/processing/build_pretrain_bins.py",
    "python data_pipeline/processing/build_sft_bins.py",
    "python data_pipeline/processing/build_preference_bins.py",
    "python data_pipeline/download/download_prompts.py",
    "python utils/setup_classic_models.py",
    "python pretrain/train.py --config_path configs/classic_reproductions/deepseek/v3_nano/0_pretrain.yaml --compile",
    "python finetune/peft/qlora/sft_qlora_train.py --config_path configs/classic_reproductions/deepseek/v3_nano/1_sft_qlora.yaml",
    "python align/train_online.py --config_path configs/classic_reproductions/deepseek/v3_nano/3_rlhf_grpo.yaml",
]
FILES = generate()
WRITER = {run["train"]["out_dir"] + "/final": rel for rel, run in ((r, yaml.safe_load(t)) for r, t in FILES.items())
          if "train" in run}  # run directory -> the generated recipe that writes it


def readme_blocks() -> tuple[list[str], list[str]]:
    """(the sequence, the alternatives): the command lines of the two bash blocks in the README's
    "Stage by stage" section, comments stripped."""
    section = (ROOT / "README.md").read_text().split("## Stage by stage", 1)[1].split("\n## ", 1)[0]
    blocks = [[line.split(" #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
              for block in re.findall(r"```bash\n(.*?)```", section, re.S)]
    assert len(blocks) == 2, "the section holds two bash blocks: the sequence, then the alternatives"
    return blocks[0], blocks[1]


def after(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1] if flag in words else ""


def test_readme_block_holds_the_seed_sequence_in_order():
    sequence, _ = readme_blocks()
    positions = [sequence.index(command) for command in SEED]  # ValueError names a missing command
    assert positions == sorted(positions)


def test_readme_commands_follow_the_recipe_headers():
    """Walking the README top to bottom (sequence, then alternatives), each generated recipe is run
    by the command its header gives, after the commands its header says to run first; each
    --checkpoint directory is written by a command above it."""
    sequence, alternatives = readme_blocks()
    ran: list[str] = []
    for line in sequence + alternatives:
        words = shlex.split(line)
        script = next(w for w in words if w.endswith(".py"))
        assert (ROOT / script).is_file(), line
        recipe, checkpoint = after(words, "--config_path"), after(words, "--checkpoint")
        if recipe.startswith(str(OUT_DIR)):
            text = FILES[str(Path(recipe).relative_to(OUT_DIR))]
            assert header_commands(text, "Run") == [f"python {script} --config_path {recipe}"], line
            for first in header_commands(text, "Run first"):
                if first.startswith("python "):
                    assert first in ran, f"{line!r} comes before {first!r}, which its recipe says to run first"
                else:  # the data commands
                    assert sum(c.startswith("python data_pipeline/") for c in ran) == 7, line
        if checkpoint:
            assert header_commands(FILES[WRITER[checkpoint]], "Run")[0] in ran, line
        ran.append(f"python {script} --config_path {recipe}" if recipe else line)


# ----------------------------------------------------------------------------- the block, run

# Appended to each command as written: CPU-test sizes (the flags and keys are the real ones).
SMALL = {
    "data_pipeline/download/download_tinystories.py": ["--n_stories", "300", "--n_val_stories", "30", "--n_sft", "400",
                                                       "--n_sft_val", "40", "--n_preference", "80",
                                                       "--n_preference_val", "20"],
    "data_pipeline/download/download_prompts.py": ["--n_rl_train", "40", "--n_rl_test", "8", "--n_gsm8k_test", "8",
                                                   "--n_mmlu_test", "20", "--n_mmlu_dev_per_subject", "5",
                                                   "--n_humaneval", "2"],
    "pretrain/train.py": ["train.max_steps=2", "train.batch_size=2", "train.seq_len=64", "train.global_batch_tokens=128",
                          "train.eval_batches=1"],
    "finetune/peft/qlora/sft_qlora_train.py": ["train.max_steps=2", "train.batch_size=2", "train.seq_len=64",
                                               "train.eval_batches=1", "format_eval_prompts=1"],
    "finetune/distill_train.py": ["train.max_steps=2", "train.batch_size=2", "train.seq_len=64",
                                  "train.global_batch_tokens=128", "train.eval_batches=1", "format_eval_prompts=1",
                                  "onpolicy.max_new_tokens=8"],
    "align/train_offline.py": ["train.max_steps=2", "train.batch_size=2", "data.max_train_pairs=4", "data.max_val_pairs=2"],
    "align/train_online.py": ["train.max_steps=1", "train.batch_size=4", "rollout.prompts_per_rollout=2",
                              "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.eval_prompts=2"],
    "eval/gsm8k.py": ["--limit", "2", "--max_new_tokens", "16"],
    "eval/perplexity.py": ["--limit", "2"],
}
# TORCH_COMPILE_DISABLE: the seed's pretraining command runs with --compile as written (the flag,
# the compiled-model wrapper and its checkpoint keys), but torch.compile runs eagerly: a cold
# inductor compile of the MLA + MoE model took 4.5 minutes of CPU on 2 cores.
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TORCH_COMPILE_DISABLE": "1"}


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a clone has them: no virtual environment, data, runs or outputs."""
    top = {".git", ".venv", "data", "data_gpu", "runs", "out", "checkpoints", ".whl", ".pytest_cache", ".hypothesis"}
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n == "__pycache__"
                                                         or Path(d) == ROOT and n in top])
    return dest


@pytest.mark.slow
def test_readme_block_runs_top_to_bottom(tmp_path):
    sequence, _ = readme_blocks()
    repo = fresh_copy(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | ENV  # the scripts find the repo themselves
    seconds = []
    for line in sequence:
        words = shlex.split(line)
        assert words[0] == "python", line
        args = [*words[1:], *SMALL.get(words[1], [])]
        start = time.time()
        if words[1] == "inference/server.py":  # started, asked one question, stopped
            model, reply = ask_server(args, "Tom has 3 apples and buys 4 more. How many?", cwd=repo, env=env)
            assert model == "llama-llama3_nano" and reply.usage.completion_tokens > 0  # 5_serve.yaml's model_name
        else:
            done = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        seconds.append(f"{time.time() - start:5.1f} s  {line}")
    print("\n".join(seconds))
    runs = repo / "runs/classic"
    for stage in ("deepseek/v3_nano/rlhf_grpo", "llama/llama3_nano/dpo", "llama/llama3_nano/rlhf_grpo"):
        assert (runs / stage / "final/model.safetensors").is_file(), stage
    assert list((runs / "llama/llama3_nano/eval/gsm8k").glob("*.json")), "the GSM8K eval wrote no result"
