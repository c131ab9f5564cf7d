"""The Files API: uploads streamed to a temporary directory, and the batches' result files.

A batch input file can be 200 MB, so nothing here holds a file's content in memory: uploads go
to disk chunk by chunk and downloads are streamed from disk.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from .answers import _ApiError, _new_id
from .ledger import Ledger
from .responses import _page

_CHUNK = 1 << 16
_MAX_UPLOAD = 512 * 1024 * 1024  # the real API's limit per file
_BATCH_FILE_TTL = 30 * 86400  # batch files expire after 30 days by default


@dataclass(slots=True, eq=False)
class _StoredFile:
    """A file on disk and the File object that describes it."""

    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    path: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.created_at + _BATCH_FILE_TTL,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


class _FileStore:
    """Stored files by id, newest last; their bytes live in one temporary directory."""

    def __init__(self, ledger: Callable[[], Ledger]) -> None:
        self._ledger = ledger
        self._files: dict[str, _StoredFile] = {}
        self._dir: Path | None = None

    def __len__(self) -> int:
        return len(self._files)

    def total_bytes(self) -> int:
        return sum(f.bytes for f in self._files.values())

    def new_path(self) -> Path:
        """A fresh path in the store's directory, for a file still being written."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="batchrun-sim-"))
        return self._dir / _new_id("part-")

    def add(self, path: Path, filename: str, purpose: str) -> _StoredFile:
        """Register a finished file (it now belongs to the store)."""
        stored = _StoredFile(
            _new_id("file-"), filename, purpose, path.stat().st_size, int(time.time()), path
        )
        self._files[stored.id] = stored
        return stored

    def get(self, file_id: str) -> _StoredFile:
        stored = self._files.get(file_id)
        if stored is None:
            raise _ApiError(404, f"No such File object: {file_id}", param="id")
        return stored

    def clear(self) -> None:
        """Forget every file and delete the directory (open handles keep working)."""
        self._files.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def handle(
        self, request: web.BaseRequest, parts: list[str]
    ) -> dict[str, Any] | web.StreamResponse:
        """Route ``/v1/files[/{id}[/content]]``: a JSON object or a streamed response."""
        method = request.method
        if parts == [] and method == "POST":
            return await self._upload(request)
        if parts == [] and method == "GET":
            query = request.query
            purpose = query.get("purpose")
            files = [f for f in reversed(self._files.values()) if purpose in (None, f.purpose)]
            if query.get("order", "desc") == "asc":
                files.reverse()
            return _page(files, query, 10_000, 10_000)
        if len(parts) == 1 and method == "GET":
            return self.get(parts[0]).to_dict()
        if len(parts) == 1 and method == "DELETE":
            stored = self.get(parts[0])
            del self._files[stored.id]
            stored.path.unlink(missing_ok=True)  # a batch reading it keeps its open handle
            return {"id": stored.id, "object": "file", "deleted": True}
        if len(parts) == 2 and parts[1] == "content" and method == "GET":
            stored = self.get(parts[0])
            headers = {"Content-Type": "application/octet-stream"}
            return web.FileResponse(stored.path, chunk_size=_CHUNK, headers=headers)
        raise _ApiError(404, f"Invalid URL ({method} {request.path})")

    async def _upload(self, request: web.BaseRequest) -> dict[str, Any]:
        """``POST /v1/files``: multipart with ``purpose`` and ``file``, streamed to disk."""
        purpose, upload = await self._read_form(request)
        problem = _form_problem(purpose, upload)
        if problem is not None:
            _discard(upload)
            raise problem
        assert purpose is not None and upload is not None
        stored = self.add(upload[0], upload[1], purpose)
        self._ledger().files_uploaded += 1
        return stored.to_dict()

    async def _read_form(
        self, request: web.BaseRequest
    ) -> tuple[str | None, tuple[Path, str] | None]:
        """The ``purpose`` field and the ``file`` part (on disk, with its name) of the body."""
        purpose: str | None = None
        upload: tuple[Path, str] | None = None
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise _ApiError(400, "Nested multipart bodies are not supported.")
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file" and upload is None:
                    upload = (await self._receive(part), part.filename or "upload")
                else:
                    await part.release()
        except (AssertionError, ValueError, KeyError):  # what aiohttp raises on a bad body
            _discard(upload)
            raise _ApiError(400, "Could not read the multipart/form-data body.") from None
        except BaseException:
            _discard(upload)
            raise
        return purpose, upload

    async def _receive(self, part: BodyPartReader) -> Path:
        """Write one part to a new file, chunk by chunk."""
        path = self.new_path()
        size = 0
        try:
            with path.open("wb") as out:
                while chunk := await part.read_chunk(_CHUNK):
                    size += len(chunk)
                    if size > _MAX_UPLOAD:
                        message = f"File too large: the maximum is {_MAX_UPLOAD} bytes."
                        raise _ApiError(413, message, param="file")
                    out.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path


def _discard(upload: tuple[Path, str] | None) -> None:
    if upload is not None:
        upload[0].unlink(missing_ok=True)


def _form_problem(purpose: str | None, upload: tuple[Path, str] | None) -> _ApiError | None:
    """Why the API would refuse this upload, if it would."""
    if purpose is None:
        return _ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")
    if purpose != "batch":
        message = f"Invalid value for 'purpose': {purpose!r}. The simulator stores 'batch'."
        return _ApiError(400, message, param="purpose")
    if upload is None:
        return _ApiError(400, "Missing required parameter: 'file'.", param="file")
    if not upload[1].endswith(".jsonl"):
        return _ApiError(400, "Invalid file format for Batch API. Must be .jsonl", param="file")
    return None
