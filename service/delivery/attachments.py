"""Attachment store: loads referenced files from one folder, refusing anything outside it."""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Protocol

from service.core.message import Attachment
from service.core.mime import base64_body

__all__ = [
    "MIME_TYPES",
    "AttachmentMissing",
    "AttachmentRefused",
    "AttachmentStore",
    "DirectoryAttachmentStore",
    "guess_type",
]

# An explicit map rather than `mimetypes`, whose answers depend on the host's
# /etc/mime.types. HTML, SVG and scripts are deliberately absent: as text/html a webmail
# client may render a supplied file inline, so they travel as opaque octets. .eml is
# octets too: message/rfc822 may not be base64-encoded (RFC 2046 §5.2.1).
MIME_TYPES: dict[str, str] = {
    "pdf": "application/pdf",
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "txt": "text/plain",
    "csv": "text/csv",
    "doc": "application/msword",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xls": "application/vnd.ms-excel",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "odt": "application/vnd.oasis.opendocument.text",
    "zip": "application/zip",
    "json": "application/json",
    "xml": "application/xml",
}
OCTET_STREAM = "application/octet-stream"


class AttachmentRefused(Exception):
    """Permanent: the reference escapes the store, is not a regular file, or is too large.

    The message names the reference by position only (file names may hold personal data);
    `ref` carries the reference for callers that want it.
    """

    def __init__(self, reason: str, ref: str = "") -> None:
        super().__init__(reason)
        self.ref = ref


class AttachmentMissing(Exception):
    """The file does not exist (yet): it may be uploaded after its event, so retry."""

    def __init__(self, reason: str, ref: str = "") -> None:
        super().__init__(reason)
        self.ref = ref


class AttachmentStore(Protocol):
    """Where attachment references are turned into files."""

    def load(self, refs: Sequence[str]) -> list[Attachment]:
        """All referenced files, in order; raises AttachmentRefused or AttachmentMissing."""
        ...


def guess_type(filename: str) -> str:
    """The media type for a file name's extension, application/octet-stream if unknown."""
    _, dot, ext = filename.rpartition(".")
    return MIME_TYPES.get(ext.lower(), OCTET_STREAM) if dot else OCTET_STREAM


class DirectoryAttachmentStore:
    """Files under `root`, named by relative paths; size limits per file and per mail."""

    def __init__(
        self,
        root: Path,
        max_file_bytes: int,
        max_mail_bytes: int,
        cache_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._root = Path(os.path.realpath(root))
        self._max_file = max_file_bytes
        self._max_mail = max_mail_bytes
        # Standard documents go out with many mails: keep recently sent files with their
        # base64 body, keyed by what fstat says of the open file, so a changed file is
        # read afresh. Bounded by bytes (content plus encoding), least recently used out.
        self._cache: OrderedDict[tuple[str, int, int, int], Attachment] = OrderedDict()
        self._cache_limit = cache_bytes
        self._cached = 0

    def load(self, refs: Sequence[str]) -> list[Attachment]:
        """Read every referenced file; all-or-nothing, so a mail is never sent half-attached."""
        # Check every reference before reading any: a refusal is permanent and should not
        # wait behind a missing file that is retried for minutes.
        paths = [self._locate(i, ref) for i, ref in enumerate(refs, 1)]
        total = 0
        loaded: list[Attachment] = []
        for i, (ref, path) in enumerate(zip(refs, paths, strict=True), 1):
            name = PurePosixPath(ref.replace("\\", "/")).name
            item = self._read(i, ref, path, name)
            total += len(item.data)
            if total > self._max_mail:
                raise AttachmentRefused(
                    f"attachments exceed the per-mail limit of {self._max_mail} bytes", ref
                )
            loaded.append(item)
        return loaded

    def _locate(self, i: int, ref: str) -> Path:
        where = f"attachment reference #{i}"
        if not ref or "\0" in ref:
            raise AttachmentRefused(f"{where} is empty or holds a NUL byte", ref)
        # Backslashes count as separators too, so a Windows-style "..\x" is caught.
        rel = PurePosixPath(ref.replace("\\", "/"))
        if rel.is_absolute() or (rel.parts and rel.parts[0].endswith(":")):
            raise AttachmentRefused(f"{where} is an absolute path", ref)
        if ".." in rel.parts:
            raise AttachmentRefused(f"{where} contains '..'", ref)
        # realpath resolves symlinks; whatever the link says, the target must be inside.
        path = Path(os.path.realpath(self._root.joinpath(*rel.parts)))
        if not path.is_relative_to(self._root) or path == self._root:
            raise AttachmentRefused(f"{where} resolves outside the store", ref)
        return path

    def _read(self, i: int, ref: str, path: Path, name: str) -> Attachment:
        where = f"attachment reference #{i}"
        try:
            # O_NOFOLLOW: the path was resolved above, a link swapped in since is refused;
            # O_NONBLOCK: opening a FIFO must not hang (it is refused below as not a file).
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise AttachmentMissing(f"{where} does not exist (yet)", ref) from None
        except IsADirectoryError:
            raise AttachmentRefused(f"{where} is not a regular file", ref) from None
        except OSError as exc:
            raise AttachmentRefused(f"{where} cannot be opened: {exc.strerror}", ref) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise AttachmentRefused(f"{where} is not a regular file", ref)
        key = (f"{path}\0{name}", info.st_ino, info.st_size, info.st_mtime_ns)
        cached = self._cache.get(key)
        if cached is not None:
            os.close(fd)
            self._cache.move_to_end(key)
            return cached
        with os.fdopen(fd, "rb") as fh:
            if info.st_size > self._max_file:
                raise AttachmentRefused(
                    f"{where} exceeds the per-file limit of {self._max_file} bytes", ref
                )
            # Read one byte past the limit: a file growing after fstat is still caught.
            data = fh.read(self._max_file + 1)
        if len(data) > self._max_file:
            raise AttachmentRefused(
                f"{where} exceeds the per-file limit of {self._max_file} bytes", ref
            )
        item = Attachment(name, guess_type(name), data, base64_body(data))
        self._remember(key, item)
        return item

    def _remember(self, key: tuple[str, int, int, int], item: Attachment) -> None:
        size = len(item.data) + len(item.encoded)
        if size > self._cache_limit // 4:
            return  # a few large files must not flush everything else
        self._cache[key] = item
        self._cached += size
        while self._cached > self._cache_limit:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old.data) + len(old.encoded)
