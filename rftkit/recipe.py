"""Recipe files: a YAML (or JSON) file whose keys are a command's config dataclass fields, so a run is one file.

    values = read_recipe("recipes/arithmetic.yaml", GRPOConfig)    # {field: value}, checked against the types
    cfg = GRPOConfig(**{**values, **flags})                        # flags override the file

Why our own ~100 lines over jsonargparse/tyro: both would change the CLI users already type (their list flags
take `--lora-targets q_proj v_proj` or JSON, not `--lora-targets q_proj,v_proj`; tyro renames bool flags and
groups help), while the dataclass is already the schema. A file is read with `yaml.safe_load` (never
`yaml.load`: a recipe must not construct Python objects), and every key and value is checked here, at the
boundary, with an error naming the key, the file and what is allowed. `config.json`, written by `rft train` and
`rft sft` into the run folder, is a recipe too: `rft train --config runs/x/config.json` replays the run.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path


def read_recipe(path: str | Path, cls) -> dict:
    """{field: value} from a .yaml/.yml/.json recipe, each value checked against `cls`'s field type."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())         # JSON is YAML: config.json reads the same way
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML/JSON: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must be a mapping of option: value, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")               # `lora-targets:` as the flag spells it works too
        if name not in fields:
            raise ValueError(f"config file {path}: unknown key {key!r} for {cls.__name__}; allowed keys: "
                             f"{', '.join(sorted(fields))}")
        values[name] = check_value(value, hints[name], f"config file {path}: key {key!r}")
    return values


def check_value(value, tp, where: str):
    """`value` as field type `tp` (lists also as "a,b" strings, ints as floats), or ValueError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        errors = []
        for a in rest:
            try:
                return check_value(value, a, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is none of {rest}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"{where}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        item = (typing.get_args(tp) or (str,))[0]
        if isinstance(value, str):                      # the flag's comma syntax: "q_proj,v_proj"
            value = [x.strip() for x in value.split(",") if x.strip()]
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list of {getattr(item, '__name__', item)}, got {value!r}")
        return [check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value                                        # a type the flags pass as text: taken as written
