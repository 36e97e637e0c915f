"""Names shared by the pipeline, the cluster manifests (infra/training) and their tests: site k reads its
images from `s3://DATA_BUCKET/sites/<k>/` with its own credentials, the Kubernetes Secret
`fedmedclip-site-<k>-s3` (keys SECRET_KEYS) in the namespace of the pipeline's pods, whose MinIO policy
(mlops/policies.py) allows that prefix and the site's own mailbox keys only.
Standard library only: the pipeline compiler imports this.
"""

from __future__ import annotations

import re

from fedmedclip.errors import ConfigError

SITE_SECRET_TEMPLATE = "fedmedclip-site-{site}-s3"
SERVER_SECRET_NAME = "fedmedclip-server-s3"  # the aggregator's credentials: the server/ prefix only
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
ENDPOINTS_CONFIGMAP = "fedmedclip-endpoints"  # MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL, DATA_BUCKET, ...
DATA_BUCKET = "fedmedclip-data"
MLFLOW_BUCKET = "fedmedclip-mlflow"
SERVER_PREFIX = "server/"
DEFAULT_SITES = 3

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _check_site(site: int | str) -> str:
    text = str(site)
    if not _DNS_LABEL.match(text) or len(SITE_SECRET_TEMPLATE.format(site=text)) > 253:
        raise ConfigError(
            f"site {site!r} cannot name a Kubernetes secret: use an index (0, 1, ...) or lowercase letters, "
            "digits and '-'"
        )
    return text


def site_secret_name(site: int | str) -> str:
    """The Secret holding site `site`'s S3 credentials."""
    return SITE_SECRET_TEMPLATE.format(site=_check_site(site))


def site_prefix(site: int | str) -> str:
    """`sites/<site>/`, the only data prefix of DATA_BUCKET that site's credentials can read."""
    return f"sites/{_check_site(site)}/"
