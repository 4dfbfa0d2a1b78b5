"""The evals take the low-precision weight formats and the bf16 KV cache (weights, group_size,
engine.kv_cache_dtype) like every inference command."""
import json

import pytest
import torch

from eval import perplexity
from eval.common import load_model, make_engine
from model.weight_formats import Int4Linear
from tests.eval.test_eval_scripts import read_out, recipe, world  # noqa: F401  (world is a fixture)
from utils.errors import UserError


def test_perplexity_command_with_each_weight_format(world, tmp_path):  # noqa: F811
    text = tmp_path / "held.jsonl"
    text.write_text("".join(json.dumps({"text": p["question"]}) + "\n" for p in world["gsm8k"][:4]))
    ppl = {}
    for flags in ([], ["--weights", "int8"], ["--weights", "int4", "--group-size", "32"]):
        perplexity.main(["--checkpoint", str(world["ckpt"]), f"text_path={text}", f"--out_dir={tmp_path / 'out'}",
                         "progress=false", *flags])
        summary, _ = read_out(tmp_path, "perplexity")
        ppl[flags[1] if flags else "full"] = summary["perplexity"]
        assert summary["recipe"]["weights"] == (flags[1] if flags else "full")
    assert abs(ppl["int8"] / ppl["full"] - 1) < 0.01 and abs(ppl["int4"] / ppl["full"] - 1) < 0.1
    assert ppl["int8"] != ppl["full"]  # the format was applied
    with pytest.raises(UserError, match="group_size=32"):  # 32-wide layers: the default group of 128 does not fit
        perplexity.main(["--checkpoint", str(world["ckpt"]), f"text_path={text}", "--weights", "int4", "progress=false"])


def test_eval_engine_takes_the_format_and_the_kv_cache_dtype(world, tmp_path):  # noqa: F811
    r = recipe(world, tmp_path, weights="int4", group_size=32)
    r.engine.kv_cache_dtype = "bf16"
    engine = make_engine(load_model(r), world["tok"], r)
    assert isinstance(engine.model.lm_head, Int4Linear) and engine.kv_cache_dtype == torch.bfloat16
