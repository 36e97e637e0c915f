"""Who may touch which objects: the ONE definition of the storage roles and their S3 permissions.

Both enforcement points are generated from it, so they cannot drift apart:
- the local stack (`fedmedclip stack up`, devstack/stack.py) creates one IAM user per role on its moto
  S3 server with these policies, per data bucket;
- the cluster's MinIO policies, `infra/training/platform/minio-policies.yaml`, are rendered by
  `render_minio_policies()`; `python -m mlops.policies --write` regenerates the file and
  tests/test_isolation.py checks that the committed file is what this module renders.

Roles (the keys are those of docs/contracts.md, "Federation runtime: the mailbox" and "Data published to
S3", under a data root `BUCKET` or `BUCKET/PREFIX`):
- `publisher` uploads data centrally: lists the bucket, reads and writes `server/`, each site's
  `sites/<k>/images/` and `sites/<k>/catalog.json`, and the sites' public summaries.
- `server` (the aggregator) reads the run manifest, shared tensors, global modules, every site's
  update, report, status and secure-aggregation objects, its own state `runs/*/server/`, the `server/` data
  and the sites' summaries; writes the manifest, shared tensors, global modules, secure aggregation's roster,
  inboxes and survivors, its own status and state. Never `sites/`.
- a site (`site_0`, ... with data index k) reads the manifest, shared tensors, global modules, the server's
  status and secure aggregation's roster, survivors and its own inbox; reads and writes only its own update,
  report and status keys, its own secure-aggregation keys (advertisement, shares, unmasking answer, identity
  registration), its own data prefix `sites/<k>/` (images, catalog, private state) and its own summary; and
  may delete its own data prefix and summary, every version of them (a hospital withdraws its data:
  `fedmedclip data withdraw`). Nothing else.
- `mlflow` reads and writes its artifact root only.

No role but the publisher (and MLflow, on its own bucket) may list: every key the runtime uses is computable,
and moto does not evaluate the `s3:prefix` condition that would confine a listing to a prefix. moto matches
`*` anywhere in a resource (across `/` too), as IAM does; site names are plain words (no `.`, `*`, `/`), so a
pattern ending in `updates/site_0.bin` cannot match another site's key.
Standard library only.
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

PUBLISHER = "publisher"
SERVER = "server"
MLFLOW = "mlflow"
SITE = "site"

# Key patterns under a data root; `{site}` is the site's name, `{k}` its data index.
MANIFEST = "runs/*/manifest.json"
SHARED = "runs/*/shared.safetensors"
GLOBAL = "runs/*/rounds/*/global.bin"
UPDATE = "runs/*/rounds/*/updates/{site}.bin"
REPORT = "runs/*/rounds/*/reports/{site}.json"
STATUS = "runs/*/status/{site}.json"
# Secure aggregation's objects of a round (docs/secure-aggregation.md): a site writes its key advertisement,
# its sealed shares and its unmasking answer, and reads the roster, the survivors and its own inbox.
SECAGG_KEYS = "runs/*/rounds/*/secagg/keys/{site}.json"
SECAGG_SHARES = "runs/*/rounds/*/secagg/shares/{site}.json"
SECAGG_UNMASK = "runs/*/rounds/*/secagg/unmask/{site}.json"
SECAGG_INBOX = "runs/*/rounds/*/secagg/inbox/{site}.json"
SECAGG_ROSTER = "runs/*/rounds/*/secagg/roster.json"
SECAGG_SURVIVORS = "runs/*/rounds/*/secagg/survivors.json"
# A site created by the system registers its own public identity key (`site run --register-identity`).
SECAGG_IDENTITY = "runs/*/secagg/identities/{site}.json"
SERVER_STATUS = "runs/*/status/server.json"
SERVER_STATE = "runs/*/server/*"
SITE_DATA = "sites/{k}/*"
SITE_IMAGES = "sites/{k}/images/*"
SITE_CATALOG = "sites/{k}/catalog.json"
SITE_PRIVATE = "sites/{k}/private/*"
SITE_SUMMARY = "summaries/sites/{k}.json"
SERVER_DATA = "server/*"
BACKBONES = "backbones/*"  # published CLIP weights (`fedmedclip backbone push`): every party's pods load them

READ_ACTIONS = ("s3:GetObject",)
WRITE_ACTIONS = ("s3:PutObject", "s3:AbortMultipartUpload")
# Every version too: the buckets are versioned, and a delete that left the old versions would withdraw nothing.
DELETE_ACTIONS = ("s3:DeleteObject", "s3:DeleteObjectVersion")

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
        """The MinIO policy's name (and its file in the minio-policies ConfigMap): `site-<k>` for a site,
        like its Secret `fedmedclip-site-<k>-s3`; the role's name otherwise."""
        return f"site-{self.site_index}" if self.kind == SITE else self.name


@dataclass(frozen=True)
class Access:
    """Key patterns (relative to a data root) a role may read, write and delete; whether it may list."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    list_bucket: bool = False


def check_site_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or not _SITE_NAME.match(name)
        or name in (PUBLISHER, SERVER, MLFLOW, "admin")
    ):
        raise ConfigError(
            f"site name {name!r} cannot name a storage role: use 1 to 63 letters, digits, '_' or '-', starting "
            f"with a letter or digit, and none of {PUBLISHER}, {SERVER}, {MLFLOW}, admin"
        )
    return name


def default_site_names(n_sites: int = DEFAULT_SITES) -> list[str]:
    """`site_0`, `site_1`, ...: the partition's names for n sites (data index k = position)."""
    if n_sites < 1:
        raise ConfigError(f"the number of sites must be at least 1, not {n_sites}")
    return [f"site_{k}" for k in range(n_sites)]


def roles(site_names: list[str] | tuple[str, ...] | None = None) -> list[Role]:
    """publisher, server, one role per site (k = its position in `site_names`), mlflow."""
    names = list(site_names) if site_names is not None else default_site_names()
    for n in names:
        check_site_name(n)
    if len(set(names)) != len(names):
        raise ConfigError(f"site names must differ: {names}")
    return [
        Role(PUBLISHER, PUBLISHER),
        Role(SERVER, SERVER),
        *(Role(n, SITE, k) for k, n in enumerate(names)),
        Role(MLFLOW, MLFLOW),
    ]


# THE role table: for each key pattern, what each kind of role may do with it ("r" read, "w" write, "d" delete
# every version). A site's `{site}` and `{k}` are its own; the server's are every site's (`*`); the publisher's
# `{k}` is each site's index in turn. The policies of both enforcement points are generated from this table.
KEY_ACCESS: dict[str, dict[str, str]] = {
    MANIFEST: {SITE: "r", SERVER: "rw"},
    SHARED: {SITE: "r", SERVER: "rw"},
    GLOBAL: {SITE: "r", SERVER: "rw"},
    UPDATE: {SITE: "rw", SERVER: "r"},
    REPORT: {SITE: "rw", SERVER: "r"},
    STATUS: {SITE: "rw", SERVER: "r"},  # the server's read of `status/*.json` covers its own status too
    SERVER_STATUS: {SITE: "r", SERVER: "w"},
    SECAGG_KEYS: {SITE: "rw", SERVER: "r"},
    SECAGG_SHARES: {SITE: "rw", SERVER: "r"},
    SECAGG_UNMASK: {SITE: "rw", SERVER: "r"},
    SECAGG_IDENTITY: {SITE: "rw", SERVER: "r"},
    SECAGG_ROSTER: {SITE: "r", SERVER: "rw"},
    SECAGG_SURVIVORS: {SITE: "r", SERVER: "rw"},
    SECAGG_INBOX: {SITE: "r", SERVER: "rw"},
    SERVER_STATE: {SERVER: "rwd"},
    SERVER_DATA: {SERVER: "r", PUBLISHER: "rw"},
    SITE_DATA: {SITE: "rwd"},  # a site withdraws its data: every version of it
    # The publisher gets each site's images and catalog by index, not `sites/*/images/*`: `*` also matches
    # `/`, which would reach a site's private state under a path that happens to contain `/images/`.
    SITE_IMAGES: {PUBLISHER: "rw"},
    SITE_CATALOG: {PUBLISHER: "rw"},
    SITE_SUMMARY: {SITE: "rwd", SERVER: "r", PUBLISHER: "rw"},
    BACKBONES: {SITE: "r", SERVER: "r", PUBLISHER: "rw"},
}


def access(role: Role, site_count: int) -> Access:
    """What `role` may do under a data root (`site_count`: how many sites the publisher serves), from
    KEY_ACCESS. The mlflow role has no access to data roots (see `mlflow_policy`)."""
    if role.kind == SITE:
        fills = [{"site": role.name, "k": role.site_index}]
    elif role.kind == SERVER:
        fills = [{"site": "*", "k": "*"}]
    else:
        fills = [{"site": "*", "k": k} for k in range(site_count)]

    def keys(op: str) -> tuple[str, ...]:
        granted = [p for p, kinds in KEY_ACCESS.items() if op in kinds.get(role.kind, "")]
        return tuple(dict.fromkeys(p.format(**fill) for p in granted for fill in fills))

    return Access(keys("r"), keys("w"), keys("d"), list_bucket=role.kind == PUBLISHER)


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


def _statement(sid: str, actions, resources: list[str]) -> dict:
    return {"Sid": sid, "Effect": "Allow", "Action": list(actions), "Resource": resources}


def _listing(bucket: str, prefix: str, actions: list[str]) -> dict:
    statement = _statement("List", actions, [_arn(bucket, prefix)])
    if prefix:  # MinIO confines the listing; moto ignores conditions (the role may read its root anyway)
        statement["Condition"] = {"StringLike": {"s3:prefix": [f"{prefix}/", f"{prefix}/*"]}}
    return statement


def data_policy(role: Role, root: str, site_count: int) -> dict:
    """The IAM policy document of `role` on the data root `root` (`BUCKET` or `BUCKET/PREFIX`)."""
    if role.kind == MLFLOW:
        raise ConfigError("the mlflow role has no data policy; use mlflow_policy")
    bucket, prefix = check_root(root)
    acc = access(role, site_count)
    statements = []
    if acc.list_bucket:
        statements.append(_listing(bucket, prefix, ["s3:GetBucketLocation", "s3:ListBucket"]))
    for sid, actions, keys in (
        ("Read", READ_ACTIONS, acc.read),
        ("Write", WRITE_ACTIONS, acc.write),
        ("Delete", DELETE_ACTIONS, acc.delete),
    ):
        if keys:
            statements.append(_statement(sid, actions, [_arn(bucket, prefix, k) for k in keys]))
    return {"Version": "2012-10-17", "Statement": statements}


def mlflow_policy(root: str) -> dict:
    """MLflow's artifact store: everything under `root` (`BUCKET` or `BUCKET/PREFIX`), listing included."""
    bucket, prefix = check_root(root)
    listing = ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"]
    objects = [
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
    ]
    return {
        "Version": "2012-10-17",
        "Statement": [
            _listing(bucket, prefix, listing),
            _statement("Objects", objects, [_arn(bucket, prefix, "*")]),
        ],
    }


def role_policy(role: Role, data_root: str, mlflow_root: str, site_count: int) -> dict:
    """The one policy of `role` where there is one data root (the cluster's MinIO)."""
    return mlflow_policy(mlflow_root) if role.kind == MLFLOW else data_policy(role, data_root, site_count)


# ------------------------------------------------------------------------------------ infra/training


def minio_policies(
    site_names: list[str] | None = None,
    data_root: str = DATA_BUCKET,
    mlflow_root: str = MLFLOW_BUCKET,
) -> dict[str, dict]:
    """{`<policy name>.json`: document} for the cluster's MinIO users, in role order."""
    rs = roles(site_names)
    n = sum(r.kind == SITE for r in rs)
    return {f"{r.policy_name}.json": role_policy(r, data_root, mlflow_root, n) for r in rs}


def render_minio_policies(site_names: list[str] | None = None) -> str:
    """The text of infra/training/platform/minio-policies.yaml."""
    names = list(site_names) if site_names is not None else default_site_names()
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
    for name, doc in minio_policies(names).items():
        lines.append(f"  {name}: |")
        lines += ["    " + line for line in json.dumps(doc, indent=2).splitlines()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlops.policies",
        description="Render the cluster's MinIO policies from mlops/policies.py.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {MINIO_POLICIES_YAML.relative_to(REPO)}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed file differs")
    args = parser.parse_args(argv)
    text = render_minio_policies()
    if args.write:
        MINIO_POLICIES_YAML.write_text(text)
        print(f"wrote {MINIO_POLICIES_YAML}", file=sys.stderr)
        return 0
    if args.check:
        same = MINIO_POLICIES_YAML.is_file() and MINIO_POLICIES_YAML.read_text() == text
        if not same:
            print(
                f"{MINIO_POLICIES_YAML} is stale: run `python -m mlops.policies --write`",
                file=sys.stderr,
            )
        return 0 if same else 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
