"""Vision-language training, LLaVA-style: stage text | align (projector) | instruct (projector + LM).

    python finetune/vlm_train.py --config_path configs/examples/vlm/1_align.yaml [key=value ...]

Everything lives in finetune/vlm.py (model, stages, data, loss) and utils/train_loop.py (the loop).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

from finetune.vlm import run_vlm  # noqa: E402
from finetune.vlm_recipe import VLMRecipe  # noqa: E402
from utils.cli import main_guard  # noqa: E402
from utils.config import parse_args  # noqa: E402


def main() -> None:
    recipe, _ = parse_args(VLMRecipe, __doc__.splitlines()[0])
    run_vlm(recipe)


if __name__ == "__main__":
    main_guard(main)
