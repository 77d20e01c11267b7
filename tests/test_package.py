import os

import pytest

import vllm_vattention

PKG = os.path.dirname(vllm_vattention.__file__)


def test_every_module_folder_is_a_regular_package():
    """A folder without __init__.py is left out of the wheel by setuptools' find_packages."""
    for folder, _, files in os.walk(PKG):
        if "__pycache__" in folder:
            continue
        if any(f.endswith(".py") for f in files):
            assert "__init__.py" in files, f"{folder} has modules but no __init__.py"


@pytest.mark.parametrize("sub", ["memory", "evict"])
def test_memory_manager_and_eviction_simulator_do_not_import_vllm(sub):
    """The memory manager and the eviction simulator know nothing of vLLM (the glue lives in
    worker/platform/selection)."""
    for name in os.listdir(os.path.join(PKG, sub)):
        if name.endswith(".py"):
            src = open(os.path.join(PKG, sub, name)).read()
            assert "import vllm" not in src and "from vllm" not in src, name


def _unbound_names(source: str) -> set[str]:
    """Names a module reads that nothing in it binds (no def, class, import, argument, assignment,
    loop or with target, except clause, global or builtin): a helper deleted while still called."""
    import ast
    import builtins
    tree = ast.parse(source)
    bound = set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__spec__", "__path__"}
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(n.name)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            bound.add(n.id)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            bound.update(n.names)
        elif isinstance(n, ast.MatchAs) and n.name:
            bound.add(n.name)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


def test_no_module_reads_a_name_it_never_binds():
    """GPU-only code runs in no CPU test: mapbench's under_load section (and its GPU test) called
    gpu_loads after an edit had deleted it, and nothing on a CPU noticed. Every Python file of the
    package, the benchmarks, examples, scripts and tests must bind each name it reads."""
    import pathlib
    root = pathlib.Path(PKG).parent
    files = [p for d in ("vllm_vattention", "benchmarks", "examples", "scripts", "tests") for p in (root / d).rglob("*.py")]
    assert len(files) > 50
    unbound = {str(p.relative_to(root)): sorted(n) for p in files if (n := _unbound_names(p.read_text()))}
    assert unbound == {}
    assert _unbound_names("def f():\n    return g()\n") == {"g"}  # the check finds what it is for
    assert _unbound_names("import os\nfor i in range(3):\n    print(os.sep, i)\n") == set()
