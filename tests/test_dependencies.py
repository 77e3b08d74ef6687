"""Every third-party module the package imports is a core dependency in pyproject.toml (or in one of
the feature extras, FEATURE_EXTRAS, for the web page and the scenes).

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


# Extras whose packages the code may import (inside the functions that need them, which say which
# extra to install): the web page and the GeoTIFF scenes.
FEATURE_EXTRAS = ("demo", "geo")


def _extra_names(text: str) -> set[str]:
    import tomllib

    extras = tomllib.loads(text)["project"]["optional-dependencies"]
    names = set()
    for extra in FEATURE_EXTRAS:
        for requirement in extras.get(extra, []):
            name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
            names.add(re.sub(r"[-_.]+", "-", name).lower())
    return names


def test_every_imported_package_is_a_core_dependency():
    text = (REPO_ROOT / "pyproject.toml").read_text()
    required = _requirement_names(text) | _extra_names(text)
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_modules()):
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(module, [module])}
        if not names & (required | {"tensorflow-cpu", "tensorflow"}):
            missing[module] = sorted(names)
    assert not missing, (
        f"imported but in neither [project] dependencies nor {FEATURE_EXTRAS}: {missing}"
    )
    assert "safetensors" in required and "torch" not in required
