"""The package's floor plan: each layer imports only the layers below it.

Every package is imported alone in a fresh interpreter and `sys.modules` must then hold no
package of its own layer or a higher one (other than itself). Packages in one layer are siblings:
neither may import the other. The rule, as data:
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import annotated_llama

# bottom to top; a package may import any package of a lower layer, none of its own or higher
LAYERS = [
    ["core", "default_model"],   # config, model + cache, tokenizers, chat formats, sampling, layout facts
    ["transforms"],              # quantize, lora: a finished model changed in place
    ["weights"],                 # every checkpoint format in and out
    ["inference"],               # the engine and its front ends (Llama, streaming, speculative)
    ["parallel", "serving", "data"],  # tensor parallelism, the OpenAI server, datasets
    ["train"],                   # pretraining and fine-tuning
    ["cli"],                     # the commands
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
ROOT = Path(annotated_llama.__file__).parent


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(RANK)
    flat = {p.stem for p in ROOT.glob("*.py")}
    assert flat == {"__init__", "__main__"}, "a module outside the packages has no layer"


def test_the_tests_mirror_the_packages():
    # tests/<package>/ holds the tests of annotated_llama/<package>/; tests/ itself only the checks
    # of the whole project (layers, docs, README, site) and the shared fixtures and assets
    tests = Path(__file__).parent
    dirs = {p.name for p in tests.iterdir() if p.is_dir() and p.name not in ("assets", "__pycache__")}
    assert dirs == set(RANK) - {"default_model"}, "a test folder that names no package, or a package with no tests"
    for d in dirs:
        assert list((tests / d).glob("test_*.py")), d
    assert {p.stem for p in tests.glob("test_*.py")} == {"test_layers", "test_docs", "test_readme", "test_site",
                                                       "test_self_contained"}


def test_layers_run_in_order():
    # the rule can fail: a package that imported a higher one would show up here
    assert RANK["core"] < RANK["weights"] < RANK["inference"] < RANK["serving"] < RANK["cli"]


def loaded_packages(modules: list[str]) -> set[str]:
    """The annotated_llama packages in sys.modules after importing `modules` in a fresh interpreter."""
    code = ("import sys, json, importlib\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print(json.dumps(sorted({m.split('.')[1] for m in sys.modules if m.startswith('annotated_llama.')})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_facade_loads_only_the_core():
    # `import annotated_llama` (which every import runs first) brings ModelArgs, Transformer and
    # Tokenizer; Llama, load_model and save_model load on first use
    assert loaded_packages(["annotated_llama"]) == {"core"}


def modules_of(pkg: str) -> list[str]:
    base = ROOT / pkg
    return [f"annotated_llama.{pkg}"] + sorted(
        f"annotated_llama.{pkg}." + ".".join(p.relative_to(base).with_suffix("").parts)
        for p in base.rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("pkg", sorted(RANK))
def test_a_package_imports_only_lower_layers(pkg):
    # every module of the package at once (their top levels), in an interpreter of its own
    loaded = loaded_packages(modules_of(pkg)) - {"core"}  # the facade's (checked above)
    wrong = sorted(p for p in loaded if p != pkg and p in RANK and RANK[p] >= RANK[pkg])
    assert not wrong, f"{pkg} (layer {RANK[pkg]}) pulls in {wrong}"


def test_a_lazy_import_also_follows_the_rule():
    # imports inside functions run only when called: read them from the source instead
    import ast

    bad = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if len(parts) == 1:
            continue  # the facade (__init__, __main__) sits above every layer
        pkg = parts[0]
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                # resolve the relative import to a top-level package name
                depth = len(parts) - 1 - (node.level - 1)
                target = list(parts[:depth]) + (node.module.split(".") if node.module else [])
                names = target[:1] or [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("annotated_llama."):
                names = [node.module.split(".")[1]]
            else:
                continue
            for t in names:
                if t in RANK and t != pkg and RANK[t] >= RANK[pkg]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {t}")
    assert not bad, bad


def test_every_module_reads_in_one_sitting():
    # one concept per file, each short enough to read at once: under 400 lines
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) >= 400}
    assert not long, long
