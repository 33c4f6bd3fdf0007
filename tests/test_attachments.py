"""Tests for service.delivery.attachments: references stay inside the store, sizes are limited."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from service.core.message import Attachment
from service.delivery.attachments import (
    AttachmentMissing,
    AttachmentRefused,
    AttachmentStore,
    DirectoryAttachmentStore,
    guess_type,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    (store / "standard").mkdir(parents=True)
    (store / "1042").mkdir()
    (store / "standard" / "terms.pdf").write_bytes(b"%PDF-terms")
    (store / "1042" / "photo.JPG").write_bytes(b"\xff\xd8photo")
    (store / "1042" / "Rechnung März.xlsx").write_bytes(b"PK-xlsx")
    (tmp_path / "secret.txt").write_text("outside the store")
    return store


def make_store(root: Path, max_file: int = 1000, max_mail: int = 5000) -> DirectoryAttachmentStore:
    return DirectoryAttachmentStore(root, max_file, max_mail)


def test_loads_files_in_order_with_basename_and_type(root: Path) -> None:
    store = make_store(root)
    loaded = store.load(["standard/terms.pdf", "1042/photo.JPG", "1042/Rechnung März.xlsx"])
    assert loaded == [
        Attachment("terms.pdf", "application/pdf", b"%PDF-terms"),
        Attachment("photo.JPG", "image/jpeg", b"\xff\xd8photo"),
        Attachment(
            "Rechnung März.xlsx",
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            b"PK-xlsx",
        ),
    ]
    assert store.load([]) == []


def test_it_satisfies_the_store_protocol(root: Path) -> None:
    store: AttachmentStore = make_store(root)
    assert store.load(["standard/terms.pdf"])[0].filename == "terms.pdf"


@pytest.mark.parametrize(
    "ref",
    [
        "../secret.txt",
        "/etc/passwd",
        "a/../../secret.txt",
        "standard/../../secret.txt",
        "standard/../terms.pdf",
        "..",
        "..\\secret.txt",
        "C:\\Windows\\win.ini",
        "standard/terms.pdf\0.png",
        "",
    ],
)
def test_escapes_and_odd_references_are_refused(root: Path, ref: str) -> None:
    with pytest.raises(AttachmentRefused) as caught:
        make_store(root).load([ref])
    assert caught.value.ref == ref


def test_absolute_paths_inside_the_store_are_refused_too(root: Path) -> None:
    with pytest.raises(AttachmentRefused, match="absolute"):
        make_store(root).load([str(root / "standard" / "terms.pdf")])


def test_symlinks_out_of_the_store_are_refused(root: Path, tmp_path: Path) -> None:
    (root / "1042" / "link.txt").symlink_to(tmp_path / "secret.txt")
    (root / "escape").symlink_to(tmp_path)
    (root / "dangling").symlink_to(tmp_path / "not-there")
    store = make_store(root)
    for ref in ("1042/link.txt", "escape/secret.txt", "dangling"):
        with pytest.raises(AttachmentRefused, match="outside the store"):
            store.load([ref])


def test_symlinks_inside_the_store_are_followed(root: Path) -> None:
    (root / "1042" / "terms-link.pdf").symlink_to(root / "standard" / "terms.pdf")
    (loaded,) = make_store(root).load(["1042/terms-link.pdf"])
    assert loaded == Attachment("terms-link.pdf", "application/pdf", b"%PDF-terms")


def test_a_store_reached_through_a_symlink_works(root: Path, tmp_path: Path) -> None:
    (tmp_path / "via").symlink_to(root)
    (loaded,) = make_store(tmp_path / "via").load(["standard/terms.pdf"])
    assert loaded.data == b"%PDF-terms"


@pytest.mark.parametrize("ref", ["standard", "standard/", ".", "./"])
def test_directories_are_refused(root: Path, ref: str) -> None:
    with pytest.raises(AttachmentRefused):
        make_store(root).load([ref])


def test_special_files_are_refused_without_blocking(root: Path) -> None:
    os.mkfifo(root / "pipe.txt")
    with pytest.raises(AttachmentRefused, match="not a regular file"):
        make_store(root).load(["pipe.txt"])


def test_a_missing_file_may_appear_later(root: Path) -> None:
    store = make_store(root)
    with pytest.raises(AttachmentMissing) as caught:
        store.load(["standard/terms.pdf", "1042/later.pdf"])
    assert caught.value.ref == "1042/later.pdf"
    (root / "1042" / "later.pdf").write_bytes(b"%PDF-later")
    assert [a.filename for a in store.load(["1042/later.pdf"])] == ["later.pdf"]


def test_a_refusal_wins_over_a_missing_file(root: Path) -> None:
    # A permanent problem must not wait behind retries for a file that may never come.
    with pytest.raises(AttachmentRefused):
        make_store(root).load(["1042/later.pdf", "../secret.txt"])


def test_files_over_the_per_file_limit_are_refused(root: Path) -> None:
    (root / "big.pdf").write_bytes(b"x" * 1001)
    (root / "exact.pdf").write_bytes(b"x" * 1000)
    store = make_store(root, max_file=1000)
    assert len(store.load(["exact.pdf"])[0].data) == 1000
    with pytest.raises(AttachmentRefused, match="per-file limit"):
        store.load(["big.pdf"])


def test_a_total_over_the_per_mail_limit_is_refused(root: Path) -> None:
    for name in ("a.pdf", "b.pdf", "c.pdf"):
        (root / name).write_bytes(b"x" * 400)
    store = make_store(root, max_file=1000, max_mail=800)
    assert len(store.load(["a.pdf", "b.pdf"])) == 2
    with pytest.raises(AttachmentRefused, match="per-mail limit"):
        store.load(["a.pdf", "b.pdf", "c.pdf"])


def test_error_messages_name_no_file(root: Path) -> None:
    with pytest.raises(AttachmentRefused) as caught:
        make_store(root).load(["standard/terms.pdf", "../Dana Smith medical report.pdf"])
    assert "Dana" not in str(caught.value)
    assert "#2" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.pdf", "application/pdf"),
        ("a.PNG", "image/png"),
        ("a.jpg", "image/jpeg"),
        ("a.jpeg", "image/jpeg"),
        ("a.gif", "image/gif"),
        ("a.txt", "text/plain"),
        ("a.csv", "text/csv"),
        ("a.doc", "application/msword"),
        ("a.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
        ("a.xls", "application/vnd.ms-excel"),
        ("a.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        ("a.odt", "application/vnd.oasis.opendocument.text"),
        ("a.zip", "application/zip"),
        ("a.json", "application/json"),
        ("a.xml", "application/xml"),
        ("a.eml", "application/octet-stream"),
        ("a.html", "application/octet-stream"),
        ("a.htm", "application/octet-stream"),
        ("a.svg", "application/octet-stream"),
        ("a.exe", "application/octet-stream"),
        ("README", "application/octet-stream"),
        ("archive.tar.gz", "application/octet-stream"),
        (".pdf", "application/pdf"),
    ],
)
def test_mime_map(name: str, expected: str) -> None:
    assert guess_type(name) == expected


def test_a_cached_file_is_read_afresh_once_it_changes(tmp_path: Path) -> None:
    (tmp_path / "doc.txt").write_bytes(b"first version")
    store = DirectoryAttachmentStore(tmp_path, 1000, 10_000)
    [first] = store.load(["doc.txt"])
    [again] = store.load(["doc.txt"])
    assert again is first  # served from the cache, base64 body included
    assert first.encoded == base64.b64encode(b"first version")
    (tmp_path / "doc.txt").write_bytes(b"second, longer version")
    [changed] = store.load(["doc.txt"])
    assert changed.data == b"second, longer version"


def test_the_cache_stays_within_its_bound(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / f"f{i}.bin").write_bytes(bytes(100))
    store = DirectoryAttachmentStore(tmp_path, 1000, 10_000, cache_bytes=1000)
    for i in range(20):
        store.load([f"f{i}.bin"])
    assert store._cached <= 1000
    assert 0 < len(store._cache) < 20
