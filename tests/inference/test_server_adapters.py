"""LoRA and QLoRA checkpoints served: the server (official openai client) answers with the same
greedy text as eval's path, since both load through model/load.py and render the one chat format."""
import pytest
import torch

from tests.inference.test_server_helpers import LiveServer, tiny_checkpoint, train_tokenizer

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "What is 12 plus 30?"}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A base checkpoint with its tokenizer, a LoRA adapter and a QLoRA adapter over it (B != 0)."""
    from model.load import load_model
    from model.lora import LoRAConfig, apply_lora, lora_layers, save_adapter
    from model.quant import quantize_model

    root = tmp_path_factory.mktemp("adapters")
    base = tiny_checkpoint(root / "base", train_tokenizer(root / "tok.json"))
    out = {"base": base}
    for kind in ("lora", "qlora"):
        model = load_model(base, train=True)
        quantized = quantize_model(model, "all-linear") if kind == "qlora" else []
        apply_lora(model, "all-linear", r=4, alpha=8)
        torch.manual_seed(1)
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.2)
        out[kind] = save_adapter(root / kind, model, LoRAConfig(r=4, alpha=8), base_checkpoint=str(base),
                                 qlora=kind == "qlora", quantized=quantized)
    return out


def eval_path_text(checkpoint) -> str:
    """Greedy reply the way eval generates: eval.common's loader and engine, the chat template."""
    from data_pipeline.tokenizer.chat_template import chat_stop_ids, render_chat
    from eval.common import EvalRecipe, load_model_and_tokenizer, make_engine
    from inference.sampling_params import SamplingParams

    recipe = EvalRecipe(checkpoint=str(checkpoint), device="cpu")
    model, tok = load_model_and_tokenizer(recipe)
    prompt, _ = render_chat(tok, MESSAGES, add_generation_prompt=True)
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=chat_stop_ids(tok), ignore_eos=True)
    return make_engine(model, tok, recipe).generate([prompt], params)[0].outputs[0].text


def served_text(checkpoint) -> str:
    from inference import server
    from inference.async_engine import AsyncEngine
    from inference.serve_recipe import ServeRecipe, load_serving

    engine, tok = load_serving(ServeRecipe(checkpoint=str(checkpoint), device="cpu", max_num_seqs=4))
    settings = server.ServerSettings(model_name="adapter", max_model_len=engine.max_model_len)
    with LiveServer(server.build_app(AsyncEngine(engine), tok, settings)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.chat.completions.create(model="adapter", messages=MESSAGES, temperature=0, max_tokens=12,
                                               extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    return reply.choices[0].message.content


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_adapter_is_served_with_the_same_greedy_text_as_eval(adapters, kind):
    text = served_text(adapters[kind])
    assert text == eval_path_text(adapters[kind]) and text
    assert text != eval_path_text(adapters["base"])  # the adapter is applied, not ignored
