"""Speculative decoding from the command line: the server, the chat CLI and eval take a draft
checkpoint; greedy output is unchanged, the acceptance rate is reported, a draft with another
tokenizer is refused."""
import json

import pytest
import torch

from inference.serve_recipe import ChatRecipe, ServeRecipe, load_serving
from inference.sampling_params import SamplingParams
from model import ModelConfig, Transformer
from tests.inference import test_server_helpers as H
from utils.checkpoint import save_checkpoint
from utils.errors import UserError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    tok_file = H.train_tokenizer(root / "tokenizer.json")
    target = H.tiny_checkpoint(root / "target", tok_file)
    torch.manual_seed(5)
    draft_cfg = ModelConfig(vocab_size=H.load_tokenizer(tok_file).vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=256)
    draft = save_checkpoint(root / "draft", Transformer(draft_cfg), tokenizer_path=tok_file)
    return root, target, draft, tok_file


def test_server_settings_with_a_draft_keep_greedy_output_and_report_acceptance(pair):
    root, target, draft, _ = pair
    plain, tok = load_serving(ServeRecipe(checkpoint=str(target), device="cpu", max_num_seqs=2))
    spec, _ = load_serving(ServeRecipe(checkpoint=str(target), device="cpu", max_num_seqs=2,
                                       draft_checkpoint=str(draft), num_speculative_tokens=3))
    assert spec.draft_model is not None and spec.k == 3 and plain.acceptance_rate is None
    prompts = [tok.encode("Once upon a time"), tok.encode("What is 12 plus 30?")]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [c.outputs[0].token_ids for c in plain.generate(prompts, params)]
    assert [c.outputs[0].token_ids for c in spec.generate(prompts, params)] == want
    assert 0.0 <= spec.acceptance_rate <= 1.0 and spec.stats["spec_proposed"] > 0
    chat = ChatRecipe(checkpoint=str(target), device="cpu", draft_checkpoint=str(draft))
    assert load_serving(chat)[0].draft_model is not None


def test_eval_reports_the_acceptance_rate_with_the_same_answers(pair, tmp_path):
    from eval import gsm8k

    root, target, draft, _ = pair
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus 3?", "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}"}) + "\n"
                            for i in range(3)))
    common = ["--checkpoint", str(target), "--data_path", str(data), "n_shot=0", "max_new_tokens=12", "progress=false",
              "device=cpu"]
    plain = gsm8k.main(common + ["--out_dir", str(tmp_path / "a")])
    gsm8k.main(common + ["--out_dir", str(tmp_path / "b"), f"engine.draft_checkpoint={draft}", "engine.num_speculative_tokens=2"])
    a, b = (json.loads((tmp_path / d / "gsm8k_summary.json").read_text()) for d in ("a", "b"))
    assert plain is None and a["accuracy"] == b["accuracy"] and "speculative_acceptance_rate" not in a
    assert 0.0 <= b["speculative_acceptance_rate"] <= 1.0
    records = [[json.loads(line)["output"] for line in (tmp_path / d / "gsm8k_records.jsonl").read_text().splitlines()]
               for d in ("a", "b")]
    assert records[0] == records[1]


def test_a_draft_with_another_tokenizer_is_refused(pair, tmp_path):
    root, target, draft, _ = pair
    other = save_checkpoint(tmp_path / "other", Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2)))
    with pytest.raises(UserError, match="vocab_size 64"):
        load_serving(ServeRecipe(checkpoint=str(target), device="cpu", draft_checkpoint=str(other)))
    with pytest.raises(UserError, match="num_speculative_tokens"):
        ServeRecipe(checkpoint=str(target), num_speculative_tokens=0)
