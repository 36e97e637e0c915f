"""Folders published to an object store and fetched back checked, for published data, backbones and the
pipeline's run directory: the files first, the manifest listing their digests LAST (a reader that finds it
finds every file), and each file checked against its digest before it is used; no listing is needed.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedmedclip.digests import file_digest, is_sha256
from fedmedclip.federation.storage import MAX_PARALLEL, ObjectStore, ObjectTooLarge, StoreError
from fedmedclip.jsonfiles import loads
from fedmedclip.paths import MAX_NAME_BYTES

from .s3 import ObjectMissing, S3Store


class TreeMismatch(StoreError):
    """A published file is not the one its manifest records (changed or damaged after publishing)."""


def tree_files(folder: str | Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every file below `folder` as {relative path: {"sha256", "size"}}, but hidden entries (an interrupted
    atomic write's leftovers, a `huggingface-cli download`'s .cache/) and those named in `skip`."""
    folder, files = Path(folder), {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in skip and not any(p.startswith(".") for p in rel.split("/")):
            files[rel] = {"sha256": file_digest(path), "size": path.stat().st_size}
    return files


def upload(store: ObjectStore, files: dict, there=None, progress: str = "") -> tuple[int, dict]:
    """Put each file `{key: path}` (S3: streamed in one PUT). With `there` (a key's stored MD5, None when it
    has none), a key already holding the file is skipped and one holding other content is refused, never
    overwritten: a re-run of the same publish sends nothing. Returns the bytes sent and each file's MD5."""

    def put(key: str) -> tuple[int, str | None]:
        path, md5 = Path(files[key]), None
        if there is not None:
            md5, found = file_digest(path, "md5"), there(key)
            if found == md5:
                return 0, md5
            if found is not None:
                raise StoreError(
                    f"{store.where(key)} exists with other content than {path}; refusing to overwrite it"
                )
        if isinstance(store, S3Store):
            store.put_file(key, path)
        else:
            store.put(key, path.read_bytes())
        return path.stat().st_size, md5

    done = _map(put, list(files), progress)
    return sum(sent for sent, _ in done), {key: md5 for key, (_, md5) in zip(files, done, strict=True)}


def download(
    store: ObjectStore, files: dict, algorithm: str = "md5", sizes: dict[str, int] | None = None
) -> list[Path]:
    """Fetch each `{key: (local path, digest)}`: a local file with that digest is kept; else the object is
    downloaded beside it, checked (TreeMismatch) and renamed into place, so a damaged download is never used.
    A digest of None: downloaded unchecked (the caller checks). With `sizes` (a key's size as its publisher
    recorded it: a published tree's files), no more than that is read of an object: one announcing another
    size is refused before its body is read, one whose body runs on is cut one byte past it (TreeMismatch),
    so an object replaced by a huge one never fills the disk before its digest could refuse it. A key without
    a recorded size (a site's images) is read whole."""

    def fetch(key: str) -> Path:
        path, digest = files[key]
        size = None if sizes is None else sizes.get(key)
        if (
            digest is not None
            and path.is_file()
            and (size is None or path.stat().st_size == size)
            and file_digest(path, algorithm) == digest
        ):
            return path

        def other_size(what: str) -> TreeMismatch:
            return TreeMismatch(
                f"{store.where(key)} {what}, not the {size} bytes its publisher recorded: it was changed after "
                "publishing, and is refused without being read whole; publish again"
            )

        def announced(length: int) -> None:
            if size is not None and length != size:
                raise other_size(f"is {length} bytes")

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        os.close(fd)
        try:
            try:
                if isinstance(store, S3Store):
                    store.download(key, tmp, size, announced)
                elif (data := store.get(key, max_bytes=size)) is None:
                    raise ObjectMissing(f"{store.where(key)} does not exist")
                else:
                    Path(tmp).write_bytes(data)  # at most size + 1 bytes: get's cap
            except ObjectTooLarge as exc:  # only with a recorded size: the file's, or a body running past it
                raise other_size(f"is {exc.size} bytes" if exc.size > size + 1 else "is larger") from None
            announced(os.path.getsize(tmp))  # a local store's file, or a response without a Content-Length
            got = file_digest(tmp, algorithm) if digest is not None else None
            if got != digest:
                raise TreeMismatch(
                    f"{store.where(key)} has {algorithm.upper()} {got}, not the {digest} its publisher recorded: "
                    "it was changed after publishing; publish again"
                )
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    return _map(fetch, list(files))


def publish_tree(store: ObjectStore, folder: str | Path, manifest_key: str, manifest: dict) -> None:
    """The files `manifest["files"]` lists (tree_files of `folder`), then the manifest itself, last."""
    upload(store, {rel: Path(folder) / rel for rel in manifest["files"]})
    store.put(manifest_key, json.dumps(manifest, indent=1).encode())


def tree_problem(files: object) -> str | None:
    """Why a manifest's file list (`{rel: {"sha256", "size"}}`, as read from storage) may not be fetched: none,
    a name that leaves its folder (or is hidden), one longer than a file system takes, a name both a file and
    a folder of others (`a` and `a/b`), an entry without a sha256 or a size. None when it may."""
    if not isinstance(files, dict) or not files:
        return "no file list"
    folders = {"/".join(rel.split("/")[:n]) for rel in files for n in range(1, rel.count("/") + 1)}
    for rel, entry in files.items():  # JSON: every name is a str
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") or p[0] == "." for p in parts):
            return f"file name {rel!r} leaves its folder"
        if any(len(p.encode()) > MAX_NAME_BYTES for p in parts) or "\0" in rel:
            return f"file name {rel[:60]!r}... is not a name a file system takes"
        if rel in folders:
            return f"file name {rel!r} is also a folder of other files"
        if not isinstance(entry, dict) or not is_sha256(str(entry.get("sha256", ""))):
            return f"file {rel!r} has no sha256"
        # Its size bounds its download (`download`): without one, a replaced object would be read whole.
        size = entry.get("size")
        if type(size) is not int or size < 0:
            return f"file {rel!r} has no size (a number of bytes)"
    return None


def read_manifest(store: ObjectStore, key: str, max_bytes: int, **expected) -> dict | None:
    """The manifest another task or party published at `key` of `store`, read bounded: None when there is none;
    ValueError naming what is wrong (too large, not a JSON object, another format, run or extraction than
    `expected`, a file list tree_problem refuses)."""
    try:
        raw = store.get(key, max_bytes=max_bytes)
    except ObjectTooLarge as exc:
        raise ValueError(str(exc)) from None
    if raw is None:
        return None
    try:  # too deeply nested, a key twice: ValueError too
        manifest = loads(raw, unique=True)
    except ValueError as exc:
        raise ValueError(f"not a readable JSON manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    for name, value in expected.items():
        if manifest.get(name) != value:
            raise ValueError(f"its {name} is {manifest.get(name)!r}, not {value!r}")
    if problem := tree_problem(manifest.get("files")):
        raise ValueError(problem)
    return manifest


def tree_mismatch(folder: str | Path, files: dict[str, dict]) -> str | None:
    """Why `folder` does not hold a manifest's files (each one's size and sha256), or None."""
    for rel, entry in files.items():
        path = Path(folder) / rel
        if not path.is_file():
            return f"{rel} is missing"
        if (size := path.stat().st_size) != entry.get("size", size):
            return f"{rel} has {size} bytes, the manifest records {entry['size']}"
        if (digest := file_digest(path)) != entry["sha256"]:
            return f"{rel} has sha256 {digest[:12]}, the manifest records {entry['sha256'][:12]}"
    return None


def fetch_tree(store: ObjectStore, files: dict[str, dict], dest: str | Path, checked: bool = True) -> None:
    """The files a manifest lists into `dest`, each read no further than its recorded size and checked against
    its sha256 unless `checked` is False (the caller checks the whole tree: `tree_mismatch`)."""
    if (problem := tree_problem(files)) is not None:
        raise StoreError(f"{store.url}: the manifest is damaged: {problem}")
    jobs = {rel: (Path(dest) / rel, e["sha256"] if checked else None) for rel, e in files.items()}
    try:
        download(store, jobs, "sha256", {rel: e["size"] for rel, e in files.items()})
    except OSError as exc:  # the local side: a full disk, a name the file system refuses
        raise StoreError(f"cannot fetch {store.url}'s files into {dest}: {exc}") from None


def _map(fn, items: list, desc: str = "") -> list:
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(MAX_PARALLEL) as pool:  # a bar (with `desc`) only over a publish's images
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="img", disable=not desc))
