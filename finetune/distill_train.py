"""Knowledge distillation: a teacher's next-token distributions train a student (logit KD on SFT or
pretraining data, forward/reverse KL or JSD, teacher online or cached as top-k; on-policy GKD).

    python finetune/distill_train.py --config_path configs/.../2_distill.yaml [key=value ...]

Everything lives in finetune/distill.py (teacher, student, loss, data) and utils/train_loop.py (the
loop); this script only reads the recipe. Sequence-level distillation (the teacher's answers as SFT
data) is finetune/distill_sequences.py.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

from finetune.distill import run_distill_and_report  # noqa: E402
from finetune.distill_recipe import DistillRecipe  # noqa: E402
from utils.cli import main_guard  # noqa: E402
from utils.config import parse_args  # noqa: E402


def main() -> None:
    recipe, _ = parse_args(DistillRecipe, __doc__.splitlines()[0])
    run_distill_and_report(recipe)


if __name__ == "__main__":
    main_guard(main)
