"""Recipes: YAML files mapped onto typed dataclasses, validated before any work starts.

    cfg = load_config(PretrainConfig, "configs/.../0_pretrain.yaml", ["optim.lr=3e-4"])

Every problem (unknown key, wrong type, missing required key, missing file) is collected
and reported at once, each line naming the file, the dotted key and what was expected,
with the closest valid key for a typo. Overrides use the same dotted keys and YAML values.
A field whose metadata says ``{"path": "file"}`` or ``{"path": "dir"}`` must exist on disk;
``{"path": "file?"}`` may be empty (None or ""). A missing directory that a recipe in the same
folder writes (its ``train.out_dir``) is reported with that recipe's command, so a stage run too
early says which stage must run first.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar, Union

import yaml

from utils.errors import UserError

T = TypeVar("T")


def _closest(name: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


class _Builder:
    """Turns a nested dict into a nested dataclass, collecting every problem."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[str] = []

    def fail(self, key: str, msg: str) -> None:
        self.problems.append(f"{self.source}: {key}: {msg}")

    def build(self, cls: type, data: Any, key: str) -> Any:
        if not isinstance(data, dict):
            self.fail(key or "<top>", f"expected a mapping of keys for {cls.__name__}, got {type(data).__name__}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for name, value in data.items():
            sub = f"{key}.{name}" if key else str(name)
            if name not in fields:
                self.fail(sub, f"unknown key{_closest(str(name), fields)}; valid keys here: {', '.join(fields)}")
                continue
            kwargs[name] = self.convert(hints[name], value, sub, fields[name])
        for name, f in fields.items():
            missing_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if missing_default and name not in data:
                self.fail(f"{key}.{name}" if key else name, f"required key is missing ({_type_name(hints[name])})")
        if self.problems:
            return None
        try:
            return cls(**kwargs)
        except UserError as err:
            self.fail(key or "<top>", str(err))
        except (TypeError, ValueError) as err:
            self.fail(key or "<top>", str(err))
        return None

    def convert(self, tp: Any, value: Any, key: str, f: Optional[dataclasses.Field] = None) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            non_none = [a for a in args if a is not type(None)]
            if len(non_none) == 1:
                return self.convert(non_none[0], value, key, f)
            for a in non_none:  # first arm that accepts the value without complaint
                probe = _Builder(self.source)
                out = probe.convert(a, value, key, f)
                if not probe.problems:
                    return out
            self.fail(key, f"expected {_type_name(tp)}, got {value!r}")
            return None
        if origin is typing.Literal:
            if value not in args:
                self.fail(key, f"expected one of {', '.join(map(repr, args))}, got {value!r}{_closest(str(value), [str(a) for a in args])}")
            return value
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, key)
        if origin in (list, tuple, Sequence) or tp in (list, tuple):
            if not isinstance(value, (list, tuple)):
                self.fail(key, f"expected a list, got {value!r}")
                return None
            item = args[0] if args else Any
            return [self.convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                self.fail(key, f"expected a mapping, got {value!r}")
            return value
        if tp is Any:
            return value
        value = self.scalar(tp, value, key)
        if f is not None and value is not None and f.metadata.get("path"):
            self.check_path(f.metadata["path"], value, key)
        return value

    def scalar(self, tp: Any, value: Any, key: str) -> Any:
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
        elif tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
        else:
            return value
        self.fail(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return None

    def check_path(self, kind: str, value: str, key: str) -> None:
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if optional and value in ("", None):
            return
        p = Path(value)
        if kind == "file" and not p.is_file():
            self.fail(key, f"file {value!r} does not exist")
        elif kind == "dir" and not p.is_dir():
            self.fail(key, f"directory {value!r} does not exist{_written_by(self.source, value)}")


def _written_by(source: str, missing: str) -> str:
    """"; X writes it ...: run `python ... --config_path X` first" when recipe X, beside the recipe
    ``source``, writes the directory ``missing`` (it lies in X's train.out_dir); else ""."""
    here = Path(source)
    if not here.is_file():
        return ""
    target = Path(os.path.abspath(missing))
    for sibling in sorted(here.parent.glob("*.yaml")):
        out_dir = _train_out_dir(sibling)
        if sibling != here and out_dir and (target == out_dir or out_dir in target.parents):
            run = _own_command(sibling)
            return f"; {sibling} writes it (its train.out_dir): run {f'`{run}`' if run else 'that stage'} first"
    return ""


def _train_out_dir(recipe: Path) -> Optional[Path]:
    try:
        train = (yaml.safe_load(recipe.read_text()) or {}).get("train")
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):  # not a stage recipe
        return None
    out_dir = train.get("out_dir") if isinstance(train, dict) else None
    return Path(os.path.abspath(out_dir)) if isinstance(out_dir, str) and out_dir else None


def _own_command(recipe: Path) -> Optional[str]:
    """The ``python <script> --config_path <recipe>`` that the recipe's comment lines give for itself."""
    for line in recipe.read_text().splitlines():
        found = re.search(r"python \S+\.py --config_path \S+", line) if line.startswith("#") else None
        if found and found.group(0).endswith(recipe.name):
            return found.group(0)
    return None


def config_from_dict(cls: type[T], data: dict, source: str = "<dict>") -> T:
    builder = _Builder(source)
    cfg = builder.build(cls, data, "")
    if builder.problems:
        raise UserError(f"invalid recipe ({len(builder.problems)} problem(s)):\n  " + "\n  ".join(builder.problems))
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key.sub=value (e.g. optim.lr=3e-4).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UserError(f"override {text!r}: {part!r} is not a mapping in the recipe.")
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe {str(path)!r} is a directory; pass --config_path pointing at a YAML file in it "
                        f"(e.g. {_example_yaml(path)}).")
    if not path.is_file():
        raise UserError(f"recipe {str(path)!r} does not exist; pass --config_path pointing at a YAML file under configs/.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"recipe {str(path)!r} is not valid YAML{where}: {getattr(err, 'problem', err)}.") from None
    except UnicodeDecodeError:
        raise UserError(f"recipe {str(path)!r} is not UTF-8 text.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {str(path)!r} must be a mapping of keys at the top, got {type(data).__name__}.")
    return data


def _example_yaml(folder: Path) -> str:
    found = sorted(folder.rglob("*.yaml"))
    return str(found[0]) if found else str(folder / "recipe.yaml")


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML recipe (or start empty when path is None), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return config_from_dict(cls, data, source=str(path) if path else "<command line>")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=False))


def flags_to_overrides(cls: type, argv: Sequence[str]) -> list[str]:
    """Turn ``--key value`` / ``--key=value`` for a recipe key of ``cls`` into the override
    ``key=value``. Hyphens mean underscores (``--max-num-seqs 8``), nested keys work
    (``--engine.block_size 8``), and a bare ``--flag`` of a bool key means true. Other
    arguments pass through unchanged."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key.split(".")[0] in names:
            if not eq:
                bare = i + 1 >= len(argv) or argv[i + 1].startswith("--")
                if bare and hints.get(key) is bool:
                    value = "true"
                elif bare:
                    raise UserError(f"--{key} needs a value (e.g. --{key} VALUE)")
                else:
                    value, i = argv[i + 1], i + 1
            out.append(f"{key}={value}")
        else:
            out.append(arg)
        i += 1
    return out


def _flag_help(cls: type) -> dict[str, str]:
    """--help text per top-level key: the field's ``help`` metadata, else its type and default."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help") or _type_name(hints[f.name])
        out[f.name] = text if default in (None, "") else f"{text} (default {default})"
    return out


def parse_args(cls: type[T], description: str = "", argv: Optional[Sequence[str]] = None, add_args=None,
               flags: bool = False) -> tuple[T, argparse.Namespace]:
    """The command line every stage script shares.

    ``--config_path recipe.yaml`` plus overrides, either ``--set optim.lr=3e-4`` (repeatable)
    or bare ``optim.lr=3e-4`` words. ``add_args(parser)`` may add script-specific flags.
    ``flags=True``: every recipe key is also a flag (``--port 9000``, see ``flags_to_overrides``),
    for commands whose recipes are short enough to be typed (eval, serving).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config_path", help="YAML recipe")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    if add_args is not None:
        add_args(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    if flags:
        for key, text in _flag_help(cls).items():  # for --help only: the flags are rewritten before parsing
            parser.add_argument(f"--{key}", help=text)
        argv = flags_to_overrides(cls, argv)
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if "=" not in r or r.startswith("-")]
    if unknown:
        hint = "--key value, " if flags else ""
        raise UserError(f"unknown command-line argument(s) {unknown}; overrides look like {hint}key.sub=value "
                        "or --set key.sub=value.")
    cfg = load_config(cls, args.config_path, list(args.sets) + list(rest))
    return cfg, args
