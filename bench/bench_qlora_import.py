"""QLoRA memory on an imported 0.5B-class model: bytes per parameter of the NF4 base, and the
process's memory against the fp32 model it replaces.

    python bench/bench_qlora_import.py [--config qwen2_0_5b] [--threads 1]

Writes a HuggingFace model directory with transformers (Qwen2.5-0.5B's published dimensions,
random weights, safetensors), loads it through model/load.py exactly as an SFT recipe with
``model.init_from: <that dir>`` does, quantizes the base as ``qlora:`` says and wraps rank-16
LoRA adapters, then prints: the quantized layers' storage per parameter (codes + block scales
+ nested scales), the whole model's parameter bytes before and after, and peak RSS. Runs one
forward/backward step of 256 tokens to show the model trains.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from utils.cli import main_guard

CONFIGS = {  # published dimensions (config.json of the model)
    "qwen2_0_5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def param_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def write_hf_dir(directory: Path, name: str) -> int:
    import transformers

    spec = dict(CONFIGS[name])
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(directory))
    del model
    return n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="qwen2_0_5b")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from model.load import load_model
    from model.lora import apply_lora, trainable_parameters
    from model.quant import QLoRAConfig, base_bytes_per_param, quantize_for_qlora

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        n_params = write_hf_dir(hf_dir, args.config)
        rss_before = rss_gb()
        t0 = time.perf_counter()
        model = load_model(hf_dir, train=True)  # through the one loader, as init_from does
        fp32_bytes = param_bytes(model)
        quantized = quantize_for_qlora(model, QLoRAConfig(compute_dtype="fp32"))
        apply_lora(model, "all-linear", r=16, alpha=32)
        load_s = time.perf_counter() - t0
        qbytes = param_bytes(model)
        x = torch.randint(0, model.cfg.vocab_size, (1, 257))
        from model.loss import lm_loss

        t0 = time.perf_counter()
        loss = lm_loss(model, x[:, :-1], x[:, 1:])
        loss.backward()
        step_s = time.perf_counter() - t0
        n_lin = sum(model.get_submodule(name).in_features * model.get_submodule(name).out_features for name in quantized)
        print(f"{args.config}: {n_params / 1e6:.0f}M parameters ({n_lin / 1e6:.0f}M in {len(quantized)} quantized linear layers, "
              f"the rest embeddings and norms); torch threads {args.threads}")
        print(f"  NF4 base (double quant): {base_bytes_per_param(model):.4f} bytes/parameter of the quantized layers")
        print(f"  model parameter bytes: fp32 {fp32_bytes / 2**30:.2f} GiB -> QLoRA {qbytes / 2**30:.2f} GiB "
              f"({qbytes / fp32_bytes:.2f}x); LoRA trainable {sum(p.numel() for p in trainable_parameters(model)) / 1e6:.1f}M")
        print(f"  peak RSS: {rss_gb():.2f} GiB (the fp32 copy is read first: {rss_before:.2f} GiB before loading); "
              f"load + quantize {load_s:.1f} s; one 256-token step {step_s:.1f} s, loss {loss.item():.3f}")


if __name__ == "__main__":
    main_guard(main)
