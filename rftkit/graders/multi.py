"""`multi` graders' `calculate_output`: an arithmetic formula over the sub-graders' scores, read with `ast` and
evaluated by walking the tree (never eval).

    f = Formula("0.5 * function_name + 0.5 * arguments", names={"function_name", "arguments"})
    f({"function_name": 1.0, "arguments": 0.8})                       # 0.9

What OpenAI's formula allows: numbers, the sub-graders' names (the keys of `graders`), + - * / and ^ (power),
parentheses, and the functions min, max, abs, floor, ceil, exp, sqrt, log. `**` is read as ^ too. A name that
is not a sub-grader, any other function, attribute, subscript or operator is refused when the grader loads,
with the formula and what it may use; a division by zero or a non-finite result is an error on that sample.
"""
from __future__ import annotations

import ast
import math
import operator

FUNCTIONS = {"min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
             "sqrt": math.sqrt, "log": math.log}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class FormulaError(ValueError):
    pass


class Formula:
    def __init__(self, text: str, names: set[str]):
        if not isinstance(text, str) or not text.strip():
            raise FormulaError(f"calculate_output must be a non-empty formula, got {text!r}")
        self.text, self.names = text, set(names)
        try:
            self.tree = ast.parse(text.replace("^", "**").strip(), mode="eval").body
        except SyntaxError as e:
            raise FormulaError(f"calculate_output {text!r} is not a formula: {e.msg}") from None
        self.used: set[str] = set()
        self._check(self.tree)

    def _refuse(self, what: str):
        raise FormulaError(f"calculate_output {self.text!r}: {what}; a formula may use numbers, the graders "
                           f"{sorted(self.names)}, + - * / ^, parentheses and {', '.join(FUNCTIONS)}")

    def _check(self, node) -> None:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                self._refuse(f"{node.value!r} is not a number")
        elif isinstance(node, ast.Name):
            if node.id not in self.names:
                self._refuse(f"{node.id!r} is not one of its graders")
            self.used.add(node.id)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                self._refuse(f"operator {type(node.op).__name__} is not allowed")
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) not in _UNARY:
                self._refuse(f"operator {type(node.op).__name__} is not allowed")
            self._check(node.operand)
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
                self._refuse(f"{ast.unparse(node.func)}(...) is not one of its functions")
            if not node.args:
                self._refuse(f"{node.func.id}() needs an argument")
            for a in node.args:
                self._check(a)
        else:
            self._refuse(f"{ast.unparse(node)!r} ({type(node).__name__}) is not allowed")

    def __call__(self, scores: dict[str, float]) -> float:
        def ev(node):
            if isinstance(node, ast.Constant):
                return float(node.value)          # float: 10 ^ 10 ^ 10 overflows, never hangs
            if isinstance(node, ast.Name):
                return scores[node.id]
            if isinstance(node, ast.BinOp):
                return _BINARY[type(node.op)](ev(node.left), ev(node.right))
            if isinstance(node, ast.UnaryOp):
                return _UNARY[type(node.op)](ev(node.operand))
            return FUNCTIONS[node.func.id](*[ev(a) for a in node.args])
        try:
            value = ev(self.tree)
        except (ZeroDivisionError, ValueError, OverflowError) as e:
            raise FormulaError(f"calculate_output {self.text!r} failed on {scores}: {type(e).__name__}: {e}") from None
        if isinstance(value, complex) or not math.isfinite(value):
            raise FormulaError(f"calculate_output {self.text!r} gave {value!r} on {scores}")
        return float(value)
