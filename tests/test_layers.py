"""The package's layers import only downward (README, "Layout").

Two checks per package, so neither a module-level nor a function-level import can hide an upward dependency:
- in an interpreter that has loaded no module of the package, importing the package and every one of its
  submodules loads no module of a higher layer;
- the source of each of its files names no higher layer in an import statement (at any depth, including inside
  functions) nor in a string that names a module of the package (``importlib.import_module("lightning_mamba.x")``,
  a ``class_path``).
Packages on one layer are peers and do not import each other either. Only ``lightning_mamba`` modules are checked
(whether a third-party module such as Triton loads is not this test's business), except that the models layer must
not load Lightning at all: it is plain ``nn.Module`` code.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "lightning_mamba")

# Lowest first. A name may import from the layers before its own and from nothing else of the package.
LAYERS = [
    ("atomic", "errors", "progress"),
    ("models",),
    ("data",),
    ("training",),
    ("analysis",),
    ("mitigations",),
    ("callbacks", "study"),
    ("commands",),
    ("cli",),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
LIGHTNING = ("lightning", "lightning_fabric", "pytorch_lightning")

# One interpreter for all the probes (a fresh one per package cost ~6 s each, almost all of it importing torch and
# Lightning): it imports a stage's third-party modules, then forks one child per package of the stage. A child starts
# with no module of lightning_mamba loaded, imports the package and every submodule pkgutil finds under it, and writes
# what loaded to <out>/<name>.out (a traceback to <name>.err, and its exit status to <name>.rc). The packages up to
# models run before Lightning is imported at all: test_models_are_plain_torch checks that models does not load it.
PROBE = r"""
import importlib, json, os, pkgutil, sys, traceback
out, stages = sys.argv[1], json.loads(sys.argv[2])
for preload, names in stages:
    for dependency in preload:
        importlib.import_module(dependency)
    ours = [m for m in sys.modules if m.split(".")[0] == "lightning_mamba"]
    assert not ours, f"{preload} loaded modules of the package: {ours}"
    for name in names:
        pid = os.fork()
        if pid == 0:
            code = 1
            with open(os.path.join(out, name + ".out"), "w") as o, open(os.path.join(out, name + ".err"), "w") as e:
                os.dup2(o.fileno(), 1)
                os.dup2(e.fileno(), 2)
                try:
                    module = importlib.import_module(name)
                    imported = [name]
                    for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
                        importlib.import_module(info.name)
                        imported.append(info.name)
                    print(json.dumps({"imported": imported, "modules": sorted(sys.modules)}))
                    code = 0
                except BaseException:
                    traceback.print_exc()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        with open(os.path.join(out, name + ".rc"), "w") as f:
            f.write(str(os.waitstatus_to_exitcode(status)))
"""
PLAIN_TORCH = [name for names in LAYERS[:LAYER["models"] + 1] for name in names]  # probed before Lightning loads


def top_level_names() -> set[str]:
    """The package's first-level modules and subpackages, as found on disk."""
    names = set()
    for entry in os.listdir(PACKAGE_DIR):
        path = os.path.join(PACKAGE_DIR, entry)
        if entry.endswith(".py") and entry != "__init__.py":
            names.add(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
    return names


def layer_of(module: str) -> int:
    """The layer of a ``lightning_mamba.<name>...`` module; the root package itself sits below everything."""
    parts = module.split(".")
    return -1 if len(parts) == 1 else LAYER[parts[1]]


def forbidden_for(name: str, modules) -> list[str]:
    """The ``lightning_mamba`` modules among ``modules`` that ``name`` may not depend on."""
    own = LAYER[name]
    bad = []
    for m in modules:
        parts = m.split(".")
        if parts[0] != "lightning_mamba" or len(parts) == 1 or parts[1] == name:
            continue
        if parts[1] not in LAYER or layer_of(m) >= own:
            bad.append(m)
    return sorted(bad)


def source_files(name: str) -> list[str]:
    path = os.path.join(PACKAGE_DIR, name)
    if os.path.isfile(path + ".py"):
        return [path + ".py"]
    return sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files if f.endswith(".py"))


def module_name(path: str) -> tuple[str, list[str]]:
    """Dotted name of a source file, and the package its relative imports start from."""
    parts = os.path.relpath(path[:-3], ROOT).split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def known_module(dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is a module or package of ours with at least two parts, else None."""
    parts = dotted.split(".")
    for n in range(len(parts), 1, -1):
        base = os.path.join(ROOT, *parts[:n])
        if os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py")):
            return ".".join(parts[:n])
    return None


def referenced_modules(path: str, source: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for every ``lightning_mamba`` module the file imports (absolute or relative, at any depth) or
    names in a string other than a docstring."""
    _, package = module_name(path)
    tree = ast.parse(source if source is not None else open(path).read(), path)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] + ([node.module] if node.module else [])
                base = ".".join(base)
            else:
                base = node.module or ""
            # `from .. import analysis` imports a subpackage: the names count as modules when they are ours
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value.startswith("lightning_mamba.") and all(p.isidentifier() for p in node.value.split(".")):
                names = [node.value]
        for dotted in names:
            if dotted.split(".")[0] == "lightning_mamba":
                module = known_module(dotted)
                if module is not None:
                    found.add((node.lineno, module))
    return sorted(found)


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """Per layered name: (exit status, stdout, stderr) of importing it and all its submodules in an interpreter
    that had loaded no module of the package (PROBE)."""
    out = tmp_path_factory.mktemp("probes")
    names = sorted(LAYER)
    stages = [(["torch"], [f"lightning_mamba.{n}" for n in names if n in PLAIN_TORCH]),
              (["lightning"], [f"lightning_mamba.{n}" for n in names if n not in PLAIN_TORCH])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", PROBE, str(out), json.dumps(stages)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr

    def written(name: str, ext: str) -> str:
        return (out / f"lightning_mamba.{name}.{ext}").read_text()

    return {n: (int(written(n, "rc")), written(n, "out"), written(n, "err")) for n in names}


def loaded(probes, name: str) -> dict:
    """What importing lightning_mamba.<name> and its submodules loaded: {"imported": [...], "modules": [...]}."""
    returncode, out, err = probes[name]
    assert returncode == 0, f"importing lightning_mamba.{name} and its submodules failed:\n{err}"
    return json.loads(out.splitlines()[-1])


def test_every_package_has_a_layer():
    assert top_level_names() == set(LAYER), ("a new package or module of lightning_mamba: put it in LAYERS here "
                                             "and in the README's layout")


@pytest.mark.parametrize("name", sorted(LAYER))
def test_importing_a_package_loads_nothing_from_above(name, probes):
    result = loaded(probes, name)
    assert len(result["imported"]) == len(source_files(name)), "the probe imported every source file of the package"
    bad = forbidden_for(name, result["modules"])
    assert not bad, f"importing lightning_mamba.{name} loads modules of a higher or peer layer:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", sorted(LAYER))
def test_no_source_file_names_a_higher_layer(name):
    bad = [f"{os.path.relpath(path, ROOT)}:{line}: {module}"
           for path in source_files(name)
           for line, module in referenced_modules(path)
           if forbidden_for(name, [module])]
    assert not bad, f"lightning_mamba.{name} imports from a higher or peer layer:\n" + "\n".join(bad)


def test_models_are_plain_torch(probes):
    lightning = [m for m in loaded(probes, "models")["modules"] if m.split(".")[0] in LIGHTNING]
    assert not lightning, f"lightning_mamba.models must not import Lightning (pure nn.Module): {lightning[:5]} ..."


@pytest.mark.parametrize("name", LAYERS[0])
def test_the_bottom_imports_nothing_of_the_package(name, probes):
    ours = [m for m in loaded(probes, name)["modules"] if m.split(".")[0] == "lightning_mamba"]
    assert ours == ["lightning_mamba", f"lightning_mamba.{name}"]


# The checks themselves: each finds an upward import where it is, and lets a downward one pass.
def test_the_source_scan_finds_imports_at_any_depth():
    path = os.path.join(PACKAGE_DIR, "training", "module.py")
    source = ("from ..models import MambaLM\n"
              "def f():\n"
              "    from ..analysis.criterion import judge_forgetting\n"
              "    import lightning_mamba.study.sweep\n"
              "    from .. import callbacks\n"
              "    return importlib.import_module('lightning_mamba.commands.sweep')\n"
              "def g():\n"
              "    '''lightning_mamba.commands.analyze, mentioned in a docstring only'''\n")
    found = referenced_modules(path, source)
    assert found == [(1, "lightning_mamba.models"), (3, "lightning_mamba.analysis.criterion"),
                     (4, "lightning_mamba.study.sweep"), (5, "lightning_mamba.callbacks"),
                     (6, "lightning_mamba.commands.sweep")]
    assert forbidden_for("training", [m for _, m in found]) == [
        "lightning_mamba.analysis.criterion", "lightning_mamba.callbacks", "lightning_mamba.commands.sweep",
        "lightning_mamba.study.sweep"]


def test_peers_on_one_layer_are_forbidden_to_each_other():
    assert forbidden_for("callbacks", ["lightning_mamba.study.sweep"]) == ["lightning_mamba.study.sweep"]
    assert forbidden_for("study", ["lightning_mamba.training.cli", "lightning_mamba.study.summary"]) == []
