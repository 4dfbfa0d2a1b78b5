"""QLoRA supervised finetuning: the frozen base is stored in 4-bit NF4 (bitsandbytes), LoRA adapters train in full precision.

    python finetune/peft/qlora/sft_qlora_train.py --config_path configs/.../1_sft_qlora.yaml [key=value ...]

Everything lives in finetune/sft.py (model, loss, data) and utils/train_loop.py (the loop);
this script only reads the recipe and checks that it is a qlora recipe.
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
    run_sft_and_report(recipe, "qlora")


if __name__ == "__main__":
    main_guard(main)
