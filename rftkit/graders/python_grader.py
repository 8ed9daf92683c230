"""`python` graders: the grader file's `grade(sample, item) -> float`, run in rftkit.sandbox.

    scores = run_python_grader(source, [(sample_ns, row), ...])   # one float or Exception per pair

The source is the user's (trusted), but what it reads is the model's completion, and a grader written for
OpenAI expects a box of its own (no network, bounded memory and time), so it runs as OpenAI runs it: in a
sandboxed process (user/PID/mount/net namespaces, limits: rftkit/sandbox.py), here with 2 GB of address space
and a wall-clock limit per batch. A whole batch runs in one process (one interpreter start for all
completions); a `grade` that raises, or returns a non-number, is an error on that completion alone. When the
run as a whole fails (a limit, a crash), each completion is run again on its own, so the error names the one
that failed.

The packages the sandboxed Python sees are this environment's (rapidfuzz, numpy, jsonschema, ... from the
core install), read-only.
"""
from __future__ import annotations

import ast
import json
import secrets

HARNESS = '''
import json as _json, math as _math
with open("rftkit_grader_input.json") as _f:
    _pairs = _json.load(_f)
_out = []
for _sample, _item in _pairs:
    try:
        _v = grade(_sample, _item)
        if isinstance(_v, bool) or not isinstance(_v, (int, float)) or not _math.isfinite(_v):
            _out.append({"error": "grade returned %r (must be a finite int or float)" % (_v,)})
        else:
            _out.append({"score": float(_v)})
    except BaseException as _e:
        _out.append({"error": "grade raised %s: %s" % (type(_e).__name__, _e)})
print(MARKER + _json.dumps(_out))
'''


class PythonGraderError(ValueError):
    pass


def check_source(source) -> None:
    """Raise unless `source` is Python that defines a top-level `grade` taking (sample, item)."""
    if not isinstance(source, str) or not source.strip():
        raise PythonGraderError(f"must be the grader's Python source, got {source!r}")
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise PythonGraderError(f"is not valid Python: line {e.lineno}: {e.msg}") from None
    fns = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "grade"]
    if not fns:
        defined = sorted(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
        raise PythonGraderError(f"defines no top-level function `grade(sample, item)` (it defines {defined})")
    args = fns[-1].args
    if len(args.posonlyargs) + len(args.args) < 2 and args.vararg is None:
        raise PythonGraderError("`grade` must take two arguments, (sample, item)")


def run_python_grader(source: str, pairs: list[tuple[dict, dict]], timeout_s: float = 120.0,
                      memory_mb: int = 2048) -> list:
    """[score or PythonGraderError per (sample, item) pair]."""
    from rftkit.sandbox import run_python
    if not pairs:
        return []
    marker = f"RFTKIT-GRADE-{secrets.token_hex(8)}:"
    code = source + "\n\nMARKER = " + repr(marker) + "\n" + HARNESS
    try:
        payload = json.dumps(pairs, default=str)
    except (TypeError, ValueError) as e:
        raise PythonGraderError(f"samples are not JSON: {e}") from None
    r = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, files={"rftkit_grader_input.json": payload})
    lines = [l for l in r.stdout.splitlines() if l.startswith(marker)]
    if r.ok and lines:
        results = json.loads(lines[-1][len(marker):])
        return [PythonGraderError(x["error"]) if "error" in x else x["score"] for x in results]
    if len(pairs) > 1:                                  # find the completion that broke the run
        return [run_python_grader(source, [p], timeout_s, memory_mb)[0] for p in pairs]
    why = r.killed_reason or f"exit status {r.returncode}"
    tail = r.stderr.strip().splitlines()[-3:]
    return [PythonGraderError(f"python grader run failed ({why}): {' | '.join(tail)}")]
