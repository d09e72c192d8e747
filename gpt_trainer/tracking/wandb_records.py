"""Reads a wandb offline run file back (wandb 0.31 ships no public reader). Layout, checked against real files:
a 7-byte header (':W&B', 0xBEE1, version 0), then 32 KiB blocks of LevelDB-style records, each
<crc32 u32, length u16, type u8> + payload; types FULL=1, FIRST=2, MIDDLE=3, LAST=4; every record a protobuf Record.

A file whose wandb process was killed ends anywhere, even inside a record: what is complete is read, and the reading
stops at the first record that is cut short or fails its CRC."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """The protobuf Records of a run file, in order, up to where it is damaged or cut off."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < HEADER:  # killed before the header was written
        return []
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        payload = data[pos + HEADER:pos + HEADER + length]
        if len(payload) < length or crc != zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF:
            break  # the damaged tail of a killed run: everything before it stands
        pos += HEADER + length
        if kind == FULL:
            records.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            records.append(pending + payload)
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def history_rows(path: Path) -> list[dict]:
    """The rows `run.log` wrote, as {key: value}; nested keys joined with '/'."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows

