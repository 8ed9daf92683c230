"""The CLI generator and the import-weight rule (STYLE.md 13)."""
import dataclasses
import subprocess
import sys
from typing import Literal

import pytest

from rftkit.cli import add_dataclass_args, config_from_args, field_help, main


@dataclasses.dataclass
class _Cfg:
    prompt: str = "hi"                    # the text to complete
    max_tokens: int = 16                  # new tokens at most
    temperature: float = 0.0              # 0 = greedy
    stream: bool = True                   # print as it goes
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj"])  # modules
    loss: Literal["grpo", "dapo"] = "dapo"  # loss type
    adapter: str | None = None            # adapter folder
    budget: float = 0.0                   # seconds at most: the run ends at the budget
                                          # or at 50% of the steps, whichever comes first


def _parse(argv):
    import argparse
    p = argparse.ArgumentParser()
    add_dataclass_args(p, _Cfg)
    return config_from_args(_Cfg, p.parse_args(argv))


def test_flags_map_to_fields_with_types_and_defaults():
    assert _parse([]) == _Cfg()
    cfg = _parse(["--prompt", "x y", "--max-tokens", "3", "--temperature", "0.5", "--no-stream",
                  "--targets", "q_proj,v_proj", "--loss", "grpo", "--adapter", "a/b"])
    assert cfg == _Cfg("x y", 3, 0.5, False, ["q_proj", "v_proj"], "grpo", "a/b")
    assert field_help(_Cfg)["max_tokens"] == "new tokens at most"


def test_help_shows_multi_line_comments_whole(capsys):
    assert field_help(_Cfg)["budget"] == ("seconds at most: the run ends at the budget or at 50% of the steps, "
                                         "whichever comes first")
    assert field_help(_Cfg)["adapter"] == "adapter folder"          # a continuation never leaks to the next field
    with pytest.raises(SystemExit):
        _parse(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "or at 50% of the steps, whichever comes first (default: 0.0)" in out
    for command in ("train", "sft"):        # the real configs: every multi-line comment shows in full
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "(chosen on the validation split: docs/experiments.md)" in out or command == "sft"
        assert "whichever comes first (lr schedule: steps)" in out or command == "train"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("rftkit ")


def test_bad_flag_values_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        _parse(["--max-tokens", "lots"])
    assert "invalid int value: 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--loss", "ppo"])
    assert "invalid choice: 'ppo'" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "generate", "chat", "sft", "train", "eval", "serve", "compress", "export"):
        assert name in out


LIGHT_FORBIDDEN = ("fastapi", "uvicorn", "trl", "peft", "matplotlib", "transformers", "starlette")


def test_public_api_import_is_light():
    import pkgutil
    import rftkit
    mods = [m.name.removeprefix("rftkit.") for m in pkgutil.walk_packages(rftkit.__path__, "rftkit.")
            if m.name not in ("rftkit.serve.app", "rftkit.cli")]
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module('rftkit.' + m)\n"
            f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {LIGHT_FORBIDDEN!r})\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing rftkit modules {mods} pulled in: {out.stdout.strip()}"
