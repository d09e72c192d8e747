"""The package's shape: modules import only modules below them (so no import circle), and a TrainConfig is frozen."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from gpt_trainer.config import parse_args

PACKAGE = Path(__file__).resolve().parent.parent / "gpt_trainer"
# Lowest first: a module may import only modules listed before it. Foundations (errors, config), then the subpackages
# in their order (system, data, model, plan, tracking, train, commands), each module of a subpackage before the
# subpackage itself. A new module must be placed here.
LAYERS = [
    "errors", "config",
    "system.hardware", "system.distributed", "system.compiling", "system.rundir", "system",
    "data.tokenizer", "data.corpora", "data.tokens", "data.batches", "data",
    "model.gpt", "model.qwen3", "model.hf", "model.gguf", "model",
    "plan.memory", "plan.autobatch", "plan.resolve", "plan.run_plan", "plan",
    "tracking.base", "tracking.wandb_records", "tracking.tensorboard", "tracking.wandb", "tracking.swanlab", "tracking",
    "train.metrics", "train.checkpoint", "train.health", "train.optimizers", "train.parallelize", "train.trainer",
    "train",
    "commands.failures", "commands.train", "commands.demo", "commands.sample", "commands.export", "commands.sweep",
    "commands.doctor", "commands.benchmark", "commands.prepare", "commands",
    # `python -m gpt_trainer.sample` and the others as in earlier versions: each only runs its command
    "cli", "demo", "sample", "export", "sweep", "doctor", "benchmark", "prepare", "memory",
    "__main__", "__init__",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def package_imports(source: str, importer: str, modules: set[str]) -> set[str]:
    """The package modules `source` imports anywhere (top level, inside functions, under TYPE_CHECKING); `from .x
    import y` counts as importing x.y where that is a module."""
    is_package = importer in modules and any(m.startswith(f"{importer}.") for m in modules)
    here = importer.split(".") if is_package else importer.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join([*here[: len(here) - (node.level - 1)], *(node.module.split(".") if node.module
                                                                             else [])])
            elif node.module and node.module.startswith("gpt_trainer"):
                target = node.module.removeprefix("gpt_trainer").removeprefix(".")
            else:
                continue
            for alias in node.names:
                name = f"{target}.{alias.name}" if target else alias.name
                found.add(name if name in modules else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("gpt_trainer.") for alias in node.names
                      if alias.name.startswith("gpt_trainer.")}
    return found - {""}


def upward_imports(sources: dict[str, str]) -> list[str]:
    order = {name: i for i, name in enumerate(LAYERS)}
    return [f"{module} imports {target}" for module, source in sources.items()
            for target in sorted(package_imports(source, module, set(sources))) if order[target] >= order[module]]


def test_every_module_imports_only_modules_below_it():
    sources = {module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}
    assert sorted(sources) == sorted(LAYERS), "a module is missing from LAYERS (or LAYERS names one that is gone)"
    assert upward_imports(sources) == []
    # the control: a lower module importing a higher one, in any form, is caught
    planted = {**sources,
               "data.tokens": sources["data.tokens"] + "\ndef f():\n    from ..train.trainer import Trainer\n",
               "tracking.wandb": sources["tracking.wandb"] + "\nfrom ..train import trainer\n",
               "model.gpt": sources["model.gpt"] + "\nimport gpt_trainer.plan.memory\n"}
    assert sorted(upward_imports(planted)) == ["data.tokens imports train.trainer", "model.gpt imports plan.memory",
                                       "tracking.wandb imports train.trainer"]


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


def read_at_import(source: str) -> list[str]:
    """What a module does at import that only a run should do: read the environment (os.environ, os.getenv) outside
    a function, or rebind a module's global from inside one (`global`)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Global):
            found.append(f"global {', '.join(node.names)}")
        elif not in_function and ast.unparse(node) in ("os.environ", "os.getenv"):
            found.append(f"{ast.unparse(node)} at line {node.lineno}")
            return
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)
    visit(ast.parse(source), False)
    return found


def test_no_module_reads_the_environment_at_import_or_keeps_a_run_s_state_in_a_global():
    """The environment is read when a run starts (tests/test_distributed.py sets GPT_TRAINER_HEARTBEAT_S after the
    import and sees it used), and what a run holds is passed to whoever uses it (the job's roll call is its World's)."""
    found = {path.name: read_at_import(path.read_text()) for path in PACKAGE.rglob("*.py")}
    assert {name: what for name, what in found.items() if what} == {}
    # the control: a read at import, in a class body too, and a global are caught; a read inside a function is not
    planted = ("import os\nPACE = float(os.environ.get('X', '5'))\nclass A:\n    b = os.getenv('Y')\n"
               "def f():\n    global PACE\n    return os.environ['Z']\n")
    assert read_at_import(planted) == ["os.environ at line 2", "os.getenv at line 4", "global PACE"]
