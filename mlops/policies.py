"""Who may touch which objects: the one definition of the storage roles (publisher, server, each site, mlflow)
and their S3 permissions, from which both enforcement points are generated: the local stack's IAM users
(devstack/stack.py) and the cluster's infra/training/platform/minio-policies.yaml (`python -m mlops.policies
--write`; tests/test_isolation.py checks the committed file). Keys are those of docs/contracts.md under a data
root `BUCKET[/PREFIX]`. No role but the publisher (and MLflow, on its own bucket) may list: every key the runtime
uses is computable, and moto does not evaluate the `s3:prefix` condition that would confine a listing. moto
matches `*` across `/` too, as IAM does; site names are plain words (no `.`, `*`, `/`), so a pattern ending in
`updates/site_0.bin` cannot match another site's key. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fedmedclip.errors import ConfigError

from .sites import DATA_BUCKET, DEFAULT_SITES, MLFLOW_BUCKET

PUBLISHER, SERVER, MLFLOW, SITE = "publisher", "server", "mlflow", "site"
SITE_PRIVATE = "sites/{k}/private/*"  # a site's private state (inside its data prefix)
SITE_SUMMARY = "summaries/sites/{k}.json"

# THE role table: for each key pattern under a data root, what each kind of role may do with it ("r" read,
# "w" write, "d" delete every version). `{site}` is a site's name, `{k}` its data index: a site's are its own,
# the server's are every site's (`*`), the publisher's `{k}` is each site's index in turn.
KEY_ACCESS: dict[str, dict[str, str]] = {
    "runs/*/manifest.json": {SITE: "r", SERVER: "rw"},
    "runs/*/shared.safetensors": {SITE: "r", SERVER: "rw"},
    "runs/*/rounds/*/global.bin": {SITE: "r", SERVER: "rw"},
    "runs/*/rounds/*/updates/{site}.bin": {SITE: "rw", SERVER: "r"},
    "runs/*/rounds/*/reports/{site}.json": {SITE: "rw", SERVER: "r"},
    "runs/*/status/{site}.json": {SITE: "rw", SERVER: "r"},  # the server's read covers its own status too
    "runs/*/status/server.json": {SITE: "r", SERVER: "w"},
    # Secure aggregation's objects of a round (docs/secure-aggregation.md): a site writes its key
    # advertisement, sealed shares and unmasking answer, and reads the roster, the survivors and its inbox.
    "runs/*/rounds/*/secagg/keys/{site}.json": {SITE: "rw", SERVER: "r"},
    "runs/*/rounds/*/secagg/shares/{site}.json": {SITE: "rw", SERVER: "r"},
    "runs/*/rounds/*/secagg/unmask/{site}.json": {SITE: "rw", SERVER: "r"},
    # A site created by the system registers its own public identity key (`site run --register-identity`).
    "runs/*/secagg/identities/{site}.json": {SITE: "rw", SERVER: "r"},
    "runs/*/rounds/*/secagg/roster.json": {SITE: "r", SERVER: "rw"},
    "runs/*/rounds/*/secagg/survivors.json": {SITE: "r", SERVER: "rw"},
    "runs/*/rounds/*/secagg/inbox/{site}.json": {SITE: "r", SERVER: "rw"},
    "runs/*/server/*": {SERVER: "rwd"},
    "server/*": {SERVER: "r", PUBLISHER: "rw"},
    "sites/{k}/*": {SITE: "rwd"},  # a site withdraws its data: every version of it
    # The publisher gets each site's images and catalog by index, not `sites/*/images/*`: `*` also matches
    # `/`, which would reach a site's private state under a path that happens to contain `/images/`.
    "sites/{k}/images/*": {PUBLISHER: "rw"},
    "sites/{k}/catalog.json": {PUBLISHER: "rw"},
    SITE_SUMMARY: {SITE: "rwd", SERVER: "r", PUBLISHER: "rw"},
    "backbones/*": {SITE: "r", SERVER: "r", PUBLISHER: "rw"},  # `backbone push`: every party's pods load them
}
ACTIONS = {
    "r": ("Read", ["s3:GetObject"]),
    "w": ("Write", ["s3:PutObject", "s3:AbortMultipartUpload"]),
    # Every version too: the buckets are versioned; a delete that left the old versions would withdraw nothing.
    "d": ("Delete", ["s3:DeleteObject", "s3:DeleteObjectVersion"]),
}

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")

REPO = Path(__file__).resolve().parents[1]
MINIO_POLICIES_YAML = REPO / "infra" / "training" / "platform" / "minio-policies.yaml"


@dataclass(frozen=True)
class Role:
    """A principal of the object store. `site_index` is a site's k (its data prefix `sites/<k>/`)."""

    name: str
    kind: str
    site_index: int | None = None

    @property
    def policy_name(self) -> str:
        """The MinIO policy's name: `site-<k>` for a site, like its Secret `fedmedclip-site-<k>-s3`."""
        return f"site-{self.site_index}" if self.kind == SITE else self.name


def default_site_names(n_sites: int = DEFAULT_SITES) -> list[str]:
    """`site_0`, `site_1`, ...: the partition's names for n sites (data index k = position)."""
    if n_sites < 1:
        raise ConfigError(f"the number of sites must be at least 1, not {n_sites}")
    return [f"site_{k}" for k in range(n_sites)]


def roles(site_names: list[str] | tuple[str, ...]) -> list[Role]:
    """publisher, server, one role per site (k = its position in `site_names`), mlflow."""
    names = list(site_names)
    for n in names:
        if not isinstance(n, str) or not _SITE_NAME.match(n) or n in (PUBLISHER, SERVER, MLFLOW, "admin"):
            raise ConfigError(
                f"site name {n!r} cannot name a storage role: use 1 to 63 letters, digits, '_' or '-', starting "
                f"with a letter or digit, and none of {PUBLISHER}, {SERVER}, {MLFLOW}, admin"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"site names must differ: {names}")
    sites = [Role(n, SITE, k) for k, n in enumerate(names)]
    return [Role(PUBLISHER, PUBLISHER), Role(SERVER, SERVER), *sites, Role(MLFLOW, MLFLOW)]


def check_root(root: str) -> tuple[str, str]:
    """`BUCKET` or `BUCKET/PREFIX` -> (bucket, prefix without slashes)."""
    bucket, _, prefix = root.strip("/").partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ConfigError(f"{root!r}: {bucket!r} is not a valid bucket name (3 to 63 of a-z, 0-9, '.', '-')")
    if prefix and not all(_PREFIX_SEGMENT.match(p) for p in prefix.split("/")):
        raise ConfigError(f"{root!r}: the prefix must be '/'-separated names of letters, digits and ._=-")
    return bucket, prefix


def _arn(bucket: str, prefix: str, key: str = "") -> str:
    path = "/".join(p for p in (prefix, key) if p)
    return f"arn:aws:s3:::{bucket}/{path}" if key else f"arn:aws:s3:::{bucket}"


def _statement(sid: str, actions: list[str], resources: list[str]) -> dict:
    return {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources}


def _listing(bucket: str, prefix: str, actions: list[str]) -> dict:
    statement = _statement("List", actions, [_arn(bucket, prefix)])
    if prefix:  # MinIO confines the listing; moto ignores conditions (the role may read its root anyway)
        statement["Condition"] = {"StringLike": {"s3:prefix": [f"{prefix}/", f"{prefix}/*"]}}
    return statement


def data_policy(role: Role, root: str, site_count: int) -> dict:
    """The IAM policy document of `role` on the data root `root` (`BUCKET` or `BUCKET/PREFIX`), from
    KEY_ACCESS (`site_count`: how many sites the publisher serves)."""
    if role.kind == MLFLOW:
        raise ConfigError("the mlflow role has no data policy; use mlflow_policy")
    bucket, prefix = check_root(root)
    if role.kind == SITE:
        fills = [{"site": role.name, "k": role.site_index}]
    else:
        fills = [{"site": "*", "k": k} for k in (["*"] if role.kind == SERVER else range(site_count))]
    statements = []
    if role.kind == PUBLISHER:
        statements.append(_listing(bucket, prefix, ["s3:GetBucketLocation", "s3:ListBucket"]))
    for op, (sid, actions) in ACTIONS.items():
        granted = [p for p, kinds in KEY_ACCESS.items() if op in kinds.get(role.kind, "")]
        keys = dict.fromkeys(p.format(**fill) for p in granted for fill in fills)
        if keys:
            statements.append(_statement(sid, actions, [_arn(bucket, prefix, k) for k in keys]))
    return {"Version": "2012-10-17", "Statement": statements}


def mlflow_policy(root: str) -> dict:
    """MLflow's artifact store: everything under `root` (`BUCKET` or `BUCKET/PREFIX`), listing included."""
    bucket, prefix = check_root(root)
    objects = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    statements = [
        _listing(bucket, prefix, ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"]),
        _statement("Objects", [*objects, "s3:ListMultipartUploadParts"], [_arn(bucket, prefix, "*")]),
    ]
    return {"Version": "2012-10-17", "Statement": statements}


def render_minio_policies() -> str:
    """The text of infra/training/platform/minio-policies.yaml: one policy per MinIO user, in role order."""
    names = default_site_names()
    lines = [
        "# GENERATED from mlops/policies.py by `python -m mlops.policies --write`: do not edit by hand",
        "# (tests/test_isolation.py checks that this file is what the module renders). One IAM policy per MinIO",
        "# user, created by minio-setup.yaml: the publisher (central uploads), the server (aggregator), one per",
        f"# site ({', '.join(names)}: data prefix sites/<k>/ and its own mailbox keys only) and MLflow",
        "# (its artifact bucket). The same definition gives the local stack's users (`fedmedclip stack up`).",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: minio-policies",
        "data:",
    ]
    for role in roles(names):
        mlflow = role.kind == MLFLOW
        doc = mlflow_policy(MLFLOW_BUCKET) if mlflow else data_policy(role, DATA_BUCKET, len(names))
        lines.append(f"  {role.policy_name}.json: |")
        lines += ["    " + line for line in json.dumps(doc, indent=2).splitlines()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlops.policies",
        description="Render the cluster's MinIO policies (mlops/policies.py).",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {MINIO_POLICIES_YAML.relative_to(REPO)}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed file differs")
    args, text = parser.parse_args(argv), render_minio_policies()
    if args.write:
        MINIO_POLICIES_YAML.write_text(text)
        print(f"wrote {MINIO_POLICIES_YAML}", file=sys.stderr)
    elif args.check and not (MINIO_POLICIES_YAML.is_file() and MINIO_POLICIES_YAML.read_text() == text):
        print(f"{MINIO_POLICIES_YAML} is stale: run `python -m mlops.policies --write`", file=sys.stderr)
        return 1
    elif not args.check:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
