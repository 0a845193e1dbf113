"""Static analysis of the deployed cell: which globals it reads and which it binds."""

from __future__ import annotations

import ast
import builtins
import symtable
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from IPython.core.inputtransformer2 import TransformerManager

from cellnode.exceptions import InvalidArgument

SYNTAX_ERROR_MSG = "The deployed cell has a syntax error at line {line}: {msg}."
# IPython injects these into every namespace, so reading them needs no input.
IPYTHON_NAMES = frozenset({"get_ipython", "display"})
# Calls that read or write the namespace in ways a static analysis cannot follow.
OPAQUE_CALLS = frozenset({"exec", "eval", "globals"})
OPAQUE_MODULE_CALLS = frozenset({"vars", "locals"})
_BUILTINS = frozenset(dir(builtins))
# Magics that run code in the user namespace, and the position of that code among the magic call's arguments.
CODE_MAGICS = {("run_line_magic", "time"): 1, ("run_cell_magic", "time"): 2, ("run_cell_magic", "capture"): 2}
# IPython does not annotate its constructor; we call it through an explicitly untyped name.
_TRANSFORMER_MANAGER: Any = TransformerManager


@dataclass(frozen=True)
class CellAnalysis:
    """What a cell needs from its namespace and what it binds there."""

    reads: frozenset[str]
    assigns: frozenset[str]
    is_complete: bool
    uses_ipython: bool


def transform_cell(source: str) -> str:
    """Turn IPython syntax (magics, `!shell`, `x?`) into plain Python."""
    transformed: str = _TRANSFORMER_MANAGER().transform_cell(source)
    return transformed


def analyze_cell(source: str) -> CellAnalysis:
    """Analyze a cell (IPython syntax allowed): its global reads, its module-level bindings, and trust flags."""
    code = transform_cell(source)
    try:
        tree = ast.parse(code, "<cell>", "exec")
        uses_ipython = any(isinstance(n, ast.Name) and n.id == "get_ipython" for n in ast.walk(tree))
        tree = _inline_code_magics(tree)
        table = symtable.symtable(ast.unparse(tree), "<cell>", "exec")
    except SyntaxError as exc:
        message = SYNTAX_ERROR_MSG.format(line=exc.lineno, msg=exc.msg)
        raise InvalidArgument(message) from exc
    walker = _ModuleWalker(lazy_annotations=_has_lazy_annotations(tree))
    walker.walk_body(tree.body)
    # A function may bind a global through `global` before the module reads it; we cannot tell, so no read.
    nested_assigns = _nested_global_assigns(table)
    assigns = walker.assigns | nested_assigns
    nested_reads = {name for name in _nested_global_reads(table) if name not in assigns and _is_external(name)}
    opaque_calls = {name for name in _called_names(tree) if name in OPAQUE_CALLS}
    return CellAnalysis(
        reads=frozenset((walker.reads - nested_assigns) | nested_reads),
        assigns=frozenset(assigns),
        is_complete=walker.is_complete and not opaque_calls,
        uses_ipython=uses_ipython,
    )


def _inline_code_magics(tree: ast.Module) -> ast.Module:
    """Put the code that `%time`, `%%time` and `%%capture` run in place of the magic call, to analyze it too."""
    body: list[ast.stmt] = []
    for statement in tree.body:
        found = _magic_code(statement)
        if found is None:
            body.append(statement)
            continue
        code, binds = found
        body.extend(_inline_code_magics(ast.parse(transform_cell(code), "<cell>", "exec")).body)
        body.extend(ast.Assign(targets=[ast.Name(name, ast.Store())], value=ast.Constant(None)) for name in binds)
    tree.body = body
    return ast.fix_missing_locations(tree)


def _magic_code(statement: ast.stmt) -> tuple[str, list[str]] | None:
    """For `get_ipython().run_*_magic(NAME, LINE[, CELL])` of a code-running magic: its code and what it binds."""
    if not (isinstance(statement, ast.Expr) and isinstance(call := statement.value, ast.Call)):
        return None
    method = call.func
    if not (
        isinstance(method, ast.Attribute)
        and isinstance(method.value, ast.Call)
        and isinstance(method.value.func, ast.Name)
        and method.value.func.id == "get_ipython"
        and all(isinstance(arg, ast.Constant) and isinstance(arg.value, str) for arg in call.args)
    ):
        return None
    args = [str(arg.value) for arg in call.args if isinstance(arg, ast.Constant)]
    index = CODE_MAGICS.get((method.attr, args[0] if args else ""))
    if index is None or len(args) <= index:
        return None
    line_words = args[1].split()
    binds = line_words[:1] if args[0] == "capture" and line_words and not line_words[0].startswith("-") else []
    return args[index], binds


def _has_lazy_annotations(tree: ast.Module) -> bool:
    return any(
        isinstance(stmt, ast.ImportFrom)
        and stmt.module == "__future__"
        and any(alias.name == "annotations" for alias in stmt.names)
        for stmt in tree.body
    )


def _is_external(name: str) -> bool:
    return name not in _BUILTINS and name not in IPYTHON_NAMES


def _descendant_tables(table: symtable.SymbolTable) -> Iterator[symtable.SymbolTable]:
    for child in table.get_children():
        yield child
        yield from _descendant_tables(child)


def _nested_global_reads(table: symtable.SymbolTable) -> set[str]:
    return {
        symbol.get_name()
        for child in _descendant_tables(table)
        for symbol in child.get_symbols()
        if symbol.is_global() and symbol.is_referenced()
    }


def _nested_global_assigns(table: symtable.SymbolTable) -> set[str]:
    return {
        symbol.get_name()
        for child in _descendant_tables(table)
        for symbol in child.get_symbols()
        if symbol.is_declared_global() and (symbol.is_assigned() or symbol.is_imported())
    }


def _called_names(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            yield node.func.id


class _ModuleWalker(ast.NodeVisitor):
    """Walks module-level code in execution order, keeping the names bound so far."""

    def __init__(self, *, lazy_annotations: bool) -> None:
        self.bound: set[str] = set()
        self.assigns: set[str] = set()
        self.reads: set[str] = set()
        self.is_complete = True
        self.lazy_annotations = lazy_annotations

    def walk_body(self, body: Iterable[ast.AST]) -> None:
        for node in body:
            self.visit(node)

    def bind(self, name: str) -> None:
        self.bound.add(name)
        self.assigns.add(name)

    def _walk_branches(self, branches: Iterable[Sequence[ast.AST]], start: set[str]) -> None:
        # A name bound in any branch counts as bound afterwards: we would rather miss a read than invent one.
        after = set(start)
        for branch in branches:
            self.bound = set(start)
            self.walk_body(branch)
            after |= self.bound
        self.bound = after

    def _walk_loop(self, loop: ast.For | ast.AsyncFor | ast.While) -> None:
        # A later iteration sees what an earlier one bound, so names bound in the loop are bound throughout it.
        probe = _ModuleWalker(lazy_annotations=self.lazy_annotations)
        probe.generic_visit(loop)
        self.bound |= probe.assigns
        self.assigns |= probe.assigns
        self.is_complete = self.is_complete and probe.is_complete
        self.generic_visit(loop)

    # Bindings and reads

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self.bind(node.id)
        elif isinstance(node.ctx, ast.Load) and node.id not in self.bound and _is_external(node.id):
            self.reads.add(node.id)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id in OPAQUE_MODULE_CALLS and not node.args:
            self.is_complete = False
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            self.visit(ast.Name(id=node.target.id, ctx=ast.Load()))
        self.visit(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        if not self.lazy_annotations:
            self.visit(node.annotation)
        if node.value is not None or not isinstance(node.target, ast.Name):
            self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.visit(node.target)

    def visit_Delete(self, node: ast.Delete) -> None:
        for target in node.targets:
            if not isinstance(target, ast.Name):
                self.generic_visit(target)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.bind(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name == "*":
                self.is_complete = False
            else:
                self.bind(alias.asname or alias.name)

    # Control flow

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        self._walk_branches([node.body, node.orelse], self.bound)

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self._walk_loop(node)

    def visit_AsyncFor(self, node: ast.AsyncFor) -> None:
        self.visit(node.iter)
        self._walk_loop(node)

    def visit_While(self, node: ast.While) -> None:
        self.visit(node.test)
        self._walk_loop(node)

    def visit_Try(self, node: ast.Try | ast.TryStar) -> None:
        self.walk_body(node.body)
        # A handler may run after any part of the body, so it starts from everything the body binds.
        handlers = [[handler] for handler in node.handlers]
        self._walk_branches([*handlers, node.orelse], self.bound)
        self.walk_body(node.finalbody)

    visit_TryStar = visit_Try

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name is not None:
            self.bind(node.name)
        self.walk_body(node.body)

    def visit_Match(self, node: ast.Match) -> None:
        self.visit(node.subject)
        start = set(self.bound)
        after = set(start)
        for case in node.cases:
            self.bound = set(start)
            self.visit(case)
            after |= self.bound
        self.bound = after

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        self.generic_visit(node)
        if node.name is not None:
            self.bind(node.name)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name is not None:
            self.bind(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        self.generic_visit(node)
        if node.rest is not None:
            self.bind(node.rest)

    # Nested scopes: only the parts evaluated in module scope; symtable covers their bodies.

    def _visit_arguments(self, args: ast.arguments) -> None:
        for default in [*args.defaults, *args.kw_defaults]:
            if default is not None:
                self.visit(default)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        self._visit_arguments(node.args)
        if not self.lazy_annotations:
            every = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg, node.args.kwarg]
            for annotation in [arg.annotation for arg in every if arg is not None] + [node.returns]:
                if annotation is not None:
                    self.visit(annotation)
        self.bind(node.name)

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_arguments(node.args)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(keyword.value for keyword in node.keywords)]:
            self.visit(expr)
        self.bind(node.name)

    def _visit_comprehension(self, node: ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp) -> None:
        self.visit(node.generators[0].iter)
        # An assignment expression inside a comprehension binds in the enclosing scope.
        for inner in ast.walk(node):
            if isinstance(inner, ast.NamedExpr) and isinstance(inner.target, ast.Name):
                self.bind(inner.target.id)

    visit_ListComp = _visit_comprehension
    visit_SetComp = _visit_comprehension
    visit_DictComp = _visit_comprehension
    visit_GeneratorExp = _visit_comprehension
