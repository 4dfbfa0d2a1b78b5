"""The vision-language demo: a tiny LLaVA-style model learns the synthetic visual task on CPU in minutes.

    python demo_vlm.py [--data_dir data] [--runs_dir runs/vlm] [--out out/demo_vlm] [--lora]

Each step is the command a user would run (printed before it runs, its output in out/demo_vlm/logs):

  data_pipeline/download/make_visual_task.py          the task: scenes, captions, questions, a tokenizer
  finetune/vlm_train.py configs/examples/vlm/0_text      the LM alone, on the chats without their images
  finetune/vlm_train.py configs/examples/vlm/1_align     stage 1: the projector on captions
  finetune/vlm_train.py configs/examples/vlm/2_instruct  stage 2: projector + LM on questions
  finetune/vlm_train.py configs/examples/vlm/2_instruct_lora   (--lora) stage 2 again, the LM as LoRA adapters
  eval/visual_qa.py after each, on held-out scenes, through the engine

and writes the held-out accuracy of each to out/demo_vlm/report.md. Steps whose output exists are
skipped (--fresh reruns them).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # repo root

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from utils.cli import main_guard  # noqa: E402
from utils.errors import UserError  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent
STAGES = [("text", "0_text", None), ("align", "1_align", "text"), ("instruct", "2_instruct", "align"),
          ("instruct_lora", "2_instruct_lora", "align")]
# (row of the report, checkpoint stage, with images)
EVALS = [("text-only base (no images)", "text", False), ("untrained projector", "text", True),
         ("after stage 1 (projector on captions)", "align", True),
         ("after stage 2 (projector + LM on questions)", "instruct", True),
         ("after stage 2 with LoRA (projector + LM adapters)", "instruct_lora", True)]


def run(cmd: list[str], log: pathlib.Path) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *cmd], cwd=os.getcwd(), stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise UserError(f"{cmd[0]} failed (exit {proc.returncode}); its output is in {log}.")
    return time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="data")
    p.add_argument("--runs_dir", default="runs/vlm")
    p.add_argument("--out", default="out/demo_vlm")
    p.add_argument("--fresh", action="store_true", help="rerun every step")
    p.add_argument("--lora", action="store_true", help="also stage 2 with LoRA adapters on the LM (a second stage-2 run)")
    args = p.parse_args()
    data, runs, out = pathlib.Path(args.data_dir) / "visual", pathlib.Path(args.runs_dir), pathlib.Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    seconds = {}
    if args.fresh or not (data / "qa_eval.jsonl").is_file():
        seconds["data"] = run([str(REPO / "data_pipeline/download/make_visual_task.py"), "--data_dir", args.data_dir],
                              out / "logs/data.log")
    stages = STAGES if args.lora else [s for s in STAGES if s[0] != "instruct_lora"]
    evals = EVALS if args.lora else [e for e in EVALS if e[1] != "instruct_lora"]
    for stage, recipe, prev in stages:
        if args.fresh and (runs / stage).exists():
            shutil.rmtree(runs / stage)
        if (runs / stage / "final").is_dir():
            continue
        cmd = [str(REPO / "finetune/vlm_train.py"), "--config_path", str(REPO / f"configs/examples/vlm/{recipe}.yaml"),
               f"train.out_dir={runs / stage}", "train.progress=false"]
        train_file = "caption_train" if stage == "align" else "qa_train"
        cmd.append(f"data.train_path={data / f'{train_file}.jsonl'}")
        if stage == "text":
            cmd += [f"data.tokenizer={data / 'tokenizer/tokenizer.json'}", f"data.extra_paths=[{data / 'caption_train.jsonl'}]"]
        else:
            cmd.append(f"model.init_from={runs / prev / 'final'}")
        seconds[stage] = run(cmd, out / f"logs/{stage}.log")
    rows = []
    for i, (label, stage, with_images) in enumerate(evals):
        eval_dir = out / f"eval_{i}"
        seconds[f"eval {i}"] = run([str(REPO / "eval/visual_qa.py"), "--checkpoint", str(runs / stage / "final"),
                                    "--data_path", str(data / "qa_eval.jsonl"), "--with_images", str(with_images).lower(),
                                    "--progress", "false", "--out_dir", str(eval_dir)], out / f"logs/eval_{i}.log")
        summary = json.loads((eval_dir / "visual_qa_summary.json").read_text())
        rows.append((label, summary))
    kinds = list(rows[-1][1]["by_kind"])
    lines = ["# Vision-language demo: held-out visual-question accuracy", "",
             f"{rows[0][1]['n']} held-out questions on scenes no training row shows; exact answers, greedy, through the engine.", "",
             "| model | accuracy | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for label, s in rows:
        lines.append(f"| {label} | {s['accuracy']:.3f} | " + " | ".join(f"{s['by_kind'].get(k, 0):.2f}" for k in kinds) + " |")
    lines += ["", "Seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main_guard(main)
