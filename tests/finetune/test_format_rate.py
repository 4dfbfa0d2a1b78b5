"""Format rate: exact '#### <number>' last line, scored on held-out prompts, through the engine."""
import pytest
import torch

from finetune.format_rate import engine_generate, heldout_problems, in_exact_format, measure_format_rate


@pytest.mark.parametrize("text,ok", [
    ("Tom has 5 + 3 = <<5+3=8>>8 apples.\n#### 8", True),
    ("#### -4\n", True),
    ("steps\n#### 8 apples", False),
    ("The answer is 8", False),
    ("#### 8\nmore text", False),
    ("####8", False),
    ("", False),
])
def test_exact_format(text, ok):
    assert in_exact_format(text) is ok


def test_heldout_prompts_are_distinct_and_not_training_prompts():
    from data_pipeline.synthetic.splits import bucket_of

    problems = heldout_problems(20)
    assert len({p["question"] for p in problems}) == 20
    assert all(bucket_of(p["question"]) == "val" for p in problems)  # SFT trains on the "sft" bucket


def test_measure_format_rate_with_a_scripted_generator():
    problems = heldout_problems(4)
    answers = [p["answer"] for p in problems]

    def generate(questions):
        # right and formatted, formatted but wrong, unformatted, right number but no '####'
        return [answers[0], "x\n#### 99999", "no idea", answers[3].replace("#### ", "")]

    r = measure_format_rate(generate, problems)
    assert r["format_rate"] == 0.5 and r["accuracy"] == 0.25 and r["n"] == 4


def test_engine_generate_runs_on_the_chat_template(tmp_path):
    from data_pipeline.tokenizer.tokenizer import Tokenizer
    from data_pipeline.tokenizer.train_tokenizer import train_hf
    from model import ModelConfig, Transformer

    problems = heldout_problems(3)
    train_hf([p["question"] + "\n" + p["answer"] for p in heldout_problems(50, seed=1)], 300, False).save(str(tmp_path / "tok.json"))
    tok = Tokenizer.from_file(tmp_path / "tok.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=128))
    generate = engine_generate(model.eval(), tok, max_tokens=8)
    outs = generate([p["question"] for p in problems])
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    r = measure_format_rate(generate, problems)
    assert r["format_rate"] == 0.0  # a random model does not write '#### <n>'
