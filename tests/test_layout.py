"""The package's layering: imports point downward only, no module imports another's private
names, and no source file outgrows what a reader can hold (700 lines)."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "mmim_ext")

# Rank of every top-level part of the package; a module may import only parts of lower rank, or
# modules of its own part (a package's modules import each other). The torch.distributed helpers
# live in estimators/sharding.py (rank 2): the estimators and the regularizers both need them.
RANK = {
    "_checks": 0,
    "_extension": 0,
    "_C": 0,
    "ops": 1,
    "estimators": 2,
    "regularizers": 3,
    "layers": 3,
    "training": 4,
    "infoplane": 4,
    "diagnostics": 4,
    "experiments": 5,
}
# Package-private modules whose names every layer may use.
SHARED = {"_checks", "_extension", "_C"}


def _modules():
    for root, _, files in os.walk(PKG):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: str, module: str):
    """``(imported module, names)`` of every import of mmim_ext in the file (relative ones resolved)."""
    tree = ast.parse(open(path).read(), path)
    pkg = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mmim_ext"):
                    yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                name = ".".join(base + ([name] if name else []))
            if name.startswith("mmim_ext"):
                yield name, [a.name for a in node.names]


MODULES = list(_modules())


def test_every_part_has_a_rank():
    parts = {_part(m) for m, _ in MODULES} - {""}
    assert parts <= set(RANK), f"parts of mmim_ext without a rank in this test: {sorted(parts - set(RANK))}"


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_downward(module, path):
    part = _part(module)
    if part == "":
        return  # mmim_ext/__init__.py gathers the public API from every layer
    for target, names in _imports(path, module):
        tpart = _part(target)
        if tpart == "":  # `from mmim_ext import X`: X is a part of the package
            for n in names:
                assert n in SHARED or RANK.get(n, 99) < RANK[part], f"{module} imports mmim_ext.{n} (a higher or equal layer)"
            continue
        if tpart != part:
            assert RANK[tpart] < RANK[part], f"{module} imports {target}: layer {tpart!r} is not below {part!r}"


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_no_private_names_across_modules(module, path):
    for target, names in _imports(path, module):
        if target == module or _part(target) in SHARED:
            continue
        private = [n for n in names if n.startswith("_") and n not in SHARED and n != "_C"]
        assert not private, f"{module} imports private names {private} from {target}"


def test_source_files_stay_short():
    roots = [PKG, os.path.join(REPO, "csrc")]
    long = []
    for root in roots:
        for d, _, files in os.walk(root):
            for f in files:
                if f.endswith((".py", ".h", ".cpp", ".cu", ".cuh")):
                    p = os.path.join(d, f)
                    n = sum(1 for _ in open(p, errors="replace"))
                    if n > 700:
                        long.append(f"{os.path.relpath(p, REPO)}: {n} lines")
    assert not long, "files over 700 lines: " + ", ".join(long)


def test_public_api_is_sorted_and_importable():
    import mmim_ext

    assert list(mmim_ext.__all__) == sorted(mmim_ext.__all__)
    for name in mmim_ext.__all__:
        assert hasattr(mmim_ext, name), name
