"""Parse an uploaded adapter: our safetensors file, or a zipped PEFT VeRA directory."""

from __future__ import annotations

import io
import stat
import zipfile
from typing import Any

from server.api.errors import ApiError
from vera_core.adapter import Adapter
from vera_core.adapter_file import adapter_from_bytes
from vera_core.errors import VeraError
from vera_core.peft_compat import CONFIG_NAME, WEIGHTS_NAME, adapter_from_peft

OCTET = "application/octet-stream"
ZIP_TYPES = ("application/zip", "application/x-zip-compressed")
_MAX_ENTRIES = 64


def parse_upload(content_type: str, data: bytes, projections: Any, max_bytes: int) -> Adapter:
    kind = content_type.split(";")[0].strip().lower()
    if not data:
        raise ApiError(400, "empty body: send the adapter file")
    try:
        if kind == OCTET:
            return adapter_from_bytes(data)
        if kind in ZIP_TYPES:
            files = _read_zip(data, max_bytes)
            return adapter_from_peft(files[CONFIG_NAME], files[WEIGHTS_NAME], projections)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        # The parsers raise VeraError for what they anticipate; well-formed JSON of the wrong
        # shape (e.g. metadata target_modules = "5", config r = [..]) can still trip a plain
        # Python error deep inside. That is the client's bad input (400), never a 500.
        if isinstance(e, VeraError):
            raise
        raise ApiError(400, f"malformed adapter: {type(e).__name__}: {e}") from None
    raise ApiError(
        415,
        f"unsupported Content-Type {kind or '(none)'!r}: use {OCTET} for a vera-serve adapter "
        "file or application/zip for a PEFT adapter directory",
        "unsupported_media_type",
    )


def _read_zip(data: bytes, max_bytes: int) -> dict[str, bytes]:
    """The two PEFT files from a zip, refusing traversal, links, bombs and extras."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as e:
        raise ApiError(400, f"not a valid zip archive: {e}") from None
    if len(infos) > _MAX_ENTRIES:
        raise ApiError(400, f"zip has {len(infos)} entries; a PEFT adapter needs 2")
    wanted: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if (
            name.startswith(("/", "\\"))
            or ".." in name.replace("\\", "/").split("/")
            or ":" in name
        ):
            raise ApiError(400, f"zip entry {name!r} has an unsafe path")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ApiError(400, f"zip entry {name!r} is a symbolic link")
        if info.is_dir():
            continue
        base = name.rsplit("/", 1)[-1]
        if base in (CONFIG_NAME, WEIGHTS_NAME):
            if base in wanted:
                raise ApiError(400, f"zip holds more than one {base}")
            wanted[base] = info
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in wanted]
    if missing:
        raise ApiError(400, f"zip lacks {', '.join(missing)} (expected a PEFT VeRA adapter dir)")
    return {base: _read_capped(archive, info, max_bytes) for base, info in wanted.items()}


def _read_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> bytes:
    if info.file_size > max_bytes:
        raise ApiError(413, f"{info.filename} unpacks to {info.file_size} bytes (> {max_bytes})")
    out = bytearray()
    try:
        with archive.open(info) as fh:
            while chunk := fh.read(1 << 16):
                out += chunk
                if len(out) > max_bytes:  # the header lied about the size: a zip bomb
                    raise ApiError(413, f"{info.filename} unpacks to more than {max_bytes} bytes")
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as e:
        raise ApiError(400, f"cannot unpack {info.filename}: {e}") from None
    return bytes(out)
