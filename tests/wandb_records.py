"""Reads an offline W&B run back from W&B's own ``.wandb`` file, not through our logger calls.

The file is a LevelDB-style record log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks
of chunks, each with a 7-byte header (CRC-32 uint32, length uint16, type uint8: 1 full, 2 first, 3 middle,
4 last; a block tail shorter than a chunk header is zero padding). The chunks of one record join into a
serialized ``wandb.proto.wandb_internal_pb2.Record``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # end of the written data (zero-filled)
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(path: Path) -> list[dict]:
    """Every history row of the run: {key: decoded value} (keys nested with '/' where W&B split them)."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def run_file(run_dir: Path) -> Path:
    """The ``.wandb`` file of the single offline run under ``run_dir``."""
    files = sorted(Path(run_dir).glob("**/wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def config(path: Path) -> dict:
    """The run's config as W&B keeps it: every config record's updates (a nested key such as W&B's own
    ``_wandb.visualize.<chart>`` comes with an empty ``key`` and a ``nested_key`` path) and removals, in order."""
    out: dict = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind not in ("config", "run"):
            continue
        cfg = record.config if kind == "config" else record.run.config
        for item in cfg.update:
            keys = [item.key] if item.key else list(item.nested_key)
            node = out
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = json.loads(item.value_json)
        for item in cfg.remove:
            keys = [item.key] if item.key else list(item.nested_key)
            node = out
            for key in keys[:-1]:
                node = node.get(key, {})
            node.pop(keys[-1], None)
    return out


def run_id(path: Path) -> str:
    """The W&B run id recorded in the run file."""
    return next(r.run.run_id for r in records(path) if r.WhichOneof("record_type") == "run")
