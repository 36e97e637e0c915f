"""Remote image sources (`--data s3://BUCKET`) behind a small interface, so the core reads data published per
holder without importing boto3. The MLOps layer registers `s3` under the entry-point group `fedmedclip.sources`
(`components/sources.py`); local folders, CSV manifests and `synthetic` never go through here.

A source provides:
- `published(cfg) -> ImageSet`: every image's id, label and split, without pixels: enough to draw the
  partition (what the server's `prepare` reads; it also checks the data was published for that partition);
- `stage(cfg, partition, holder) -> ImageSet`: that holder's own images, downloaded with the holder's own
  credentials into the cache, with local paths;
- `site_holder(cfg, site) -> (ImageSet, {"train"|"val"|"test": [ids]}, partition digest)`: a site's images and
  its own split from its own prefix only (a hospital's worker cannot read the server's catalog).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .errors import ConfigError

SOURCE_ENTRY_POINTS = "fedmedclip.sources"


def is_remote(data: str) -> bool:
    return "://" in str(data)


def remote_source(data: str):
    """The registered source for `data`'s URL scheme."""
    scheme = str(data).split("://", 1)[0]
    for ep in entry_points(group=SOURCE_ENTRY_POINTS):
        if ep.name == scheme:
            try:
                return ep.load()()
            except ImportError as exc:
                raise ConfigError(
                    f"--data {data}: reading {scheme}:// data needs the MLOps layer's packages ({exc}); install "
                    "the project with its `pipelines` extra"
                ) from None
    raise ConfigError(
        f"--data {data}: no source for {scheme}:// (use a local folder, a .csv manifest or s3://)"
    )
