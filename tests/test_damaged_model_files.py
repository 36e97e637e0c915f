"""Damaged or edited model files, run files and cached data: each is refused in one line naming the file and the
problem, never a traceback, never a silently wrong result (an ONNX model answering NaN, class names over another
class's outputs, training on relabelled data). One tiny run (2 sites, 1 round, the tiny backbone) is trained per
module and copied per test."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from conftest import SYNTH, error_lines

from fedmedclip.errors import DataError, FedMedClipError


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_cache) -> Path:
    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import train

    out = tmp_path_factory.mktemp("damaged") / "run"
    cfg = TrainConfig(
        data="synthetic", synthetic=SYNTH, sites=2, rounds=1, cache_dir=str(synthetic_cache), out=str(out)
    )
    train(cfg, progress=False)
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _export_error(run: Path, tmp_path: Path, capsys, site: str = "global") -> str:
    """`fedmedclip export RUN --site SITE` (no OOD score, TorchScript): exit 2 with one error line, which is
    returned; no model written."""
    from fedmedclip.cli import main

    out = tmp_path / "m.onnx"
    argv = [
        "-q",
        "export",
        str(run),
        "--site",
        site,
        "--no-ood",
        "--exporter",
        "torchscript",
        "--out",
        str(out),
    ]
    status = main(argv)
    err = capsys.readouterr().err
    errors = error_lines(err)
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".m.onnx.*")), "a model was written"
    return errors[0]


# ---------------------------------------------------------------- a model that would answer NaN
def _negative_variance(run: Path) -> Path:
    from safetensors.torch import load_file, save_file

    path = run / "model" / "site_site_0.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.endswith("running_var"))
    tensors[key][:] = -1.0  # finite, but sqrt(var + eps) is NaN
    save_file(tensors, str(path))
    return path


def test_export_refuses_a_negative_batchnorm_variance(run, tmp_path, capsys):
    """A site MLP's BatchNorm running_var set to -1 was exported (exit 0), and ONNX Runtime answered
    probabilities [nan nan nan nan]: only non-finite tensors were refused."""
    path = _negative_variance(run)
    error = _export_error(run, tmp_path, capsys, site="site_0")
    assert str(path) in error and "running_var" in error and "below 0" in error, error


def test_export_refuses_a_model_that_answers_nan_on_probe_images(run, tmp_path):
    """Whatever makes a finite model answer NaN (here a negative variance, past the files' check): the probe
    batch run through it before anything is written refuses it, naming the model files."""
    from fedmedclip.export import export_classifier
    from fedmedclip.inference import load_classifier

    _negative_variance(run)
    clf, meta = load_classifier(run, "site_0")
    out = tmp_path / "m.onnx"
    with pytest.raises(FedMedClipError, match="non-finite 'probabilities' on probe images") as caught:
        export_classifier(clf, meta, out, exporter="torchscript")
    assert str(run / "model") in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists() and not list(tmp_path.glob(".m.onnx.*"))


# ---------------------------------------------------------------- model.json: types and the trained classes
@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda d: d.update(class_names=d["class_names"][::-1]), "but the run trained on"),
        (lambda d: d.update(class_names=["w", "x", "y", "z"]), "but the run trained on"),
        (lambda d: d.update(class_names="abcd"), "class_names: input should be a valid list"),
        (lambda d: d.update(class_names=[*d["class_names"][:3], d["class_names"][0]]), "listed twice"),
        (lambda d: d.update(backbone="tiny"), "backbone: input should be"),
        (lambda d: d.update(sites=5), "sites: input should be a valid list"),
        (lambda d: d.update(preprocessing={}), "preprocessing.name: field required"),
        (lambda d: d["preprocessing"].update(resample="nope"), "preprocessing resample is 'nope'"),
        (lambda d: d.update(method_options=[1]), "method_options: input should be a valid dictionary"),
    ],
    ids=[
        "classes-reversed",
        "classes-renamed",
        "classes-string",
        "classes-twice",
        "backbone-string",
        "sites-number",
        "preprocessing-empty",
        "preprocessing-resample",
        "options-list",
    ],
)
def test_export_refuses_an_edited_model_json_in_one_line(run, tmp_path, capsys, edit, why):
    """Reversed class names (or the string "abcd") were exported with exit 0, the ONNX metadata naming the wrong
    class for each output; a string backbone, a number of sites or an empty preprocessing were tracebacks."""
    _edit_json(run / "model" / "model.json", edit)
    error = _export_error(run, tmp_path, capsys)
    assert "model.json" in error and why in error, error


# ---------------------------------------------------------------- partition.json as the model card reads it
@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda d: d.update(counts=[1]), "`counts` must be a JSON object, got list"),
        (lambda d: d["counts"].update(site_0=[1]), "`counts.site_0` must be a JSON object"),
        (lambda d: d["counts"]["site_0"].update(train=3), "`counts.site_0.train` must be a JSON object"),
        (lambda d: d.update(class_names="abcd"), "`class_names` must be a JSON list, got str"),
    ],
    ids=["counts-list", "site-list", "split-number", "classes-string"],
)
def test_model_card_refuses_a_partition_json_of_another_shape(run, edit, why):
    """`counts: [1]` in partition.json was an AttributeError traceback from `fedmedclip card RUN`, and class_names
    "abcd" a card listing the classes a, b, c and d."""
    from fedmedclip.model_card import CardError, build_card

    _edit_json(run / "partition.json", edit)
    with pytest.raises(CardError) as caught:
        build_card(run)
    message = str(caught.value)
    assert str(run / "partition.json") in message and why in message and "\n" not in message, message


# ---------------------------------------------------------------- the synthetic data cache
def _cached_synthetic(synthetic_cache: Path, tmp_path: Path):
    """A copy of the session's cached synthetic data set (the fixture's run generated it) in a cache of this
    test's own: (its config, its folder)."""
    from fedmedclip.config import TrainConfig
    from fedmedclip.digests import canonical_digest

    cfg = TrainConfig(data="synthetic", synthetic=SYNTH, sites=2, cache_dir=str(tmp_path / "cache"), out="")
    cfg = cfg.validate()
    name = canonical_digest(cfg.synthetic_arguments())[:16]
    folder = tmp_path / "cache" / "synthetic" / name
    shutil.copytree(synthetic_cache / "synthetic" / name, folder)
    return cfg, folder


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_an_edited_synthetic_data_cache_is_refused_not_trained_on(trained, synthetic_cache, tmp_path):
    """`sed -i '2s/,diffuse_lesion,/,normal,/' CACHE/synthetic/<id>/manifest.csv`: a fresh run trained on the
    relabelled data without a word."""
    from fedmedclip.preparation import _local_source

    cfg, folder = _cached_synthetic(synthetic_cache, tmp_path)
    manifest = folder / "manifest.csv"
    lines = manifest.read_text().splitlines(keepends=True)
    assert ",diffuse_lesion," in lines[1]
    lines[1] = lines[1].replace(",diffuse_lesion,", ",normal,")
    manifest.write_text("".join(lines))
    before = _contents(folder)
    with pytest.raises(DataError) as caught:
        _local_source(cfg)
    message = str(caught.value)
    assert str(folder) in message and "manifest.csv differs" in message and "delete" in message, message
    assert _contents(folder) == before  # left as it was
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no generation left behind


def test_a_synthetic_data_cache_without_its_manifest_is_named_incomplete(trained, synthetic_cache, tmp_path):
    """With manifest.csv removed, every later run generated the data again and failed with "[Errno 39]
    Directory not empty: '.../.184649…-xxxx' -> '.../184649…'"."""
    from fedmedclip.preparation import _local_source

    cfg, folder = _cached_synthetic(synthetic_cache, tmp_path)
    (folder / "manifest.csv").unlink()
    (folder / "mine.txt").write_text("a file of the user's")
    before = _contents(folder)
    with pytest.raises(DataError) as caught:
        _local_source(cfg)
    message = str(caught.value)
    assert str(folder) in message and "incomplete" in message and "delete" in message, message
    assert "Errno" not in message and ".part" not in message and f".{folder.name}-" not in message
    assert _contents(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_a_synthetic_data_cache_from_before_the_record_is_checked_once(trained, synthetic_cache, tmp_path):
    """A folder generated before its record was kept is compared with a fresh generation: the same bytes give it
    its record (and it is used); an edited one is refused."""
    from fedmedclip.preparation import GENERATED, _local_source

    cfg, folder = _cached_synthetic(synthetic_cache, tmp_path)
    record = (folder / GENERATED).read_bytes()
    (folder / GENERATED).unlink()
    assert _local_source(cfg) == folder / "manifest.csv"
    assert (folder / GENERATED).read_bytes() == record

    (folder / GENERATED).unlink()
    image = next(p for p in sorted(folder.rglob("*.png")))
    image.write_bytes(next(p for p in sorted(folder.rglob("*.png")) if p != image).read_bytes())
    with pytest.raises(DataError, match="differs from what the generator writes"):
        _local_source(cfg)
    assert not (folder / GENERATED).exists()


def test_a_folder_that_cannot_be_put_in_place_is_named_not_its_temporary_copy(tmp_path):
    """put_folder_in_place over a non-empty folder that is not the one expected raised the system's
    "[Errno 39] Directory not empty" naming the temporary folder too; what was there is kept."""
    from fedmedclip.paths import put_folder_in_place

    final, tmp = tmp_path / "store", tmp_path / ".store-tmp"
    (final / "sub").mkdir(parents=True)
    (final / "sub" / "kept.txt").write_text("mine")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    with pytest.raises(OSError) as caught:
        put_folder_in_place(tmp, final, lambda: False)
    message = str(caught.value)
    assert str(final) in message and str(tmp) not in message and "delete it" in message, message
    assert caught.value.errno == errno.ENOTEMPTY
    assert (final / "sub" / "kept.txt").read_text() == "mine" and not tmp.exists()
