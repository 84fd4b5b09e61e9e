"""Every Triton kernel of ours reads only the module globals Triton's compiler accepts.

Triton's interpreter runs a kernel as Python, so a kernel that reads a plain module constant (``KW = 4``) passes
every interpreter test and fails only when compiled for a GPU ("Cannot access global variable KW from within
@jit'ed function"). This walks each kernel's source instead: a name it reads that is not its own (an argument or an
assignment) must be a module, another kernel or helper, a ``tl.constexpr`` or a builtin."""

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

    return (isinstance(value, (types.ModuleType, tl.constexpr)) or _is_jit(value)
            or value in (None, True, False))


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


KERNELS = _jit_functions()


def test_the_kernels_are_found():
    names = {name for name, _ in KERNELS}
    assert len(KERNELS) >= 40 and "conv_scan_triton._scan_bwd_kernel" in names, sorted(names)


@pytest.mark.parametrize("name,kernel", KERNELS, ids=[name for name, _ in KERNELS])
def test_kernel_reads_only_compilable_globals(name, kernel):
    assert bad_globals(kernel.fn) == [], f"{name} reads plain module globals; pass them as tl.constexpr arguments"


def test_a_plain_global_is_caught():
    import triton.language as tl

    namespace = {"triton": triton, "tl": tl, "WIDTH": 4, "HALF": tl.constexpr(2)}
    source = ("def kernel(x_ptr, N: tl.constexpr):\n"
              "    y = tl.arange(0, N) * HALF\n"
              "    tl.store(x_ptr + y, WIDTH * 1.0 + len([]) + undefined)\n")
    exec(compile(source, "<kernel>", "exec"), namespace)  # noqa: S102  (this test's fixed source)
    assert bad_globals(namespace["kernel"], source) == ["WIDTH", "undefined"]
