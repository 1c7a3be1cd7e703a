"""spp's import graph has no cycle and every import points down the layers; no script imports another script.

Every import statement counts: at module level, inside a function, under `if TYPE_CHECKING:`. A cycle
that a late import keeps from failing at import time is still a cycle, and a layer reached through a
function-level import is still reached. `from spp.x import y` is an edge to the module `spp.x.y` when
that module exists, else to `spp.x`; a package's `__init__.py` is the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer or any layer below it, never one above. An entry is a module
# or `package.*` (the package and everything under it); the most specific entry that names a module places it.
LAYERS: list[tuple[str, list[str]]] = [
    ("base: errors, typed values, the rules of a sparse weight, transformers/hub access, process-wide switches",
     ["spp", "spp.errors", "spp.typed", "spp.sparsity", "spp.hf", "spp.hub", "spp.quiet", "spp.faults", "spp.env"]),
    ("io: every file spp reads or writes (checkpoints, masks, manifests, formats, input data)",
     ["spp.io.*", "spp.data"]),
    ("model structure: loading, decoder blocks, linear layers, expert weights, name patterns",
     ["spp.models", "spp.patterns"]),
    ("math: pure tensor functions and the per-layer plans they run on",
     ["spp.prune.masks", "spp.prune.wanda", "spp.prune.ria", "spp.prune.permute", "spp.prune.owl", "spp.prune.sparsegpt",
      "spp.prune.reconstruction", "spp.prune.alps", "spp.prune.dsnot", "spp.prune.experts", "spp.prune.plan", "spp.train.losses", "spp.eval.sparse_kernels"]),
    ("adapters: the kinds, the mixture-of-experts wrapper, adding/saving/loading/merging in memory",
     ["spp.adapter.*"]),
    ("config: one dataclass per stage", ["spp.config"]),
    ("stages", ["spp.prune.*", "spp.train.*", "spp.merge", "spp.eval.*", "spp.verify", "spp.export"]),
    ("orchestration: spp run, its report, spp demo", ["spp.pipeline", "spp.report", "spp.demo"]),
    ("command line", ["spp.cli"]),
]


def spp_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every `spp/**/*.py`."""
    out = {}
    for path in sorted((ROOT / "spp").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The spp modules that `module` (at `path`) imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()

    def add(name: str) -> None:
        while name and name not in known:  # `import spp.io.reader.x` / `from spp.io import nothing_here`
            name = name.rpartition(".")[0]
        if name:
            out.add(name)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "spp":
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..io import y
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "spp":
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                add(full if full in known else source)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = spp_modules()
    return {m: imported(m, p, set(modules)) for m, p in modules.items()}


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the most specific entry naming `module` (exact beats `pkg.*`, longer beats shorter)."""
    best, best_rank = None, (-1, -1)
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if entry.endswith(".*"):
                package = entry[:-2]
                if module == package or module.startswith(package + "."):
                    rank = (0, len(package))
                else:
                    continue
            elif module == entry:
                rank = (1, len(entry))
            else:
                continue
            if rank > best_rank:
                best, best_rank = index, rank
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, modules in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in spp_modules() if layer_of(m) is None)
    assert not unplaced, f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            low, high = layer_of(module), layer_of(target)
            if low is not None and high is not None and high > low:
                upward.append(f"{module} ({LAYERS[low][0].split(':')[0]}) imports {target} "
                              f"({LAYERS[high][0].split(':')[0]})")
    assert not upward, "lower layer imports a higher one:\n" + "\n".join(upward)


def test_the_checker_sees_late_and_type_checking_imports(tmp_path):
    """The walk finds an import inside a function and one under TYPE_CHECKING, and resolves `from pkg import mod`."""
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from spp.x import b\n"
                                   "def f():\n    from spp.x.c import g\n    import spp.d\n")
    known = {"spp", "spp.x", "spp.x.b", "spp.x.c", "spp.d"}
    assert imported("spp.a", tmp_path / "a.py", known) == {"spp.x.b", "spp.x.c", "spp.d"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("spp.prune.masks") < layer_of("spp.prune") == layer_of("spp.prune.sequential")


# --------------------------------------------------------------------------- scripts


def script_imports() -> dict[str, set[str]]:
    """scripts/NAME.py -> the other scripts/ modules it imports (by module name)."""
    names = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    out = {}
    for path in sorted((ROOT / "scripts").glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
        out[path.stem] = (found & names) - {path.stem}
    return out


def is_script(name: str) -> bool:
    """A script runs (`if __name__ == "__main__":`); a helper module beside the scripts does not."""
    return '__name__ == "__main__"' in (ROOT / "scripts" / f"{name}.py").read_text(encoding="utf-8")


def test_no_script_imports_another_script():
    bad = sorted(f"scripts/{name}.py imports scripts/{other}.py"
                 for name, others in script_imports().items() for other in others if is_script(other))
    assert not bad, "a script imports another script (share code through a helper module or spp):\n" + "\n".join(bad)


def test_scripts_have_no_import_cycle():
    cycle = find_cycle(script_imports())
    assert cycle is None, "import cycle among scripts/: " + " -> ".join(cycle)
