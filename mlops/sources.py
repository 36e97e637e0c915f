"""`s3://BUCKET` as an image source of the core (`fedmedclip.sources`, entry-point group `fedmedclip.sources`):
data published one prefix per holder by `fedmedclip data publish` (mlops/site_data.py)."""

from __future__ import annotations

from mlops import site_data


class S3Source:
    def published(self, cfg):
        """Every image's id, label and split from server/published.json (server credentials), no pixels."""
        image_set, catalog = site_data.catalog_image_set(site_data.parse_bucket(cfg.data))
        _CATALOGS[cfg.data] = catalog
        return image_set

    def check_partition(self, cfg, partition) -> None:
        catalog = _CATALOGS.get(cfg.data)
        if catalog is not None:
            site_data.check_published_partition(cfg, partition, catalog)

    def stage(self, cfg, partition, holder: str):
        return site_data.stage_holder(cfg, partition, holder)

    def site_holder(self, cfg, site: str, index: int):
        got = site_data.read_site_assignment(cfg.data, index, site=site, cache_dir=cfg.cache_dir)
        return got.image_set, got.splits, got.partition_digest


_CATALOGS: dict[str, dict] = {}


def s3_source() -> S3Source:
    return S3Source()
