"""Two rules of Triton's compiler that its interpreter does not enforce, checked on every kernel's source.

Triton's interpreter runs a kernel as Python, so these pass every interpreter test and go wrong only when compiled
for a GPU:

- a kernel that reads a plain module constant (``KW = 4``) does not compile ("Cannot access global variable KW from
  within @jit'ed function"): a name a kernel reads that is not its own (an argument or an assignment) must be a
  module, another kernel or helper, a ``tl.constexpr`` or a builtin;
- a loop carries a name only if the loop changes its value, so names that start as ONE tensor (``g2 = g1``) and pass
  it along inside the loop (``g3 = g2; g2 = g1; g1 = g``) are not all carried: the compiled kernel silently computes
  something else (grad u of conv_scan_triton.py's backward did). Each loop-carried name starts as its own tensor."""

import ast
import builtins
import importlib
import inspect
import pkgutil
import types

import pytest

import lightning_mamba.models.kernels as kernels_pkg

triton = pytest.importorskip("triton", reason="triton is not installed")


def _jit_functions() -> list[tuple[str, object]]:
    found = []
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"{kernels_pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if _is_jit(obj) and obj.fn.__module__ == module.__name__:
                found.append((f"{info.name}.{name}", obj))
    return found


def _is_jit(obj) -> bool:
    # JITFunction when compiled; the interpreter's wrapper under TRITON_INTERPRET=1; both hold the Python function
    return isinstance(getattr(obj, "fn", None), types.FunctionType) and "triton" in type(obj).__module__


def _own_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _allowed(value) -> bool:
    import triton.language as tl

    return isinstance(value, (types.ModuleType, tl.constexpr)) or _is_jit(value)


def bad_globals(fn, source: str | None = None) -> list[str]:
    """Names the kernel function ``fn`` (its ``source``, default read from its file) reads from its module that
    Triton's compiler rejects."""
    tree = ast.parse(inspect.cleandoc("\n" + (source or inspect.getsource(fn))))
    own = _own_names(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in own:
            if node.id in fn.__globals__:
                if not _allowed(fn.__globals__[node.id]):
                    bad.append(node.id)
            elif not hasattr(builtins, node.id):
                bad.append(node.id)  # undefined
    return sorted(set(bad))


def aliased_loop_names(fn, source: str | None = None) -> list[str]:
    """``x = y`` before a loop of ``fn`` where the loop assigns both x and y: names that may start as one tensor."""
    tree = ast.parse(inspect.cleandoc("\n" + (source or inspect.getsource(fn))))
    loops = [node for node in ast.walk(tree) if isinstance(node, (ast.For, ast.While))]
    bad = set()
    for loop in loops:
        inside = {id(node) for node in ast.walk(loop)}
        stored = {node.id for node in ast.walk(loop) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Assign) and id(node) not in inside and node.lineno < loop.lineno
                    and isinstance(node.value, ast.Name) and node.value.id in stored):
                bad.update(f"{t.id} = {node.value.id}" for t in node.targets
                           if isinstance(t, ast.Name) and t.id in stored)
    return sorted(bad)


KERNELS = _jit_functions()


def test_the_kernels_are_found():
    names = {name for name, _ in KERNELS}
    assert len(KERNELS) >= 40 and "conv_scan_triton._scan_bwd_kernel" in names, sorted(names)


@pytest.mark.parametrize("name,kernel", KERNELS, ids=[name for name, _ in KERNELS])
def test_kernel_reads_only_compilable_globals(name, kernel):
    assert bad_globals(kernel.fn) == [], f"{name} reads plain module globals; pass them as tl.constexpr arguments"


@pytest.mark.parametrize("name,kernel", KERNELS, ids=[name for name, _ in KERNELS])
def test_loop_carried_names_start_as_their_own_tensors(name, kernel):
    assert aliased_loop_names(kernel.fn) == [], f"{name}: give each loop-carried name its own initial tensor"


def test_names_passed_along_a_loop_from_one_tensor_are_caught():
    source = ("def kernel(x_ptr, N: tl.constexpr):\n"
              "    g1 = tl.zeros((N,), dtype=tl.float32)\n"
              "    g2 = g1\n"
              "    acc = tl.zeros((N,), dtype=tl.float32)\n"
              "    fixed = acc\n"
              "    for i in range(N):\n"
              "        acc += g2 + fixed\n"
              "        g2 = g1\n"
              "        g1 = tl.load(x_ptr + i)\n")
    assert aliased_loop_names(lambda: None, source) == ["g2 = g1"]  # fixed is never reassigned: not carried


def test_a_plain_global_is_caught():
    import triton.language as tl

    namespace = {"triton": triton, "tl": tl, "WIDTH": 4, "HALF": tl.constexpr(2), "ON": False}
    source = ("def kernel(x_ptr, N: tl.constexpr):\n"
              "    y = tl.arange(0, N) * HALF\n"
              "    tl.store(x_ptr + y, WIDTH * 1.0 + len([]) + undefined + ON)\n")
    exec(compile(source, "<kernel>", "exec"), namespace)  # noqa: S102  (this test's fixed source)
    assert bad_globals(namespace["kernel"], source) == ["ON", "WIDTH", "undefined"]
