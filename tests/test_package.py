"""The package's shape: modules import only modules below them (so no import circle), and a TrainConfig is frozen."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from gpt_trainer.config import parse_args

PACKAGE = Path(__file__).resolve().parent.parent / "gpt_trainer"
# Lowest first: a module may import only modules listed before it. Foundations, then data and model, then the run
# plan, tracking and the loop, then the commands. A new module must be placed here.
LAYERS = ["errors", "config", "hardware", "distributed", "tokenizer", "model", "hf", "compiling", "rundir", "corpora",
          "metrics", "data", "checkpoint", "memory", "autobatch", "plan", "tracking.base", "tracking.wandb_records",
          "tracking.tensorboard", "tracking.wandb", "tracking.swanlab", "tracking", "trainer", "cli", "demo", "sample",
          "export", "sweep", "doctor", "benchmark", "prepare", "__main__", "__init__"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def package_imports(source: str, importer: str) -> set[str]:
    """The package modules `source` imports anywhere (top level, inside functions, under TYPE_CHECKING)."""
    is_package = importer in {"tracking"}  # __init__.py of a subpackage: `.` is the subpackage itself
    here = importer.split(".") if is_package else importer.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            if node.module is None:  # `from . import a, b`: each name is a module
                found |= {".".join([*target, alias.name]) for alias in node.names}
            else:
                found.add(".".join(target))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {name.removeprefix("gpt_trainer.") for name in names if name.startswith("gpt_trainer.")}
    return found


def upward_imports(sources: dict[str, str]) -> list[str]:
    order = {name: i for i, name in enumerate(LAYERS)}
    return [f"{module} imports {target}" for module, source in sources.items()
            for target in sorted(package_imports(source, module)) if order[target] >= order[module]]


def test_every_module_imports_only_modules_below_it():
    sources = {module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}
    assert sorted(sources) == sorted(LAYERS), "a module is missing from LAYERS (or LAYERS names one that is gone)"
    assert upward_imports(sources) == []
    # the control: a lower module importing a higher one, in any form, is caught
    planted = {**sources, "data": sources["data"] + "\ndef f():\n    from .trainer import Trainer\n",
               "tracking.wandb": sources["tracking.wandb"] + "\nfrom .. import trainer\n"}
    assert upward_imports(planted) == ["data imports trainer", "tracking.wandb imports trainer"]


def test_nothing_assigns_to_a_train_config():
    cfg = parse_args(["--batch_size=auto"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 16
    assert cfg.batch_size is None  # auto: the run plan resolves it, the configuration keeps what was asked
    outside = [p.name for p in PACKAGE.rglob("*.py") if p.name != "config.py" and "object.__setattr__" in p.read_text()]
    assert outside == []


def test_an_install_ships_every_subpackage():
    """pyproject lists its packages by name: a subpackage left out would be missing from `pip install .` (the image)."""
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    listed = ast.literal_eval(re.search(r"^packages = (\[.*\])$", pyproject, re.M).group(1))
    present = [".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")]
    assert sorted(listed) == sorted(present)
