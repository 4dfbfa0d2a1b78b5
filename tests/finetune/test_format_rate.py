"""Format rate: held-out arithmetic prompts, answered through the engine, scored by the one
GSM8K answer check (data_pipeline/answer.py) that RL's exact-accuracy eval uses too."""
import pytest
import torch

from data_pipeline.answer import score_answers
from finetune.format_rate import format_rate, heldout_problems


def test_heldout_prompts_are_distinct_and_not_training_prompts():
    from data_pipeline.synthetic.splits import bucket_of

    problems = heldout_problems(20)
    assert len({p["question"] for p in problems}) == 20
    assert all(bucket_of(p["question"]) == "val" for p in problems)  # SFT trains on the "sft" bucket


def test_score_answers_counts_format_and_exact_answers():
    problems = heldout_problems(4)
    answers = [p["answer"] for p in problems]
    # right and formatted, formatted but wrong, unformatted, right number but no '####'
    completions = [answers[0], "x\n#### 99999", "no idea", answers[3].replace("#### ", "")]
    r = score_answers(completions, answers)
    assert r == {"format_rate": 0.5, "accuracy": 0.25, "n": 4}
    with pytest.raises(ValueError):
        score_answers(completions[:3], answers)


def test_format_rate_runs_on_the_chat_template(tmp_path):
    from data_pipeline.tokenizer.tokenizer import Tokenizer
    from data_pipeline.tokenizer.train_tokenizer import train_hf
    from model import ModelConfig, Transformer

    problems = heldout_problems(3)
    train_hf([p["question"] + "\n" + p["answer"] for p in heldout_problems(50, seed=1)], 300, False).save(str(tmp_path / "tok.json"))
    tok = Tokenizer.from_file(tmp_path / "tok.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=128))
    model.train()
    r = format_rate(model, tok, problems, max_tokens=8)
    assert r["n"] == 3 and len(r["examples"]) == 3 and all(isinstance(a, str) for _, a in r["examples"])
    assert r["format_rate"] == 0.0  # a random model does not write '#### <n>'
    assert 0 < r["mean_response_tokens"] <= 8
    assert model.training  # the check puts the model back in the mode it found it in
