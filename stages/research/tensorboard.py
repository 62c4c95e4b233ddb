"""TensorBoard event files without TensorBoard: a minimal writer (and reader) of the documented format.

An event file is a TFRecord stream (per record: uint64 length, masked CRC-32C of the length, the bytes, masked
CRC-32C of the bytes) of `tensorflow.Event` protobuf messages: the first holds `file_version: "brain.Event:2"`,
each further one a wall time, a step and a `Summary` of tagged values. Scalars are `simple_value`s; text uses the
text plugin's string tensor; hyper-parameters are the HParams plugin's experiment / session summaries (and a
markdown table beside them). TensorBoard (`tensorboard --logdir`)
reads these files as it reads its own.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c

FILE_VERSION = "brain.Event:2"
#: Event files' name prefix (TensorBoard lists files whose name contains "tfevents").
PREFIX = "events.out.tfevents"


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _scalar_value(tag: str, value: float) -> bytes:
    # Summary.Value: tag = 1 (string), simple_value = 2 (float).
    return _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(value)))


def _text_value(tag: str, text: str) -> bytes:
    # Summary.Value: tag = 1, metadata = 9 (SummaryMetadata: plugin_data = 1 {plugin_name = 1}), tensor = 8
    # (TensorProto: dtype = 1 (DT_STRING = 7), tensor_shape = 2 (empty: a scalar), string_val = 8).
    metadata = _bytes_field(1, _bytes_field(1, b"text"))
    tensor = _field(1, 0, _varint(7)) + _bytes_field(2, b"") + _bytes_field(8, text.encode())
    return _bytes_field(1, tag.encode()) + _bytes_field(9, metadata) + _bytes_field(8, tensor)


def _struct_value(value: Any) -> bytes:
    # google.protobuf.Value: number_value = 2 (double), string_value = 3, bool_value = 4.
    if isinstance(value, bool):
        return _field(4, 0, _varint(int(value)))
    if isinstance(value, int | float):
        return _field(2, 1, struct.pack("<d", float(value)))
    return _bytes_field(3, str(value).encode())


def _hparams_values(params: Mapping[str, Any], metrics: Sequence[str]) -> list[bytes]:
    """The HParams dashboard's summaries: an experiment (hparam names; metric tags), a session start (the values)
    and a session end (status success). HParamsPluginData: version = 1, experiment = 2, session_start_info = 3,
    session_end_info = 4."""

    def plugin(tag: str, content: bytes) -> bytes:
        data = _bytes_field(1, b"hparams") + _bytes_field(2, content)  # PluginData: plugin_name, content
        # Summary.Value: tag = 1, metadata = 9 (SummaryMetadata.plugin_data = 1); an empty string tensor as value.
        return _bytes_field(1, tag.encode()) + _bytes_field(9, _bytes_field(1, data)) + _bytes_field(
            8, _field(1, 0, _varint(7)) + _bytes_field(2, b""))

    version = _field(1, 0, _varint(0))
    infos = b"".join(_bytes_field(4, _bytes_field(1, k.encode())) for k in params)  # Experiment.hparam_infos
    infos += b"".join(_bytes_field(5, _bytes_field(1, _bytes_field(2, m.encode())))  # metric_infos.name.tag
                      for m in metrics)
    start = b"".join(_bytes_field(1, _bytes_field(1, k.encode()) + _bytes_field(2, _struct_value(v)))
                     for k, v in params.items())  # SessionStartInfo.hparams (map<string, Value>)
    end = _field(1, 0, _varint(1))  # SessionEndInfo.status = STATUS_SUCCESS
    return [plugin("_hparams_/experiment", version + _bytes_field(2, infos)),
            plugin("_hparams_/session_start_info", version + _bytes_field(3, start)),
            plugin("_hparams_/session_end_info", version + _bytes_field(4, end))]


def _event(step: int, values: list[bytes] | None = None, file_version: str | None = None,
           wall_time: float | None = None) -> bytes:
    # Event: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5 (Summary: value = 1).
    out = _field(1, 1, struct.pack("<d", time.time() if wall_time is None else wall_time))
    out += _field(2, 0, _varint(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if values:
        out += _bytes_field(5, b"".join(_bytes_field(1, v) for v in values))
    return out


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


class EventWriter:
    """Appends scalars and text to one new event file in `logdir` (one writer per process and folder)."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX}.{int(time.time())}.{socket.gethostname()}.{time.monotonic_ns() % 10**9}"
        self.path = self.logdir / name
        with self.path.open("wb") as fh:
            fh.write(_record(_event(0, file_version=FILE_VERSION)))

    def _append(self, data: bytes) -> None:
        with self.path.open("ab") as fh:
            fh.write(_record(data))

    def scalars(self, step: int, values: Mapping[str, float], wall_time: float | None = None) -> None:
        """One event holding every finite scalar of `values` (tag -> value) at `step`."""
        finite = [_scalar_value(k, v) for k, v in values.items() if v == v and abs(v) != float("inf")]
        if finite:
            self._append(_event(step, finite, wall_time=wall_time))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A markdown text summary (TensorBoard's Text tab)."""
        self._append(_event(step, [_text_value(tag, text)]))

    def hparams(self, params: Mapping[str, Any], tag: str = "hparams", metrics: Sequence[str] = ()) -> None:
        """The run's hyper-parameters: for the HParams dashboard (values None become "None"; `metrics` names the
        scalar tags it lists beside them) and as a two-column markdown table (text summary `tag`)."""
        clean = {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in params.items()}
        self._append(_event(0, _hparams_values(clean, metrics)))
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
        self.text(tag, f"| parameter | value |\n|---|---|\n{rows}")


# ------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class ScalarEvent:
    """One scalar read back: its tag, step, value and wall time."""

    tag: str
    step: int
    value: float
    wall_time: float


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message (varint, 64-bit, length-delimited, 32-bit)."""
    pos = 0
    value: Any
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by event files")
        yield number, wire, value


def read_records(path: str | Path) -> Iterator[bytes]:
    """The records of a TFRecord file, each checked against its two CRCs (a mismatch is an error naming the
    file and the offset)."""
    data = Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        body = data[pos + 12:pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if crc != _masked_crc(header) or body_crc != _masked_crc(body):
            raise ValueError(f"{path}: record at byte {pos} fails its CRC (a truncated or corrupt event file)")
        yield body
        pos += 16 + length


def read_events(logdir: str | Path) -> tuple[list[ScalarEvent], dict[str, str], list[str]]:
    """Every scalar, text summary (tag -> last text) and file version in the event files under `logdir`."""
    scalars: list[ScalarEvent] = []
    texts: dict[str, str] = {}
    versions: list[str] = []
    for path in sorted(Path(logdir).rglob(f"{PREFIX}*")):
        for record in read_records(path):
            wall, step, summary = 0.0, 0, b""
            value: Any
            for number, _, value in _fields(record):
                if number == 1:
                    (wall,) = struct.unpack("<d", value)
                elif number == 2:
                    step = value
                elif number == 3:
                    versions.append(value.decode())
                elif number == 5:
                    summary = value
            for number, _, raw in _fields(summary):
                if number != 1:
                    continue
                tag, simple, text = "", None, None
                for n, _, v in _fields(raw):
                    if n == 1:
                        tag = v.decode()
                    elif n == 2:
                        (simple,) = struct.unpack("<f", v)
                    elif n == 8:
                        text = next((s.decode() for k, _, s in _fields(v) if k == 8), None)
                if simple is not None:
                    scalars.append(ScalarEvent(tag, int(step), float(simple), wall))
                elif text is not None:
                    texts[tag] = text
    return scalars, texts, versions


def pretraining_events(run_dir: str | Path) -> Path | None:
    """A pretraining run's metrics.csv (every numeric column, tag pretrain/<column>) and its resolved config (as
    hyper-parameters) written to <run_dir>/tensorboard/pretrain, replacing earlier files there; None without
    metrics."""
    import csv
    import json
    import shutil

    run = Path(run_dir)
    metrics = run / "metrics.csv"
    if not metrics.is_file():
        return None
    logdir = run / "tensorboard" / "pretrain"
    shutil.rmtree(logdir, ignore_errors=True)
    writer = EventWriter(logdir)
    with metrics.open() as fh:
        for row in csv.DictReader(fh):
            values = {}
            for key, text in row.items():
                if key in ("step", "weights"):
                    continue
                try:
                    values[f"pretrain/{key}"] = float(text)
                except (TypeError, ValueError):
                    continue
            writer.scalars(int(row["step"]), values)
    config = run / "config.json"
    if config.is_file():
        resolved = json.loads(config.read_text())
        flat = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in resolved.get("config", {}).items()}
        writer.hparams({**flat, "student_weights": resolved.get("student_weights"),
                        "teacher_weights": resolved.get("teacher_weights")}, metrics=["pretrain/loss"])
    return logdir
