"""Every third-party module the package imports is a core dependency in pyproject.toml.

The README's first command installs `pip install -e .` without extras; a module that only the
`test` extra brings in (safetensors once did) would crash the default job after training.
"""

import ast
import importlib.metadata
import re
import sys

from conftest import REPO_ROOT

# Imported only when present: torch when a torch tensor is passed in (weights.spec.as_numpy),
# transformers to add tokenizer.json to an HF export (weights.hf_processor; without it the export
# still loads, transformers converts tokenizer.model itself).
OPTIONAL = {"torch", "transformers"}


def _requirement_names(text: str) -> set[str]:
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    names = re.findall(r'^\s*"([A-Za-z0-9_.\-]+)', block, re.M)
    return {re.sub(r"[-_.]+", "-", n).lower() for n in names}


def _imported_modules() -> set[str]:
    modules = set()
    for path in (REPO_ROOT / "paligemma_seg").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"paligemma_seg", "__future__"} - OPTIONAL


def test_every_imported_package_is_a_core_dependency():
    required = _requirement_names((REPO_ROOT / "pyproject.toml").read_text())
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_modules()):
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(module, [module])}
        if not names & (required | {"tensorflow-cpu", "tensorflow"}):
            missing[module] = sorted(names)
    assert not missing, f"imported but not in [project] dependencies: {missing}"
    assert "safetensors" in required and "torch" not in required
