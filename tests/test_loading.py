"""No file we read can run code. Every place in the package that calls something able to turn bytes into running
code (pickle and its kin, torch.load, TorchScript and torch.package archives, numpy's pickled arrays, YAML's Python
tags, marshal, torch.distributed.checkpoint's default reader, which unpickles a checkpoint's .metadata) is found by
walking the source with `ast` and must be listed in ALLOWED with the reason it is safe; a few of them are safe only
with a literal argument (torch.load's weights_only=True, a sharded checkpoint read through HuggingFaceStorageReader),
which is checked whatever the list says. A new call fails the test until someone writes down why it is safe."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpt_trainer"

# torch.distributed.checkpoint's loaders: they read with the storage reader they are given
DCP_LOADS = {f"torch.distributed.checkpoint.{name}" for name in (
    "load", "load_state_dict", "state_dict_loader.load", "state_dict_loader.load_state_dict")}
# by full name: each of these can run code that the bytes it reads ask for
DESERIALIZERS = {
    *(f"{module}.{name}" for module in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
      for name in ("load", "loads", "Unpickler")),
    "joblib.load", "shelve.open", "marshal.load", "marshal.loads", "pandas.read_pickle",
    "torch.load", "torch.jit.load", "torch.package.PackageImporter", "numpy.load",
    *(f"yaml.{name}" for name in ("load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all")),
    *DCP_LOADS, *(f"torch.distributed.checkpoint.{name}" for name in (
        "FileSystemReader", "filesystem.FileSystemReader", "format_utils.dcp_to_torch_save",
        "format_utils.DynamicMetaLoadPlanner")),
}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}
# the one reader of torch.distributed.checkpoint that pickles nothing: it rebuilds the index from the safetensors
# files' JSON headers (the default FileSystemReader unpickles the folder's .metadata file)
SAFE_DCP_READERS = {"torch.distributed.checkpoint.HuggingFaceStorageReader",
                    "torch.distributed.checkpoint.hf_storage.HuggingFaceStorageReader"}

# (file, the function it is in, the call) -> why it cannot run code from a file
ALLOWED = {
    ("train/checkpoint.py", "load", "torch.load"):
        "weights_only=True: tensors and plain data only; the one allowance (NUMPY_ARRAY) rebuilds the numpy array that "
        "older checkpoints' RNG state holds, and calls nothing else",
    ("train/checkpoint.py", "Shards.read_into", "torch.distributed.checkpoint.load"):
        "storage_reader=HuggingFaceStorageReader: a sharded checkpoint's safetensors files, tensors only, indexed from "
        "their JSON headers; the files were checked against manifest.json (JSON) first",
    ("model/hf.py", "read_weights", "torch.load"):
        "weights_only=True: a GPT-2 folder's pytorch_model.bin, tensors only",
    ("data/tokens.py", "Workers._receive", "pickle.load"):
        "a pipe from our own worker process (tokenizer.serve, started by Workers), never a file: the bytes are what "
        "our code pickled a moment before",
    ("data/tokenizer.py", "serve", "pickle.load"):
        "this worker's stdin, a pipe from the Workers of data.py that started it, never a file",
}


@dataclass(frozen=True)
class Use:
    where: tuple[str, str, str]  # (file, function, the full name called)
    line: int
    problem: str | None  # an argument that leaves the call unsafe whatever ALLOWED says


def imported_names(tree: ast.AST) -> dict[str, str]:
    """What each name bound by an import stands for: `np` -> numpy, `loads` -> pickle.loads (imports inside
    functions too)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                bound = alias.asname or alias.name.split(".")[0]
                names[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def full_name(node: ast.AST, names: dict[str, str]) -> str | None:
    """`np.load` -> numpy.load; None for what is not a dotted name starting at an imported one."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    return ".".join([names[node.id], *reversed(parts)])


def keyword(call: ast.Call, name: str, position: int | None = None) -> ast.AST | None:
    given = {k.arg: k.value for k in call.keywords}
    if name in given:
        return given[name]
    return call.args[position] if position is not None and len(call.args) > position else None


def unsafe_argument(name: str, call: ast.Call | None, names: dict[str, str]) -> str | None:
    """Why a call of `name` is unsafe whatever the list says: torch.load without a literal weights_only=True, numpy.load
    with allow_pickle not a literal False, yaml.load without a safe Loader, torch.distributed.checkpoint's load without
    a HuggingFaceStorageReader made in the call, its FileSystemReader at all; a reference that is not called (passed
    around, its arguments unseen) for those."""
    if "FileSystemReader" in name:
        return "FileSystemReader unpickles the checkpoint's .metadata file"
    if name not in ("torch.load", "numpy.load", "yaml.load", "yaml.load_all", *DCP_LOADS):
        return None
    if call is None:
        return "used without being called here: its arguments cannot be checked"
    if name in DCP_LOADS:
        reader = keyword(call, "storage_reader")
        ok = isinstance(reader, ast.Call) and full_name(reader.func, names) in SAFE_DCP_READERS
        return None if ok else f"{name} without storage_reader=HuggingFaceStorageReader(...)"
    if name == "torch.load":
        value = keyword(call, "weights_only")
        ok = isinstance(value, ast.Constant) and value.value is True
        return None if ok else "torch.load without weights_only=True written as a literal"
    if name == "numpy.load":
        value = keyword(call, "allow_pickle", 2)
        ok = value is None or (isinstance(value, ast.Constant) and value.value is False)
        return None if ok else "numpy.load with allow_pickle not a literal False"
    loader = keyword(call, "Loader", 1)
    return None if loader is not None and full_name(loader, names) in SAFE_YAML_LOADERS else \
        f"{name} without Loader=yaml.SafeLoader"


class Finder(ast.NodeVisitor):
    """Every reference to a deserializer in one file, with the function (class.method) it is in."""

    def __init__(self, file: str, names: dict[str, str]):
        self.file, self.names, self.scope, self.uses, self.calls = file, names, [], [], {}

    def visit_Call(self, node: ast.Call) -> None:
        self.calls[id(node.func)] = node
        self.generic_visit(node)

    def in_scope(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = in_scope

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.found(node)
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        self.found(node)

    def found(self, node: ast.AST) -> None:
        name = full_name(node, self.names)
        if name in DESERIALIZERS:
            call = self.calls.get(id(node))
            where = (self.file, ".".join(self.scope) or "<module>", name)
            self.uses.append(Use(where, node.lineno, unsafe_argument(name, call, self.names)))


def uses_in(source: str, file: str) -> list[Use]:
    tree = ast.parse(source)
    finder = Finder(file, imported_names(tree))
    finder.visit(tree)
    return finder.uses


def uses_in_package() -> list[Use]:
    return [use for path in sorted(PACKAGE.rglob("*.py"))
            for use in uses_in(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))]


def test_every_call_that_can_deserialize_code_is_listed_with_why_it_is_safe():
    uses = uses_in_package()
    unlisted = [f"{u.where[0]}:{u.line} {u.where[2]} in {u.where[1]}" for u in uses if u.where not in ALLOWED]
    assert not unlisted, f"reading bytes that can run code, not in ALLOWED with a reason: {unlisted}"
    unsafe = [f"{u.where[0]}:{u.line} {u.problem}" for u in uses if u.problem]
    assert not unsafe, unsafe
    stale = set(ALLOWED) - {u.where for u in uses}
    assert not stale, f"ALLOWED lists calls that are gone (remove them): {sorted(stale)}"


PLANTED = '''
import pickle as p
import numpy
import torch
import torch.distributed.checkpoint as dcp
import yaml
from dill import loads
from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageReader
from yaml import SafeLoader


def read_everything(path, text):
    state = torch.load(path, weights_only=False)
    weights = torch.load(path)
    safe = torch.load(path, weights_only=True)
    array = numpy.load(path, allow_pickle=True)
    config = yaml.load(text, Loader=yaml.Loader)
    also_safe = yaml.load(text, Loader=SafeLoader)
    script = torch.jit.load(path)
    dcp.load(state, checkpoint_id=path)
    dcp.state_dict_loader.load(state, storage_reader=FileSystemReader(path))
    dcp.load(state, storage_reader=HuggingFaceStorageReader(path))
    return p.loads(text), loads(text), state, weights, safe, array, config, also_safe, script


class Reader:
    def read(self, f, opener=p.load):
        return opener(f)
'''


def test_the_walker_finds_planted_calls_however_they_are_imported():
    """The positive control: a snippet with bad calls behind aliases and from-imports, each one found, and the unsafe
    arguments named; the calls made safe by their argument (yaml's `SafeLoader` imported by name, a sharded
    checkpoint read through HuggingFaceStorageReader) are found but not faulted."""
    uses = uses_in(PLANTED, "planted.py")
    assert [(u.where[1:], u.problem is not None) for u in uses] == [
        (("read_everything", "torch.load"), True), (("read_everything", "torch.load"), True),
        (("read_everything", "torch.load"), False), (("read_everything", "numpy.load"), True),
        (("read_everything", "yaml.load"), True), (("read_everything", "yaml.load"), False),
        (("read_everything", "torch.jit.load"), False),
        (("read_everything", "torch.distributed.checkpoint.load"), True),
        (("read_everything", "torch.distributed.checkpoint.state_dict_loader.load"), True),
        (("read_everything", "torch.distributed.checkpoint.FileSystemReader"), True),
        (("read_everything", "torch.distributed.checkpoint.load"), False),
        (("read_everything", "pickle.loads"), False),
        (("read_everything", "dill.loads"), False), (("Reader.read", "pickle.load"), False)]
    assert {u.problem for u in uses if u.problem} == {
        "torch.load without weights_only=True written as a literal", "numpy.load with allow_pickle not a literal False",
        "yaml.load without Loader=yaml.SafeLoader", "FileSystemReader unpickles the checkpoint's .metadata file",
        *(f"{name} without storage_reader=HuggingFaceStorageReader(...)" for name in (
            "torch.distributed.checkpoint.load", "torch.distributed.checkpoint.state_dict_loader.load"))}
    assert not any(u.where in ALLOWED for u in uses)  # none of them would pass
