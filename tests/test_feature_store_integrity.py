"""A feature store edited or damaged on disk is refused in one line naming it, never trained on: its files are
checked against the sha256 its provenance.json records, the provenance against its digest, its labels against
its classes and the data, and a row asked for that it does not hold is an error. Also: a file written over a
folder names the path, and `export --out` replaces only an earlier export."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTH, error_lines
from PIL import Image
from safetensors.torch import load_file, save_file

from fedmedclip.backbone import make_preprocessing
from fedmedclip.cli import main
from fedmedclip.data import open_source
from fedmedclip.digests import canonical_digest, sha256_file, sha256_sidecar, write_sha256_sidecar
from fedmedclip.errors import ConfigError, DataError, ProvenanceMismatch
from fedmedclip.features import FILES_SHA256, UNDIGESTED, FeatureStore, build_feature_store
from fedmedclip.federation.storage import atomic_write_bytes

CLASSES = ("glioma", "normal")


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """Eight images of two classes, and their store (tiny backbone), built once: each test edits a copy."""
    root = tmp_path_factory.mktemp("integrity")
    for ci, c in enumerate(CLASSES):
        for i in range(4):
            path = root / "data" / "Training" / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(100 * ci + i).integers(0, 256, (24, 24), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(path)
    images = open_source(root / "data")
    records, prep = images.split("train"), make_preprocessing("squash", tiny)
    build_feature_store(records, images.class_names, tiny, prep, directory=root / "store", progress=False)
    return root / "store", records, images.class_names, prep


@pytest.fixture
def store(built, tmp_path, tiny):
    """(a copy of the built store, a call that reuses it as a run would)."""
    original, records, classes, prep = built
    copy = Path(shutil.copytree(original, tmp_path / "store"))

    def reuse(**kw):
        return build_feature_store(records, classes, tiny, prep, directory=copy, progress=False, **kw)

    return copy, reuse


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "features.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "features.safetensors"))


def _edit_json(folder: Path, name: str, edit) -> None:
    obj = json.loads((folder / name).read_text())
    edit(obj)
    (folder / name).write_text(json.dumps(obj, indent=2))


def _rehash(folder: Path) -> None:
    """Record the edited files' sha256 in provenance.json, as a careful editor would: what the hashes cannot
    see, as in a store written before they were recorded."""

    def rehash(prov: dict) -> None:
        if FILES_SHA256 in prov:
            prov[FILES_SHA256] = {name: sha256_file(folder / name) for name in prov[FILES_SHA256]}

    _edit_json(folder, "provenance.json", rehash)


def _swap_first_ids(index: dict) -> None:
    ids = index["image_ids"]
    ids[0], ids[-1] = ids[-1], ids[0]


EDITS = {
    "labels-all-0": lambda d: _edit_tensors(d, lambda t: t["labels"].zero_()),
    "id-renamed": lambda d: _edit_json(d, "index.json", lambda i: i["image_ids"].__setitem__(0, "other.png")),
    "ids-swapped": lambda d: _edit_json(d, "index.json", _swap_first_ids),
    "feature-changed": lambda d: _edit_tensors(d, lambda t: t["features"].view(-1).__setitem__(0, 0.5)),
}
EDITED_FILE = {
    "labels-all-0": "features.safetensors",
    "id-renamed": "index.json",
    "ids-swapped": "index.json",
    "feature-changed": "features.safetensors",
}


def _refused_in_one_line(call, folder: Path, *words: str, error=DataError) -> str:
    before = _snapshot(folder)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and f"feature store {str(folder)!r}" in message, message
    assert "delete it, and the next run encodes the images again" in message, message
    for word in words:
        assert word in message, message
    assert _snapshot(folder) == before  # left as it is
    return message


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_store_file_edited_on_disk_is_refused_by_its_recorded_sha256(store, edit):
    """Labels set to 0, an image id renamed or two swapped, a finite feature changed: each trained silently
    (another accuracy, a training image dropped)."""
    folder, reuse = store
    EDITS[edit](folder)
    for call in (reuse, lambda: FeatureStore.load(folder)):
        _refused_in_one_line(call, folder, EDITED_FILE[edit], "sha256")


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ("labels-all-0", "labels image"),
        ("id-renamed", "'other.png'"),
        ("ids-swapped", "its image 0 is"),
    ],
)
def test_an_edit_with_its_sha256_recorded_again_still_does_not_match_the_data(store, edit, why):
    """What the hashes cannot see (recorded again after the edit, or a store that predates them): the store
    reused for a holder's images must hold those images, in their order, with their labels."""
    folder, reuse = store
    EDITS[edit](folder)
    _rehash(folder)
    FeatureStore.load(folder)  # the files are what provenance.json says
    _refused_in_one_line(reuse, folder, why, "it was edited")


def test_rows_refuses_an_image_the_store_neither_holds_nor_skipped(store):
    """An id renamed in index.json left its training image out of the run without a word."""
    folder, _ = store
    loaded = FeatureStore.load(folder)
    assert loaded.rows([loaded.image_ids[2], loaded.image_ids[0]]).tolist() == [2, 0]
    _refused_in_one_line(
        lambda: loaded.rows([loaded.image_ids[0], "not/there.png"]), folder, "'not/there.png'"
    )
    skipped = FeatureStore(loaded.features, loaded.labels, loaded.image_ids, loaded.class_names,
                           loaded.text_features, loaded.provenance, ["bad.png"])  # fmt: skip
    assert skipped.rows(["bad.png", loaded.image_ids[1]]).tolist() == [1]  # a skipped image is left out


@pytest.mark.parametrize("label", [99, -1])
def test_a_label_outside_the_classes_is_refused_at_load(store, label):
    """A label of 99 or -1 was a ValueError traceback when the run counted the classes' training images."""
    folder, reuse = store
    _edit_tensors(folder, lambda t: t["labels"].__setitem__(3, label))
    _rehash(folder)
    for call in (reuse, lambda: FeatureStore.load(folder)):
        _refused_in_one_line(call, folder, f"label {label} of image", "outside the range of the 2 classes")


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p["backbone"].update(name="ViT-L/14"),  # another backbone named, the digest untouched
        lambda p: p.update(digest="0" * 64),  # the digest edited, the inputs untouched
    ],
    ids=["backbone-renamed", "digest-edited"],
)
def test_a_provenance_that_does_not_hash_to_its_digest_is_refused(store, edit):
    """A backbone's name edited under the digest was reused, and recorded in the run's provenance; an edited
    digest was a mismatch listing differences that are none (a list stored, a tuple requested)."""
    folder, reuse = store
    _edit_json(folder, "provenance.json", edit)
    message = _refused_in_one_line(reuse, folder, "provenance.json does not hold the inputs its digest names")
    assert "preprocessing" not in message


def test_a_real_mismatch_lists_only_what_differs(store):
    """Values are compared as JSON: a stored list and the tuple asked for are the same preprocessing."""
    folder, reuse = store
    before = _snapshot(folder)
    with pytest.raises(ProvenanceMismatch) as info:
        reuse(prompt_template="an MRI of {}")
    lines = str(info.value).splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:-1]] == ["prompt_template"], lines
    assert _snapshot(folder) == before


def test_the_hashes_of_a_current_store_cannot_be_removed(store):
    folder, reuse = store
    _edit_json(folder, "provenance.json", lambda p: p.pop(FILES_SHA256, None))
    for call in (reuse, lambda: FeatureStore.load(folder)):
        _refused_in_one_line(call, folder, FILES_SHA256)


def test_a_store_written_before_the_hashes_still_loads_and_is_not_reused(store):
    """Format 3 recorded no hashes: such a store still loads (its shapes and labels checked), and a run asks
    for format 4, so it encodes the images once more instead of trusting it; nothing stored is touched."""
    folder, reuse = store

    def as_format_3(prov: dict) -> None:
        prov.pop(FILES_SHA256, None)
        prov["format"] = 3
        prov["digest"] = canonical_digest({k: v for k, v in prov.items() if k not in UNDIGESTED})

    _edit_json(folder, "provenance.json", as_format_3)
    before = _snapshot(folder)
    assert FeatureStore.load(folder).provenance["format"] == 3
    with pytest.raises(ProvenanceMismatch, match="format: stored '3' vs requested '4'"):
        reuse()
    assert _snapshot(folder) == before


# ----------------------------------------------------------------------------- writing over a folder


def test_a_file_written_over_a_folder_names_the_path_not_its_temporary_file(tmp_path):
    """results.json or model/global.safetensors being a folder said "[Errno 21] Is a directory" naming the
    write's temporary `.part` file."""
    target = tmp_path / "model" / "global.safetensors"
    target.mkdir(parents=True)
    with pytest.raises(IsADirectoryError) as info:
        atomic_write_bytes(target, b"x")
    assert str(info.value) == f"cannot write {target}: it is a directory"
    assert [p.name for p in target.parent.iterdir()] == ["global.safetensors"]  # no temporary file left


# ----------------------------------------------------------------------------- a run on the synthetic data


@pytest.fixture(scope="module")
def run(synthetic_cache, tmp_path_factory):
    """One small run on the session's synthetic cache (its stores are then there to copy)."""
    out = tmp_path_factory.mktemp("integrity-run") / "run"
    assert main(_train_args(out, synthetic_cache)) == 0
    return out


def _train_args(out: Path, cache: Path) -> list[str]:
    return ["-q", "train", "--data", "synthetic", "--sites", "2", "--rounds", "1", "--out", str(out),
            "--cache-dir", str(cache), "--synthetic", json.dumps(SYNTH)]  # fmt: skip


def test_a_run_on_a_store_with_a_label_outside_the_classes_stops_in_one_line(
    run, synthetic_cache, tmp_path, capsys
):
    cache = Path(shutil.copytree(synthetic_cache, tmp_path / "cache"))
    digest = json.loads((run / "provenance.json").read_text())["site_0"]["digest"]
    folder = cache / "features" / digest[:24]
    _edit_tensors(folder, lambda t: t["labels"].__setitem__(0, 99))
    _rehash(folder)
    capsys.readouterr()
    assert main(_train_args(tmp_path / "again", cache)) == 2
    err = capsys.readouterr().err
    errors = error_lines(err)
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"feature store {str(folder)!r}" in errors[0] and "label 99 of image" in errors[0], errors


def test_export_refuses_an_out_that_is_not_an_earlier_export(run, tmp_path, capsys):
    """`--out RUN/results.json` replaced the run's results with a model."""
    results = run / "results.json"
    kept = results.read_bytes()
    other = tmp_path / "notes.onnx"
    other.write_bytes(b"mine")
    write_sha256_sidecar(other, "0" * 64)  # a sidecar that does not match it vouches for nothing
    for out in (results, other):
        capsys.readouterr()
        assert main(["-q", "export", str(run), "--no-ood", "--out", str(out)]) == 2
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and f"--out {str(out)!r} already exists" in errors[0], errors
        assert "remove it or choose another path" in errors[0]
    assert results.read_bytes() == kept and other.read_bytes() == b"mine"


def test_an_earlier_export_is_replaced_also_by_two_exports_at_once(tmp_path):
    """Re-exporting over an export is the usual workflow, and two exports to one --out at once both succeed:
    neither takes the other's file, between its rename and its sidecar, for one that is not an export."""
    from fedmedclip.export import check_out, put_export_in_place

    out = tmp_path / "model.onnx"
    out.write_bytes(b"earlier")
    write_sha256_sidecar(out)
    check_out(out)
    failures = []

    def export(tag: str) -> None:
        for i in range(40):
            tmp = tmp_path / f".{tag}-{i}.part"
            tmp.write_bytes(f"{tag}-{i}".encode())
            try:
                check_out(out)
                put_export_in_place(tmp, out, sha256_file(tmp))
            except ConfigError as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=export, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert sha256_sidecar(out).read_text() == f"{sha256_file(out)}  model.onnx\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.sha256"]


def test_an_export_stopped_between_its_rename_and_its_sidecar_is_replaced_by_its_retry(tmp_path):
    """A kill (a preempted pod) after the new model took the name and before its sidecar did left a file no
    sidecar vouched for, and every retry of the export refused it as not an export."""
    from fedmedclip.export import _pending, check_out, put_export_in_place

    out = tmp_path / "model.onnx"
    out.write_bytes(b"earlier")
    write_sha256_sidecar(out)
    # The state such a kill leaves: the new bytes under the name, the earlier sidecar, the pending digest.
    out.write_bytes(b"new")
    _pending(out).write_text(sha256_file(out) + "\n")
    check_out(out)
    retry = tmp_path / ".retry.part"
    retry.write_bytes(b"new")
    put_export_in_place(retry, out, sha256_file(retry))
    assert sha256_sidecar(out).read_text() == f"{sha256_file(out)}  model.onnx\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.sha256"]
    # Without the pending digest it is a file no export vouches for, left as it is.
    out.write_bytes(b"someone else's")
    with pytest.raises(ConfigError, match="already exists and is not a model this tool exported"):
        check_out(out)
