"""Remote image sources (`--data s3://BUCKET`) behind a small interface, so the core reads data published per
holder without importing boto3. The MLOps layer registers `s3` under the entry-point group `fedmedclip.sources`
(`mlops/site_data.py`); local folders, CSV manifests and `synthetic` never go through here.

A source provides:
- `published(cfg) -> ImageSet`: every image's id, label and split, without pixels: enough to draw the
  partition (what the server's `prepare` reads; it also checks the data was published for that partition);
- `stage(cfg, partition, holder) -> ImageSet`: that holder's own images, downloaded with the holder's own
  credentials into the cache, with local paths;
- `site_holder(cfg, site, index) -> (ImageSet, {"train"|"val"|"test": [ids]}, partition digest)`: a site's
  images and its own split from its own prefix only (a hospital's worker cannot read the server's catalog).

A local directory in the same layout (`DIR/sites/<k>/catalog.json`, written by `fedmedclip data publish --site
NAME --to DIR` inside a hospital) is read by the source registered as `published`, for sites only.
"""

from __future__ import annotations

from .errors import ConfigError
from .extensions import load_extension

SOURCE_ENTRY_POINTS = "fedmedclip.sources"


def is_remote(data: str) -> bool:
    return "://" in str(data)


def is_published_layout(data: str) -> bool:
    """A local directory holding sites' published prefixes (`sites/<k>/catalog.json`), not an image folder."""
    from pathlib import Path

    return (
        not is_remote(data) and Path(str(data), "sites").is_dir() and not Path(str(data), "Training").is_dir()
    )


def remote_source(data: str):
    """The registered source for `data`'s URL scheme (`published` for a local directory in that layout)."""
    scheme = str(data).split("://", 1)[0] if is_remote(data) else "published"
    source = load_extension(
        SOURCE_ENTRY_POINTS, scheme, ConfigError, f"--data {data}: reading {scheme}:// data"
    )
    if source is not None:
        return source()
    raise ConfigError(
        f"--data {data}: no source for {scheme}:// (use a local folder, a .csv manifest or s3://)"
    )
