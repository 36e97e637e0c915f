"""Site isolation enforced by the real local S3 server (moto with IAM enforcement, behind the stack's guard),
with the per-role policies of mlops/policies.py, which also render the cluster's MinIO policies.

Every refusal is asserted by the error code the server answers, and every allowed operation is performed
and checked, so each case can fail both ways. Objects a refused write aimed at are checked unchanged."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytest.importorskip("boto3")

from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from devstack.stack import ADMIN, DEFAULT_DATA_BUCKET, StackError, add_data_root  # noqa: E402
from mlops import policies  # noqa: E402

RUN = f"iso-{uuid.uuid4().hex[:8]}"  # this session's run id: the shared bucket may hold other tests' objects
# A data root of this file's own: other test files publish into the default one meanwhile (a site's summary
# at the fixed key summaries/sites/0.json was replaced between a put here and its read-back).
BUCKET = "fmc-isolation"
OK = "ok"


def _client(stack, role=None, access_key=None, secret_key=None, signed=True, service="s3", **config):
    """A client of the stack's S3 (or `service="iam"`) with `role`'s key (or the given one), one attempt per
    request (a refusal is the answer, not something to retry); `config`: more botocore Config settings."""
    import boto3
    from botocore import UNSIGNED

    if role is not None:
        access_key, secret_key = stack.credentials(role)
    if not signed:
        config["signature_version"] = UNSIGNED
    config = Config(retries={"max_attempts": 1}, **config)
    return boto3.client(
        service,
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=stack.region,
        config=config,
    )


def run_cli(*argv) -> int:
    import argparse

    from devstack import cli as stack_cli
    from mlops import cli

    parser = argparse.ArgumentParser(prog="fedmedclip")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    stack_cli.register(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def _code(call) -> str:
    """`ok` when the request succeeds, else the S3 error code the server answered."""
    try:
        call()
    except ClientError as e:
        return e.response.get("Error", {}).get("Code") or str(
            e.response["ResponseMetadata"]["HTTPStatusCode"]
        )
    return OK


# Objects the admin seeds: key -> bytes. {run} is this session's run id.
SEEDED = {
    "sites/0/images/{run}/a.png": b"site 0 scan",
    "sites/1/images/{run}/b.png": b"site 1 scan",
    "sites/0/catalog.json": None,  # written only when absent: other tests may publish there
    "sites/0/private/{run}/mlp.bin": b"site 0 private head",
    "sites/1/private/{run}/mlp.bin": b"site 1 private head",
    "runs/{run}/manifest.json": b"{}",
    "runs/{run}/shared.safetensors": b"shared",
    "runs/{run}/rounds/0001/global.bin": b"global 1",
    "runs/{run}/rounds/0001/updates/site_0.bin": b"update 0",
    "runs/{run}/rounds/0001/updates/site_1.bin": b"update 1",
    "runs/{run}/rounds/0001/reports/site_0.json": b"{}",
    "runs/{run}/rounds/0001/reports/site_1.json": b"{}",
    "runs/{run}/status/server.json": b"{}",
    "runs/{run}/status/site_0.json": b"{}",
    "runs/{run}/status/site_1.json": b"{}",
    "runs/{run}/server/checkpoint.bin": b"server state",
    "runs/{run}/rounds/0001/secagg/keys/site_1.json": b"{}",
    "runs/{run}/rounds/0001/secagg/shares/site_1.json": b"{}",
    "runs/{run}/rounds/0001/secagg/unmask/site_1.json": b"{}",
    "runs/{run}/rounds/0001/secagg/roster.json": b"{}",
    "runs/{run}/rounds/0001/secagg/survivors.json": b"{}",
    "runs/{run}/rounds/0001/secagg/inbox/site_0.json": b"{}",
    "runs/{run}/rounds/0001/secagg/inbox/site_1.json": b"{}",
    "runs/{run}/secagg/identities/site_1.json": b"{}",
    "server/images/{run}/t.png": b"global test scan",
    "summaries/sites/1.json": b"{}",
}


@pytest.fixture(scope="module")
def seeded(mlops_stack):
    mlops_stack = add_data_root(mlops_stack.data_dir, BUCKET)
    admin = _client(mlops_stack, ADMIN)
    for key, body in SEEDED.items():
        key = key.format(run=RUN)
        if body is None:
            if _code(lambda k=key: admin.head_object(Bucket=BUCKET, Key=k)) == OK:
                continue
            body = b"{}"
        admin.put_object(Bucket=BUCKET, Key=key, Body=body)
    return mlops_stack


def _snapshot(admin, key: str):
    try:
        return admin.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except ClientError:
        return None


# (role, operation, key, expected code). get = GetObject, head = HeadObject, put = PutObject,
# delete = DeleteObject.
CASES = [
    # a site reads what the runtime gives every site, and its own keys
    ("site_0", "get", "runs/{run}/manifest.json", OK),
    ("site_0", "get", "runs/{run}/shared.safetensors", OK),
    ("site_0", "get", "runs/{run}/rounds/0001/global.bin", OK),
    ("site_0", "get", "runs/{run}/status/server.json", OK),
    ("site_0", "get", "runs/{run}/rounds/0001/updates/site_0.bin", OK),
    ("site_0", "get", "runs/{run}/rounds/0001/reports/site_0.json", OK),
    ("site_0", "get", "runs/{run}/status/site_0.json", OK),
    ("site_0", "get", "sites/0/images/{run}/a.png", OK),
    ("site_0", "head", "sites/0/images/{run}/a.png", OK),
    ("site_0", "get", "sites/0/catalog.json", OK),
    ("site_0", "get", "sites/0/private/{run}/mlp.bin", OK),
    # ... and writes only its own update, report, status, data prefix and summary
    ("site_0", "put", "runs/{run}/rounds/0002/updates/site_0.bin", OK),
    ("site_0", "put", "runs/{run}/rounds/0002/reports/site_0.json", OK),
    ("site_0", "put", "runs/{run}/status/site_0.json", OK),
    ("site_0", "put", "sites/0/private/{run}/optimiser.bin", OK),
    ("site_0", "put", "sites/0/images/{run}/new.png", OK),
    ("site_0", "put", "summaries/sites/0.json", OK),
    ("site_0", "delete", "sites/0/private/{run}/optimiser.bin", OK),
    # cross-site: images, private state, updates, reports, status, catalog, summary
    ("site_0", "get", "sites/1/images/{run}/b.png", "AccessDenied"),
    ("site_0", "head", "sites/1/images/{run}/b.png", "403"),
    ("site_0", "put", "sites/1/images/{run}/b.png", "AccessDenied"),
    ("site_0", "put", "sites/1/images/{run}/planted.png", "AccessDenied"),
    ("site_0", "get", "sites/1/private/{run}/mlp.bin", "AccessDenied"),
    ("site_0", "put", "sites/1/private/{run}/mlp.bin", "AccessDenied"),
    ("site_0", "delete", "sites/1/private/{run}/mlp.bin", "AccessDenied"),
    ("site_0", "get", "sites/1/catalog.json", "AccessDenied"),
    ("site_0", "get", "runs/{run}/rounds/0001/updates/site_1.bin", "AccessDenied"),
    ("site_0", "put", "runs/{run}/rounds/0001/updates/site_1.bin", "AccessDenied"),
    ("site_0", "get", "runs/{run}/rounds/0001/reports/site_1.json", "AccessDenied"),
    ("site_0", "put", "runs/{run}/rounds/0001/reports/site_1.json", "AccessDenied"),
    ("site_0", "get", "runs/{run}/status/site_1.json", "AccessDenied"),
    ("site_0", "put", "runs/{run}/status/site_1.json", "AccessDenied"),
    ("site_0", "get", "summaries/sites/1.json", "AccessDenied"),
    ("site_0", "put", "summaries/sites/1.json", "AccessDenied"),
    ("site_2", "get", "sites/0/images/{run}/a.png", "AccessDenied"),
    ("site_2", "get", "runs/{run}/rounds/0001/updates/site_0.bin", "AccessDenied"),
    # a site cannot overwrite what the server publishes, nor read the server's data or state
    ("site_0", "put", "runs/{run}/rounds/0001/global.bin", "AccessDenied"),
    ("site_0", "put", "runs/{run}/manifest.json", "AccessDenied"),
    ("site_0", "put", "runs/{run}/shared.safetensors", "AccessDenied"),
    ("site_0", "put", "runs/{run}/status/server.json", "AccessDenied"),
    ("site_0", "get", "runs/{run}/server/checkpoint.bin", "AccessDenied"),
    ("site_0", "get", "server/images/{run}/t.png", "AccessDenied"),
    ("site_0", "put", "server/images/{run}/t.png", "AccessDenied"),
    # a site withdraws its own data (images, catalog, summary), nobody else's
    ("site_0", "put", "sites/0/images/{run}/withdrawn.png", OK),
    ("site_0", "delete", "sites/0/images/{run}/withdrawn.png", OK),
    ("site_0", "delete", "sites/1/images/{run}/b.png", "AccessDenied"),
    ("site_0", "delete", "summaries/sites/1.json", "AccessDenied"),
    ("site_0", "delete", "runs/{run}/rounds/0001/global.bin", "AccessDenied"),
    ("server", "delete", "sites/0/images/{run}/a.png", "AccessDenied"),
    ("publisher", "delete", "sites/0/images/{run}/a.png", "AccessDenied"),
    # secure aggregation: a site writes its own advertisement, shares and unmasking answer, reads the roster,
    # the survivors and its own inbox; never another site's, and never what the server publishes
    ("site_0", "put", "runs/{run}/rounds/0002/secagg/keys/site_0.json", OK),
    ("site_0", "put", "runs/{run}/rounds/0002/secagg/shares/site_0.json", OK),
    ("site_0", "put", "runs/{run}/rounds/0002/secagg/unmask/site_0.json", OK),
    ("site_0", "get", "runs/{run}/rounds/0001/secagg/roster.json", OK),
    ("site_0", "get", "runs/{run}/rounds/0001/secagg/survivors.json", OK),
    ("site_0", "get", "runs/{run}/rounds/0001/secagg/inbox/site_0.json", OK),
    ("site_0", "get", "runs/{run}/rounds/0001/secagg/inbox/site_1.json", "AccessDenied"),
    ("site_0", "get", "runs/{run}/rounds/0001/secagg/shares/site_1.json", "AccessDenied"),
    ("site_0", "get", "runs/{run}/rounds/0001/secagg/unmask/site_1.json", "AccessDenied"),
    ("site_0", "put", "runs/{run}/rounds/0001/secagg/keys/site_1.json", "AccessDenied"),
    ("site_0", "put", "runs/{run}/rounds/0001/secagg/shares/site_1.json", "AccessDenied"),
    ("site_0", "put", "runs/{run}/rounds/0001/secagg/unmask/site_1.json", "AccessDenied"),
    ("site_0", "put", "runs/{run}/rounds/0001/secagg/roster.json", "AccessDenied"),
    ("site_0", "put", "runs/{run}/rounds/0001/secagg/survivors.json", "AccessDenied"),
    ("site_0", "put", "runs/{run}/rounds/0001/secagg/inbox/site_1.json", "AccessDenied"),
    ("site_0", "put", "runs/{run}/rounds/0001/secagg/inbox/site_0.json", "AccessDenied"),
    ("server", "get", "runs/{run}/rounds/0001/secagg/keys/site_1.json", OK),
    ("server", "get", "runs/{run}/rounds/0001/secagg/shares/site_1.json", OK),
    ("server", "get", "runs/{run}/rounds/0001/secagg/unmask/site_1.json", OK),
    ("server", "put", "runs/{run}/rounds/0002/secagg/roster.json", OK),
    ("server", "put", "runs/{run}/rounds/0002/secagg/inbox/site_1.json", OK),
    ("server", "put", "runs/{run}/rounds/0002/secagg/survivors.json", OK),
    ("server", "put", "runs/{run}/rounds/0001/secagg/keys/site_1.json", "AccessDenied"),  # forging keys
    ("server", "put", "runs/{run}/rounds/0001/secagg/unmask/site_1.json", "AccessDenied"),
    ("publisher", "get", "runs/{run}/rounds/0001/secagg/inbox/site_0.json", "AccessDenied"),
    # a site registers its own identity key (the pipeline's sites), never another's; the server reads them
    ("site_0", "put", "runs/{run}/secagg/identities/site_0.json", OK),
    ("site_0", "put", "runs/{run}/secagg/identities/site_1.json", "AccessDenied"),
    ("site_0", "get", "runs/{run}/secagg/identities/site_1.json", "AccessDenied"),
    ("server", "get", "runs/{run}/secagg/identities/site_1.json", OK),
    ("server", "put", "runs/{run}/secagg/identities/site_1.json", "AccessDenied"),
    # the server: reads every site's update, report and status, writes the global module; never sites/
    ("server", "get", "runs/{run}/rounds/0001/updates/site_0.bin", OK),
    ("server", "get", "runs/{run}/rounds/0001/updates/site_1.bin", OK),
    ("server", "get", "runs/{run}/rounds/0001/reports/site_1.json", OK),
    ("server", "get", "runs/{run}/status/site_1.json", OK),
    ("server", "get", "runs/{run}/server/checkpoint.bin", OK),
    ("server", "get", "server/images/{run}/t.png", OK),
    ("server", "get", "summaries/sites/1.json", OK),
    ("server", "put", "runs/{run}/rounds/0002/global.bin", OK),
    ("server", "put", "runs/{run}/manifest.json", OK),
    ("server", "put", "runs/{run}/status/server.json", OK),
    ("server", "put", "runs/{run}/server/checkpoint-2.bin", OK),
    ("server", "delete", "runs/{run}/server/checkpoint-2.bin", OK),
    ("server", "get", "sites/0/images/{run}/a.png", "AccessDenied"),
    ("server", "get", "sites/1/images/{run}/b.png", "AccessDenied"),
    ("server", "get", "sites/0/catalog.json", "AccessDenied"),
    ("server", "get", "sites/1/private/{run}/mlp.bin", "AccessDenied"),
    ("server", "put", "runs/{run}/rounds/0001/updates/site_0.bin", "AccessDenied"),  # forging an update
    ("server", "put", "runs/{run}/status/site_0.json", "AccessDenied"),
    ("server", "put", "sites/0/images/{run}/planted.png", "AccessDenied"),
    ("server", "put", "server/images/{run}/t.png", "AccessDenied"),  # the publisher's
    # the publisher: server/ and each site's images and catalog; not the mailbox, not private state
    ("publisher", "put", "server/images/{run}/published.png", OK),
    ("publisher", "put", "sites/1/images/{run}/published.png", OK),
    ("publisher", "get", "sites/0/images/{run}/a.png", OK),
    ("publisher", "get", "sites/0/private/{run}/mlp.bin", "AccessDenied"),
    ("publisher", "put", "sites/0/private/{run}/mlp.bin", "AccessDenied"),
    ("publisher", "get", "runs/{run}/rounds/0001/updates/site_0.bin", "AccessDenied"),
    ("publisher", "put", "runs/{run}/rounds/0001/global.bin", "AccessDenied"),
    # MLflow's server: its artifact prefix only
    ("mlflow", "get", "sites/0/images/{run}/a.png", "AccessDenied"),
    ("mlflow", "put", "server/images/{run}/x.png", "AccessDenied"),
]


@pytest.mark.parametrize(
    ("role", "op", "key", "expected"), CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES]
)
def test_role_may_only_touch_its_keys(seeded, role, op, key, expected):
    key = key.format(run=RUN)
    client, admin = _client(seeded, role), _client(seeded, ADMIN)
    before = _snapshot(admin, key)
    body = f"written by {role} {uuid.uuid4().hex}".encode()
    calls = {
        "get": lambda: client.get_object(Bucket=BUCKET, Key=key)["Body"].read(),
        "head": lambda: client.head_object(Bucket=BUCKET, Key=key),
        "put": lambda: client.put_object(Bucket=BUCKET, Key=key, Body=body),
        "delete": lambda: client.delete_object(Bucket=BUCKET, Key=key),
    }
    assert _code(calls[op]) == expected
    after = _snapshot(admin, key)
    if op == "put" and expected == OK:
        assert after == body
    elif op == "delete" and expected == OK:
        assert after is None
    else:
        assert after == before  # a refused write or delete changed nothing
    if op == "get" and expected == OK:
        assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == before


@pytest.mark.parametrize("role", ["site_0", "server", "mlflow"])
def test_only_the_publisher_may_list_the_data_bucket(seeded, role):
    # moto ignores the s3:prefix condition that could confine a listing, so no runtime role may list.
    assert _code(lambda: _client(seeded, role).list_objects_v2(Bucket=BUCKET)) == "AccessDenied"
    listed = _client(seeded, "publisher").list_objects_v2(Bucket=BUCKET, Prefix=f"sites/0/images/{RUN}/")
    assert [o["Key"] for o in listed["Contents"]][:1] == [f"sites/0/images/{RUN}/a.png"]


def test_server_side_copy_cannot_exfiltrate_another_sites_image(seeded):
    """moto checks only the destination of a copy; the stack's guard refuses copies altogether."""
    site_0, admin = _client(seeded, "site_0"), _client(seeded, ADMIN)
    dst = f"sites/0/images/{RUN}/stolen.png"
    source = {"Bucket": BUCKET, "Key": f"sites/1/images/{RUN}/b.png"}
    assert _code(lambda: site_0.copy_object(Bucket=BUCKET, Key=dst, CopySource=source)) == "AccessDenied"
    assert _snapshot(admin, dst) is None
    # even the admin's copies are refused: the server cannot tell which copies would be safe
    assert _code(lambda: admin.copy_object(Bucket=BUCKET, Key=dst, CopySource=source)) == "AccessDenied"


def test_a_process_whose_credentials_change_gets_a_client_of_the_new_ones(seeded, monkeypatch):
    """mlops.s3 keeps one boto3 client per endpoint, credentials and environment: a process that switches its
    environment to another party's key (as a test or a notebook does) is answered as that party, never with
    the client of the key it held before; the same environment gets the same client back."""
    from mlops.s3 import s3_client

    own = {
        role: f"sites/{role[-1]}/images/{RUN}/{name}"
        for role, name in (("site_0", "a.png"), ("site_1", "b.png"))
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", seeded.s3_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", seeded.region)
    for role, other in (("site_0", "site_1"), ("site_1", "site_0")):
        key_id, secret = seeded.credentials(role)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        client = s3_client()
        assert s3_client() is client
        assert _code(lambda c=client, k=own[role]: c.get_object(Bucket=BUCKET, Key=k)) == OK, role
        assert _code(lambda c=client, k=own[other]: c.get_object(Bucket=BUCKET, Key=k)) == "AccessDenied", (
            role
        )


def test_unauthenticated_and_unknown_credentials_are_refused(seeded):
    key = f"sites/0/images/{RUN}/a.png"
    anonymous = _client(seeded, signed=False)
    assert _code(lambda: anonymous.get_object(Bucket=BUCKET, Key=key)) == "AccessDenied"
    assert _code(lambda: anonymous.put_object(Bucket=BUCKET, Key=key, Body=b"x")) == "AccessDenied"
    assert _code(lambda: anonymous.list_objects_v2(Bucket=BUCKET)) == "AccessDenied"
    made_up = _client(seeded, access_key="AKIAIOSFODNN7EXAMPLE", secret_key="x" * 40)
    assert _code(lambda: made_up.get_object(Bucket=BUCKET, Key=key)) == "InvalidAccessKeyId"
    assert _code(lambda: made_up.list_buckets()) == "InvalidAccessKeyId"
    wrong_secret = _client(seeded, access_key=seeded.credentials("site_0")[0], secret_key="x" * 40)
    assert _code(lambda: wrong_secret.get_object(Bucket=BUCKET, Key=key)) == "SignatureDoesNotMatch"
    # a plain HTTP GET of an object (no signature at all)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{seeded.s3_endpoint}/{BUCKET}/{key}")
    assert err.value.code == 403 and b"<Code>AccessDenied</Code>" in err.value.read()
    assert _snapshot(_client(seeded, ADMIN), key) == SEEDED["sites/0/images/{run}/a.png"]


def _fetch(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    try:
        # urllib would label a body as a form, which the server then parses instead of storing
        headers = {"Content-Type": "application/octet-stream"} if data is not None else {}
        with urllib.request.urlopen(
            urllib.request.Request(url, data=data, method=method, headers=headers)
        ) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_presigned_urls_carry_their_signers_permissions_only(seeded):
    """MLflow hands clients presigned URLs to download artifacts: they work, with the signer's policy."""
    site_0 = _client(seeded, "site_0", signature_version="s3v4")  # as MLflow's server presigns
    own, other = f"sites/0/images/{RUN}/a.png", f"sites/1/images/{RUN}/b.png"
    url = site_0.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": own}, ExpiresIn=60)
    assert _fetch(url) == (200, b"site 0 scan")
    disposition = {"Bucket": BUCKET, "Key": own, "ResponseContentDisposition": 'attachment; filename="a.png"'}
    assert _fetch(site_0.generate_presigned_url("get_object", Params=disposition))[0] == 200
    status, body = _fetch(
        site_0.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": other})
    )
    assert status == 403 and b"<Code>AccessDenied</Code>" in body
    # a URL signed for one key does not open another, and a forged or expired one opens nothing
    assert _fetch(url.replace("a.png", "b.png").replace("sites/0", "sites/1"))[0] == 403
    signature = url.split("X-Amz-Signature=")[1][:64]
    assert _fetch(url.replace(signature, "0" * 64))[0] == 403
    expired = site_0.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": own}, ExpiresIn=-1)
    assert _fetch(expired)[0] == 403
    # a presigned upload to the site's own prefix works, to another's is refused
    key = f"sites/0/images/{RUN}/presigned.png"
    put = site_0.generate_presigned_url("put_object", Params={"Bucket": BUCKET, "Key": key})
    assert _fetch(put, "PUT", b"uploaded")[0] == 200
    assert _snapshot(_client(seeded, ADMIN), key) == b"uploaded"
    put_other = site_0.generate_presigned_url("put_object", Params={"Bucket": BUCKET, "Key": other})
    assert _fetch(put_other, "PUT", b"planted")[0] == 403
    assert _snapshot(_client(seeded, ADMIN), other) == b"site 1 scan"
    sigv2 = _client(seeded, "site_0").generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": own}
    )
    assert "AWSAccessKeyId=" in sigv2 and _fetch(sigv2)[0] == 403  # moto cannot check SigV2: refused


def test_motos_control_api_cannot_switch_enforcement_off(seeded):
    for path, data in (
        ("/moto-api/reset-auth", b"inf"),
        ("/moto-api/reset", b""),
        ("/moto-api/data.json", None),
    ):
        request = urllib.request.Request(f"{seeded.s3_endpoint}{path}", data=data)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request)
        assert err.value.code == 403, path
    # still enforcing, and nothing was reset
    anonymous = _client(seeded, signed=False)
    assert (
        _code(lambda: anonymous.get_object(Bucket=BUCKET, Key=f"sites/1/images/{RUN}/b.png"))
        == "AccessDenied"
    )
    assert _code(
        lambda: _client(seeded, "site_0").get_object(Bucket=BUCKET, Key=f"sites/1/images/{RUN}/b.png")
    ) == ("AccessDenied")
    assert _snapshot(_client(seeded, ADMIN), f"sites/1/images/{RUN}/b.png") == b"site 1 scan"


def test_roles_cannot_grant_themselves_more(seeded):
    iam = _client(seeded, "site_0", service="iam")
    everything = json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    )
    assert _code(
        lambda: iam.put_user_policy(UserName="site_0", PolicyName="all", PolicyDocument=everything)
    ) == ("AccessDenied")
    assert _code(lambda: iam.create_access_key(UserName="site_1")) == "AccessDenied"
    assert _code(
        lambda: _client(seeded, "site_0").create_bucket(Bucket=f"fmc-evil-{uuid.uuid4().hex[:8]}")
    ) == ("AccessDenied")


def test_mlflow_role_reaches_only_its_artifact_prefix(seeded):
    mlflow = _client(seeded, "mlflow")
    key = f"{policies.MLFLOW}-probe/{RUN}"
    assert _code(lambda: mlflow.put_object(Bucket=seeded.bucket, Key=f"mlartifacts/{key}", Body=b"x")) == OK
    assert mlflow.get_object(Bucket=seeded.bucket, Key=f"mlartifacts/{key}")["Body"].read() == b"x"
    assert _code(lambda: mlflow.put_object(Bucket=seeded.bucket, Key=key, Body=b"x")) == "AccessDenied"
    assert _code(
        lambda: _client(seeded, "site_0").get_object(Bucket=seeded.bucket, Key=f"mlartifacts/{key}")
    ) == ("AccessDenied")


def test_a_mailbox_root_under_a_prefix(seeded):
    """Roles granted on BUCKET/PREFIX reach the same keys under the prefix, and nothing at the bucket root."""
    bucket = f"fmc-iso-{uuid.uuid4().hex[:8]}"
    info = add_data_root(seeded.data_dir, f"{bucket}/fed")
    assert f"{bucket}/fed" in info.data_roots
    site_1 = _client(seeded, "site_1")
    assert (
        _code(lambda: site_1.put_object(Bucket=bucket, Key="fed/runs/r/status/site_1.json", Body=b"{}")) == OK
    )
    assert _code(lambda: site_1.put_object(Bucket=bucket, Key="runs/r/status/site_1.json", Body=b"{}")) == (
        "AccessDenied"
    )
    assert _code(lambda: site_1.put_object(Bucket=bucket, Key="fed/sites/0/images/x.png", Body=b"x")) == (
        "AccessDenied"
    )
    admin = _client(seeded, ADMIN)
    assert admin.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    assert add_data_root(seeded.data_dir, f"{bucket}/fed").data_roots == info.data_roots  # idempotent


def test_roots_granted_at_once_by_several_commands_are_all_recorded(seeded):
    """Commands that grant roots on the same stack at once (two `data publish`, the demo beside a test run) each
    read the state file, grant, and write it back: every root they granted is recorded, and the file stays
    whole (with one shared temporary file, a writer truncated another's half-written state, and the later
    writer dropped the roots the earlier one had added)."""
    from concurrent.futures import ThreadPoolExecutor

    from devstack.stack import read_state

    tag = uuid.uuid4().hex[:8]
    roots = [f"fmc-race-{tag}-{i}" for i in range(6)]
    with ThreadPoolExecutor(len(roots)) as pool:
        list(pool.map(lambda root: add_data_root(seeded.data_dir, root), roots))
    recorded = read_state(seeded.data_dir).data_roots
    assert set(roots) <= set(recorded), sorted(set(roots) - set(recorded))
    assert not list(Path(seeded.data_dir).glob(".stack.json*")), "a temporary state file was left behind"


def test_a_site_withdraws_every_version_of_its_own_data(seeded, monkeypatch, capsys):
    """`fedmedclip data withdraw` with the site's own key: every version of the images its catalog lists (the
    bucket is versioned), its catalog and its summary are gone; another site's data is untouched."""
    bucket = f"fmc-withdraw-{uuid.uuid4().hex[:8]}"
    add_data_root(seeded.data_dir, bucket)
    site_0, site_1, admin = _client(seeded, "site_0"), _client(seeded, "site_1"), _client(seeded, ADMIN)
    for version in (b"first scan", b"rescanned"):  # two versions of one image
        site_0.put_object(Bucket=bucket, Key="sites/0/images/x/a.png", Body=version)
    site_0.put_object(Bucket=bucket, Key="sites/0/images/b.png", Body=b"b")
    ids = ["x/a.png", "b.png"]
    catalog = {  # what `data publish` writes (a catalog is parsed against its declaration)
        "format": 2,
        "holder": "site_0",
        "index": 0,
        "class_names": ["a"],
        "records": [[i, "a", "train"] for i in ids],
        "md5": {"x/a.png": "0" * 32, "b.png": "1" * 32},
        "assignment": {"train": ids, "val": [], "test": []},
        "partition_digest": "0" * 64,
    }
    site_0.put_object(Bucket=bucket, Key="sites/0/catalog.json", Body=json.dumps(catalog).encode())
    site_0.put_object(Bucket=bucket, Key="summaries/sites/0.json", Body=b"{}")
    site_1.put_object(Bucket=bucket, Key="sites/1/images/c.png", Body=b"site 1 keeps this")

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FEDMEDCLIP_STACK_DIR", seeded.data_dir)  # the site's own key from the local stack
    assert run_cli("data", "withdraw", "--from", f"s3://{bucket}", "--site", "site_0") == 0
    assert "withdrew site 0's 2 images" in capsys.readouterr().err
    left = admin.list_object_versions(Bucket=bucket)
    keys = {v["Key"] for v in left.get("Versions", []) + left.get("DeleteMarkers", [])}
    assert keys == {"sites/1/images/c.png"}, keys  # no version, no delete marker of site 0's data
    # another site's data cannot be withdrawn with site 0's key
    monkeypatch.setenv("FEDMEDCLIP_STACK_DIR", seeded.data_dir)
    from fedmedclip.errors import FedMedClipError

    site_1.put_object(
        Bucket=bucket, Key="sites/1/catalog.json", Body=json.dumps({"md5": {"c.png": "2" * 32}}).encode()
    )
    with pytest.raises(FedMedClipError):
        run_cli("data", "withdraw", "--from", f"s3://{bucket}", "--site", "site_0", "--site-index", "1")
    assert admin.get_object(Bucket=bucket, Key="sites/1/images/c.png")["Body"].read() == b"site 1 keeps this"


# ------------------------------------------------------------------------ credentials and their file


def test_each_role_has_its_own_key_in_a_private_state_file(seeded, capsys):
    path = os.path.join(seeded.data_dir, "stack.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as fh:
        state = json.load(fh)
    expected = ["publisher", "server", "site_0", "site_1", "site_2", "mlflow"]
    assert list(state["roles"]) == expected
    keys = {state["roles"][r]["access_key"] for r in expected} | {state["access_key"]}
    assert len(keys) == len(expected) + 1  # no two roles share a key
    assert state["roles"]["site_2"]["site_index"] == 2

    assert run_cli("stack", "env", "--data-dir", seeded.data_dir, "--role", "site_1") == 0
    out = capsys.readouterr().out
    assert f"export AWS_ACCESS_KEY_ID={seeded.credentials('site_1')[0]}" in out
    assert f"export AWS_ENDPOINT_URL_S3={seeded.s3_endpoint}" in out
    assert "export MLFLOW" not in out  # nothing of a site goes to the central MLflow
    # ... even in a shell that held the admin's or the server's environment before
    import subprocess

    shell = subprocess.run(
        [
            "bash",
            "-c",
            'eval "$1"; echo "uri=${MLFLOW_TRACKING_URI-unset} key=$AWS_ACCESS_KEY_ID"',
            "_",
            out,
        ],
        env={
            "PATH": os.environ["PATH"],
            "MLFLOW_TRACKING_URI": seeded.tracking_uri,
            "MLFLOW_TRACKING_PASSWORD": "x",
        },
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shell.strip() == f"uri=unset key={seeded.credentials('site_1')[0]}"
    assert run_cli("stack", "env", "--data-dir", seeded.data_dir) == 0
    captured = capsys.readouterr()
    assert f"export AWS_ACCESS_KEY_ID={seeded.access_key}" in captured.out and "ADMIN" in captured.err
    assert seeded.role_env("server")["MLFLOW_TRACKING_URI"] == seeded.tracking_uri
    with pytest.raises(StackError, match="no role 'site_9'.*site_0"):
        run_cli("stack", "env", "--data-dir", seeded.data_dir, "--role", "site_9")


# ----------------------------------------------------------------------- one definition, two targets


def test_committed_minio_policies_are_the_generated_ones():
    committed = policies.MINIO_POLICIES_YAML.read_text()
    assert committed == policies.render_minio_policies(), "stale: run `python -m mlops.policies --write`"
    data = yaml.safe_load(committed)["data"]
    assert list(data) == [
        "publisher.json",
        "server.json",
        "site-0.json",
        "site-1.json",
        "site-2.json",
        "mlflow.json",
    ]
    assert policies.main(["--check"]) == 0


def test_the_enforced_local_policies_are_the_clusters(seeded):
    """The stack's IAM policies on the default data bucket are, document for document, the MinIO ones."""
    iam = _client(seeded, ADMIN, service="iam")
    minio = {
        k: json.loads(v) for k, v in yaml.safe_load(policies.MINIO_POLICIES_YAML.read_text())["data"].items()
    }
    for role in policies.roles(seeded.site_names):
        if role.kind == policies.MLFLOW:
            continue  # the cluster's MLflow has a bucket of its own; locally it is a prefix
        doc = iam.get_user_policy(UserName=role.name, PolicyName=f"data@{DEFAULT_DATA_BUCKET}")[
            "PolicyDocument"
        ]
        doc = json.loads(doc) if isinstance(doc, str) else doc
        assert doc == minio[f"{role.policy_name}.json"], role.name


def test_policies_refuse_ambiguous_names():
    from fedmedclip.errors import ConfigError

    for bad in ("site.0", "a/b", "site*", "", "server", "x" * 64):
        with pytest.raises(ConfigError):
            policies.roles([bad])
    with pytest.raises(ConfigError, match="must differ"):
        policies.roles(["a", "a"])
    with pytest.raises(ConfigError):
        policies.check_root("Bad_Bucket")
    site_b = policies.roles(["a", "b"])[3]
    assert (site_b.name, site_b.site_index, site_b.policy_name) == ("b", 1, "site-1")
    text = json.dumps(policies.data_policy(site_b, "fedmedclip-data", 2))
    assert "sites/0/" not in text and "/a." not in text and "sites/1/*" in text and "updates/b.bin" in text
