"""Every demo recipe and the stage recipes it names validate against their classes."""
from pathlib import Path

import pytest
import yaml

import demo
from align.recipe import OfflineRecipe, OnlineRecipe
from finetune.distill_recipe import DistillRecipe
from finetune.recipe import SFTRecipe
from pretrain.recipe import PretrainRecipe
from utils.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"pretrain": PretrainRecipe, "sft": SFTRecipe, "dpo": OfflineRecipe, "grpo": OnlineRecipe}
STUDENT_CLASSES = {"student_pretrain": PretrainRecipe, "student_sft": SFTRecipe, "student_distill": DistillRecipe}


def stub_paths(node, root: Path) -> None:
    # Stage inputs (bins, checkpoints) exist only after earlier stages ran: create empty stand-ins.
    if isinstance(node, dict):
        for v in node.values():
            stub_paths(v, root)
    elif isinstance(node, str) and node.startswith(("data/", "data_gpu/", "out/")):
        p = root / node
        if p.name == "preference":  # a bin dir is recognised by its meta.json
            p.mkdir(parents=True, exist_ok=True)
            (p / "meta.json").touch()
        elif p.suffix:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        else:
            p.mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_demo_recipe_and_its_stages_validate(name, tmp_path, monkeypatch):
    recipe = load_config(demo.DemoRecipe, ROOT / f"configs/demo/{name}.yaml")
    assert all((ROOT / step.script).is_file() for step in recipe.data)
    students = {stage: cls for stage, cls in STUDENT_CLASSES.items() if getattr(recipe, stage)}  # demo.py --distill
    for stage, cls in {**CLASSES, **students}.items():
        data = yaml.safe_load((ROOT / getattr(recipe, stage)).read_text())
        stub_paths(data, tmp_path)
        monkeypatch.chdir(tmp_path)
        config_from_dict(cls, data, source=getattr(recipe, stage))
        monkeypatch.chdir(ROOT)
