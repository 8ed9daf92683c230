"""Import every third-party module that rftkit imports anywhere (function bodies too), in the current
environment: run in a fresh venv after the README's quick-start install, it fails when a README command would
meet a missing package at run time. OPTIONAL lists the few that stay outside the core install; each is checked
by its command before any work starts, with the `pip install` to run.

    python scripts/check_deps.py
"""
import ast
import importlib
import pathlib
import sys

OPTIONAL = {
    "tensorboard": "--report-to tensorboard: checked before the run (pip install tensorboard)",
    "trackio": "--report-to trackio: checked before the run (pip install trackio)",
    "wandb": "--report-to wandb: checked before the run (pip install wandb)",
    "mlflow": "--report-to mlflow: checked before the run (pip install mlflow)",
}

root = pathlib.Path(__file__).resolve().parent.parent / "rftkit"
where: dict[str, str] = {}
for f in sorted(root.rglob("*.py")):
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for n in names:
            top = n.split(".")[0]
            if top not in sys.stdlib_module_names and top != "rftkit":
                where.setdefault(top, f"{f.relative_to(root.parent)}:{node.lineno}")
missing = []
for top, at in sorted(where.items()):
    if top in OPTIONAL:
        print(f"  optional  {top:14s} {OPTIONAL[top]}")
        continue
    try:
        importlib.import_module(top)
        print(f"  ok        {top:14s} (first imported at {at})")
    except Exception as e:  # an ImportError, or a broken install that fails on import
        missing.append(top)
        print(f"  MISSING   {top:14s} imported at {at}: {type(e).__name__}: {e}")
if missing:
    sys.exit(f"{len(missing)} module(s) rftkit imports are not provided by the core install: {', '.join(missing)} "
             f"(add them to pyproject.toml's dependencies, or to OPTIONAL here with a check before work starts)")
