"""`fedmedclip train`: a whole federated run in one process, the fast simulator.

A federated run here is the federation runtime itself: the same `FederationServer` and `SiteWorker` objects
that `fedmedclip server run` and `fedmedclip site run` drive as separate processes, exchanging the same codec
payloads through an in-memory mailbox, polled in a fixed order. So a mailbox run (local directory or S3) with
every site answering gives the same metrics, payloads and model files as this one.

`--federation local|centralized` (the lower and upper references: each site alone, or every site's data
pooled in one holder) share nothing over a network; they run in `ReferenceRun`, which writes the same round
records, results.json and model directory through the same functions (fedmedclip/federation/records.py).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import TrainConfig
from .encoders import resolve_device
from .errors import CheckpointError, ConfigError
from .federation.checkpoint import (
    PARTY_CHECKPOINTS,
    CheckpointStore,
    configuration,
    expect_type,
    expect_types,
    fit_state,
    tensor_map,
)
from .federation.mailbox import Mailbox
from .federation.records import (
    atomic_write_json,
    check_progress,
    evaluate_global,
    evaluate_site,
    is_better,
    only_writer,
    round_of,
    round_record,
)
from .federation.runner import method_for, server_setup
from .federation.server import FederationError, FederationServer, ServerOptions, write_run
from .federation.site import SiteSetup, SiteWorker, model_part
from .federation.storage import LocalDirStore
from .jsonfiles import read_json_object
from .methods import SiteTrainer
from .observer import NO_OBSERVER, RunObserver
from .preparation import (
    SERVER,
    Prepared,
    pooled_data,
    prepare,
    reference_features,
    site_data,
)
from .privacy.report import attach_epsilon, privacy_results
from .privacy.settings import PrivacySettings
from .secagg.identity import IDENTITY_FILE, site_identity

log = logging.getLogger(__name__)

INPROCESS_RUN_ID = "inprocess"


@dataclass(frozen=True)
class CheckpointFolders:
    """RUN/checkpoint/ (`root`), where each party of an in-process run keeps its state, each a folder of it
    (relative, a key of its store): the mailbox of the last rounds, the server's and each site's state (as
    `server run --state` and `site run --state` keep theirs: checkpoints in PARTY_CHECKPOINTS/, a site's
    identity key), and a reference run's checkpoints."""

    root: Path
    mailbox = "mailbox"
    server = "server"
    reference = "reference"

    @staticmethod
    def site(name: str) -> str:
        return f"sites/{name}"

    def checkpoint_stores(self) -> dict[str, Path]:
        """Each party's checkpoint folder, by the name its CheckpointStore gives it: the server's, the
        reference run's, and those of the sites that have one there."""
        stores = {
            "server": self.root / self.server / PARTY_CHECKPOINTS,
            "reference run": self.root / self.reference,
        }
        for folder in sorted(self.root.glob(f"{self.site('*')}/{PARTY_CHECKPOINTS}")):
            stores[f"site {folder.parent.name}"] = folder
        return stores


def checkpoint_folders(out: Path) -> CheckpointFolders:
    """The checkpoint folders of the run directory `out`."""
    return CheckpointFolders(Path(out) / "checkpoint")


# ---------------------------------------------------------------- the parties, from a prepared run
def site_setups(cfg: TrainConfig, p: Prepared, method) -> list[SiteSetup]:
    ref = reference_features(p.partition, p.stores[SERVER], cfg.transductive)
    pixels = p.pixels or {}
    return [
        SiteSetup(
            s, k, method, site_data(p.partition, s, p.stores[s], ref, pixels.get(s)), p.stores[s].provenance
        )
        for k, s in enumerate(p.partition.site_names)
    ]


# ---------------------------------------------------------------- the in-process federation
def simulate(
    cfg: TrainConfig,
    p: Prepared,
    out: Path,
    progress: bool = True,
    run_id: str = INPROCESS_RUN_ID,
    observer: RunObserver = NO_OBSERVER,
) -> dict:
    """Run the federation's server and sites in this process over a mailbox in RUN/checkpoint/mailbox/ (the
    last rounds only). Each party keeps its checkpoints under RUN/checkpoint/: a resumed run continues every
    party from its own, and a party whose newest checkpoint was damaged redoes what it lost from the rounds
    still in the mailbox, exactly. `observer` (fedmedclip.observer: the interface of `fedmedclip server run --track`) hears the start and each round as it finishes; `train` tells it the end once
    results.json is final."""
    method = method_for(cfg, p)
    folders = checkpoint_folders(out)
    ckpt = LocalDirStore(folders.root)
    mailbox = Mailbox(ckpt.sub(folders.mailbox), run_id)
    setups = site_setups(cfg, p, method)
    # Secure aggregation: each site's identity key is generated in its own private state (this process
    # stands for the operator who registers the public keys in the manifest).
    keys = (
        {
            s.name: site_identity(folders.root / folders.site(s.name) / IDENTITY_FILE, create=True)[0]
            for s in setups
        }
        if cfg.secure_aggregation
        else {}
    )
    server = FederationServer(
        mailbox,
        server_setup(cfg, p, method),
        ckpt.sub(folders.server),
        out,
        ServerOptions(),
        verbose=False,
        identities={name: key.public for name, key in keys.items()},
    )
    server.start()
    logged = len(server.history)  # a resumed run's earlier rounds were logged when they finished
    observer.start(server.manifest, resumed=logged > 0)
    sites = [
        SiteWorker(
            mailbox,
            server.manifest,
            s,
            ckpt.sub(folders.site(s.name)),
            model_dir=out / "model",
            verbose=False,
            identity=keys.get(s.name),
        )
        for s in setups
    ]
    bar = tqdm(
        total=cfg.rounds,
        initial=len(server.history),
        desc=f"{cfg.method} rounds",
        unit="round",
        disable=not progress,
    )
    try:
        while not (server.finished and all(s.finished for s in sites)):
            progressed = False
            for s in sites:
                progressed |= s.poll()
            while server.poll():
                progressed = True
                if len(server.history) > bar.n:
                    rec = server.history[-1]
                    val = rec["val_acc_mean"]
                    bar.set_postfix(
                        global_acc=f"{rec['global']['acc']:.3f}", val=f"{val:.3f}" if val is not None else "-"
                    )
                    bar.update(len(server.history) - bar.n)
                    _forget_old_rounds(mailbox, rec["round"], server.sites)
                for rec in server.history[logged:]:
                    observer.round(rec)
                logged = len(server.history)
            if not progressed:  # every party is in this process: someone cannot go on
                raise FederationError(_stalled(server, sites))
    finally:
        bar.close()
    return server.results


def _stalled(server: FederationServer, sites: list[SiteWorker]) -> str:
    waiting = ", ".join(
        f"{s.name} (trained round {s.trained}, evaluated round {s.reported})" for s in sites if not s.finished
    )
    state = checkpoint_folders(server.out).root
    return (
        f"the in-process federation cannot go on: the server is in the {server.phase} phase of round "
        f"{server.round}; sites: {waiting or 'all finished'}. Its state in {state} does not "
        "fit together (were parts of it replaced?): start the run again in an empty --out"
    )


def _forget_old_rounds(mailbox: Mailbox, r: int, sites: list[str]) -> None:
    """Free the mailbox of rounds no party reads again. Round r just closed; the two before it stay, which
    is what a party whose newest checkpoint is damaged (one save lost) reads again to redo its step."""
    old = r - 2
    if old < 0:
        return
    secure = (
        [mailbox.secagg_key(old, what) for what in ("roster", "survivors")]
        + [mailbox.secagg_key(old, what, s) for s in sites for what in ("keys", "shares", "unmask", "inbox")]
        if old >= 1
        else []
    )
    for key in (
        [mailbox.global_key(old)]
        + secure
        + [k for s in sites for k in (mailbox.update_key(old, s), mailbox.report_key(old, s))]
    ):
        mailbox.store.delete(key)


# ---------------------------------------------------------------- the references (nothing travels)
class ReferenceRun:
    """`--federation local` (each site trains alone, nothing shared, no aggregation) or `centralized` (every
    site's training data pooled in one holder). Evaluated like a federation: every site's own test with the
    model that site would hold, and the global test."""

    def __init__(self, cfg: TrainConfig, p: Prepared):
        self.cfg, self.p, self.mode = cfg, p, cfg.federation  # validated: no method that needs a global model
        self.method = method_for(cfg, p)
        setups = site_setups(cfg, p, self.method)
        self.datas = [s.data for s in setups]
        self.site_names = [s.name for s in setups]
        self.unit_datas = [pooled_data(self.datas)] if self.mode == "centralized" else self.datas
        self.units: list[SiteTrainer] = [self.method.new_site(d, k) for k, d in enumerate(self.unit_datas)]
        # What each site predicts with: its own trainer, or in the centralized case the pooled one.
        self.trainers = self.units * len(self.datas) if self.mode == "centralized" else self.units
        self.global_module = self.method.new_global()
        self.global_state = self.method.shared_state(self.global_module)
        if self.mode == "centralized":
            self.units[0].load_shared(self.global_state)  # starts where a federation would
        self.setup = server_setup(cfg, p, self.method)
        # Under DP the training loss, a mean over the patients' examples without noise, is not published: as a
        # federated site keeps it (federation/site.py), so do local and centralized runs.
        self.publish_loss = not PrivacySettings.from_config(cfg.privacy).enabled
        self.round, self.history, self.reports = 0, [], {}
        self.best_round, self.best_val, self.best = None, None, None

    def global_predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Local-only training has no global model: every site's own module predicts every global test image
        (the metrics are then over sites x images)."""
        gx, gy = self.setup.global_x, self.setup.global_y
        if self.mode != "local":
            return self.method.global_probs(self.global_module, gx), gy
        scratch = copy.deepcopy(self.global_module)
        probs = []
        for t in self.units:
            scratch.load_state_dict(t.shared_update(), strict=False)
            probs.append(self.method.global_probs(scratch, gx))
        return torch.cat(probs), gy.repeat(len(self.units))

    def step(self) -> dict:
        r = self.round + 1
        t0 = time.perf_counter()
        losses = [float(t.train_round(r)["loss"]) for t in self.units]
        if self.mode == "centralized":
            self.global_state = self.units[0].shared_update()
            self.global_module.load_state_dict(self.global_state, strict=False)
        self.reports[r] = {
            "global": evaluate_global(*self.global_predictions()),
            "sites": {
                n: {**evaluate_site(t, d), "privacy": t.privacy_report()}
                for n, t, d in zip(self.site_names, self.trainers, self.datas, strict=True)
            },
        }
        zeros = dict.fromkeys(self.site_names, 0)
        site_losses = dict(
            zip(
                self.site_names,
                losses * len(self.site_names) if self.mode == "centralized" else losses,
                strict=False,
            )
        )
        if not self.publish_loss:
            site_losses = {}
        record = round_record(
            r,
            self.reports[r]["global"],
            self.site_names,
            self.reports[r]["sites"],
            self.site_names,
            site_losses,
            zeros,
            zeros,
            time.perf_counter() - t0,
        )
        attach_epsilon(record, self.cfg.privacy, self.site_names, self.reports, self.history)
        self.round = r
        self.history.append(record)
        if is_better(record, round_of(self.history, self.best_round)):
            self.best_round, self.best_val = r, record["val_acc_mean"]
            self.best = self._snapshot()
        return record

    def _snapshot(self) -> dict:
        return {
            "global": {k: v.clone() for k, v in self.global_state.items()},
            "units": [copy.deepcopy(t.state_dict()) for t in self.units],
        }

    def save(self, store: CheckpointStore) -> None:
        body = {
            "round": self.round,
            "history": self.history,
            "reports": {str(r): v for r, v in self.reports.items()},
            "best_round": self.best_round,
            "best_val": self.best_val,
        }
        tensors = {"global": self.global_state, "units": [t.state_dict() for t in self.units]}
        if self.best is not None:
            tensors["best"] = self.best
        store.save(body, tensors)

    def checkpoints(self, out: Path) -> CheckpointStore:
        """Its checkpoint store in RUN/checkpoint/reference/, recording the run's configuration (its resume key
        and partition): state that another configuration wrote is refused, never continued."""
        folders = checkpoint_folders(out)
        return CheckpointStore(
            LocalDirStore(folders.root / folders.reference),
            "reference run",
            configuration(self.cfg.resume_key(), self.p.partition.digest),
            check=self._check_state,
        )

    def _check_state(self, body: dict, tensors) -> None:
        """CheckpointError naming what of a checkpoint is missing or of another type (its digest matched): the
        store then takes the other slot, as for any damaged one."""
        progress = check_progress(body)
        if not 0 <= progress.round <= self.cfg.rounds:
            raise CheckpointError(
                f"body.round is {progress.round}, not a round of this run (0..{self.cfg.rounds})"
            )
        expect_type(tensors, dict, "tensors.pt")
        expect_types(tensors, {"global": dict, "units": list}, "tensors")
        tensor_map(tensors["global"], "tensors.global")
        if len(tensors["units"]) != len(self.units):
            raise CheckpointError(
                f"tensors.units holds {len(tensors['units'])} trainers, not {len(self.units)}"
            )
        for k, unit in enumerate(tensors["units"]):
            expect_type(unit, dict, f"tensors.units[{k}]")
        if "best" in tensors:
            expect_types(tensors["best"], {"global": dict, "units": list}, "tensors.best")

    def load(self, store: CheckpointStore) -> None:
        got = store.load()
        if got is None:
            return
        _, body, tensors = got
        self.round, self.history = int(body["round"]), body["history"]
        self.reports = {int(r): v for r, v in body["reports"].items()}
        self.best_round, self.best_val, self.best = body["best_round"], body["best_val"], tensors.get("best")
        self.global_state = tensors["global"]

        def load_units() -> None:
            self.global_module.load_state_dict(self.global_state, strict=False)
            for t, s in zip(self.units, tensors["units"], strict=True):
                t.load_state_dict(s)

        fit_state(
            load_units,
            f"reference run: its state in {store.store.url}",
            "start the run again in an empty --out",
        )

    def finish(self, out: Path) -> dict:
        if self.best is None:
            self.best = self._snapshot()
        for t, s in zip(self.units, self.best["units"], strict=True):
            t.load_state_dict(s)
        self.global_module.load_state_dict(self.best["global"], strict=False)
        site_tensors = {
            n: model_part(t, own_shared=self.mode == "local")
            for n, t in zip(self.site_names, self.trainers, strict=True)
        }
        provenance = {h: s.provenance for h, s in self.p.stores.items()}
        results = write_run(
            out,
            self.setup,
            self.method,
            self.history,
            self.reports,
            self.best_round,
            provenance,
            self.best["global"],
            site_tensors,
            extra={"privacy": privacy_results(self.cfg.privacy, self.site_names, self.reports, self.history)},
        )
        return results


def _run_reference(cfg: TrainConfig, p: Prepared, out: Path, progress: bool, observer: RunObserver) -> dict:
    run = ReferenceRun(cfg, p)
    store = run.checkpoints(out)
    run.load(store)
    atomic_write_json(out / "config.json", cfg.to_json())
    p.partition.save(out / "partition.json")
    # Nothing travels: the observer hears the sites and the rounds, no manifest.
    observer.start({"sites": [{"name": n} for n in run.site_names]}, resumed=run.round > 0)
    bar = tqdm(
        total=cfg.rounds, initial=run.round, desc=f"{cfg.method} rounds", unit="round", disable=not progress
    )
    while run.round < cfg.rounds:
        rec = run.step()
        run.save(store)
        observer.round(rec)
        bar.update(1)
        bar.set_postfix(global_acc=f"{rec['global']['acc']:.3f}")
    bar.close()
    return run.finish(out)


# ---------------------------------------------------------------- the command
def check_resumable(cfg: TrainConfig, out: Path, resume: bool) -> None:
    """Before any work (feature extraction included): a resumed run must have the same configuration; a
    new run needs an empty directory."""
    config_file = out / "config.json"
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"output directory {str(out)!r} is not empty: pass --resume to continue it, or another --out"
            )
        return
    if not config_file.exists():
        if checkpoint_folders(out).root.exists():
            raise CheckpointError(f"cannot resume {str(out)!r}: config.json is missing")
        raise CheckpointError(
            f"nothing to resume in {str(out)!r}: no config.json (start it without --resume)"
        )
    try:
        stored_cfg = TrainConfig.from_json(read_json_object(config_file))
        # A reference run started before validate() refused its codecs (they never acted) resumes without them.
        stored_cfg.drop_unsent()
        stored = stored_cfg.resume_key()
    except (ValueError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"cannot resume {str(out)!r}: config.json is unreadable ({exc})") from None
    wanted = cfg.resume_key()
    if stored != wanted:
        diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise CheckpointError(f"cannot resume {str(out)!r}: the configuration differs in {', '.join(diff)}")
    # config.json is only what the directory says: each party's checkpoints record the configuration that wrote
    # them (checked again with the partition's digest as each one loads its state, once the data is prepared).
    settings = configuration(wanted, None)
    for party, folder in checkpoint_folders(out).checkpoint_stores().items():
        if folder.is_dir():
            CheckpointStore(LocalDirStore(folder), party, settings).check_configuration()


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    run_id: str = INPROCESS_RUN_ID,
    observer: RunObserver | None = None,
) -> dict:
    """Run (or resume) a training; writes the run directory (docs/contracts.md) and returns results.json.
    `run_id` is recorded in every payload's header: the same id as a mailbox run gives byte-identical payloads.
    `observer` (fedmedclip.observer; `train --track`: the MLOps layer's MLflow logging) is told the start, each round as it finishes, and the
    end (`finish(results, None)`, or `finish(None, message)` when the run fails)."""
    cfg.validate()
    resolve_device(cfg.encoder_device)  # here, not in validate(): a CPU machine may submit a run for GPU pods
    observer = observer or NO_OBSERVER
    out = Path(cfg.out)
    with only_writer(out):
        check_resumable(cfg, out, resume)
        t0 = time.perf_counter()
        prepared = prepare(cfg, progress)
        # Once the data, the backbone and the prompts are found good: a run refused before (an unknown class,
        # a damaged backbone) leaves no config.json that would make its corrected command "not empty".
        atomic_write_json(out / "config.json", cfg.to_json())
        torch.set_num_threads(cfg.threads)
        try:
            if cfg.federation == "federated":
                results = simulate(cfg, prepared, out, progress, run_id, observer)
            else:
                results = _run_reference(cfg, prepared, out, progress, observer)
        except BaseException as exc:
            observer.finish(None, f"{type(exc).__name__}: {exc}")
            raise
        results["timing"]["total_seconds"] = time.perf_counter() - t0
        results["timing"]["feature_seconds"] = prepared.feature_seconds
        atomic_write_json(out / "results.json", results)
        observer.finish(results, None)
    return results


__all__ = [
    "INPROCESS_RUN_ID",
    "CheckpointFolders",
    "ReferenceRun",
    "check_resumable",
    "checkpoint_folders",
    "simulate",
    "site_setups",
    "train",
]
