"""The server's settings are a typed recipe (inference/serve_recipe.py): YAML keys and flags are
the same keys, the command line wins, problems are reported together with the closest key."""
import pytest

from inference.server import parse_serve_args
from utils.errors import UserError


def test_yaml_sets_keys_and_command_line_wins(tmp_path):
    (tmp_path / "ckpt").mkdir()
    p = tmp_path / "serve.yaml"
    p.write_text(f"checkpoint: {tmp_path / 'ckpt'}\nport: 9001\nmax_num_seqs: 4\ndtype: bf16\n")
    recipe = parse_serve_args(["--config_path", str(p), "--port", "9002", "--max-model-len", "64"])
    assert (recipe.port, recipe.max_num_seqs, recipe.dtype, recipe.max_model_len) == (9002, 4, "bf16", 64)
    same = parse_serve_args(["--config_path", str(p), "port=9002", "--set", "max_model_len=64"])
    assert same == recipe
    assert not recipe.clamp_max_tokens and parse_serve_args(["--config_path", str(p), "--clamp-max-tokens"]).clamp_max_tokens


def test_bad_keys_and_types_are_reported_together(tmp_path):
    p = tmp_path / "serve.yaml"
    p.write_text("checkpoint: x\nmax_num_seq: 4\nport: abc\ndtype: float32\n")
    with pytest.raises(UserError) as e:
        parse_serve_args(["--config_path", str(p)])
    msg = str(e.value)
    assert "3 problem" in msg and "did you mean 'max_num_seqs'" in msg and "port: expected int" in msg
    assert "'float32'" in msg and "did you mean 'fp32'" in msg  # one dtype vocabulary, with the right spelling


@pytest.mark.parametrize("args,fragment", [
    ([], "no checkpoint given"),
    (["--checkpoint", "x", "--max-num-seqs", "0"], "max_num_seqs must be >= 1"),
    (["--checkpoint", "x", "--port", "70000"], "port must be in"),
    (["--checkpoint", "x", "--bogus", "1"], "unknown command-line argument"),
])
def test_bad_command_lines_are_one_clear_error(args, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_serve_args(args)


def test_api_key_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_API_KEY", "sekret")
    assert parse_serve_args(["--checkpoint", "x"]).api_key == "sekret"
    assert parse_serve_args(["--checkpoint", "x", "--api-key", "other"]).api_key == "other"
