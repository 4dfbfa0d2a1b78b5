"""Generate the classic-reproduction recipes under configs/classic_reproductions/.

    python utils/setup_classic_models.py            # (re)write every file
    python utils/setup_classic_models.py --check    # exit 1 if a committed file is stale

For each nano model (a named architecture at a size that trains on a CPU in minutes) it
writes the whole staged pipeline, each stage reading an earlier stage's output by path:

    0_pretrain.yaml                                     -> runs/classic/<model>/pretrain/final
    1_sft_qlora.yaml                                    (from pretrain; every later stage starts here)
    1_sft_full.yaml / 1_sft_lora.yaml                   (from pretrain; alternatives to 1_sft_qlora)
    1_distill_pretrain.yaml   a new student of half the layers, distilled from pretrain on the pretraining bins
    2_distill.yaml            that student distilled from sft_qlora on the SFT data (logit KD + on-policy samples)
    2_vlm_align.yaml          a vision tower + projector in front of sft_qlora's model; the projector on captions
    3_vlm_instruct.yaml       then projector + LM on visual questions; 4_eval_visual_qa.yaml scores it
    2_reward.yaml / 2_dpo.yaml / 2_orpo.yaml            (from sft_qlora)
    3_rlhf_ppo.yaml   (policy from sft_qlora; reward model and critic from 2_reward)
    3_rlhf_grpo.yaml / 3_rlhf_gspo.yaml   (policy from sft_qlora; verifiable GSM8K-format reward)
    4_eval_*.yaml, 5_serve.yaml           (the GRPO policy; perplexity: the pretrained model)

So the seed's path, pretrain -> QLoRA SFT -> GRPO, runs as written for every family. A stage
that starts from 1_sft_qlora's adapter merges it onto its NF4 base when loading (model/load.py)
and trains the merged model full-parameter. Each file's header names the commands that must
run before it ("Run first"), computed from the paths it reads.

Each family also gets ``<family>/<published model>/model.yaml``: the published dimensions
as a ModelConfig, validated by the tests (and its parameter count checked against the
published one) but never trained here.

The generator is pure data -> text (``generate()``), so the test can regenerate into a
temporary directory and compare with the committed files byte for byte.
"""
import sys
import pathlib

if __name__ == "__main__":
    # Run as a script, Python puts utils/ first on the path, where utils/logging.py would shadow
    # the standard logging that torch imports (model.architectures brings torch): the repo root
    # takes its place.
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import textwrap
from pathlib import Path

import yaml

from model.architectures import ARCHITECTURES
from utils.cli import main_guard
from utils.fs import atomic_file

OUT_DIR = Path("configs/classic_reproductions")
TOKENIZER = "data/tokenizer/tokenizer.json"
# Named architectures (model/architectures.py): a nano size gets the staged pipeline below,
# a published size only its model.yaml.
NANO = [name for name, arch in ARCHITECTURES.items() if arch.published_params is None]
PUBLISHED = [name for name, arch in ARCHITECTURES.items() if arch.published_params is not None]

# ----------------------------------------------------------------------------- stages
# filename -> (recipe class "module:Class", entry script). The test validates every file
# against its class; a stage appears here once its recipe class exists.

STAGES: dict[str, tuple[str, str]] = {
    "0_pretrain.yaml": ("pretrain.recipe:PretrainRecipe", "pretrain/train.py"),
    "1_sft_full.yaml": ("finetune.recipe:SFTRecipe", "finetune/sft_train.py"),
    "1_sft_lora.yaml": ("finetune.recipe:SFTRecipe", "finetune/peft/lora/sft_lora_train.py"),
    "1_sft_qlora.yaml": ("finetune.recipe:SFTRecipe", "finetune/peft/qlora/sft_qlora_train.py"),
    "1_distill_pretrain.yaml": ("finetune.distill_recipe:DistillRecipe", "finetune/distill_train.py"),
    "2_distill.yaml": ("finetune.distill_recipe:DistillRecipe", "finetune/distill_train.py"),
    "2_vlm_align.yaml": ("finetune.vlm_recipe:VLMRecipe", "finetune/vlm_train.py"),
    "3_vlm_instruct.yaml": ("finetune.vlm_recipe:VLMRecipe", "finetune/vlm_train.py"),
    "2_reward.yaml": ("align.recipe:OfflineRecipe", "align/train_offline.py"),
    "2_dpo.yaml": ("align.recipe:OfflineRecipe", "align/train_offline.py"),
    "2_orpo.yaml": ("align.recipe:OfflineRecipe", "align/train_offline.py"),
    "3_rlhf_ppo.yaml": ("align.recipe:OnlineRecipe", "align/train_online.py"),
    "3_rlhf_grpo.yaml": ("align.recipe:OnlineRecipe", "align/train_online.py"),
    "3_rlhf_gspo.yaml": ("align.recipe:OnlineRecipe", "align/train_online.py"),
    "4_eval_gsm8k.yaml": ("eval.common:EvalRecipe", "eval/gsm8k.py"),
    "4_eval_mmlu.yaml": ("eval.common:EvalRecipe", "eval/mmlu.py"),
    "4_eval_perplexity.yaml": ("eval.common:EvalRecipe", "eval/perplexity.py"),
    "4_eval_humaneval.yaml": ("eval.common:EvalRecipe", "eval/humaneval.py"),
    "4_eval_visual_qa.yaml": ("eval.common:EvalRecipe", "eval/visual_qa.py"),
    "5_serve.yaml": ("inference.server:parse_serve_args", "inference/server.py"),  # flags as YAML keys
}


# The SFT run every later stage starts from: the seed's path is pretrain -> QLoRA SFT -> GRPO.
CHAIN_SFT = "sft_qlora"


def run_dir(key: str, stage: str) -> str:
    return f"runs/classic/{key}/{stage}"


def final(key: str, stage: str) -> str:
    return run_dir(key, stage) + "/final"


def train_section(key: str, stage: str, max_steps: int, batch_size: int, seq_len: int, **extra) -> dict:
    return dict(out_dir=run_dir(key, stage), max_steps=max_steps, batch_size=batch_size, seq_len=seq_len, **extra)


def pretrain_optim(model: dict) -> dict:
    # MoE/MLA and Gemma's extra norms like a slightly lower LR.
    lr = 2.0e-3 if model.get("ffn") == "moe" or model.get("attention") == "mla" or model.get("post_norms") else 3.0e-3
    return dict(name="adamw", lr=lr, weight_decay=0.1, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1)


def pretrain(key: str, model: dict) -> dict:
    # ~2M tokens: 500 steps x 4096 tokens.
    return dict(
        model=model,
        data=dict(train_bin="data/bins/pretrain/train.bin", val_bin="data/bins/pretrain/val.bin", tokenizer=TOKENIZER,
                  document_mask=False),  # true: the stories of a window attend only to themselves
        train=train_section(key, "pretrain", 500, 8, 256, global_batch_tokens=4096, log_every=10, eval_every=100,
                            eval_batches=10, save_every=100, keep_last=2, dtype="auto", distributed="none",
                            parallel=dict(tp=1, pp=1, dp=0, pp_schedule="1f1b")),
        # grad_clip is the ceiling; adaptive_clip also clips a spike down to the recent norms (utils/grad_clip.py)
        optim=dict(pretrain_optim(model), grad_clip=1.0,
                   adaptive_clip=dict(z_threshold=2.5, ema_beta=0.97, warmup_steps=25)),
    )


def sft(key: str, mode: str) -> dict:
    # modules_to_save: the stories-only base never saw the chat tokens and digits of SFT data
    lora = dict(r=16, alpha=32, dropout=0.05, targets="all-linear", modules_to_save=["embed", "lm_head"])
    recipe = dict(
        model=dict(init_from=final(key, "pretrain")),
        data=dict(bin_dir="data/bins/sft", tokenizer=TOKENIZER, pack=True, document_mask=True),
        train=train_section(key, f"sft_{mode}", 300, 8, 256, eval_every=100, save_every=100),
        # adapters start at zero and take a larger LR than full fine-tuning
        optim=dict(lr=1.0e-3 if mode == "full" else 3.0e-3, weight_decay=0.0, warmup_steps=20),
    )
    if mode in ("lora", "qlora"):
        recipe["lora"] = lora
    if mode == "qlora":
        recipe["qlora"] = dict(compute_dtype="auto", double_quant=True, targets="all-linear")
    recipe["format_eval_prompts"] = 64
    return recipe


def distill_pretrain(key: str, model: dict) -> dict:
    # The student: the family's architecture at half the layers, new, learning the pretrained
    # model's next-token distributions and the data's tokens on the pretraining budget.
    student = {**model, "n_layers": max(1, model["n_layers"] // 2)}
    return dict(
        teacher=dict(init_from=final(key, "pretrain")),
        model=dict(config=student),
        data=dict(train_bin="data/bins/pretrain/train.bin", val_bin="data/bins/pretrain/val.bin", tokenizer=TOKENIZER),
        loss=dict(divergence="forward_kl", temperature=1.0, kd_weight=0.5),
        train=train_section(key, "distill_pretrain", 500, 8, 256, global_batch_tokens=4096, log_every=10,
                            eval_every=100, eval_batches=10, save_every=100, keep_last=2),
        optim=pretrain_optim(model),
        format_eval_prompts=0,
    )


def distill(key: str) -> dict:
    # The half-depth student learns the QLoRA SFT model's answers: its distributions on the SFT data,
    # and on a quarter of the batches its own samples scored by the teacher (on-policy, GKD).
    return dict(
        teacher=dict(init_from=final(key, CHAIN_SFT), logits="online"),
        model=dict(init_from=final(key, "distill_pretrain")),
        data=dict(bin_dir="data/bins/sft", tokenizer=TOKENIZER),
        loss=dict(divergence="forward_kl", temperature=1.0, kd_weight=0.5),
        onpolicy=dict(ratio=0.25, max_new_tokens=96, temperature=1.0),
        train=train_section(key, "distill", 300, 8, 256, eval_every=100, save_every=100),
        optim=dict(lr=1.0e-3, weight_decay=0.0, warmup_steps=20),
        format_eval_prompts=64,
    )


# The vision part a nano model gets (data/visual's 24 x 24 scenes: 3 x 3 patches of 8 pixels).
VLM_VISION = dict(image_size=24, patch_size=8, d_model=64, n_heads=4, n_layers=2, d_ff=128, image_token_id=4)


def vlm(key: str, stage: str) -> dict:
    """LLaVA's two stages over the SFT model (data_pipeline/download/make_visual_task.py's data)."""
    align = stage == "align"
    return dict(
        stage=stage,
        model=dict(init_from=final(key, CHAIN_SFT), vision=VLM_VISION) if align else dict(init_from=final(key, "vlm_align")),
        data=dict(train_path="data/visual/caption_train.jsonl" if align else "data/visual/qa_train.jsonl"),
        train=train_section(key, f"vlm_{stage}", 300 if align else 600, 32, 128, log_every=50),
        optim=dict(lr=3.0e-3 if align else 1.0e-3, weight_decay=0.0, warmup_steps=40),
    )


def offline(key: str, algorithm: str) -> dict:
    lr = {"reward": 1.0e-4, "dpo": 5.0e-5, "orpo": 5.0e-5}[algorithm]
    loss = {"reward": {}, "dpo": dict(beta=0.1), "orpo": dict(orpo_lambda=0.1)}[algorithm]
    recipe = dict(
        algorithm=algorithm,
        model=dict(init_from=final(key, CHAIN_SFT), tokenizer_path=""),
        data=dict(train_path="data/raw/preference_train.jsonl", val_path="data/raw/preference_val.jsonl",
                  max_val_pairs=256),
        train=train_section(key, "reward" if algorithm == "reward" else algorithm, 200, 8, 256, eval_every=50,
                            save_every=100),
        optim=dict(lr=lr, warmup_steps=10, weight_decay=0.0),
    )
    if loss:
        recipe["loss"] = loss
    return recipe


def online(key: str, algorithm: str) -> dict:
    rl = {
        "ppo": dict(epochs=4, kl_coef=0.05, gamma=1.0, lam=0.95, vf_coef=0.1, vf_clip=0.2, whiten_advantages=True,
                    critic_init=final(key, "reward")),
        "grpo": dict(epochs=1, kl_beta=0.04, aggregation="token", scale_rewards=True),
        "gspo": dict(epochs=2, clip_eps=3.0e-4, clip_eps_high=4.0e-4, scale_rewards=True),
    }[algorithm]
    # PPO is classic RLHF: a learned reward model scores completions. GRPO/GSPO use the
    # verifiable GSM8K-format reward (answer after '####'), RLVR-style.
    reward = dict(model_path=final(key, "reward")) if algorithm == "ppo" else dict(function="gsm8k_combined")
    group = 1 if algorithm == "ppo" else 8
    return dict(
        algorithm=algorithm,
        model=dict(init_from=final(key, CHAIN_SFT), tokenizer_path=""),
        rollout=dict(train_prompts="data/prompts/rl_train.jsonl", test_prompts="data/prompts/rl_test.jsonl",
                     prompts_per_rollout=32 if algorithm == "ppo" else 4, group_size=group, max_new_tokens=96,
                     temperature=1.0, eval_prompts=128),
        reward=reward,
        rl=rl,
        train=train_section(key, f"rlhf_{algorithm}", 100, 16, 256, eval_every=25, save_every=25,
                            spike=dict(enabled=False)),
        optim=dict(lr=1.0e-5, warmup_steps=0, schedule="constant", weight_decay=0.0),
    )


def evaluation(key: str, name: str) -> dict:
    # The aligned policy answers GSM8K; MMLU and HumanEval score the same model; perplexity
    # measures the pretrained model on the held-out stories.
    checkpoint = final(key, {"perplexity": "pretrain", "visual_qa": "vlm_instruct"}.get(name, "rlhf_grpo"))
    recipe = dict(checkpoint=checkpoint, source="synthetic", out_dir=f"runs/classic/{key}/eval/{name}")
    if name == "visual_qa":
        recipe.pop("source")
    recipe.update({
        "gsm8k": dict(n_shot=0, max_new_tokens=96),
        "mmlu": dict(n_shot=5),
        "perplexity": dict(bin_path="data/bins/pretrain/val.bin"),
        "humaneval": dict(n_samples=10, temperature=0.8, k_list=[1, 10]),
        "visual_qa": dict(data_path="data/visual/qa_eval.jsonl", max_new_tokens=16),
    }[name])
    return recipe


def serve(key: str) -> dict:
    return dict(checkpoint=final(key, "rlhf_grpo"), host="127.0.0.1", port=8000, max_num_seqs=32, max_tokens_cap=1024,
                n_cap=8, model_name=key.replace("/", "-"))


def stage_recipes(key: str, model: dict) -> dict[str, dict]:
    return {
        "0_pretrain.yaml": pretrain(key, model),
        "1_sft_full.yaml": sft(key, "full"),
        "1_sft_lora.yaml": sft(key, "lora"),
        "1_sft_qlora.yaml": sft(key, "qlora"),
        "1_distill_pretrain.yaml": distill_pretrain(key, model),
        "2_distill.yaml": distill(key),
        "2_vlm_align.yaml": vlm(key, "align"),
        "3_vlm_instruct.yaml": vlm(key, "instruct"),
        "2_reward.yaml": offline(key, "reward"),
        "2_dpo.yaml": offline(key, "dpo"),
        "2_orpo.yaml": offline(key, "orpo"),
        "3_rlhf_ppo.yaml": online(key, "ppo"),
        "3_rlhf_grpo.yaml": online(key, "grpo"),
        "3_rlhf_gspo.yaml": online(key, "gspo"),
        **{f"4_eval_{name}.yaml": evaluation(key, name) for name in ("gsm8k", "mmlu", "perplexity", "humaneval", "visual_qa")},
        "5_serve.yaml": serve(key),
    }


MERGED = "1_sft_qlora's adapter, merged onto its NF4 base when loaded (then trained full-parameter)"
ALTERNATIVE = ("An alternative to 1_sft_qlora, whose output the later stages read; to continue from this one, "
               "pass model.init_from={out} to them.")
ABOUT = {
    "0_pretrain.yaml": "next-token pretraining on the token bins and tokenizer of the data_pipeline commands. "
                       "Under torchrun, train.distributed (ddp | fsdp) and train.parallel (tp, pp; dp = the rest) "
                       "lay the processes out, e.g. --nproc_per_node 4 train.distributed=fsdp train.parallel.tp=2 "
                       "(README: Parallelism).",
    "1_sft_full.yaml": "full fine-tuning of 0_pretrain's checkpoint. " + ALTERNATIVE,
    "1_sft_lora.yaml": "LoRA adapters over 0_pretrain's checkpoint. " + ALTERNATIVE,
    "1_sft_qlora.yaml": "LoRA adapters over 0_pretrain's checkpoint quantized to NF4; the reward, DPO, ORPO and RL "
                        "stages start from this adapter.",
    "1_distill_pretrain.yaml": "a new student with half of 0_pretrain's layers, distilled from 0_pretrain's checkpoint "
                               "on the pretraining bins (forward KL mixed with the next-token loss); 2_distill's start.",
    "2_distill.yaml": "1_distill_pretrain's student distilled from 1_sft_qlora's model on the SFT data (forward KL "
                      "mixed with the next-token loss), a quarter of the batches being its own samples scored by the "
                      "teacher (on-policy distillation).",
    "2_vlm_align.yaml": f"LLaVA stage 1: a new vision tower and projector in front of {MERGED}; the projector alone "
                        "trains, on image captions (data: python data_pipeline/download/make_visual_task.py).",
    "3_vlm_instruct.yaml": "LLaVA stage 2: 2_vlm_align's projector and language model on visual questions (tower frozen).",
    "2_reward.yaml": f"a reward model (scalar head) on preference pairs, from {MERGED}; 3_rlhf_ppo's reward and critic.",
    "2_dpo.yaml": f"DPO on preference pairs, from {MERGED}.",
    "2_orpo.yaml": f"ORPO on preference pairs, from {MERGED}.",
    "3_rlhf_ppo.yaml": f"PPO with 2_reward's model as reward and critic; the policy is {MERGED}.",
    "3_rlhf_grpo.yaml": f"GRPO with the verifiable GSM8K-format reward; the policy is {MERGED}.",
    "3_rlhf_gspo.yaml": f"GSPO with the verifiable GSM8K-format reward; the policy is {MERGED}.",
    "4_eval_gsm8k.yaml": "GSM8K-format accuracy of 3_rlhf_grpo's policy.",
    "4_eval_mmlu.yaml": "MMLU-format accuracy of 3_rlhf_grpo's policy.",
    "4_eval_perplexity.yaml": "perplexity of 0_pretrain's checkpoint on the held-out stories.",
    "4_eval_humaneval.yaml": "HumanEval-format pass@k of 3_rlhf_grpo's policy.",
    "4_eval_visual_qa.yaml": "held-out visual-question accuracy of 3_vlm_instruct's model.",
    "5_serve.yaml": "serves 3_rlhf_grpo's policy (OpenAI-compatible API and chat page on port 8000).",
}
MOE_ADAPTERS = {  # targets: all-linear takes in the routed experts (model/linear_layers.py)
    "1_sft_lora.yaml": " all-linear includes the routed experts: each expert gets its own adapters.",
    "1_sft_qlora.yaml": " all-linear includes the routed experts: stored in NF4 and each given its own adapters "
                        "(targets can name experts, shared_experts, gate (the router) or attn instead).",
}
DATA_FIRST = "the data_pipeline commands of the README (token bins, tokenizer, prompts)"


def command(key: str, name: str) -> str:
    """The command that runs stage file ``name`` of model ``key``."""
    return f"python {STAGES[name][1]} --config_path {OUT_DIR}/{key}/{name}"


def strings(data) -> list[str]:
    """Every string value of a recipe, nested sections included."""
    if isinstance(data, dict):
        return [s for v in data.values() for s in strings(v)]
    return [data] if isinstance(data, str) else []


def run_first(recipes: dict[str, dict]) -> dict[str, list[str]]:
    """Stage file -> the stage files whose output it reads (a path equal to their train.out_dir/final)."""
    writer = {r["train"]["out_dir"] + "/final": name for name, r in recipes.items() if "train" in r}
    return {name: sorted({writer[s] for s in strings(r) if s in writer}) for name, r in recipes.items()}


def render(prose: list[str], commands: list[str], data: dict) -> str:
    """Header comments (prose wrapped at 100 columns; commands whole, so they can be copied) + YAML."""
    lines = [f"# {part}" for line in prose for part in textwrap.wrap(line, 100, subsequent_indent="  ")]
    lines += [f"# {line}" for line in commands]
    lines.append("# Generated by utils/setup_classic_models.py; edit the generator, not this file.")
    return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False, width=120)


def generate() -> dict[str, str]:
    """Every file, relative to the output directory -> its text."""
    files = {}
    for key in NANO:
        arch = ARCHITECTURES[key]
        recipes = stage_recipes(key, arch.values)
        for name, before in run_first(recipes).items():
            about = ABOUT[name].format(out=final(key, name[2:-5]))
            if arch.values.get("ffn") == "moe" and name in ("1_sft_lora.yaml", "1_sft_qlora.yaml"):
                about += MOE_ADAPTERS[name]
            first = [f"Run first: {command(key, b)}" for b in before] or [f"Run first: {DATA_FIRST}"]
            files[f"{key}/{name}"] = render([f"{key} -- {arch.description}", f"Stage {name[:-5]}: {about}"],
                                            [*first, f"Run:       {command(key, name)}"], recipes[name])
    for key in PUBLISHED:
        prose = [ARCHITECTURES[key].description,
                 "Published dimensions as a ModelConfig; validated by the tests, never trained here.",
                 "Use it as the model: section of a 0_pretrain.yaml to train it at scale."]
        files[f"{key}/model.yaml"] = render(prose, [], ARCHITECTURES[key].values)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description="Generate configs/classic_reproductions/ recipes.")
    ap.add_argument("--out_dir", default=str(OUT_DIR))
    ap.add_argument("--check", action="store_true", help="only report files that differ from the generator")
    args = ap.parse_args()
    out = Path(args.out_dir)
    files = generate()
    if args.check:
        stale = [p for p, text in files.items() if not (out / p).is_file() or (out / p).read_text() != text]
        for p in stale:
            print(f"stale: {out / p}")
        sys.exit(1 if stale else 0)
    for rel, text in files.items():
        with atomic_file(out / rel) as f:
            f.write(text)
    print(f"wrote {len(files)} files under {out}")


if __name__ == "__main__":
    main_guard(main)
