"""model/hf_convert.py: a checkpoint of ours exported with its tokenizer files, read back by
transformers (AutoTokenizer renders our chat format with the same ids, generation_config stops at
our end-of-turn), an adapter exported merged or alone, and bad exports refused."""
import json

import pytest
import torch

from model import ModelConfig, Transformer
from model.hf_convert import export, import_hf
from model.load import load, load_model
from tests.inference.test_server_helpers import train_tokenizer
from utils.checkpoint import save_checkpoint
from utils.errors import UserError

transformers = pytest.importorskip("transformers")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 plus 30?"},
                {"role": "assistant", "content": "The answer is 42."}, {"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    from data_pipeline.tokenizer.tokenizer import hf_config_files

    root = tmp_path_factory.mktemp("convert")
    (root / "tok").mkdir()
    tok_file = train_tokenizer(root / "tok" / "tokenizer.json")
    hf_config_files(root / "tok")  # as train_tokenizer.py writes them
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    return root, save_checkpoint(root / "ckpt", Transformer(cfg), tokenizer_path=tok_file)


def test_export_carries_the_chat_format_and_stop_ids(ours, tmp_path):
    from data_pipeline.tokenizer.chat_template import chat_stop_ids, render_chat

    root, ckpt = ours
    out = export(str(ckpt), str(tmp_path / "hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model, tok = load(ckpt)
    for n in (2, 4):  # a generation prompt after a user turn, with and without history
        want = render_chat(tok, CONVERSATION[:n], add_generation_prompt=True)[0]
        assert hf_tok.apply_chat_template(CONVERSATION[:n], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] == want
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == chat_stop_ids(tok) and hf_tok.bos_token_id == tok.bos_id
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([want])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_import_round_trips_and_the_hf_directory_loads_directly(ours, tmp_path):
    root, ckpt = ours
    out = export(str(ckpt), str(tmp_path / "hf"))
    back = import_hf(str(out), str(tmp_path / "back"))
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        want = load_model(ckpt)(ids)
        torch.testing.assert_close(load_model(back)(ids), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_model(out)(ids), want, atol=1e-5, rtol=0)  # the HF dir itself, no import


def test_adapter_exports_merged_or_as_peft_and_bad_exports_are_refused(ours, tmp_path):
    from model.lora import LoRAConfig, apply_lora, lora_layers, save_adapter

    root, ckpt = ours
    model = load_model(ckpt, train=True)
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    adapter = save_adapter(tmp_path / "adapter", model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]),
                           base_checkpoint=str(ckpt))
    merged = export(str(adapter), str(tmp_path / "merged"))
    peft_dir = export(str(adapter), str(tmp_path / "peft"), peft=True)
    assert (peft_dir / "adapter_model.safetensors").is_file() and (peft_dir / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_merged(ids).logits, load_model(adapter)(ids), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="drop --peft"):
        export(str(ckpt), str(tmp_path / "x"), peft=True)
    with pytest.raises(UserError, match="does not exist"):
        export(str(tmp_path / "missing"), str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
