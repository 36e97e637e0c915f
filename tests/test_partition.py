"""Partition properties: disjoint, complete, seed-reproducible, Dirichlet skew, natural sites, splits,
and configuration errors. The image set is built in memory (partitioning never reads pixels)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedmedclip.data import ImageRecord, ImageSet
from fedmedclip.errors import ConfigError, DataError
from fedmedclip.partition import Partition, make_partition

CLASSES = ["a_class", "b_class", "c_class", "d_class"]


def image_set(per_class=(90, 60, 120, 30), test_per_class=10, sites=None) -> ImageSet:
    records = []
    for c, n in zip(CLASSES, per_class, strict=True):
        for i in range(n):
            site = None if sites is None else sites[i % len(sites)]
            records.append(ImageRecord(f"train/{c}/{i}.png", f"/nowhere/train/{c}/{i}.png", c, "train", site))
        for i in range(test_per_class):
            records.append(ImageRecord(f"test/{c}/{i}.png", f"/nowhere/test/{c}/{i}.png", c, "test"))
    return ImageSet(CLASSES, records, "/nowhere")


def _all_site_ids(p: Partition) -> list[str]:
    return [i for s in p.sites.values() for split in ("train", "val", "test") for i in s[split]]


@pytest.mark.parametrize(("scheme", "alpha"), [("iid", None), ("dirichlet", 0.3), ("dirichlet", 5.0)])
def test_disjoint_and_complete(scheme, alpha):
    ims = image_set()
    p = make_partition(ims, scheme, 3, alpha, seed=4)
    site_ids = _all_site_ids(p)
    pool = [r.image_id for r in ims.split("train")]
    assert len(site_ids) == len(set(site_ids))  # no image in two site splits
    assert not set(site_ids) & set(p.reference)  # the reference set is held out
    assert sorted(site_ids + p.reference) == sorted(pool)  # every training image exactly once
    assert p.global_test == [r.image_id for r in ims.split("test")]  # global test = official test
    assert not set(p.global_test) & set(site_ids)
    # counts in the manifest are the true per-split class counts
    labels = {r.image_id: r.label for r in ims.records}
    for site, splits in p.sites.items():
        for split, ids in splits.items():
            assert p.counts[site][split] == dict(sorted(Counter(labels[i] for i in ids).items()))


def test_reference_set_is_a_stratified_tenth():
    ims = image_set()
    p = make_partition(ims, "iid", 3, seed=0)
    got = Counter(i.split("/")[1] for i in p.reference)
    assert got == {"a_class": 9, "b_class": 6, "c_class": 12, "d_class": 3}
    assert make_partition(ims, "iid", 3, seed=0, reference_fraction=0).reference == []


def test_seed_reproducible(tmp_path):
    ims = image_set()
    for scheme, alpha in (("iid", None), ("dirichlet", 0.5)):
        a = make_partition(ims, scheme, 3, alpha, seed=11)
        b = make_partition(ims, scheme, 3, alpha, seed=11)
        c = make_partition(ims, scheme, 3, alpha, seed=12)
        assert a.digest == b.digest and a.sites == b.sites and a.reference == b.reference
        assert c.digest != a.digest and c.sites != a.sites
        a.save(tmp_path / f"{scheme}.json")
        loaded = Partition.load(tmp_path / f"{scheme}.json")
        assert loaded.digest == a.digest and loaded.sites == a.sites


def _skew(p: Partition, pool_labels: list[str]) -> float:
    """Mean over sites of the total-variation distance between the site's and the pool's class mix."""
    glob = Counter(pool_labels)
    n = sum(glob.values())
    dists = []
    for site in p.sites.values():
        ids = site["train"] + site["val"] + site["test"]
        cnt = Counter(i.split("/")[1] for i in ids)
        m = sum(cnt.values())
        dists.append(0.5 * sum(abs(cnt[c] / m - glob[c] / n) for c in CLASSES))
    return float(np.mean(dists))


def test_dirichlet_skew_grows_as_alpha_falls():
    ims = image_set(per_class=(150, 150, 150, 150))
    pool = [r.label for r in ims.split("train")]
    skew = {
        alpha: np.mean([_skew(make_partition(ims, "dirichlet", 3, alpha, seed=s), pool) for s in range(8)])
        for alpha in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] + 0.1 > skew[100.0] + 0.1, skew
    assert skew[100.0] < 0.08  # nearly the pool's own mix
    iid = np.mean([_skew(make_partition(ims, "iid", 3, seed=s), pool) for s in range(8)])
    assert iid < 0.08


def test_iid_sites_have_equal_shares_and_8_1_1_splits():
    ims = image_set(per_class=(100, 100, 100, 100))  # 400 - 40 reference = 360 = 3 x 120
    p = make_partition(ims, "iid", 3, seed=1)
    assert p.site_names == ["site_0", "site_1", "site_2"]
    for s in p.sites.values():
        assert (len(s["train"]), len(s["val"]), len(s["test"])) == (96, 12, 12)
    p = make_partition(ims, "iid", 3, seed=1, split_ratio=(0.6, 0.2, 0.2))
    for s in p.sites.values():
        assert (len(s["train"]), len(s["val"]), len(s["test"])) == (72, 24, 24)
    p = make_partition(ims, "iid", 3, seed=1, split_ratio=(0.7, 0.1, 0.2))
    for s in p.sites.values():
        assert (len(s["train"]), len(s["val"]), len(s["test"])) == (84, 12, 24)
    p = make_partition(ims, "iid", 4, seed=1)  # 360 / 4 = 90 -> 72 / 9 / 9
    assert [len(s["train"]) + len(s["val"]) + len(s["test"]) for s in p.sites.values()] == [90] * 4
    assert all((len(s["val"]), len(s["test"])) == (9, 9) for s in p.sites.values())


def test_natural_partition_follows_the_site_column():
    ims = image_set(sites=["hosp_b", "hosp_a", "hosp_c"])
    p = make_partition(ims, "natural", None, seed=0)
    assert p.site_names == ["hosp_a", "hosp_b", "hosp_c"]
    site_of = {r.image_id: r.site for r in ims.records}
    for name, splits in p.sites.items():
        ids = splits["train"] + splits["val"] + splits["test"]
        assert ids and {site_of[i] for i in ids} == {name}
    assert p.alpha is None
    assert make_partition(ims, "natural", 3, seed=0).digest == p.digest  # a matching --sites is fine
    with pytest.raises(ConfigError, match="hosp_a"):
        make_partition(ims, "natural", 2, seed=0)
    with pytest.raises(DataError, match="site"):
        make_partition(image_set(), "natural", None, seed=0)


def test_bad_configurations_are_refused():
    ims = image_set()
    with pytest.raises(ConfigError, match="alpha"):
        make_partition(ims, "dirichlet", 3, None)
    with pytest.raises(ConfigError, match="alpha"):
        make_partition(ims, "dirichlet", 3, 0.0)
    with pytest.raises(ConfigError, match="unknown partition 'pathological'"):
        make_partition(ims, "pathological", 3)
    with pytest.raises(ConfigError, match="split ratio"):
        make_partition(ims, "iid", 3, split_ratio=(0.5, 0.3, 0.3))
    with pytest.raises(ConfigError, match="split ratio"):
        make_partition(ims, "iid", 3, split_ratio=(0.0, 0.5, 0.5))
    with pytest.raises(ConfigError, match="reference fraction"):
        make_partition(ims, "iid", 3, reference_fraction=0.6)
    with pytest.raises(ConfigError, match="sites"):
        make_partition(ims, "iid", 0)
    with pytest.raises(DataError, match="too few"):
        make_partition(image_set(per_class=(5, 5, 5, 5)), "iid", 3)
    no_test = ImageSet(CLASSES, ims.split("train"), "/nowhere")
    with pytest.raises(DataError, match="global test"):
        make_partition(no_test, "iid", 3)


def test_transductive_holds_nothing_out_so_sites_train_on_the_whole_pool():
    """With --transductive FACMIC adapts toward the global test images (the reference code's setting), so
    the configuration holds no reference set out, whatever --reference-fraction says: the sites' splits
    cover 100 % of the training pool, as in the paper."""
    from fedmedclip.config import TrainConfig

    ims = image_set()
    cfg = TrainConfig(method="facmic", transductive=True, reference_fraction=0.2).validate()
    assert cfg.reference_fraction == 0.0
    p = make_partition(
        ims, cfg.partition, cfg.sites, cfg.alpha, cfg.seed, cfg.split_ratio, cfg.reference_fraction
    )
    pool = sorted(r.image_id for r in ims.split("train"))
    assert p.reference == [] and sorted(_all_site_ids(p)) == pool
    assert sum(len(s["train"]) for s in p.sites.values()) == round(0.8 * len(pool))
    # without it the default holds a tenth out
    assert TrainConfig(method="facmic").validate().reference_fraction == 0.1
