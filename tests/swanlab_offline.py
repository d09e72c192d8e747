"""Reads a SwanLab offline run folder back with SwanLab's own reader (the one `swanlab sync` uses; an internal
module, so the dev extra pins swanlab). A run folder is `<logdir>/run-<time>-<id>/` holding `run-<id>.swanlab`, a
sequence of protobuf Records (start, column, scalar, media, finish ...) in a LevelDB-style container."""

from __future__ import annotations

from pathlib import Path


def run_folders(logdir: Path) -> list[Path]:
    return sorted(p for p in Path(logdir).glob("run-*") if p.is_dir())


def read_records(run_folder: Path) -> list:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    [path] = Path(run_folder).glob("run-*.swanlab")
    reader = DataStoreReader()
    reader.open(str(path))
    records = []
    for raw in reader:
        record = Record()
        record.ParseFromString(raw)
        records.append(record)
    reader.close()
    return records


def scalar_steps(records: list) -> dict[str, list[int]]:
    """{metric name: the steps it was logged at}, like tests.conftest.scalars for TensorBoard."""
    steps: dict = {}
    for r in records:
        if r.HasField("scalar"):
            steps.setdefault(r.scalar.key, []).append(r.scalar.step)
    return {name: sorted(s) for name, s in steps.items()}


def media_steps(records: list) -> dict[str, list[int]]:
    steps: dict = {}
    for r in records:
        if r.HasField("media"):
            steps.setdefault(r.media.key, []).append(r.media.step)
    return steps


def start_record(records: list):
    return next(r.start for r in records if r.HasField("start"))


def finish_states(records: list) -> list[str]:
    """The state each finish record gives, by name (RUN_STATE_FINISHED, RUN_STATE_ABORTED, ...)."""
    finishes = [r.finish for r in records if r.HasField("finish")]
    return [f.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[f.state].name for f in finishes]
