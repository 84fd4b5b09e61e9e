"""Two rules of Triton's compiler that its interpreter does not enforce, checked on every kernel's source.

Triton's interpreter runs a kernel as Python, so these pass every interpreter test and go wrong only when compiled
for a GPU:

- a kernel that reads a plain module constant (``KW = 4``) does not compile ("Cannot access global variable KW from
  within @jit'ed function"): a name a kernel reads that is not its own (an argument or an assignment) must be
  imported (a module, another module's kernel or helper), a function of its module, a ``tl.constexpr(...)`` or a
  builtin;
- a loop carries a name only if the loop changes its value, so names that start as ONE tensor (``g2 = g1``) and pass
  it along inside the loop (``g3 = g2; g2 = g1; g1 = g``) are not all carried: the compiled kernel silently computes
  something else (grad u of conv_scan_triton.py's backward did). Each loop-carried name starts as its own tensor,
  in ``tl.static_range`` loops too (unrolled, they carry nothing, but one may become a runtime loop, as the walk's did).

The check reads the files (no triton needed), so it runs everywhere, CI included."""

import ast
import builtins
from pathlib import Path

import pytest

import lightning_mamba.models.kernels as kernels_pkg

KERNEL_DIR = Path(kernels_pkg.__file__).parent


def _is_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator  # @triton.jit or @triton.jit(...)
    return isinstance(target, ast.Attribute) and target.attr == "jit"


def _is_constexpr(value: ast.expr) -> bool:
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "constexpr"


def module_names(tree: ast.Module) -> dict[str, set[str]]:
    """What each module-level name is bound to ("import", "function", "constexpr", "value"), through if/try blocks
    (the kernels live under ``if triton is not None:``) but not into functions or classes."""
    kinds: dict[str, set[str]] = {}

    def bind(name: str, kind: str) -> None:
        kinds.setdefault(name, set()).add(kind)

    def visit(statements) -> None:
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    bind((alias.asname or alias.name).split(".")[0], "import")
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                bind(node.name, "function")
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                kind = "constexpr" if node.value is not None and _is_constexpr(node.value) else "value"
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            bind(name.id, kind)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
    visit(tree.body)
    return kinds


def _own_names(fn: ast.FunctionDef) -> set[str]:
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def bad_globals(fn: ast.FunctionDef, kinds: dict[str, set[str]]) -> list[str]:
    """Names the kernel ``fn`` reads from its module (``kinds``: module_names) that Triton's compiler rejects: plain
    values (a name also imported somewhere, as ``triton`` is under try/except, passes) and undefined names."""
    own = _own_names(fn)
    bad = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in own:
            bound = kinds.get(node.id)
            if bound == {"value"} or (bound is None and not hasattr(builtins, node.id)):
                bad.add(node.id)
    return sorted(bad)


def aliased_loop_names(fn: ast.FunctionDef) -> list[str]:
    """``x = y`` before a loop of ``fn`` where the loop assigns both x and y: names that may start as one tensor."""
    bad = set()
    for loop in (node for node in ast.walk(fn) if isinstance(node, (ast.For, ast.While))):
        inside = {id(node) for node in ast.walk(loop)}
        stored = {node.id for node in ast.walk(loop) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
        for node in ast.walk(fn):
            if (isinstance(node, ast.Assign) and id(node) not in inside and node.lineno < loop.lineno
                    and isinstance(node.value, ast.Name) and node.value.id in stored):
                bad.update(f"{t.id} = {node.value.id}" for t in node.targets
                           if isinstance(t, ast.Name) and t.id in stored)
    return sorted(bad)


def jit_functions(tree: ast.Module) -> list[ast.FunctionDef]:
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list)]


def _kernels() -> list[tuple[str, ast.FunctionDef, dict[str, set[str]]]]:
    found = []
    for path in sorted(KERNEL_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        kinds = module_names(tree)
        found += [(f"{path.stem}.{fn.name}", fn, kinds) for fn in jit_functions(tree)]
    return found


KERNELS = _kernels()
IDS = [name for name, _, _ in KERNELS]


def test_the_kernels_are_found():
    names = set(IDS)
    assert len(KERNELS) >= 40 and "conv_scan_triton._scan_bwd_kernel" in names, sorted(names)


@pytest.mark.parametrize("name,fn,kinds", KERNELS, ids=IDS)
def test_kernel_reads_only_compilable_globals(name, fn, kinds):
    assert bad_globals(fn, kinds) == [], f"{name} reads plain module globals; pass them as tl.constexpr arguments"


@pytest.mark.parametrize("name,fn,kinds", KERNELS, ids=IDS)
def test_loop_carried_names_start_as_their_own_tensors(name, fn, kinds):
    assert aliased_loop_names(fn) == [], f"{name}: give each loop-carried name its own initial tensor"


SOURCE = '''
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
WIDTH = 4
HALF = tl.constexpr(2)
ON = False

if triton is not None:
    @triton.jit
    def _helper(x):
        return x

    @triton.jit
    def kernel(x_ptr, N: tl.constexpr):
        y = tl.arange(0, N) * HALF
        tl.store(x_ptr + y, _helper(WIDTH * 1.0) + len([]) + undefined + ON)
        g1 = tl.zeros((N,), dtype=tl.float32)
        g2 = g1
        acc = tl.zeros((N,), dtype=tl.float32)
        fixed = acc
        for i in range(N):
            acc += g2 + fixed
            g2 = g1
            g1 = tl.load(x_ptr + i)
'''


def test_plain_globals_and_names_passed_along_a_loop_from_one_tensor_are_caught():
    tree = ast.parse(SOURCE)
    kernels = {fn.name: fn for fn in jit_functions(tree)}
    assert set(kernels) == {"_helper", "kernel"}
    assert bad_globals(kernels["kernel"], module_names(tree)) == ["ON", "WIDTH", "undefined"]
    assert aliased_loop_names(kernels["kernel"]) == ["g2 = g1"]  # fixed is never reassigned: not carried
