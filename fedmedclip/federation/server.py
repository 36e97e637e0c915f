"""The aggregator: one long-lived party. It publishes the initial global module; each round it waits for the
sites' updates (every expected site, or a quorum once the round times out), validates each update, aggregates
with the method's weights renormalised over the sites present, evaluates on the global test set, publishes the
next global module, and collects the sites' metrics. At the end it writes the same run directory and
results.json as `fedmedclip train`.

`poll()` does whatever is ready and returns at once, so the in-process simulator drives the very same object
that `fedmedclip server run` drives with `run()`. Every completed step is checkpointed in storage only the
server reads; a restarted server continues from its last completed step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..aggregation import aggregation_weights
from ..codec import decode, encode
from ..errors import FedMedClipError
from ..methods import Method
from ..privacy.client import server_privacy
from ..privacy.report import attach_epsilon, check_site_privacy, privacy_results
from .checkpoint import CheckpointStore, non_finite
from .mailbox import SERVER, Mailbox, Poller, ProtocolError
from .records import (
    atomic_write_bytes,
    atomic_write_json,
    build_results,
    check_site_report,
    evaluate_global,
    is_better,
    round_of,
    round_record,
    write_model_dir,
    write_results,
)
from .storage import ObjectStore

log = logging.getLogger("fedmedclip.server")

MANIFEST_FORMAT = 1


class FederationError(FedMedClipError):
    """The run cannot go on: no quorum at a round's timeout, a manifest of other settings, ..."""


@dataclass
class ServerOptions:
    quorum: int | None = None  # minimum sites per round; None: every expected site
    round_timeout: float = 600.0  # seconds a round waits for updates once the global module is out
    join_timeout: float = 3600.0  # round 1 also waits for the sites to encode their features
    report_timeout: float | None = (
        None  # seconds to wait for a present site's metrics (default: round_timeout)
    )
    norm_factor: float = 10.0  # reject an update whose distance to the global module exceeds this x the others' median (0: off)
    max_update_bytes: int | None = None  # cap on an inflated update (default: the template's size + headroom)
    stall_every: float = 30.0  # seconds between "waiting for ..." lines
    poll_cap: float = 0.25


@dataclass
class ServerSetup:
    """What the server holds: the method, the partition, the global test set, and the shared tensors."""

    cfg: object  # TrainConfig
    method: Method
    partition: object  # Partition
    global_x: torch.Tensor
    global_y: torch.Tensor
    text_features: torch.Tensor
    reference_x: torch.Tensor
    class_names: list[str]
    backbone: dict
    preprocessing: dict
    provenance: dict  # the server's feature store
    feature_seconds: float = 0.0
    extra_results: dict = field(default_factory=dict)


def tensor_template(state: dict[str, torch.Tensor]) -> dict:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()}


def make_manifest(run_id: str, setup: ServerSetup, options: ServerOptions, template: dict) -> dict:
    cfg, part = setup.cfg, setup.partition
    counts = {s: len(part.sites[s]["train"]) for s in part.site_names}
    return {
        "format": MANIFEST_FORMAT,
        "run_id": run_id,
        "settings": cfg.resume_key(),
        "method": cfg.method,
        "rounds": cfg.rounds,
        "codec_up": cfg.codec_up,
        "codec_down": cfg.codec_down,
        "partition_digest": part.digest,
        "sites": [{"name": s, "index": k, "n_train": counts[s]} for k, s in enumerate(part.site_names)],
        "quorum": options.quorum or len(part.site_names),
        "round_timeout": options.round_timeout,
        "norm_factor": options.norm_factor,
        "backbone": setup.backbone,
        "preprocessing": setup.preprocessing,
        "class_names": setup.class_names,
        "template": template,
    }


class UpdateRejected(Exception):
    pass


class FederationServer:
    def __init__(
        self,
        mailbox: Mailbox,
        setup: ServerSetup,
        state: ObjectStore,
        out_dir: str | Path,
        options: ServerOptions | None = None,
        observer=None,
        verbose: bool = True,
    ):
        self.mb, self.setup, self.state = mailbox, setup, state
        self.out = Path(out_dir)
        self.opt = options or ServerOptions()
        self.observer, self.verbose = observer, verbose
        cfg, part = setup.cfg, setup.partition
        self.cfg, self.method, self.sites = cfg, setup.method, list(part.site_names)
        self.rounds = int(cfg.rounds)
        self.quorum = self.opt.quorum or len(self.sites)
        if not 1 <= self.quorum <= len(self.sites):
            raise FederationError(f"quorum {self.quorum} must be between 1 and the {len(self.sites)} sites")
        self.ckpt = CheckpointStore(state.sub("ckpt"), "server")
        self.global_module = self.method.new_global()
        self.global_state = self.method.shared_state(self.global_module)
        self.template = tensor_template(self.global_state)
        self.manifest = make_manifest(mailbox.run_id, setup, self.opt, self.template)
        self.counts = {s["name"]: s["n_train"] for s in self.manifest["sites"]}
        # Differential privacy (fedmedclip.privacy): delta checked against every site's size before any
        # training; client-level DP's aggregation when on.
        self.client_dp = server_privacy(setup.method.ctx.privacy, self.counts, self.quorum, state)
        template_bytes = sum(int(np.prod(shape)) * 8 for shape, _ in self.template.values())
        self.max_update_bytes = self.opt.max_update_bytes or template_bytes + (1 << 20)
        # Progress state (checkpointed).
        self.phase, self.round = "start", 0
        self.received: dict[str, torch.Tensor] = {}
        self.best_received: dict[str, torch.Tensor] | None = None
        self.best_round: int | None = None
        self.best_val: float | None = None
        self.history: list[dict] = []
        self.reports: dict[int, dict] = {}
        self.site_provenance: dict[str, dict] = {}
        self.info: dict = {}  # the round being closed: present, rejected, losses, bytes
        self.payload: bytes = b""
        # Not checkpointed: what arrived in the current round.
        self._updates: dict[str, dict] = {}
        self._rejected: dict[str, str] = {}
        self._quorum_at: float | None = None
        self._round_started = time.monotonic()
        self._last_stall_line = time.monotonic()
        self.results: dict | None = None
        self.finished = False

    # ------------------------------------------------------------------ start and restart
    # The manifest's entries that define the run; a restart may change the operational ones (quorum, timeouts).
    DEFINING = (
        "format",
        "run_id",
        "settings",
        "method",
        "rounds",
        "codec_up",
        "codec_down",
        "partition_digest",
        "sites",
        "backbone",
        "preprocessing",
        "class_names",
        "template",
    )

    def start(self) -> None:
        existing = self.mb.get_json(self.mb.manifest_key, SERVER)
        mine = json.loads(json.dumps(self.manifest))
        if existing is not None:
            diff = [k for k in self.DEFINING if existing.get(k) != mine.get(k)]
            if diff:
                raise FederationError(
                    f"run {self.mb.run_id} already exists in {self.mb.store.url} with other settings "
                    f"(differing: {', '.join(diff)}): use another --run-id, or the same settings to resume it"
                )
        if existing != mine:
            from safetensors.torch import save

            shared = {"text_features": self.setup.text_features, "reference_x": self.setup.reference_x}
            self.mb.store.put(self.mb.shared_key, save({k: v.contiguous() for k, v in shared.items()}))
            self.mb.put_json(self.mb.manifest_key, self.manifest)
        got = self.ckpt.load()
        if got is not None:
            self._restore(*got[1:])
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json", self.cfg.to_json())
            self.setup.partition.save(self.out / "partition.json")
            self._publish(0, self.global_state, [])
            self._write_global(0, self.payload)
            self.phase, self.round = "updates", 1
            self._save()
        if self.observer is not None and hasattr(self.observer, "start"):
            self.observer.start(self.manifest, resumed=got is not None)
        self._round_started = self._reports_started = time.monotonic()
        if self.phase == "done":
            selected = self.results["metrics"]["best_round"]
            self._status("done", f"selected round {selected}", best_round=selected)
        else:
            self._status("waiting_updates" if self.phase == "updates" else self.phase)

    def _restore(self, body: dict, tensors: dict) -> None:
        if body.get("run_id") != self.mb.run_id:
            raise FederationError(
                f"the server's state in {self.state.url} belongs to run {body.get('run_id')!r}"
            )
        self.phase, self.round = body["phase"], int(body["round"])
        self.history, self.info = body["history"], body["info"]
        self.reports = {int(r): v for r, v in body["reports"].items()}
        self.best_round, self.best_val = body["best_round"], body["best_val"]
        self.site_provenance = body["site_provenance"]
        self.global_state, self.received = tensors["global_state"], tensors["received"]
        self.best_received = tensors.get("best_received")
        self.payload = tensors["payload"].numpy().tobytes()
        self.global_module.load_state_dict(self.received, strict=False)
        if self.client_dp is not None:
            self.client_dp.restore(self.info)
        # The newest global module goes out again when the mailbox lacks it (a crash between this checkpoint
        # and publishing, or an in-process mailbox that did not survive): the same bytes.
        newest = self.round if self.phase == "reports" else self.round - 1
        if self.phase != "done" and not self.mb.store.exists(self.mb.global_key(newest)):
            self._write_global(newest, self.payload)
        if self.phase == "done":
            # A finished run started again (a retried pod, maybe on a fresh disk): its run directory again.
            self.results = self._write_outputs(rewrite=not (self.out / "results.json").exists())
            self.finished = True
        self._say(f"resuming run {self.mb.run_id}: {self.phase} of round {self.round}")

    def _save(self) -> None:
        body = {
            "run_id": self.mb.run_id,
            "phase": self.phase,
            "round": self.round,
            "history": self.history,
            "reports": {str(r): v for r, v in self.reports.items()},
            "best_round": self.best_round,
            "best_val": self.best_val,
            "site_provenance": self.site_provenance,
            "info": self.info,
        }
        tensors = {
            "global_state": self.global_state,
            "received": self.received,
            "payload": torch.frombuffer(bytearray(self.payload), dtype=torch.uint8),
        }
        if self.best_received is not None:
            tensors["best_received"] = self.best_received
        self.ckpt.save(body, tensors)

    # ------------------------------------------------------------------ helpers
    def _say(self, message: str) -> None:
        if self.verbose:
            log.info("%s", message)

    def _status(self, state: str, message: str = "", **extra) -> None:
        self.mb.put_status(SERVER, state, self.round, message, **{"best_round": self.best_round, **extra})

    def _write_global(self, r: int, payload: bytes) -> None:
        self.mb.store.put(self.mb.global_key(r), payload)
        if r >= 1:  # the run directory keeps every round's broadcast, as `fedmedclip train` always did
            atomic_write_bytes(self.out / "rounds" / f"global_round_{r:03d}.bin", payload)

    def _publish(self, r: int, state: dict, present: list[str]) -> None:
        """Encode the global module after round r for the sites; keep what they will receive."""
        meta = {"run_id": self.mb.run_id, "round": r, "sites_present": present, "best_round": self.best_round}
        self.payload = encode(state, self.cfg.codec_down, meta=meta).payload
        self.received = decode(self.payload).state
        self.global_module.load_state_dict(self.received, strict=False)

    # ------------------------------------------------------------------ validation
    def _validate(self, site: str, payload: bytes) -> dict:
        """The decoded update of `site` for the current round, or UpdateRejected with the reason."""
        r = self.round
        try:
            got = decode(
                payload,
                reference=self.received,
                template=self.template_tuples,
                max_bytes=self.max_update_bytes,
            )
        except Exception as exc:  # CodecError and anything a hostile payload provokes
            raise UpdateRejected(f"undecodable update: {exc}") from None
        meta = got.meta
        if meta.get("run_id") != self.mb.run_id or meta.get("round") != r or meta.get("site") != site:
            raise UpdateRejected(
                f"update is labelled run {meta.get('run_id')!r} round {meta.get('round')!r} site "
                f"{meta.get('site')!r}, expected run {self.mb.run_id!r} round {r} site {site!r}"
            )
        n = meta.get("n_train")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.counts[site]:
            raise UpdateRejected(
                f"reported sample count {n!r} is outside what the manifest says {site} holds (1..{self.counts[site]})"
            )
        bad = non_finite(got.state)
        if bad:
            raise UpdateRejected(f"tensor {bad} holds NaN or Inf")
        loss = meta.get("loss")
        return {
            "state": got.state,
            "n_train": n,
            "loss": float(loss) if isinstance(loss, (int, float)) else None,
            "bytes": len(payload),
        }

    @property
    def template_tuples(self) -> dict:
        return {k: (tuple(shape), dtype) for k, (shape, dtype) in self.template.items()}

    def _norm_outliers(self) -> None:
        """Reject updates whose distance to the global module is far outside the round's others."""
        if not self.opt.norm_factor or len(self._updates) < 3:
            return
        norms = {}
        for site, u in self._updates.items():
            sq = sum(
                float(((v.double() - self.received[k].double()) ** 2).sum())
                for k, v in u["state"].items()
                if v.is_floating_point()
            )
            norms[site] = math.sqrt(sq)
        for site, norm in norms.items():
            others = [v for s, v in norms.items() if s != site]
            median = float(np.median(others))
            if median > 0 and norm > self.opt.norm_factor * median:
                self._reject(
                    site,
                    f"update norm {norm:.4g} is over {self.opt.norm_factor:g}x the median of the round's others ({median:.4g})",
                )

    def _reject(self, site: str, reason: str) -> None:
        self._updates.pop(site, None)
        self._rejected[site] = reason
        log.warning("round %d: rejected the update of %s: %s", self.round, site, reason)

    # ------------------------------------------------------------------ the round
    def poll(self) -> bool:
        """Do what is ready; True when something was done."""
        if self.finished:
            return False
        if self.phase == "updates":
            return self._poll_updates()
        if self.phase == "reports":
            return self._poll_reports()
        return False

    def _waiting_for(self) -> list[str]:
        return [s for s in self.sites if s not in self._updates and s not in self._rejected]

    def _poll_updates(self) -> bool:
        r, progressed = self.round, False
        for site in self._waiting_for():
            payload = self.mb.store.get(self.mb.update_key(r, site))
            if payload is None:
                continue
            progressed = True
            try:
                self._updates[site] = self._validate(site, payload)
            except UpdateRejected as exc:
                self._reject(site, str(exc))
        waiting = self._waiting_for()
        now = time.monotonic()
        elapsed = now - self._round_started
        if waiting:
            if len(self._updates) >= self.quorum:
                # With a quorum, stragglers get the round timeout; in round 1 counted from when the quorum
                # was reached, since the sites start at different times and first encode their images.
                if self._quorum_at is None:
                    self._quorum_at = now
                start = self._quorum_at if r == 1 else self._round_started
                if now - start < self.opt.round_timeout:
                    self._stall_line(waiting, elapsed)
                    return progressed
            elif elapsed < (self.opt.join_timeout if r == 1 else self.opt.round_timeout):
                self._stall_line(waiting, elapsed)
                return progressed
        self._norm_outliers()
        if len(self._updates) < self.quorum:
            self._fail_quorum(waiting, elapsed)
        self._aggregate()
        return True

    def _stall_line(self, waiting: list[str], elapsed: float) -> None:
        if time.monotonic() - self._last_stall_line < self.opt.stall_every:
            return
        self._last_stall_line = time.monotonic()
        self._status("waiting_updates", f"waiting for {', '.join(waiting)}")
        self._say(f"round {self.round}: waiting {elapsed:.0f} s for {self._describe(waiting)}")

    def _describe(self, sites: list[str]) -> str:
        parts = []
        for s in sites:
            st = self.mb.status(s)
            if st is None:
                parts.append(f"{s} (never seen)")
            else:
                ago = time.time() - float(st.get("time", 0))
                parts.append(f"{s} ({st.get('state')} round {st.get('round')}, {ago:.0f} s ago)")
        return ", ".join(parts)

    def _fail_quorum(self, waiting: list[str], elapsed: float) -> None:
        why = [f"{s}: {reason}" for s, reason in self._rejected.items()]
        message = (
            f"round {self.round}: only {len(self._updates)} of {len(self.sites)} sites answered with a usable "
            f"update within {elapsed:.0f} s (quorum {self.quorum})"
            + (f"; no update from {self._describe(waiting)}" if waiting else "")
            + (f"; rejected: {'; '.join(why)}" if why else "")
            + f". Everything up to round {self.round - 1} is kept in {self.out} and the mailbox"
        )
        self._save()  # the records of every closed round stay, for a restart with a lower --quorum
        self._status("failed", message)
        if self.observer is not None and hasattr(self.observer, "finish"):
            self.observer.finish(None, message)
        raise FederationError(message)

    def _aggregate(self) -> None:
        r = self.round
        present = [s for s in self.sites if s in self._updates]
        client_dp = None
        if self.client_dp is not None:
            new_state, client_dp = self.client_dp.aggregate(
                self.received, [self._updates[s]["state"] for s in present], r
            )
        else:
            new_state = aggregate_updates(
                self.method,
                self.global_state,
                [self._updates[s]["state"] for s in present],
                [self.counts[s] for s in present],
            )
        bad = non_finite(new_state)
        if bad:  # cannot happen with validated finite updates and convex weights; never publish it
            raise FederationError(
                f"round {r}: the aggregated module's {bad} is non-finite; nothing was published"
            )
        self.global_state = new_state
        downloaded = len(self.payload)  # this round's sites trained from the previous global module
        self._publish(r, new_state, present)
        probs = self.method.global_probs(self.global_module, self.setup.global_x)
        self.reports[r] = {"global": evaluate_global(probs, self.setup.global_y), "sites": {}}
        self.info = {
            "present": present,
            "rejected": dict(self._rejected),
            "losses": {s: self._updates[s]["loss"] for s in present if self._updates[s]["loss"] is not None},
            "bytes_up": {s: self._updates[s]["bytes"] for s in present},
            "bytes_down": {s: downloaded for s in present},
            "seconds": time.monotonic() - self._round_started,
        }
        if client_dp is not None:
            self.info["client_dp"] = client_dp
        self.phase = "reports"
        self._save()
        self._write_global(r, self.payload)
        self._updates, self._rejected, self._quorum_at = {}, {}, None
        # The next round starts now: the sites train from this module as soon as they see it (a round's
        # seconds and its timeout run from its global module going out to the next one going out).
        self._round_started = self._reports_started = time.monotonic()

    def _poll_reports(self) -> bool:
        r, progressed = self.round, False
        got = self.reports[r]["sites"]
        for site in self.info["present"]:
            if site in got:
                continue
            try:
                report = self.mb.get_json(self.mb.report_key(r, site), site)
            except ProtocolError as exc:
                log.warning("round %d: ignoring the report of %s: %s", r, site, exc)
                got[site] = None
                continue
            if report is None:
                continue
            progressed = True
            problem = check_site_report(report) or (
                None
                if report.get("round") == r and report.get("site") == site
                else "labelled for another round or site"
            )
            if problem:
                log.warning("round %d: ignoring the report of %s: %s", r, site, problem)
                got[site] = None
                continue
            got[site] = {"val": report.get("val"), "test": report.get("test")}
            privacy, why = check_site_privacy(report.get("privacy"))
            if why:
                log.warning("round %d: ignoring the privacy report of %s: %s", r, site, why)
            if privacy is not None:
                got[site]["privacy"] = privacy
            if isinstance(report.get("provenance"), dict):
                self.site_provenance[site] = report["provenance"]
        missing = [s for s in self.info["present"] if s not in got]
        limit = self.opt.report_timeout or self.opt.round_timeout
        if missing and time.monotonic() - self._reports_started < limit:
            return progressed
        for s in missing:
            log.warning("round %d: no metrics from %s within %.0f s", r, s, limit)
        self._close_round()
        return True

    def _close_round(self) -> None:
        r, info = self.round, self.info
        record = round_record(
            r,
            self.reports[r]["global"],
            self.sites,
            self.reports[r]["sites"],
            info["present"],
            info["losses"],
            info["bytes_up"],
            info["bytes_down"],
            info["seconds"],
            info["rejected"],
        )
        attach_epsilon(record, {s: (rep or {}).get("privacy") for s, rep in self.reports[r]["sites"].items()})
        if info.get("client_dp"):
            record["client_dp"] = info["client_dp"]
        self.history.append(record)
        if is_better(record, round_of(self.history, self.best_round)):
            self.best_round, self.best_val = r, record["val_acc_mean"]
            self.best_received = {k: v.clone() for k, v in self.received.items()}
        if self.observer is not None and hasattr(self.observer, "round"):
            self.observer.round(record)
        self._round_line(record)
        if r >= self.rounds:
            self._finish()
            return
        # No checkpoint here: a restart in the reports phase reads the same reports again and closes the same
        # record (the next round's updates stay in the mailbox).
        self.phase, self.round = "updates", r + 1
        self._status("waiting_updates")

    def _round_line(self, rec: dict) -> None:
        ups = [b for b in rec["bytes_up"] if b is not None]
        rejected = f" · rejected {', '.join(rec['rejected'])}" if rec["rejected"] else ""
        self._say(
            f"round {rec['round']}/{self.rounds} · {len(rec['sites_present'])}/{len(self.sites)} sites"
            f" · global acc {rec['global']['acc']:.3f} bacc {rec['global']['bacc']:.3f}"
            + (f" · val {rec['val_acc_mean']:.3f}" if rec["val_acc_mean"] is not None else "")
            + f" · up {np.mean(ups) / 1e3 if ups else 0:.1f} kB/site · {rec['seconds']:.2f} s{rejected}"
            + (f" · epsilon max {rec['epsilon_max']:.4g}" if rec.get("epsilon_max") is not None else "")
            + (f" · client epsilon {rec['client_dp']['epsilon']:.4g}" if rec.get("client_dp") else "")
        )

    # ------------------------------------------------------------------ the end
    def _write_outputs(self, rewrite: bool = True) -> dict:
        """The run directory from the server's state (`rewrite=False`: it is there, read results.json)."""
        if not rewrite:
            return json.loads((self.out / "results.json").read_text())
        setup = self.setup
        atomic_write_json(self.out / "config.json", self.cfg.to_json())
        setup.partition.save(self.out / "partition.json")
        for r in range(1, len(self.history) + 1):
            if not (self.out / "rounds" / f"global_round_{r:03d}.bin").exists():
                payload = self.mb.store.get(self.mb.global_key(r))
                if payload is not None:
                    atomic_write_bytes(self.out / "rounds" / f"global_round_{r:03d}.bin", payload)
        # Holders in the sites' order, then the server: as `fedmedclip train` writes them.
        provenance = {s: self.site_provenance[s] for s in self.sites if s in self.site_provenance}
        return write_run(
            self.out,
            setup,
            self.method,
            self.history,
            self.reports,
            self.best_round,
            {**provenance, SERVER: setup.provenance},
            self.best_received,
            extra={
                "run_id": self.mb.run_id,
                **setup.extra_results,
                "privacy": privacy_results(self.cfg.privacy, self.sites, self.reports, self.history),
            },
        )

    def _finish(self) -> None:
        if self.best_round is None:
            self._say("no site has a validation split: the last round is selected (results.json says so)")
            self.best_received = {k: v.clone() for k, v in self.received.items()}
        results = self._write_outputs()
        selected = results["metrics"]["best_round"]
        self.results, self.phase, self.finished = results, "done", True
        self._save()
        self._status("done", f"selected round {selected}", best_round=selected)
        if self.observer is not None and hasattr(self.observer, "finish"):
            self.observer.finish(results, None)

    def run(self) -> dict:
        """Poll until the run ends (or fails with FederationError); returns results.json's content."""
        poller = Poller(cap=self.opt.poll_cap)
        last_beat = time.monotonic()
        while not self.finished:
            if self.poll():
                poller.reset()
                continue
            if time.monotonic() - last_beat > 10:
                self._status("waiting_updates" if self.phase == "updates" else "waiting_reports")
                last_beat = time.monotonic()
            poller.sleep()
        return self.results


def aggregate_updates(method: Method, previous: dict, states: list[dict], sample_counts: list[int]) -> dict:
    """The method's aggregation of the present sites' decoded updates. `sample_counts` are the counts the
    server holds (the manifest's), never what a site reports; the weights are renormalised over the sites
    present."""
    weights = aggregation_weights(method.aggregation_counts(sample_counts), method.weighting)
    return method.aggregate(previous, states, weights)


def write_run(
    out: Path,
    setup: ServerSetup,
    method: Method,
    history: list[dict],
    reports: dict[int, dict],
    best_round: int | None,
    provenance: dict,
    received_global: dict[str, torch.Tensor],
    site_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    extra: dict | None = None,
) -> dict:
    """The end of every run, whatever ran it: results.json, the plots, provenance.json and model/ (the
    selected round's global module as the sites received it, and the given sites' own parts)."""
    cfg = setup.cfg
    results = build_results(
        cfg=cfg,
        partition=setup.partition,
        backbone=setup.backbone,
        preprocessing=setup.preprocessing,
        method_options=method.opt,
        history=history,
        reports=reports,
        best_round=best_round,
        timing={"total_seconds": None, "feature_seconds": setup.feature_seconds},
        features={h: p.get("digest") for h, p in provenance.items()},
        extra=extra,
    )
    selected = results["metrics"]["best_round"]
    atomic_write_json(out / "provenance.json", provenance, indent=1)
    write_model_dir(
        out / "model",
        received_global,
        setup.text_features,
        model_meta(cfg, method, setup, selected),
        site_tensors,
    )
    write_results(
        out,
        results,
        f"{cfg.method} ({cfg.federation}) · {cfg.partition} · {len(setup.partition.site_names)} sites",
    )
    return results


def model_meta(cfg, method: Method, setup: ServerSetup, best_round: int) -> dict:
    """model/model.json: what export and serving need to rebuild the predictor."""
    return {
        "format_version": 1,
        "method": cfg.method,
        "method_options": method.opt,
        "federation": cfg.federation,
        "class_names": setup.class_names,
        "prompt_template": cfg.prompt_template,
        "backbone": setup.backbone,
        "preprocessing": setup.preprocessing,
        "feature_dim": int(setup.text_features.shape[1]),
        "sites": list(setup.partition.site_names),
        "best_round": best_round,
        "partition_digest": setup.partition.digest,
    }
