"""LoRA supervised finetuning: the base stays frozen, only low-rank adapters train and are saved.

    python finetune/peft/lora/sft_lora_train.py --config_path configs/.../1_sft_lora.yaml [key=value ...]

Everything lives in finetune/sft.py (model, loss, data) and utils/train_loop.py (the loop);
this script only reads the recipe and checks that it is a lora recipe.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))  # repo root

from finetune.recipe import SFTRecipe  # noqa: E402
from finetune.sft import run_sft_and_report  # noqa: E402
from utils.cli import main_guard  # noqa: E402
from utils.config import parse_args  # noqa: E402


def main() -> None:
    recipe, _ = parse_args(SFTRecipe, __doc__.splitlines()[0])
    run_sft_and_report(recipe, "lora")


if __name__ == "__main__":
    main_guard(main)
