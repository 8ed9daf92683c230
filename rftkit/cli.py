"""The `rft` command. Each subcommand is one config dataclass plus one run function; flags are generated
from the dataclass, so the Python API and the CLI take the same object.

    rft generate --prompt "What is 2 + 2?" --max-tokens 16
    rft train --config recipes/arithmetic.yaml --steps 20     # a recipe file, flags override it

A field's help text is the `# comment` after it in the dataclass source (no metadata boilerplate).
Only the chosen subcommand's module is imported, so `rft --help` and `rft generate` stay quick.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import types
import typing

from rftkit.recipe import read_recipe

# name -> (module, config class, run function, one-line description)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": ("rftkit.demo", "DemoConfig", "run_demo", "RFT on 2-digit additions: evaluate, train, evaluate again"),
    "generate": ("rftkit.generate", "GenerateConfig", "run_generate", "complete one prompt (chat template applied)"),
    "chat": ("rftkit.generate", "ChatConfig", "run_chat", "interactive multi-turn chat, streamed"),
    "sft": ("rftkit.sft", "SFTConfig", "run_sft", "supervised fine-tuning on JSONL"),
    "train": ("rftkit.grpo", "GRPOConfig", "run_grpo", "reinforcement fine-tuning (GRPO family) on a task"),
    "eval": ("rftkit.evaluate", "EvalConfig", "run_eval", "accuracy / pass@k on a task split"),
    "grade": ("rftkit.graders.grade", "GradeConfig", "run_grade", "try a grader (OpenAI grader JSON) on samples"),
    "serve": ("rftkit.serve.app", "ServeConfig", "run_serve", "OpenAI-compatible server with many adapters"),
    "compress": ("rftkit.compress.report", "CompressConfig", "run_compress", "quantize, prune, factorize, distill"),
    "export": ("rftkit.compress.export", "ExportConfig", "run_export", "merge an adapter and write an HF folder or GGUF"),
    "pretrain": ("rftkit.pretrain", "PretrainConfig", "run_pretrain", "train a small dense or MoE model from scratch"),
    "upcycle": ("rftkit.upcycle", "UpcycleConfig", "run_upcycle", "turn a dense model into an MoE"),
}


def field_help(cls) -> dict[str, str]:
    """Map field name -> the trailing `# comment` on its line in the class source, joined with the comment-only
    lines that continue it."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        name = None
        for line in source.splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
            more = re.match(r"\s+#\s*(.+)$", line)
            if m:
                name = m.group(1)
                helps[name] = m.group(2).strip()
            elif more and name is not None:
                helps[name] += " " + more.group(1).strip()
            else:
                name = None
    return helps


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_list(item_type):
    def parse(text: str):
        return [item_type(x) for x in text.split(",") if x.strip()]
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, "")
        text = f"{text} (default: {default!r})" if text else f"default: {default!r}"
        text = text.replace("%", "%%")                     # argparse formats help with %
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            item = (typing.get_args(tp) or (str,))[0]
            kwargs.update(type=_parse_list(item), metavar="A,B,...")
        elif origin is typing.Literal:
            kwargs.update(choices=list(typing.get_args(tp)))
        elif tp in (int, float, str):
            kwargs.update(type=tp, metavar=tp.__name__.upper())
        elif origin is dict or tp is dict:
            continue  # presets: Python API only
        else:
            kwargs.update(type=str)
        parser.add_argument(flag, **kwargs)


def config_from_args(cls, ns: argparse.Namespace):
    """The config: the --config file's values (if any), overridden by the flags given."""
    given = {k: v for k, v in vars(ns).items() if k in {f.name for f in dataclasses.fields(cls)}}
    from_file = read_recipe(ns._config, cls) if vars(ns).get("_config") else {}
    return cls(**{**from_file, **given})


def version() -> str:
    """The installed package's version (the source tree's when run from a checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("rftkit")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, type | None]:
    parser = argparse.ArgumentParser(prog="rft", description="rftkit: reinforcement fine-tuning of open LLMs.")
    parser.add_argument("--version", action="version", version=f"rftkit {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cls = None
    for name, (module, cls_name, _, desc) in COMMANDS.items():
        p = sub.add_parser(name, help=desc, description=desc)
        if name == command:
            cls = getattr(importlib.import_module(module), cls_name)
            p.add_argument("--config", dest="_config", metavar="FILE", default=None,
                           help="recipe file (.yaml or .json; a run's config.json replays it) whose keys are "
                                "this command's options; flags given beside it override it (docs/recipes.md)")
            add_dataclass_args(p, cls)
    return parser, cls


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        parser, cls = build_parser(command)
    except ModuleNotFoundError as e:
        print(f"rft {command}: not available in this install ({e})", file=sys.stderr)
        return 2
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    module, _, run_name, _ = COMMANDS[ns.command]
    import rftkit.compress.folder  # noqa: F401  registers the compressed folder format with rftkit.loading
    import rftkit.graders  # noqa: F401  registers grader:, judge-api:, judge-group: and http(s) reward specs
    try:
        cfg = config_from_args(cls, ns)
        result = getattr(importlib.import_module(module), run_name)(cfg)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"rft {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rft {ns.command}: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
