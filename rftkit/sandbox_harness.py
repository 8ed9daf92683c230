"""Assert tests whose verdict the program under test cannot write or fake.

    check = compile_check("assert add(2, 3) == 5")         # rftkit.sandbox.run_python(code, check=...) uses it

Two reward hacks beat the old harness (program + test + "print a marker" in one file, pass = exit 0 with the
marker last on stdout): print the marker and exit 0 before the test runs; or return an object whose __eq__ is
always True. Here:
  - The verdict is decided by the sandbox's PID 1 (rftkit/sandbox_supervisor.py), a process the program can
    neither signal nor trace, from records the harness sends on a pipe; stdout and the exit status alone pass
    nothing. A test passes when the harness exited 0 after the test's last line, every `assert` in it ran,
    and every record meets its assert.
  - `assert EXPR op LITERAL` (op any comparison, LITERAL anything ast.literal_eval takes: the usual
    `assert f(x) == 7`) is rewritten so that the program's process evaluates only EXPR: the literal is replaced
    by the assert's index and stays with PID 1, which compares the value it receives. The program never sees
    the expected value, so even a program that knows this protocol and writes records itself can only pass by
    sending the right answer.
  - Every value that crosses is encoded by exact type (None, bool, int, float, complex, str, bytes, and lists,
    tuples, sets, frozensets and dicts of them; subclasses and other objects fail the test) and compared as a
    builtin value, so no program code (__eq__, __bool__, __hash__, ...) runs in the comparison.
  - Any other assert (`assert f(x)`, `assert abs(f(x) - y) < 1e-6`, `assert f(x) == g(y)`) is evaluated in the
    program's process, but every comparison, arithmetic and boolean operand in it must be a plain value first,
    and only the plain result is sent. Such asserts resist objects with custom dunders, not a program that
    forges records knowing this protocol (it could read the test): prefer literal expected values.
Statements of the test other than `assert` run unchanged; an assert's message is dropped.
"""
from __future__ import annotations

import ast

# The encoder runs in the program's process (below, in HARNESS) and here, for the expected literals; the
# supervisor's decode() reads it back. Captured builtins: a program that rebinds builtins.type changes nothing.
CODEC = r'''
def _rftkit_encode(v, depth=0, _type=type, _list=list, _tuple=tuple, _set=set, _frozenset=frozenset,
                   _dict=dict, _int=int, _float=float, _complex=complex, _str=str, _bytes=bytes,
                   _tags={list: "l", tuple: "t", set: "S", frozenset: "F"}):
    if v is None or v is True or v is False:
        return v
    if depth > 60:
        raise ValueError("value nested more than 60 deep")
    t = _type(v)
    if t is _int:
        return ["i", _int.__repr__(v)]
    if t is _float:
        return ["f", _float.hex(v)]
    if t is _complex:
        return ["c", _float.hex(_complex.__getattribute__(v, "real")), _float.hex(_complex.__getattribute__(v, "imag"))]
    if t is _str:
        return ["s", v]
    if t is _bytes:
        return ["b", _bytes.hex(v)]
    if t is _list or t is _tuple or t is _set or t is _frozenset:
        return [_tags[t], [_rftkit_encode(x, depth + 1) for x in v]]
    if t is _dict:
        return ["d", [[_rftkit_encode(k, depth + 1), _rftkit_encode(x, depth + 1)] for k, x in _dict.items(v)]]
    raise TypeError("only None, bool, int, float, complex, str, bytes and lists, tuples, sets and dicts of "
                    "them compare; got a " + _type.__repr__(t))
'''

# How every program starts: `python -E -S -c RUN_MAIN SITE_PACKAGES` in its work folder, main.py as __main__.
# -S, with the site-packages folders put on sys.path by hand: `site` runs every .pth file there at each start,
# a third of a run's CPU time (36 -> 8 ms); a program gets its packages, not their start-up hooks.
RUN_MAIN = r'''
import builtins as _builtins, sys as _sys
_sys.path += [_p for _p in _sys.argv[1].split(":") if _p]
_builtins.exit = _builtins.quit = _sys.exit                  # what site would have added
_sys.argv = ["main.py"]
_main = type(_sys)("__main__")
_main.__file__ = "main.py"
_sys.modules["__main__"] = _main
with open("main.py", "rb") as _f:
    _code = compile(_f.read(), "main.py", "exec")
exec(_code, _main.__dict__)
'''

# Assert tests: `python -E -S -c HARNESS SITE_PACKAGES FD TEST`: main.py as above, then the rewritten test in a
# copy of its globals, one JSON line per assert, then "end", written to FD.
HARNESS = CODEC + r'''
import json as _json, os as _os, sys as _sys
_fd, _test = int(_sys.argv[2]), _sys.argv[3]
_dumps, _write, _all, _enumerate = _json.dumps, _os.write, all, enumerate


def _send(line):
    data = (line + "\n").encode()
    while data:
        data = data[_write(_fd, data):]


def _rftkit_plain(v):
    _rftkit_encode(v)
    return v


_OPS = {"Eq": lambda a, b: a == b, "NotEq": lambda a, b: a != b, "Lt": lambda a, b: a < b,
        "LtE": lambda a, b: a <= b, "Gt": lambda a, b: a > b, "GtE": lambda a, b: a >= b,
        "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b, "Is": lambda a, b: a is b,
        "IsNot": lambda a, b: a is not b}


def _rftkit_compare(ops, *values):
    for v in values:
        _rftkit_encode(v)
    return _all(_OPS[op](values[i], values[i + 1]) for i, op in _enumerate(ops))


def _rftkit_check(k, v):
    _send(_dumps([k, _rftkit_encode(v)]))
''' + RUN_MAIN + r'''
_g = dict(_main.__dict__)
_g.update(_rftkit_check=_rftkit_check, _rftkit_plain=_rftkit_plain, _rftkit_compare=_rftkit_compare)
exec(compile(_test, "<test>", "exec"), _g)
_send('"end"')
'''

_codec: dict = {}
exec(CODEC, _codec)
encode = _codec["_rftkit_encode"]


class _Plain(ast.NodeTransformer):
    """Inside an assert: every comparison becomes _rftkit_compare (plain operands), and the operands of
    arithmetic, unary and boolean operators are passed through _rftkit_plain."""

    def visit_Compare(self, node):
        self.generic_visit(node)
        ops = ast.List([ast.Constant(type(op).__name__) for op in node.ops], ast.Load())
        return ast.Call(ast.Name("_rftkit_compare", ast.Load()), [ops, node.left, *node.comparators], [])

    def visit_BinOp(self, node):
        self.generic_visit(node)
        node.left, node.right = _plain(node.left), _plain(node.right)
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        node.operand = _plain(node.operand)
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        node.values = [_plain(v) for v in node.values]
        return node

    def visit_Lambda(self, node):                    # a lambda's body runs later, on the program's terms
        return node


def _plain(expr: ast.expr) -> ast.expr:
    return ast.Call(ast.Name("_rftkit_plain", ast.Load()), [expr], [])


def _call(name: str, *args: ast.expr) -> ast.stmt:
    return ast.Expr(ast.Call(ast.Name(name, ast.Load()), list(args), []))


_NOT_LITERAL = object()
MAX_TEST_BYTES = 100_000                            # Linux takes at most 128 KiB per command-line argument


def _literal(node: ast.expr):
    try:
        value = ast.literal_eval(node)
        encode(value)
        return value
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_LITERAL


class _Asserts(ast.NodeTransformer):
    def __init__(self):
        self.sites: list = []                         # [op, encoded expected] or ["truth", None]

    def visit_Assert(self, node):
        k = ast.Constant(len(self.sites))
        t = node.test
        if isinstance(t, ast.Compare) and len(t.ops) == 1:
            want = _literal(t.comparators[0])
            if want is not _NOT_LITERAL:
                self.sites.append([type(t.ops[0]).__name__, encode(want)])
                return ast.copy_location(_call("_rftkit_check", k, _Plain().visit(t.left)), node)
        self.sites.append(["truth", None])
        return ast.copy_location(_call("_rftkit_check", k, _plain(_Plain().visit(t))), node)


def compile_check(test: str) -> dict:
    """The rewritten test (its expected literals removed) and its assert sites, for run_python(check=...).
    Raises ValueError naming the test when it is not Python."""
    if not isinstance(test, str):
        raise ValueError(f"an assert test is a string of Python, got {test!r}")
    try:
        tree = ast.parse(test)
    except SyntaxError as e:
        raise ValueError(f"assert test {test!r} is not valid Python: {e.msg} (line {e.lineno})") from None
    rewriter = _Asserts()
    source = ast.unparse(ast.fix_missing_locations(rewriter.visit(tree)))
    if len(source.encode()) > MAX_TEST_BYTES:
        raise ValueError(f"assert test of {len(source.encode())} bytes: at most {MAX_TEST_BYTES} (it is an argument "
                         f"of the program's command line)")
    return {"source": source, "sites": rewriter.sites, "harness": HARNESS}
