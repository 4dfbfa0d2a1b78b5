"""Bring your own model and data, from the commands a user runs (README "Finetune your own model"):
a HuggingFace model directory written by transformers (random weights; a Llama-3-style and a
ChatML-style template; the tokenizer trained with `tokenizers`) -> import -> QLoRA SFT on a
messages JSONL -> DPO on a TRL-style JSONL -> export merged -> transformers' AutoModelForCausalLM
+ AutoTokenizer give the same greedy tokens as our engine -> the server answers in the model's
own template (the official openai client)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.data_pipeline.hf_style import save_hf_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
CASES = {"llama3": ("LlamaConfig", "LlamaForCausalLM"), "chatml": ("Qwen2Config", "Qwen2ForCausalLM")}
QUESTION = [{"role": "user", "content": "What is 12 plus 30?"}]


def run(*args, timeout=600):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def save_hf_model(directory: Path, style: str) -> Path:
    """A tiny random-weight model of the style's family plus its tokenizer files, saved by transformers."""
    tok = save_hf_tokenizer(directory, style)
    config_cls, kind = (getattr(transformers, name) for name in CASES[style])
    config = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    kind(config).save_pretrained(str(directory))
    return directory


def write_data(root: Path) -> tuple[Path, Path]:
    chats = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                           {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]} for a in range(8) for b in range(5)]
    pairs = [{"prompt": [{"role": "user", "content": f"What is {a} plus {a}?"}],
              "chosen": f"{a} + {a} = {2 * a}.", "rejected": "I do not know."} for a in range(12)]
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return root / "chats.jsonl", root / "pairs.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("style", sorted(CASES))
def test_import_finetune_align_export_serve(tmp_path, style):
    hf_dir = save_hf_model(tmp_path / "hf", style)
    chats, pairs = write_data(tmp_path)
    ckpt, sft, dpo, export = (tmp_path / name for name in ("ckpt", "sft", "dpo", "export"))
    run("model/hf_convert.py", "import", "--hf_dir", hf_dir, "--out", ckpt)
    common = ["train.progress=false", "train.device=cpu", "train.eval_every=0", "train.batch_size=4", "train.seq_len=64"]
    run("finetune/peft/qlora/sft_qlora_train.py", "--config_path", "configs/examples/byo/1_sft_qlora.yaml",
        f"model.init_from={ckpt}", f"data.train_path={chats}", f"data.cache_dir={tmp_path / 'cache'}",
        f"train.out_dir={sft}", "train.max_steps=3", "optim.lr=1e-2", *common)
    out = run("align/train_offline.py", "--config_path", "configs/examples/byo/2_dpo.yaml", f"model.init_from={sft}/final",
              f"data.train_path={pairs}", f"data.val_path={pairs}", f"train.out_dir={dpo}", "train.max_steps=2", *common)
    assert "before:" in out and "after:" in out
    run("model/hf_convert.py", "export", "--checkpoint", dpo / "final", "--out", export)

    # transformers on the export == our engine on the checkpoint, token for token.
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    prompt = hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(prompt):]
    from data_pipeline.tokenizer.chat_template import render_chat
    from inference.engine import LLMEngine
    from inference.sampling_params import SamplingParams
    from model.load import load

    model, tok = load(dpo / "final")
    ours_prompt = render_chat(tok, QUESTION, add_generation_prompt=True)[0]
    assert ours_prompt == prompt  # our rendering of the model's own template == transformers'
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ours = LLMEngine(model, tokenizer=tok).generate([ours_prompt], params)[0].outputs[0].token_ids
    assert ours == theirs.tolist()

    # The server renders the model's own template and answers through the official client.
    from inference import server
    from inference.async_engine import AsyncEngine
    from inference.serve_recipe import ServeRecipe, load_serving
    from tests.inference.test_server_helpers import LiveServer

    engine, tok = load_serving(ServeRecipe(checkpoint=str(dpo / "final"), device="cpu", max_num_seqs=2))
    settings = server.ServerSettings(model_name="mine", max_model_len=engine.max_model_len)
    with LiveServer(server.build_app(AsyncEngine(engine), tok, settings)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.chat.completions.create(model="mine", messages=QUESTION, temperature=0, max_tokens=8,
                                               extra_body={"ignore_eos": True})
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.choices[0].message.content == hf_tok.decode(theirs, skip_special_tokens=True)


def test_byo_recipes_validate(tmp_path):
    """Every recipe under configs/examples/byo loads with its entry point's recipe type."""
    from align.recipe import OfflineRecipe, OnlineRecipe
    from finetune.recipe import SFTRecipe
    from pretrain.recipe import PretrainRecipe
    from utils.checkpoint import save_checkpoint
    from utils.config import load_config
    from model import ModelConfig, Transformer

    ckpt = save_checkpoint(tmp_path / "m", Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)))
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    (tmp_path / "train.bin").write_bytes(b"")
    cases = {
        "0_continued_pretrain": (PretrainRecipe, [f"init_from={ckpt}", f"data.train_bin={tmp_path}/train.bin", "data.val_bin=",
                                                   "data.tokenizer=", "train.seq_len=64"]),
        "1_sft_qlora": (SFTRecipe, [f"model.init_from={ckpt}", f"data.train_path={data}"]),
        "2_dpo": (OfflineRecipe, [f"model.init_from={ckpt}", f"data.train_path={data}", f"data.val_path={data}"]),
        "3_rlhf_grpo": (OnlineRecipe, [f"model.init_from={ckpt}", f"rollout.train_prompts={data}", f"rollout.test_prompts={data}"]),
    }
    assert sorted(p.stem for p in (REPO / "configs/examples/byo").glob("*.yaml")) == sorted(cases)
    for name, (kind, overrides) in cases.items():
        recipe = load_config(kind, REPO / f"configs/examples/byo/{name}.yaml", overrides)
        assert str(ckpt) in (getattr(recipe, "init_from", "") or recipe.model.init_from)
