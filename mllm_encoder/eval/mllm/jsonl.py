"""JSON-lines files: reading with line-numbered errors, atomic writing, repairing a killed append."""

import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple

from mllm_encoder.atomic import PathLike, atomic_write_text

logger = logging.getLogger(__name__)


class JsonlRecord(NamedTuple):
    """One JSON object of a JSON-lines file with the (1-based) line it came from."""

    line: int
    data: Dict[str, Any]


def read_jsonl(path: PathLike) -> List[JsonlRecord]:
    """Read a JSON-lines file of objects; blank lines are skipped.

    Raises:
        ValueError: naming the file and line when a line is not UTF-8, not valid JSON or not a JSON object.
    """
    records = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(
                    f"{path}:{line_number}: not UTF-8 text (a binary file?); expected JSON lines"
                ) from None
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                hint = "" if line.endswith("\n") else " (the last line is cut off: was the writer killed?)"
                raise ValueError(f"{path}:{line_number}: malformed JSON line{hint}: {error}") from None
            if not isinstance(data, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(data).__name__}")
            records.append(JsonlRecord(line_number, data))
    return records


def require_fields(path: PathLike, record: JsonlRecord, fields: Iterable[str]) -> None:
    """Raise a ValueError naming the file and line when ``record`` lacks one of ``fields``."""
    missing = [name for name in fields if name not in record.data]
    if missing:
        raise ValueError(f"{path}:{record.line}: missing field(s) {', '.join(missing)}")


def repair_partial_tail(path: PathLike) -> int:
    """Make an append-only JSON-lines file end cleanly after an interrupted write.

    A last line without its newline is kept (newline added) when it is complete JSON, and cut off when it is the
    start of a JSON object (what a killed writer leaves). Anything else is not ours to cut.

    Returns:
        The number of bytes removed (0 when nothing was cut).

    Raises:
        ValueError: naming the file when it is not UTF-8 text or its last line is not a JSON object's start.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return 0
    start = data.rfind(b"\n") + 1
    tail = data[start:]
    try:
        data[:start].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (a binary file?); expected JSON lines") from None
    try:
        json.loads(tail.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        if not tail.lstrip().startswith(b"{"):
            raise ValueError(
                f"{path}: the last line is neither JSON nor a cut-off JSON object; not an answer file?"
            ) from None
        with open(path, "r+b") as handle:
            handle.truncate(start)
        logger.warning("%s: removed an incomplete last line (%d bytes) left by an interrupted run", path, len(tail))
        return len(tail)
    with open(path, "ab") as handle:
        handle.write(b"\n")
    logger.warning("%s: the last line lacked its newline; added it", path)
    return 0


def dumps_line(record: Dict[str, Any]) -> str:
    """One JSON line (with its newline) in the format LLaVA writes answers in."""
    return json.dumps(record) + "\n"


def write_jsonl_atomic(path: PathLike, records: Iterable[Dict[str, Any]]) -> None:
    """Write ``records`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    atomic_write_text(path, "".join(dumps_line(record) for record in records))
