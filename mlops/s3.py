"""S3 for the MLOps layer: the one boto3 client factory, error mapper and object store (`S3Store`, the core's
`ObjectStore` for `s3://`) behind the mailbox, published data, backbones and the pipeline's run directory.
Registered as `s3` under the entry-point group `fedmedclip.stores`, so the core's `open_store` finds it without
importing boto3. Credentials and endpoint come from the party's environment. Every object is one PUT: no
reader sees half of it, and its ETag is its MD5.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from fedmedclip.federation.storage import ObjectStore, StoreAccessDenied, StoreError, check_key, check_size

from .sites import SECRET_KEYS, SERVER_PREFIX, SERVER_SECRET_NAME, site_secret_name

MISSING = ("NoSuchKey", "404", "NotFound")
# A body is read 1 MiB at a time: a download never holds a CLIP's ~600 MB of weights whole in memory.
DOWNLOAD_CHUNK = 1 << 20
_SITE_KEY = re.compile(r"(?:^|/)sites/(\d+)/")


class ObjectMissing(StoreError):
    """The object (or its bucket) does not exist."""


def split_s3_url(url: str, error: type[Exception] = StoreError) -> tuple[str, str]:
    """`s3://BUCKET[/PREFIX]` -> (BUCKET, PREFIX without slashes); the caller's `error` when it is not one."""
    text = str(url)
    if not text.startswith("s3://"):
        raise error(f"{text!r} is not an s3:// URL")
    bucket, _, prefix = text[len("s3://") :].partition("/")
    if not bucket:
        raise error(f"{text!r}: no bucket; use s3://BUCKET or s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


def s3_client(endpoint=None, access_key=None, secret_key=None, region=None):
    """A boto3 S3 client: the environment's endpoint (AWS_ENDPOINT_URL_S3) and credentials unless given.

    One client per endpoint, credentials and environment for the process's life (boto3's clients are
    thread-safe): building one reads botocore's service model, about 30 ms of CPU, where a party makes one per
    store it opens. The environment is part of the key (every AWS_* variable and the proxies), so a process that
    changes its credentials or endpoint there gets a client of the new ones."""
    env = os.environ
    settings = tuple(
        sorted((k, v) for k, v in env.items() if k.startswith("AWS_") or k.lower().endswith("_proxy"))
    )
    endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("MLFLOW_S3_ENDPOINT_URL") or None
    return _client(endpoint, access_key, secret_key, region, settings)


@functools.lru_cache(maxsize=64)
def _client(endpoint, access_key, secret_key, region, _environment):
    import boto3
    from botocore.config import Config

    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "Found credentials" per client
    # A fresh session: boto3's default one keeps the first credentials it found for the process's life.
    # Retries with backoff absorb a bucket's transient errors; the parties poll anyway.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=16),
    )


def error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def s3_error(exc: Exception, verb: str, bucket: str, key: str) -> StoreError:
    """A boto3 failure as a StoreError naming the object and the credentials it needs (the Secret a cluster
    task holds for it): StoreAccessDenied when they are missing or refused, ObjectMissing when the object or
    its bucket does not exist."""
    from botocore.exceptions import NoCredentialsError

    where, code, site = f"s3://{bucket}/{key}", error_code(exc), _SITE_KEY.search(key)
    if site:
        needs = f"site {site.group(1)}'s (Secret {site_secret_name(site.group(1))})"
    elif key.startswith(SERVER_PREFIX) or f"/{SERVER_PREFIX}" in key:
        needs = f"the server's (Secret {SERVER_SECRET_NAME})"
    else:
        needs = "this party's"
    if isinstance(exc, NoCredentialsError):
        return StoreAccessDenied(
            f"cannot {verb} {where}: no S3 credentials in the environment ({', '.join(SECRET_KEYS)}); it needs "
            f"{needs} credentials: in a cluster the task gets them from its Secret, on this machine run "
            '`eval "$(fedmedclip stack env --role ROLE)"`'
        )
    if code in ("AccessDenied", "403", "Forbidden"):
        key_id = os.environ.get("AWS_ACCESS_KEY_ID", "?")[:8]
        return StoreAccessDenied(
            f"access to {where} denied ({verb}): the credentials in use (access key {key_id}...) do not cover "
            f"it; it needs {needs} credentials"
        )
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StoreAccessDenied(
            f"cannot {verb} {where}: the S3 server does not accept these credentials ({code})"
        )
    if code == "NoSuchBucket":
        return ObjectMissing(f"cannot {verb} {where}: bucket {bucket!r} does not exist")
    if code in MISSING:
        return ObjectMissing(f"{where} does not exist")
    return StoreError(f"cannot {verb} {where}: {code or type(exc).__name__}: {exc}")


@contextlib.contextmanager
def store_errors(error: type[Exception], missing: Callable[[ObjectMissing], str]):
    """The object store's failures as the caller's `error`, one line each; a missing object's message is
    `missing(exc)` (how to publish it). A context manager and a decorator."""
    try:
        yield
    except ObjectMissing as exc:
        raise error(missing(exc)) from None
    except StoreError as exc:
        raise error(str(exc)) from None


class S3Store(ObjectStore):
    """`s3://BUCKET[/PREFIX]`; keys are relative to the prefix, each checked by `check` (by default the core's
    check_key; published data passes its image-id check)."""

    def __init__(self, url: str, client=None, check: Callable[[str], str] = check_key):
        self.bucket, self.prefix = split_s3_url(url)
        self.url = f"s3://{self.bucket}/{check_key(self.prefix)}" if self.prefix else f"s3://{self.bucket}"
        self.client, self.check = client or s3_client(), check

    def sub(self, prefix: str) -> S3Store:
        return S3Store(f"{self.url}/{check_key(prefix.strip('/'))}", self.client, self.check)

    def _key(self, key: str) -> str:
        self.check(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, verb: str, method: str, key: str = "", missing_ok: bool = False, **kwargs):
        """One boto3 call on the bucket (on the object `key`, a full key, if given): its answer (None for a
        missing object when `missing_ok`), else the failure as the mapped StoreError."""
        try:
            return getattr(self.client, method)(Bucket=self.bucket, **({"Key": key} if key else {}), **kwargs)
        except Exception as exc:  # botocore raises several unrelated classes
            if missing_ok and error_code(exc) in MISSING:
                return None
            raise s3_error(exc, verb, self.bucket, key) from None

    def put(self, key, data):
        self._call("write", "put_object", self._key(key), Body=bytes(data))

    def put_file(self, key: str, path: str | Path) -> None:
        """One PUT of the file (streamed), so its ETag is its MD5."""
        with open(path, "rb") as fh:
            self._call("write", "put_object", self._key(key), Body=fh)

    def get(self, key, max_bytes=None):
        with self._body(key, max_bytes, missing_ok=True) as chunks:
            if chunks is None:
                return None
            data = b"".join(chunks)
        check_size(self.where(key), len(data), max_bytes)
        return data

    def download(
        self,
        key: str,
        path: str | Path,
        max_bytes: int | None = None,
        announced: Callable[[int], None] | None = None,
    ) -> int:
        """The object streamed into `path` a chunk at a time, never whole in memory (ObjectMissing when it does
        not exist); returns the bytes written. `announced` (a reader that knows the size the object must have)
        and `max_bytes` refuse it as in `_body`: an object replaced by a huge one, or an endless stream, cannot
        fill the disk."""
        written = 0
        # The local side's failures (a full disk) are OSErrors, for the caller.
        with self._body(key, max_bytes, announced) as chunks, open(path, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                written += len(chunk)
        check_size(self.where(key), written, max_bytes)
        return written

    @contextlib.contextmanager
    def _body(self, key: str, max_bytes: int | None, announced=None, missing_ok: bool = False):
        """The object's body as chunks of at most DOWNLOAD_CHUNK bytes, no more than max_bytes + 1 in all (the
        reader's check_size then refuses a body that ran on past max_bytes), None when it does not exist and
        `missing_ok`. Its Content-Length is first shown to `announced`, which raises to refuse the object, and
        checked against `max_bytes`: a refused object's connection is closed with its body unread."""
        full = self._key(key)
        response = self._call("read", "get_object", full, missing_ok)
        if response is None:
            yield None
            return
        body, where = response["Body"], self.where(key)
        with contextlib.closing(body):
            length = response.get("ContentLength")
            if length is not None:  # S3 always sends it; without it, the cap on the body still holds
                if announced is not None:
                    announced(int(length))
                check_size(where, int(length), max_bytes)
            yield self._chunks(body, full, None if max_bytes is None else max_bytes + 1)

    def _chunks(self, body, full: str, limit: int | None):
        read = 0
        while limit is None or read < limit:
            try:
                chunk = body.read(DOWNLOAD_CHUNK if limit is None else min(DOWNLOAD_CHUNK, limit - read))
            except Exception as exc:  # the connection lost while the body is read
                raise s3_error(exc, "read", self.bucket, full) from None
            if not chunk:
                return
            read += len(chunk)
            yield chunk

    def md5(self, key: str) -> str | None:
        """The stored object's MD5 (its ETag: every object is one PUT), None when it does not exist."""
        head = self._call("check", "head_object", self._key(key), True)
        return None if head is None else head["ETag"].strip('"')

    def exists(self, key):
        return self.md5(key) is not None

    def delete(self, key):
        self._call("delete", "delete_object", self._key(key))

    def delete_every_version(self, key: str) -> int:
        """Delete `key` and its earlier versions (a versioned bucket keeps them) without listing, which a
        site's role may not: HEAD gives the current version, deleted until none is left. Returns how many."""
        gone, full = 0, self._key(key)
        while (head := self._call("check", "head_object", full, True)) is not None:
            version = head.get("VersionId")
            if version in (None, "", "null"):
                self.delete(key)
                return gone + 1
            self._call("delete", "delete_object", full, VersionId=version)
            gone += 1
        return gone

    def md5s(self, prefix: str) -> dict[str, str]:
        """Every object's MD5 under `prefix` (relative keys), one listing: the publisher's role only."""
        base, skip = self._key(prefix.strip("/")) + "/", len(self.prefix) + 1 if self.prefix else 0
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
        try:  # the pages are requested as they are read
            return {o["Key"][skip:]: o["ETag"].strip('"') for page in pages for o in page.get("Contents", [])}
        except Exception as exc:
            raise s3_error(exc, "list", self.bucket, base) from None

    def ensure_bucket(self) -> None:
        """List the bucket (HeadBucket is not an action a role can be granted), and create it, versioned as the
        cluster's are, when it does not exist (an admin's key may; a role's may not: `stack add-bucket`)."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except Exception as exc:
            if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise s3_error(exc, "list", self.bucket, "") from None
            self._call("create", "create_bucket")
            self._call("create", "put_bucket_versioning", VersioningConfiguration={"Status": "Enabled"})


open_s3_store = S3Store  # the entry point `fedmedclip.stores: s3`
