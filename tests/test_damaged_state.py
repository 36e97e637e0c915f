"""A run's state damaged, edited or another run's, then resumed (`train --resume`): refused in one line naming the
file and the problem, or recovered from exactly; never a traceback, never state that another configuration wrote
continued, never a damaged output kept, never a read without bound. Two tiny runs (2 sites, 2 rounds, the tiny
backbone), one finished and one killed in round 2, are trained per module and copied per test; the checkpoint
store's and the JSON reader's own checks run on files of their own."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SYNTH, train_interrupted, without_timing

from fedmedclip import engine
from fedmedclip.config import TrainConfig
from fedmedclip.digests import canonical_digest
from fedmedclip.errors import CheckpointError, FedMedClipError


class Killed(Exception):
    pass


def config(out: Path, cache: Path, **kw) -> TrainConfig:
    return TrainConfig(
        **{"data": "synthetic", "synthetic": SYNTH, "sites": 2, "rounds": 2, **kw},
        cache_dir=str(cache),
        out=str(out),
    )


@pytest.fixture(scope="module")
def bases(tmp_path_factory, synthetic_cache) -> tuple[Path, dict]:
    """A finished run, and the same run killed as site_1 starts round 2 (the server waits for its updates)."""
    base = tmp_path_factory.mktemp("damaged-state")
    finished = engine.train(config(base / "finished", synthetic_cache), progress=False)
    train_interrupted(config(base / "mid-run", synthetic_cache), 2, Killed)
    return base, finished


@pytest.fixture
def copy_of(bases, tmp_path):
    def copy(name: str) -> Path:
        shutil.copytree(bases[0] / name, tmp_path / name)
        return tmp_path / name

    return copy


def _same_run(a: dict, b: dict) -> None:
    def history(h):
        return [{k: v for k, v in r.items() if k not in ("seconds", "finished_at")} for r in h]

    assert a["metrics"] == b["metrics"]
    assert history(a["history"]) == history(b["history"])


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _newest_slot(party: Path) -> Path:
    slots = [party / "ckpt" / s for s in ("a", "b")]
    return max(slots, key=lambda s: json.loads((s / "state.json").read_text())["seq"])


def _resign(slot: Path, edit) -> None:
    """Edit a slot's body and compute its digest again, as a hand that knows the format would: only the checks
    of what the body holds can find it."""
    state = json.loads((slot / "state.json").read_text())
    edit(state["body"])
    state.pop("digest")
    state["digest"] = canonical_digest(state)
    (slot / "state.json").write_text(json.dumps(state))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ----------------------------------------------------------------------------- another configuration's state
@pytest.mark.parametrize(
    ("party", "changed", "removed"),
    [
        ("server", {"seed": 1}, ["checkpoint/mailbox"]),
        ("server", {"sites": 3}, ["checkpoint/mailbox/runs/inprocess/manifest.json"]),
        ("site", {"seed": 1}, ["checkpoint/mailbox", "checkpoint/server"]),
    ],
    ids=["server-seed", "server-sites", "site-seed"],
)
def test_a_checkpoint_of_another_configuration_is_refused(
    copy_of, synthetic_cache, monkeypatch, party, changed, removed
):
    """A run killed mid-way, its mailbox (or only its manifest) removed and config.json edited to another seed or
    site count, resumed with those: every party's checkpoint records the digest of the configuration's resume
    key and partition, so the state of the seed-0 run is refused in one line naming the checkpoint, before any
    work (the data is not prepared) and before anything is written. (It resumed, exit 0, rounds of one
    configuration mixed with another.)"""
    out = copy_of("mid-run")
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: pytest.fail("prepared before the refusal"))
    for rel in removed:
        path = out / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    _edit_json(out / "config.json", lambda c: c.update(changed))
    with pytest.raises(CheckpointError, match="was written by another configuration") as err:
        engine.train(config(out, synthetic_cache, **changed), resume=True, progress=False)
    where = out / "checkpoint" / ("server/ckpt" if party == "server" else "sites/site_0/ckpt")
    assert str(where) in _one_line(err.value)
    if party == "server":
        assert not (out / "checkpoint/mailbox/runs/inprocess/manifest.json").exists()


def test_a_reference_run_checkpoint_of_another_configuration_is_refused(tmp_path, synthetic_cache):
    """`--federation local` likewise: its checkpoint records its configuration (it checked nothing)."""
    out = tmp_path / "local"
    engine.train(config(out, synthetic_cache, federation="local", rounds=1), progress=False)
    kept = (out / "results.json").read_bytes()
    _edit_json(out / "config.json", lambda c: c.update(seed=1))
    with pytest.raises(CheckpointError, match="was written by another configuration") as err:
        engine.train(
            config(out, synthetic_cache, federation="local", rounds=1, seed=1), resume=True, progress=False
        )
    assert str(out / "checkpoint" / "reference") in _one_line(err.value)
    assert (out / "results.json").read_bytes() == kept


# ----------------------------------------------------------------------------- a finished run's directory
def test_a_finished_run_resumed_writes_its_damaged_run_directory_again(bases, copy_of, synthetic_cache):
    """A finished run whose results.json was edited (method, accuracy, its timing removed), whose partition.json,
    model and round-2 module were truncated: --resume writes each from the checkpoints (and the mailbox, which
    still holds round 2), byte for byte. (The edited results.json was saved again as the run's, the truncated
    files kept, exit 0; without `timing`, a KeyError's traceback.)"""
    base, finished = bases
    out = copy_of("finished")
    rels = ["partition.json", "model/global.safetensors", "model/model.json", "rounds/global_round_002.bin"]
    kept = {rel: (out / rel).read_bytes() for rel in rels}

    def edit(results):
        results["method"], results["metrics"]["global"]["acc"] = "facmic", 0.99
        del results["timing"]

    _edit_json(out / "results.json", edit)
    for rel in rels:
        with (out / rel).open("r+b") as fh:
            fh.truncate(20)
    again = engine.train(config(out, synthetic_cache), resume=True, progress=False)
    assert without_timing(again) == without_timing(finished)
    assert without_timing(json.loads((out / "results.json").read_text())) == without_timing(finished)
    for rel, data in kept.items():
        assert (out / rel).read_bytes() == data, rel


def test_a_damaged_round_module_the_mailbox_no_longer_holds_is_refused_not_kept(copy_of, synthetic_cache):
    """rounds/global_round_001.bin truncated once the mailbox has let go of round 1: it cannot be written again,
    and it is not the module the server's checkpoint recorded (sha256, size), so the resume is refused in one
    line saying what to do; done, the run finishes without it. (It was kept, exit 0.)"""
    out = copy_of("finished")
    (out / "rounds/global_round_001.bin").write_bytes(b"damaged")
    (out / "checkpoint/mailbox/runs/inprocess/rounds/0001/global.bin").unlink()
    with pytest.raises(FedMedClipError, match="global_round_001.bin is damaged") as err:
        engine.train(config(out, synthetic_cache), resume=True, progress=False)
    assert "remove the file" in _one_line(err.value)
    (out / "rounds/global_round_001.bin").unlink()
    engine.train(config(out, synthetic_cache), resume=True, progress=False)
    assert not (out / "rounds/global_round_001.bin").exists()


# ----------------------------------------------------------------------------- a checkpoint's body
def _nan_report(body):
    body["last_report"]["val"]["acc"] = float("nan")


@pytest.mark.parametrize(
    ("party", "edit", "reason"),
    [
        (
            "server",
            lambda b: b["reports"]["1"]["global"]["report"].update(acc=float("nan")),
            "NaN is not a number",
        ),
        (
            "server",
            lambda b: b.update(history=5),
            "checkpoint body refused: history: input should be a valid list, got 5",
        ),
        ("sites/site_0", _nan_report, "NaN is not a number"),
    ],
    ids=["server-nan", "server-history-of-another-type", "site-nan"],
)
def test_a_checkpoint_body_holding_nan_or_another_type_is_a_damaged_slot(
    bases, copy_of, synthetic_cache, party, edit, reason
):
    """The newest checkpoint's body holds NaN, or a history that is no list, under a recomputed digest: the slot
    is damaged like any other, the party resumes from the other one and the run ends as the undamaged one, its
    `recovery` naming the party and why. (Every restart crashed: 'refusing to checkpoint non-finite state',
    naming no file; a TypeError's or pydantic's traceback.)"""
    out = copy_of("mid-run")
    _resign(_newest_slot(out / "checkpoint" / party), edit)
    resumed = engine.train(config(out, synthetic_cache), resume=True, progress=False)
    _same_run(resumed, bases[1])
    [entry] = resumed["recovery"]
    assert entry["party"] == party.removeprefix("sites/") and reason in entry["reason"], entry


# ----------------------------------------------------------------------------- the mailbox
def test_a_planted_global_module_is_refused_saying_what_to_remove(bases, copy_of, synthetic_cache):
    """A copy of round 1's global module planted as round 2's: refused in one line that names the file and says
    to remove it (it said only whose module it is, at every restart); removed, the run ends as the undamaged
    one."""
    out = copy_of("mid-run")
    rounds = out / "checkpoint/mailbox/runs/inprocess/rounds"
    shutil.copy(rounds / "0001/global.bin", rounds / "0002/global.bin")
    with pytest.raises(FedMedClipError, match="belongs to run 'inprocess' round 1") as err:
        engine.train(config(out, synthetic_cache), resume=True, progress=False)
    assert f"{rounds / '0002/global.bin'}" in _one_line(err.value) and "Remove that file" in str(err.value)
    (rounds / "0002/global.bin").unlink()
    _same_run(engine.train(config(out, synthetic_cache), resume=True, progress=False), bases[1])


# ----------------------------------------------------------------------------- the checkpoint store itself
def test_checkpoints_of_an_earlier_version_are_refused_before_any_work(copy_of, synthetic_cache, monkeypatch):
    """Checkpoints written before they recorded their tensors' size and their configuration cannot be checked:
    refused in one line saying so, before the data is prepared (they were listed as damaged slots, after it)."""
    out = copy_of("mid-run")
    for state_file in (out / "checkpoint").rglob("ckpt/*/state.json"):
        state = json.loads(state_file.read_text())
        state["body"].pop("configuration", None)
        state.pop("tensors_bytes")
        state.pop("digest")
        state["digest"] = canonical_digest(state)
        state_file.write_text(json.dumps(state))
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: pytest.fail("prepared before the refusal"))
    with pytest.raises(CheckpointError, match="was written by an earlier fedmedclip") as err:
        engine.train(config(out, synthetic_cache), resume=True, progress=False)
    assert "start the run again in an empty --out" in _one_line(err.value)
    assert str(out / "checkpoint") in str(err.value)


def test_a_checkpoint_store_refuses_another_configuration_without_falling_back(tmp_path):
    """What `load` checks as each party resumes (the partition's digest too, which `train` knows only once the
    data is prepared): a checkpoint written by another configuration is refused, naming the slot, whichever
    slot holds it; it is no damage, so the other slot is not taken instead."""
    from fedmedclip.federation.checkpoint import CheckpointStore, configuration
    from fedmedclip.federation.storage import LocalDirStore

    written = configuration({"seed": 0}, "p" * 64)
    store = CheckpointStore(LocalDirStore(tmp_path), "site site_0", written)
    store.save({"round": 1}, {"w": torch.ones(2)})
    store.save({"round": 2}, {"w": torch.ones(2)})
    assert store.load()[1] == {"round": 2, "configuration": written}
    for other in (configuration({"seed": 0}, "q" * 64), configuration({"seed": 1}, "p" * 64)):
        with pytest.raises(CheckpointError, match="was written by another configuration") as err:
            CheckpointStore(LocalDirStore(tmp_path), "site site_0", other).load()
        assert str(tmp_path / "a") in _one_line(err.value)
    _resign(tmp_path / "b", lambda body: body.pop("configuration"))  # as a checkpoint of an older fedmedclip
    with pytest.raises(CheckpointError, match="records no configuration"):
        CheckpointStore(LocalDirStore(tmp_path), "site site_0", written).load()


def _two_saves(root: Path):
    from fedmedclip.federation.checkpoint import CheckpointStore
    from fedmedclip.federation.storage import LocalDirStore

    store = CheckpointStore(LocalDirStore(root), "server")
    store.save({"round": 1, "acc": 0.5}, {"w": torch.ones(4)})  # slot a
    store.save({"round": 2, "acc": 0.5}, {"w": torch.full((4,), 2.0)})  # slot b
    return lambda: CheckpointStore(LocalDirStore(root), "server")


@pytest.mark.parametrize(
    ("number", "value"), [("NaN", float("nan")), ("Infinity", float("inf")), ("1e400", float("inf"))]
)
def test_a_non_finite_number_in_a_body_is_a_damaged_slot(tmp_path, number, value):
    """A body number that is NaN, Infinity or past float's range (`1e400` parses to inf) under a matching
    digest: `load` passes the slot over for the other, naming it. (It was loaded, and the party's next save
    refused it, at every restart.)"""
    reopen = _two_saves(tmp_path)
    path = tmp_path / "b" / "state.json"
    state = json.loads(path.read_text())
    state["body"]["acc"] = value  # the digest of what the edited text parses to
    state.pop("digest")
    state["digest"] = canonical_digest(state)
    state["body"]["acc"] = float("inf")
    path.write_text(json.dumps(state).replace("Infinity", number))
    store = reopen()
    seq, body, _ = store.load()
    assert (seq, body) == (0, {"round": 1, "acc": 0.5})
    [problem] = store.problems
    assert problem.startswith(f"{tmp_path / 'b'}: ") and "state.json" in problem, problem


def test_a_tensors_file_larger_than_recorded_is_not_read(tmp_path, monkeypatch):
    """tensors.pt grown to 64 MiB (sparse): it is refused by the size its state.json records, before a byte of
    it is read (a 3 GB one was read whole before its sha256 refused it), and the other slot is used."""
    from fedmedclip.federation.storage import LocalDirStore

    reopen = _two_saves(tmp_path)
    with (tmp_path / "b" / "tensors.pt").open("r+b") as fh:
        fh.truncate(64 << 20)
    asked = []
    get = LocalDirStore.get
    monkeypatch.setattr(
        LocalDirStore,
        "get",
        lambda self, key, max_bytes=None: asked.append((key, max_bytes)) or get(self, key, max_bytes),
    )
    store = reopen()
    assert store.load()[1] == {"round": 1, "acc": 0.5}
    assert all(
        limit is not None and limit < (1 << 20) for key, limit in asked if key.endswith("tensors.pt")
    ), asked
    [problem] = store.problems
    assert "tensors.pt is 67108864 bytes, not the" in problem, problem


def test_a_checkpoint_folder_that_is_a_file_is_named_in_full(tmp_path):
    """checkpoint/server/ckpt replaced by a file: the save says where, in full ('[Errno 20] Not a directory:
    'ckpt'' named no path)."""
    from fedmedclip.federation.checkpoint import CheckpointStore
    from fedmedclip.federation.storage import LocalDirStore

    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "ckpt").write_text("not a folder")
    store = CheckpointStore(LocalDirStore(tmp_path).sub("server").sub("ckpt"), "server")
    assert store.load() is None
    with pytest.raises(CheckpointError) as err:
        store.save({"round": 1}, {"w": torch.ones(2)})
    assert str(tmp_path / "server" / "ckpt" / "a") in _one_line(err.value)


# ----------------------------------------------------------------------------- run-directory JSON files
def test_a_json_file_that_is_no_regular_file_or_too_large_is_refused_unread(tmp_path, monkeypatch, bases):
    """results.json or config.json a link to /dev/zero, a FIFO or a folder, or larger than the reader's cap:
    a ValueError at once, and the commands that read them stop in one line (`card` and `train --resume` grew
    their memory without bound; a FIFO would have blocked them)."""
    from fedmedclip import jsonfiles
    from fedmedclip.model_card import CardError, build_card

    assert jsonfiles.MAX_JSON_BYTES >= 16 << 20  # generous: before it is read at all, a file is checked so
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "x.json")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    for path in (tmp_path / "zero.json", tmp_path / "fifo" / "x.json", tmp_path / "fifo"):
        with pytest.raises(ValueError, match="not a regular file"):
            jsonfiles.read_json(path)
    (tmp_path / "big.json").write_text(json.dumps({"x": "y" * 100}))
    monkeypatch.setattr(jsonfiles, "MAX_JSON_BYTES", 64)
    with pytest.raises(ValueError, match="over the limit of 64"):
        jsonfiles.read_json(tmp_path / "big.json")
    monkeypatch.undo()

    run = tmp_path / "run"
    shutil.copytree(bases[0] / "finished", run)
    for name in ("results.json", "config.json"):
        (run / name).unlink()
        os.symlink("/dev/zero", run / name)
    with pytest.raises(CardError, match="results.json") as err:
        build_card(run)
    assert "not a regular file" in _one_line(err.value)
    with pytest.raises(CheckpointError, match="config.json is unreadable") as err:
        engine.check_resumable(config(run, tmp_path), run, resume=True)
    assert "not a regular file" in _one_line(err.value)


def test_a_checkpoint_records_the_size_of_its_tensors(tmp_path):
    """state.json records tensors.pt's byte size beside its sha256 (what its reader is bounded by)."""
    _two_saves(tmp_path)
    for slot in ("a", "b"):
        state = json.loads((tmp_path / slot / "state.json").read_text())
        blob = (tmp_path / slot / "tensors.pt").read_bytes()
        assert (
            state["tensors_bytes"] == len(blob)
            and state["tensors_sha256"] == hashlib.sha256(blob).hexdigest()
        )
