"""The S3 implementation of the federation's object store (`fedmedclip.federation.storage.ObjectStore`).

Registered under the entry-point group `fedmedclip.stores` as `s3`, so `open_store("s3://BUCKET/PREFIX")` in the
core finds it without importing boto3. Credentials and endpoint come from the environment (a party's own:
its Kubernetes Secret in a cluster, `eval "$(fedmedclip stack env --role ROLE)"` on this machine). A PUT is one
request, so S3 publishes the object whole: no reader ever sees half of it.
"""

from __future__ import annotations

import logging
import os

from fedmedclip.federation.storage import (
    ObjectStore,
    StoreAccessDenied,
    StoreError,
    check_key,
    check_size,
)

_MISSING = ("NoSuchKey", "404", "NotFound")
_DENIED = ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch")


def _client():
    import boto3
    from botocore.config import Config

    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    # A fresh session: boto3's default one keeps the first credentials it found for the process's life.
    # Retries with backoff absorb a bucket's transient errors; the parties poll anyway.
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=16)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


class S3Store(ObjectStore):
    def __init__(self, url: str, client=None):
        if not url.startswith("s3://"):
            raise StoreError(f"{url!r} is not an s3:// URL")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise StoreError(f"{url!r}: no bucket name")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = client or _client()

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, verb: str, key: str) -> StoreError:
        from botocore.exceptions import ClientError, NoCredentialsError

        where = self.where(key)
        if isinstance(exc, NoCredentialsError):
            return StoreAccessDenied(
                f"cannot {verb} {where}: no S3 credentials in the environment (AWS_ACCESS_KEY_ID, "
                'AWS_SECRET_ACCESS_KEY); on this machine run `eval "$(fedmedclip stack env --role ROLE)"`'
            )
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _DENIED:
                return StoreAccessDenied(
                    f"cannot {verb} {where}: {code}: the credentials in use (access key "
                    f"{os.environ.get('AWS_ACCESS_KEY_ID', '?')[:8]}...) may not touch this object"
                )
            if code == "NoSuchBucket":
                return StoreError(f"cannot {verb} {where}: bucket {self.bucket!r} does not exist")
            return StoreError(f"cannot {verb} {where}: {code or exc}")
        return StoreError(f"cannot {verb} {where}: {type(exc).__name__}: {exc}")

    def put(self, key, data):
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=bytes(data))
        except Exception as exc:  # botocore raises several unrelated classes
            raise self._error(exc, "write", key) from None

    def get(self, key, max_bytes=None):
        """With `max_bytes`, the response's Content-Length is checked before the body is read (a larger
        object's connection is closed unread), and the body is read with that cap."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = response["Body"]
            if max_bytes is None:
                return body.read()
            try:
                check_size(self.where(key), int(response.get("ContentLength", 0)), max_bytes)
                data = body.read(max_bytes + 1)
                check_size(self.where(key), len(data), max_bytes)
                return data
            finally:
                body.close()
        except StoreError:
            raise
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") in _MISSING:
                return None
            raise self._error(exc, "read", key) from None
        except Exception as exc:
            raise self._error(exc, "read", key) from None

    def exists(self, key):
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") in _MISSING:
                return False
            raise self._error(exc, "check", key) from None
        except Exception as exc:
            raise self._error(exc, "check", key) from None

    def delete(self, key):
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._error(exc, "delete", key) from None


def open_s3_store(url: str) -> S3Store:
    return S3Store(url)
