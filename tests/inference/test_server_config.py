"""`inference/server.py --config_path serve.yaml`: YAML keys are the flags; the command line wins."""
import pytest

from inference.server import parse_serve_args
from utils.errors import UserError


def test_yaml_sets_flags_and_command_line_wins(tmp_path):
    p = tmp_path / "serve.yaml"
    p.write_text("checkpoint: some/dir\nport: 9001\nmax-num-seqs: 4\ndtype: bfloat16\n")
    args = parse_serve_args(["--config_path", str(p), "--port", "9002"])
    assert (args.checkpoint, args.port, args.max_num_seqs, args.dtype) == ("some/dir", 9002, 4, "bfloat16")


def test_bad_keys_and_types_are_reported_together(tmp_path):
    p = tmp_path / "serve.yaml"
    p.write_text("checkpoint: x\nmax_num_seq: 4\nport: abc\ndtype: fp8\n")
    with pytest.raises(UserError) as e:
        parse_serve_args(["--config_path", str(p)])
    msg = str(e.value)
    assert "3 problem" in msg and "did you mean 'max_num_seqs'" in msg and "port: expected int" in msg and "fp8" in msg
