from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from model import ModelConfig
from utils.config import load_config, parse_args
from utils.errors import UserError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    name: Literal["adamw", "muon"] = "adamw"


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: Optim = field(default_factory=Optim)
    steps: int = 10
    data_path: Optional[str] = field(default=None, metadata={"path": "file?"})


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_loads_nested_and_yaml_sci_notation(tmp_path):
    cfg = load_config(Recipe, write(tmp_path, "optim:\n  lr: 3e-4\nmodel:\n  n_layers: 2\n"))
    assert cfg.optim.lr == 3e-4 and cfg.model.n_layers == 2 and cfg.model.head_dim == 64


def test_unknown_key_names_file_key_and_closest(tmp_path):
    p = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(UserError) as e:
        load_config(Recipe, p)
    msg = str(e.value)
    assert str(p) in msg and "optim.lrr" in msg and "did you mean 'lr'" in msg


def test_all_problems_reported_together(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(Recipe, write(tmp_path, "steps: ten\noptim:\n  name: sgd\nmodl: {}\n"))
    msg = str(e.value)
    assert "3 problem" in msg and "steps: expected int" in msg and "'adamw', 'muon'" in msg and "did you mean 'model'" in msg


def test_missing_path_and_bad_model_combo(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(Recipe, write(tmp_path, "data_path: /nope/x.bin\n"))
    with pytest.raises(UserError, match="not divisible by n_kv_heads"):
        load_config(Recipe, write(tmp_path, "model:\n  n_heads: 4\n  n_kv_heads: 3\n"))


@dataclass
class Train:
    out_dir: str = "runs/x"


@dataclass
class Stage:
    init_from: str = field(default="", metadata={"path": "dir?"})
    train: Train = field(default_factory=Train)


def test_missing_dir_names_the_sibling_recipe_that_writes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r/0_first.yaml").write_text("# First stage.  python first.py --config_path r/0_first.yaml\n"
                                             "train:\n  out_dir: runs/first\n")
    (tmp_path / "r/2_other.yaml").write_text("train:\n  out_dir: runs/other\n")  # no command in its header
    (tmp_path / "r/notes.yaml").write_text("[a list, not a recipe]\n")
    second = tmp_path / "r/1_second.yaml"
    second.write_text("init_from: runs/first/final\ntrain:\n  out_dir: runs/second\n")
    with pytest.raises(UserError) as e:
        load_config(Stage, second)
    assert "'runs/first/final' does not exist; r/0_first.yaml writes it (its train.out_dir): " \
           "run `python first.py --config_path r/0_first.yaml` first" in str(e.value).replace(str(tmp_path) + "/", "")
    with pytest.raises(UserError, match="r/2_other.yaml writes it .*: run that stage first"):
        load_config(Stage, second, ["init_from=runs/other/step_00000010"])
    with pytest.raises(UserError) as e:  # written by no recipe here (and never by the recipe itself)
        load_config(Stage, second, ["init_from=runs/second/final"])
    assert str(e.value).endswith("directory 'runs/second/final' does not exist")


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not valid YAML at line 2"):
        load_config(Recipe, write(tmp_path, "a: 1\n  b: [\n"))
    with pytest.raises(UserError, match="does not exist"):
        load_config(Recipe, tmp_path / "absent.yaml")
    write(tmp_path, "steps: 5\n")
    with pytest.raises(UserError, match=r"is a directory; .*r\.yaml"):  # was "does not exist"
        load_config(Recipe, tmp_path)


def test_overrides_both_forms(tmp_path):
    p = write(tmp_path, "steps: 5\n")
    cfg, _ = parse_args(Recipe, argv=["--config_path", str(p), "--set", "optim.lr=0.5", "model.n_layers=3", "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 0.5 and cfg.model.n_layers == 3 and cfg.optim.betas == [0.8, 0.9] and cfg.steps == 5
    with pytest.raises(UserError, match="optim.lrx"):
        parse_args(Recipe, argv=["--config_path", str(p), "optim.lrx=1"])
