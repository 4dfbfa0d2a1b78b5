"""configs/classic_reproductions/: generated files are up to date, every stage recipe
validates against its stage's recipe class, stages chain by path, nano models run, and each
published size's model.yaml is its entry in model/architectures.py (whose tests check the
parameter counts)."""
import importlib
import re
from pathlib import Path

import pytest
import torch
import yaml

from model import ModelConfig, Transformer, architectures
from utils.config import config_from_dict, load_config
from utils.errors import UserError
from utils.setup_classic_models import NANO, OUT_DIR, PUBLISHED, STAGES, generate

ROOT = Path(__file__).resolve().parents[2]
FILES = generate()


def test_committed_files_equal_regenerated():
    on_disk = {str(p.relative_to(ROOT / OUT_DIR)) for p in (ROOT / OUT_DIR).rglob("*.yaml")}
    assert on_disk == set(FILES), "run python utils/setup_classic_models.py"
    for rel, text in FILES.items():
        assert (ROOT / OUT_DIR / rel).read_text() == text, f"{rel} is stale; run python utils/setup_classic_models.py"


def test_generator_is_deterministic():
    assert generate() == FILES


def test_every_family_has_every_stage():
    assert set(NANO) == {"deepseek/v3_nano", "llama/llama3_nano", "gemma/gemma_nano", "qwen/qwen3_nano", "gpt2/gpt2_small",
                         "gemma/gemma1_nano", "gemma/gemma3_nano", "qwen/qwen2_moe_nano", "qwen/qwen3_moe_nano",
                         "mixtral/mixtral_nano", "phi/phi3_nano", "olmo/olmo2_nano"}
    for key in NANO:
        assert {f"{key}/{name}" for name in STAGES} <= set(FILES)


def _stub_inputs(data, root: Path) -> None:
    """Create every data/ and runs/ path a recipe names, so validation checks the recipe, not the disk."""
    if isinstance(data, dict):
        for v in data.values():
            _stub_inputs(v, root)
    elif isinstance(data, str) and data.startswith(("data/", "runs/")):
        p = root / data
        if p.suffix:  # a file (.bin, .json, .jsonl)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        else:  # a checkpoint or bin directory
            p.mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("rel", sorted(r for r in FILES if not r.endswith("model.yaml")))
def test_stage_recipe_validates(rel, tmp_path, monkeypatch):
    module, cls = STAGES[Path(rel).name][0].split(":")
    recipe_cls = getattr(importlib.import_module(module), cls)
    if Path(rel).name == "5_serve.yaml":  # the server's flags, read through its own parser
        args = recipe_cls(["--config_path", str(ROOT / OUT_DIR / rel)])
        assert args.checkpoint.startswith(f"runs/classic/{Path(rel).parent}/") and args.port == 8000
        return
    data = yaml.safe_load((ROOT / OUT_DIR / rel).read_text())
    _stub_inputs(data, tmp_path)
    monkeypatch.chdir(tmp_path)
    recipe = config_from_dict(recipe_cls, data, source=rel)
    if Path(rel).name.startswith("1_sft_"):
        recipe.expect_mode(Path(rel).stem.removeprefix("1_sft_"))  # each SFT file is its script's kind
    out_dir = recipe.out_dir if Path(rel).name.startswith("4_eval_") else recipe.train.out_dir
    assert out_dir.startswith(f"runs/classic/{Path(rel).parent}/")


def test_stages_chain_by_path():
    """The seed's path (pretrain -> QLoRA SFT -> GRPO) holds: every stage after SFT starts from
    the QLoRA adapter; full and LoRA SFT are alternatives nothing reads by default."""
    for key in NANO:
        load = lambda name: yaml.safe_load(FILES[f"{key}/{name}"])  # noqa: E731
        out = {name: load(name)["train"]["out_dir"] + "/final" for name in STAGES if name[0] in "0123"}
        for sft in ("1_sft_full.yaml", "1_sft_lora.yaml", "1_sft_qlora.yaml"):
            assert load(sft)["model"]["init_from"] == out["0_pretrain.yaml"]
        for name in ("2_reward.yaml", "2_dpo.yaml", "2_orpo.yaml", "3_rlhf_ppo.yaml", "3_rlhf_grpo.yaml", "3_rlhf_gspo.yaml"):
            assert load(name)["model"]["init_from"] == out["1_sft_qlora.yaml"]
        # distillation: a new half-depth student from the pretrained model, then from the QLoRA SFT model
        student = load("1_distill_pretrain.yaml")
        assert student["teacher"]["init_from"] == out["0_pretrain.yaml"] and "init_from" not in student["model"]
        assert student["model"]["config"]["n_layers"] == load("0_pretrain.yaml")["model"]["n_layers"] // 2
        distilled = load("2_distill.yaml")
        assert distilled["teacher"]["init_from"] == out["1_sft_qlora.yaml"]
        assert distilled["model"]["init_from"] == out["1_distill_pretrain.yaml"]
        ppo = load("3_rlhf_ppo.yaml")
        assert ppo["reward"]["model_path"] == ppo["rl"]["critic_init"] == out["2_reward.yaml"]
        assert len(set(out.values())) == len(out)  # no two stages write the same run dir
        for name in ("gsm8k", "mmlu", "humaneval"):
            assert load(f"4_eval_{name}.yaml")["checkpoint"] == out["3_rlhf_grpo.yaml"]
        assert load("4_eval_perplexity.yaml")["checkpoint"] == out["0_pretrain.yaml"]
        assert load("5_serve.yaml")["checkpoint"] == out["3_rlhf_grpo.yaml"]


def header_commands(text: str, label: str) -> list[str]:
    """The commands a generated recipe's header lists after ``# <label>:``."""
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(f"# {label}:")]


@pytest.mark.parametrize("key", sorted(NANO))
def test_missing_input_names_the_command_the_header_runs_first(key, tmp_path, monkeypatch):
    """A stage run too early: its recipe fails on the missing run directory, naming the command
    that writes it, which is the command its header says to run first."""
    for rel, text in FILES.items():
        (tmp_path / OUT_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / OUT_DIR / rel).write_text(text)
    monkeypatch.chdir(tmp_path)
    checked = 0
    for name in STAGES:
        text = FILES[f"{key}/{name}"]
        first = [c for c in header_commands(text, "Run first") if c.startswith("python ")]
        assert header_commands(text, "Run") == [f"python {STAGES[name][1]} --config_path {OUT_DIR}/{key}/{name}"]
        if name[0] not in "123":  # pretrain reads data only; eval and serving load their checkpoint later
            continue
        data = yaml.safe_load(text)
        _stub_inputs({k: v for k, v in data.items() if k in ("data", "rollout")}, tmp_path)  # data, not runs
        module, cls = STAGES[name][0].split(":")
        with pytest.raises(UserError) as err:
            load_config(getattr(importlib.import_module(module), cls), OUT_DIR / key / name)
        named = re.findall(r"run `([^`]+)` first", str(err.value))
        assert first and set(named) == set(first), (name, str(err.value))
        checked += 1
    assert checked == 13


@pytest.mark.parametrize("key", sorted(NANO))
def test_nano_model_trains_a_step(key):
    torch.manual_seed(0)
    cfg = ModelConfig(**yaml.safe_load(FILES[f"{key}/0_pretrain.yaml"])["model"])
    model = Transformer(cfg)
    assert 2e6 < model.num_params() < 2e7  # CPU-trainable in minutes
    idx = torch.randint(0, cfg.vocab_size, (2, 33))
    loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 0.5  # ~uniform at init


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_published_model_yaml_is_the_named_architecture(key):
    cfg = config_from_dict(ModelConfig, yaml.safe_load(FILES[f"{key}/model.yaml"]), source=key)
    assert cfg == architectures.get(key)


def test_v3_nano_qlora_recipe_quantizes_and_adapts_the_routed_experts():
    """The seed's headline QLoRA recipe: its sections, applied as finetune/sft.py applies them, store the
    routed experts in NF4 and give each expert its own adapters."""
    pytest.importorskip("bitsandbytes")
    from model.lora import apply_lora
    from model.lora_experts import LoRAExperts
    from model.quant import NF4Experts, QLoRAConfig, quantize_for_qlora

    recipe = yaml.safe_load(FILES["deepseek/v3_nano/1_sft_qlora.yaml"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**yaml.safe_load(FILES["deepseek/v3_nano/0_pretrain.yaml"])["model"]))
    quantize_for_qlora(model, QLoRAConfig(**recipe["qlora"]))
    lora = recipe["lora"]
    apply_lora(model, lora["targets"], lora["r"], lora["alpha"], modules_to_save=lora["modules_to_save"])
    experts = [layer.ffn.experts for layer in model.layers[model.cfg.moe["first_k_dense"]:]]
    assert experts and all(isinstance(e, LoRAExperts) and isinstance(e.base, NF4Experts) for e in experts)


def test_pretrain_recipes_show_the_parallel_layout():
    """Every 0_pretrain.yaml spells train.parallel (one process per model copy by default); the seed's
    DeepSeek-V3 nano fits tensor parallelism over 2 and 4 ranks."""
    from model.tensor_parallel import check_tensor_parallel

    for key in NANO:
        recipe = yaml.safe_load(FILES[f"{key}/0_pretrain.yaml"])
        assert recipe["train"]["parallel"] == {"tp": 1, "pp": 1, "dp": 0, "pp_schedule": "1f1b"}
    model = Transformer(ModelConfig(**yaml.safe_load(FILES["deepseek/v3_nano/0_pretrain.yaml"])["model"]))
    for tp in (2, 4):
        check_tensor_parallel(model, tp)
