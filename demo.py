"""`make demo`: every stage on the embedded synthetic default, then a report card.

    python demo.py --recipe configs/demo/cpu.yaml [--fresh]

Stages run as the user would run them (the README's commands, as subprocesses), each reading
the previous stage's output through the paths in its recipe:

    data -> pretrain -> SFT (LoRA) -> DPO -> GRPO -> eval -> serve (one OpenAI-client request)

A stage that finished before (its stamp in out/demo/stamps/ matches its command and recipe) is
reused; an interrupted stage resumes from its last checkpoint (the trainers resume by default).
``--fresh`` starts over. The report card goes to the terminal and to out/demo/report.md, with
the loss curves in out/demo/loss_curves.png.

``--distill`` runs the distillation demonstration instead (after data, pretrain and SFT, reused
when done): a student of half the demo model's size, pretrained as the demo model was, then
trained on the SFT data twice with the same batches and budget, by SFT alone and distilled from
the demo's SFT model; the teacher and both students answer the same held-out arithmetic
prompts (out/demo/distill.md).
"""
from __future__ import annotations

import sys
import pathlib

sys.path[0] = str(pathlib.Path(__file__).resolve().parent)  # repo root, whatever the cwd

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Optional  # noqa: E402

from utils.cli import main_guard  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.fs import atomic_file  # noqa: E402


@dataclass
class DataStep:
    script: str
    args: list[str] = field(default_factory=list)


@dataclass
class DemoRecipe:
    out_dir: str = "out/demo"
    data_dir: str = "data"
    data: list[DataStep] = field(default_factory=list)
    pretrain: str = field(default="", metadata={"path": "file"})
    sft: str = field(default="", metadata={"path": "file"})
    dpo: str = field(default="", metadata={"path": "file"})
    grpo: str = field(default="", metadata={"path": "file"})
    # --distill: the student's pretraining, SFT alone, and distillation from the SFT model
    student_pretrain: str = field(default="", metadata={"path": "file?"})
    student_sft: str = field(default="", metadata={"path": "file?"})
    student_distill: str = field(default="", metadata={"path": "file?"})
    eval_limit: int = 200  # held-out problems per eval set
    threads: int = 0  # OMP_NUM_THREADS for every stage; 0 keeps torch's default (one per core)
    serve_port: int = 0  # 0: a free port


STUDENT = ("student_pretrain", "student_sft", "student_distill")


@dataclass
class Stage:
    name: str
    commands: list[list[str]]
    recipe: Optional[str] = None  # hashed into the stamp, so an edited recipe reruns the stage


# ----------------------------------------------------------------------------- plan


def read_yaml_key(path: str, *keys: str):
    import yaml

    node = yaml.safe_load(pathlib.Path(path).read_text())
    for k in keys:
        node = node[k]
    return node


def plan(recipe: DemoRecipe, recipe_path: str) -> list[Stage]:
    py = sys.executable
    out = pathlib.Path(recipe.out_dir)
    data = [[py, step.script, *step.args] for step in recipe.data]
    grpo_final = str(pathlib.Path(read_yaml_key(recipe.grpo, "train", "out_dir")) / "final")
    data_dir = pathlib.Path(recipe.data_dir)
    # The embedded eval sets are read by path (source=local, their original formats), so the demo
    # works with any data_dir.
    evals = [
        [py, "eval/gsm8k.py", "--checkpoint", grpo_final, "--source", "local", "--data_path",
         str(data_dir / "eval" / "gsm8k_test.jsonl"), "--limit", str(recipe.eval_limit), "--n_shot", "0",
         "--out_dir", str(out / "eval")],
        # the same model and problems, its "<<a*b=" answered by the calculator tool
        [py, "eval/gsm8k.py", "--checkpoint", grpo_final, "--source", "local", "--data_path",
         str(data_dir / "eval" / "gsm8k_test.jsonl"), "--limit", str(recipe.eval_limit), "--n_shot", "0",
         "--calculator", "true", "--out_dir", str(out / "eval" / "calculator")],
        [py, "eval/mmlu.py", "--checkpoint", grpo_final, "--source", "local", "--data_path", str(data_dir / "eval" / "mmlu"),
         "--out_dir", str(out / "eval")],
        [py, "eval/perplexity.py", "--checkpoint", str(pathlib.Path(read_yaml_key(recipe.pretrain, "train", "out_dir")) / "final"),
         "--bin_path", str(data_dir / "bins" / "pretrain" / "val.bin"), "--limit", str(recipe.eval_limit),
         "--out_dir", str(out / "eval")],
    ]
    return [
        Stage("data", data),
        Stage("pretrain", [[py, "pretrain/train.py", "--config_path", recipe.pretrain]], recipe.pretrain),
        Stage("sft", [[py, "finetune/peft/lora/sft_lora_train.py", "--config_path", recipe.sft]], recipe.sft),
        Stage("dpo", [[py, "align/train_offline.py", "--config_path", recipe.dpo]], recipe.dpo),
        Stage("grpo", [[py, "align/train_online.py", "--config_path", recipe.grpo]], recipe.grpo),
        Stage("eval", evals),
        Stage("serve", [[py, "demo.py", "--recipe", recipe_path, "--serve_check", grpo_final, "--port", str(recipe.serve_port)]]),
    ]


def plan_distill(recipe: DemoRecipe, recipe_path: str) -> list[Stage]:
    """The stages the distillation demonstration needs: the demo's data, pretraining and SFT (the
    teacher), then the student's pretraining, its SFT alone and its distillation."""
    if not all(getattr(recipe, name) for name in STUDENT):
        raise UserError(f"{recipe_path} names no student recipes (student_pretrain, student_sft, student_distill); "
                        "use configs/demo/cpu.yaml or add them.")
    py = sys.executable
    first = [s for s in plan(recipe, recipe_path) if s.name in ("data", "pretrain", "sft")]
    return first + [
        Stage("student_pretrain", [[py, "pretrain/train.py", "--config_path", recipe.student_pretrain]], recipe.student_pretrain),
        Stage("student_sft", [[py, "finetune/sft_train.py", "--config_path", recipe.student_sft]], recipe.student_sft),
        Stage("student_distill", [[py, "finetune/distill_train.py", "--config_path", recipe.student_distill]],
              recipe.student_distill),
    ]


def stamp_of(stage: Stage) -> str:
    h = hashlib.sha256(json.dumps(stage.commands).encode())
    if stage.recipe:
        h.update(pathlib.Path(stage.recipe).read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- run


def banner(i: int, n: int, text: str) -> None:
    print(f"\n{'=' * 78}\n[{i}/{n}] {text}\n{'=' * 78}", flush=True)


def run_stage(stage: Stage, stamps: pathlib.Path, log_dir: pathlib.Path, env: dict) -> float:
    """Run a stage's commands (streaming their output) unless its stamp says it is done."""
    stamp_file = stamps / f"{stage.name}.json"
    stamp = stamp_of(stage)
    if stamp_file.is_file():
        done = json.loads(stamp_file.read_text())
        if done.get("stamp") == stamp:
            print(f"{stage.name}: finished earlier ({done['seconds']:.0f}s), reusing its outputs", flush=True)
            return done["seconds"]
    start = time.time()
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{stage.name}.log", "a") as log:
        for cmd in stage.commands:
            print("$ " + " ".join(cmd[1:] if cmd[0] == sys.executable else cmd), flush=True)
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            if proc.wait() != 0:
                raise UserError(
                    f"demo stage {stage.name!r} failed (exit {proc.returncode}) running: {' '.join(cmd)}. "
                    f"Its output is in {log_dir / (stage.name + '.log')}; fix the problem and run `make demo` again "
                    "(finished stages are reused, an interrupted stage resumes)."
                )
    seconds = time.time() - start
    with atomic_file(stamp_file) as f:
        json.dump({"stamp": stamp, "seconds": seconds}, f)
    return seconds


# ----------------------------------------------------------------------------- report card


def read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def fmt(x, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def report_card(recipe: DemoRecipe, seconds: dict[str, float]) -> str:
    runs = {name: pathlib.Path(read_yaml_key(getattr(recipe, name), "train", "out_dir")) for name in ("pretrain", "sft", "dpo", "grpo")}
    out = pathlib.Path(recipe.out_dir)
    rows = []

    pre = read_metrics(runs["pretrain"])
    first = next((r["loss"] for r in pre if "loss" in r), None)
    val = [r for r in pre if "val_loss" in r]
    last_val = val[-1]["val_loss"] if val else None
    ppl = val[-1].get("val_ppl") if val else None
    rows.append(("pretrain", "val loss (perplexity)", f"{fmt(first)} (step-1 train loss)",
                 f"{fmt(last_val)} (ppl {fmt(ppl)})"))

    fe = read_json(runs["sft"] / "format_eval.json")
    if fe:
        rows.append(("SFT (LoRA)", f"'#### <n>' format rate, {fe['sft']['n']} held-out prompts",
                     fmt(fe["base"]["format_rate"], True), fmt(fe["sft"]["format_rate"], True)))

    pe = read_json(runs["dpo"] / "preference_eval.json")
    if pe:
        rows.append(("DPO", f"held-out preference accuracy, {pe.get('n_val_pairs')} pairs",
                     fmt(pe["before"].get("val_pref_accuracy"), True), fmt(pe["after"].get("val_pref_accuracy"), True)))

    rl = read_json(runs["grpo"] / "rl_eval.json")
    if rl:
        rows.append(("GRPO", f"exact-answer accuracy, {rl.get('n_eval_prompts')} held-out prompts",
                     fmt(rl["before"].get("val_accuracy"), True), fmt(rl["after"].get("val_accuracy"), True)))

    gsm = read_json(out / "eval" / "gsm8k_summary.json")
    if gsm:
        rows.append(("eval", f"GSM8K-format accuracy (synthetic, {gsm.get('n')} problems)", "", fmt(gsm.get("accuracy"), True)))
        if "format_rate" in gsm:
            rows.append(("eval", "GSM8K '#### <n>' format rate", "", fmt(gsm.get("format_rate"), True)))
    calc = read_json(out / "eval" / "calculator" / "gsm8k_summary.json")
    if gsm and calc:
        rows.append(("eval", "GSM8K-format accuracy: without / with the calculator tool", fmt(gsm.get("accuracy"), True),
                     fmt(calc.get("accuracy"), True)))
    mmlu = read_json(out / "eval" / "mmlu_summary.json")
    if mmlu:
        rows.append(("eval", "MMLU-format accuracy (synthetic, 4 choices; chance 25%)", "", fmt(mmlu.get("micro"), True)))
    ppx = read_json(out / "eval" / "perplexity_summary.json")
    if ppx:
        rows.append(("eval", "pretrain val perplexity / bits per byte", "", f"{fmt(ppx.get('perplexity'))} / {fmt(ppx.get('bits_per_byte'))}"))
    serve = read_json(out / "serve.json")
    if serve:
        rows.append(("serve", "OpenAI-client chat request", "", f"{serve['completion_tokens']} tokens: {serve['text'][:40]!r}"))

    lines = ["# Demo report card", "", "| stage | metric | before | after |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", "| stage | wall time |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} s |" for k, v in seconds.items()]
    lines += [f"| total | {sum(seconds.values()):.0f} s |", "", "Loss curves: loss_curves.png"]
    return "\n".join(lines) + "\n"


def distill_card(recipe: DemoRecipe, seconds: dict[str, float]) -> str:
    """Teacher, SFT-only student and distilled student on the same held-out exact-answer prompts."""
    run = lambda name: pathlib.Path(read_yaml_key(getattr(recipe, name), "train", "out_dir"))  # noqa: E731
    sft, distilled = read_json(run("student_sft") / "format_eval.json"), read_json(run("student_distill") / "format_eval.json")
    params = {}
    for name, key in (("teacher", "pretrain"), ("student", "student_pretrain")):
        model = read_yaml_key(getattr(recipe, key), "model")
        params[name] = f"d_model {model['d_model']}, {model['n_layers']} layers"
    rows = [("teacher: the demo's SFT model", params["teacher"], distilled.get("teacher")),
            ("student before (pretrained only)", params["student"], distilled.get("base")),
            ("student, SFT alone", params["student"], sft.get("sft")),
            ("student, distilled from the teacher", params["student"], distilled.get("distilled"))]
    n = (distilled.get("distilled") or {}).get("n")
    lines = ["# Distillation demo", "", f"Exact answers on {n} held-out arithmetic prompts (greedy, the same prompts for all).",
             "", "| model | size | exact answers | '#### <n>' format |", "|---|---|---|---|"]
    lines += [f"| {name} | {size} | {fmt(r and r['accuracy'], True)} | {fmt(r and r['format_rate'], True)} |"
              for name, size, r in rows]
    lines += ["", ("One training seed per student: from seed to seed the same student's exact answers move by several "
                   "points, so `python bench/bench_distill_demo.py` pairs the students prompt by prompt, and "
                   "docs/BENCHMARKS.md repeats them over training seeds.")]
    lines += ["", "| stage | wall time |", "|---|---|"] + [f"| {k} | {v:.0f} s |" for k, v in seconds.items()]
    return "\n".join(lines) + "\n"


def plot_curves(recipe: DemoRecipe, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, name in zip(axes, ("pretrain", "sft", "dpo", "grpo")):
        records = read_metrics(pathlib.Path(read_yaml_key(getattr(recipe, name), "train", "out_dir")))
        pts = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
        if pts:
            ax.plot(*zip(*pts), label="train loss")
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o-", label="val loss")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- serve check


def ask_server(args: list[str], question: str, port: int = 0, cwd: Optional[str] = None,
               env: Optional[dict] = None):
    """Start ``python <args> --port PORT`` (0: a free port), send ``question`` through the official
    OpenAI client once the server answers, stop the server. Returns (model name, the chat completion)."""
    import socket

    from openai import OpenAI

    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, *args, "--port", str(port)], cwd=cwd, env=env)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo", max_retries=0, timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                model = client.models.list().data[0].id
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise UserError("the server did not come up within 120 s; see its output above.")
                time.sleep(0.5)
        return model, client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                     max_tokens=64, temperature=0)
    finally:
        server.terminate()
        server.wait(30)


def serve_check(checkpoint: str, port: int, out_dir: str) -> None:
    """Start the server, send one chat request through the official OpenAI client, stop it."""
    question = "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"
    _, reply = ask_server(["inference/server.py", "--checkpoint", checkpoint], question, port)
    text = reply.choices[0].message.content
    print(f"server: {question!r} -> {text!r}")
    with atomic_file(pathlib.Path(out_dir) / "serve.json") as f:
        json.dump({"question": question, "text": text, "completion_tokens": reply.usage.completion_tokens}, f)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/demo/cpu.yaml")
    parser.add_argument("--fresh", action="store_true", help="delete the demo's outputs and start over")
    parser.add_argument("--only", help="comma-separated stage names to run (default: all)")
    parser.add_argument("--distill", action="store_true", help="the distillation demonstration (see above)")
    parser.add_argument("--serve_check", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    recipe = load_config(DemoRecipe, args.recipe)
    if args.serve_check:
        return serve_check(args.serve_check, args.port, recipe.out_dir)

    out = pathlib.Path(recipe.out_dir)
    stages = plan_distill(recipe, args.recipe) if args.distill else plan(recipe, args.recipe)
    if args.fresh:
        stage_recipes = [n for n in ("pretrain", "sft", "dpo", "grpo", *STUDENT) if getattr(recipe, n)]
        for d in [out, pathlib.Path(recipe.data_dir)] + [
            pathlib.Path(read_yaml_key(getattr(recipe, n), "train", "out_dir")) for n in stage_recipes
        ]:
            shutil.rmtree(d, ignore_errors=True)
    only = set(args.only.split(",")) if args.only else None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if recipe.threads > 0:  # tiny models on few cores: one thread avoids OpenMP spin-waits
        env["OMP_NUM_THREADS"] = str(recipe.threads)
    seconds: dict[str, float] = {}
    for i, stage in enumerate(stages, 1):
        if only and stage.name not in only:
            continue
        banner(i, len(stages), stage.name)
        seconds[stage.name] = run_stage(stage, out / "stamps", out / "logs", env)
    if args.distill:
        card = distill_card(recipe, seconds)
        with atomic_file(out / "distill.md") as f:
            f.write(card)
        print("\n" + card + f"\nreport: {out / 'distill.md'}")
        return
    plot_curves(recipe, out / "loss_curves.png")
    card = report_card(recipe, seconds)
    with atomic_file(out / "report.md") as f:
        f.write(card)
    print("\n" + card)
    print(f"report card: {out / 'report.md'}")


if __name__ == "__main__":
    main_guard(main)
