"""Imports flow one way: a module of the library never imports a higher layer.

The layers, lowest first (DESIGN: utils -> layers -> models -> data -> retrieval
-> methods -> training -> comparison -> apps/tools). Every import is parsed, also those inside
functions: an import inside a function to dodge a cycle is still a cycle.
"""

import ast
import importlib
import inspect
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "keras_seltransfer"

RANKS = {
    "utils": 0,
    "layers": 1,
    "losses": 1,
    "optimizers": 1,
    "models": 2,
    "relevance": 2,
    "regularizers": 2,
    "export": 2,
    "data": 3,
    "evaluation": 3,
    "distribute": 3,
    "retrieval": 4,
    "callbacks": 4,
    "methods": 5,
    "training": 6,
    "comparison": 7,
    "apps": 8,
}
# The package's __init__.py gathers every layer for `import keras_seltransfer`.
TOP = max(RANKS.values()) + 1

# Upward imports allowed, as (importing module, imported module) pairs: none.
ALLOWED_UPWARD = set()


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _library_files():
    return sorted((ROOT / PACKAGE).rglob("*.py"))


def _imports(path):
    """`(line, imported module, imported names)` of every import in `path`,
    with relative imports resolved; `names` is empty for `import x`."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target, tuple(alias.name for alias in node.names)))
    return found


def _rank(module):
    """The rank of `keras_seltransfer.<sub>...`; None outside the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return TOP
    return RANKS.get(parts[1])


def _targets(module, names):
    """The package modules an import reaches: `from keras_seltransfer import
    data` reaches `keras_seltransfer.data`, not the whole package."""
    if module == PACKAGE and names:
        return [f"{PACKAGE}.{name}" for name in names]
    return [module]


def test_every_library_module_has_a_rank():
    unranked = sorted(
        {
            _module_name(path)
            for path in _library_files()
            if _module_name(path) != PACKAGE and _rank(_module_name(path)) is None
        }
    )
    assert not unranked, f"Modules without a rank in RANKS: {unranked}"


def test_imports_flow_one_way():
    violations = []
    for path in _library_files():
        module = _module_name(path)
        if module == PACKAGE:
            continue
        own = _rank(module)
        for line, imported, names in _imports(path):
            for target in _targets(imported, names):
                rank = _rank(target)
                if rank is None or rank <= own:
                    continue
                if (module, ".".join(target.split(".")[:2])) in ALLOWED_UPWARD:
                    continue
                violations.append(f"{module}:{line} imports {target} (rank {own} -> {rank})")
    assert not violations, "Imports from a higher layer:\n" + "\n".join(violations)


def test_allow_list_only_names_code_being_replaced():
    for module, _ in ALLOWED_UPWARD:
        assert module.startswith(
            (f"{PACKAGE}.recipes", f"{PACKAGE}.training")
        ), module


def _private_uses(path):
    """`(line, module, name)` for each private name of another module that
    `path` imports (`from m import _x`) or reads (`m._x` on an imported module)."""
    module = _module_name(path) if PACKAGE in path.parts else None
    uses = []
    bound = {}
    tree = ast.parse(path.read_text(), str(path))
    for line, imported, names in _imports(path) if module else _absolute_imports(tree):
        if not imported.startswith((PACKAGE, "apps")) or imported == module:
            continue
        for name in names:
            if name.startswith("_") and not name.startswith("__"):
                uses.append((line, imported, name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith((PACKAGE, "apps")):
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.startswith((PACKAGE, "apps")):
                for alias in node.names:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            uses.append((node.lineno, bound[node.value.id], node.attr))
    return uses


def _absolute_imports(tree):
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module, tuple(alias.name for alias in node.names)))
    return found


def test_no_private_names_imported_across_modules():
    files = _library_files()
    for folder in ("apps", "tools"):
        files += sorted((ROOT / folder).rglob("*.py"))
    uses = [
        f"{path.relative_to(ROOT)}:{line} uses {name} of {module}"
        for path in files
        for line, module, name in _private_uses(path)
    ]
    assert not uses, "Private names used across modules:\n" + "\n".join(uses)


def test_submodule_imports_are_not_shadowed():
    """`from keras_seltransfer.models import adafilter` gives the function
    that `models/__init__.py` binds to that name, not the submodule: code that
    uses such a name as a module (`adafilter.gate_usage`) must import the
    submodule's names by their full path."""
    shadowed = []
    files = _library_files()
    for folder in ("apps", "tools", "tests"):
        files += sorted((ROOT / folder).rglob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        bound = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                for alias in node.names:
                    bound[alias.asname or alias.name] = (node.module, alias.name, node.lineno)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and "." in alias.name:
                        package, name = alias.name.rsplit(".", 1)
                        bound[alias.asname] = (package, name, node.lineno)
        used_as_module = {
            node.value.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        }
        for local, (package, name, line) in bound.items():
            if local not in used_as_module or not package.startswith(PACKAGE):
                continue
            folder = ROOT.joinpath(*package.split("."))
            if not ((folder / f"{name}.py").is_file() or (folder / name).is_dir()):
                continue
            bound_value = getattr(importlib.import_module(package), name, None)
            # Unbound in the package until imported: the import gets the submodule.
            if bound_value is not None and not inspect.ismodule(bound_value):
                shadowed.append(f"{path.relative_to(ROOT)}:{line} {package}.{name}")
    assert not shadowed, "Submodules shadowed by a package attribute:\n" + "\n".join(shadowed)
