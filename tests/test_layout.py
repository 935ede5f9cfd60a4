"""The code's shape, read from its source: no import cycles, no script imported by another recipe,
settings passed as values below the scripts, no function with more than eight parameters."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}
# The recipes a user runs; no other recipe imports them (a driver of all of them may: gpu_check,
# bench_memory, real). Library modules never see an argparse Namespace.
SCRIPTS = ("train", "evaluate", "explain", "predict", "export", "bench", "bench_memory", "real", "gpu_check",
           "slide")
LIBRARIES = ("explanations", "shards", "engine", "quality", "db", "attribution", "trust", "gallery", "metrics",
             "report", "plots", "budget", "centre_shift", "model", "formats", "wsi", "tissue", "tissue_map", "page",
             "slide_explanations", "rss")
MAX_PARAMETERS = 8


def imports(name):
    """The repository's modules that `name` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {name}


def cycle_from(start, graph):
    """A list of modules that import each other in a ring starting at `start`, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_no_modules_import_each_other_in_a_ring():
    graph = {name: imports(name) for name in MODULES}
    rings = [ring for name in MODULES if (ring := cycle_from(name, graph))]
    assert not rings, rings[0]


def test_cli_imports_no_module_of_this_repository():
    assert imports("cli") == set()


def test_evaluate_imports_no_other_script():
    assert not imports("evaluate") & set(SCRIPTS)


def test_no_library_function_reads_an_argparse_namespace():
    # a library module's own command line (its main) is a script's part, and may
    for name in LIBRARIES:
        functions = [f for f in ast.walk(ast.parse(MODULES[name].read_text()))
                     if isinstance(f, ast.FunctionDef) and f.name != "main"]
        uses = [f"{f.name}:{n.lineno}" for f in functions for n in ast.walk(f)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "args"]
        assert not uses, f"{name}.py reads args.* in {uses}"


def test_no_function_takes_more_than_eight_parameters():
    wide = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                if n > MAX_PARAMETERS:
                    wide.append(f"{name}.py:{node.lineno} {node.name} ({n})")
    assert not wide, wide
