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
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import Field, create_model

from ..aggregation import aggregation_weights
from ..codec import CodecError, decode, encode
from ..digests import file_digest, sha256_bytes
from ..errors import CheckpointError, FedMedClipError, reason_line, shown
from ..flags import SERVER as SERVER_RUN
from ..flags import declared, setting
from ..methods import Method
from ..observer import NO_OBSERVER, RunObserver
from ..privacy.accounting import sample_rate
from ..privacy.client import noised_update_bound, server_privacy
from ..privacy.report import attach_epsilon, check_site_privacy, privacy_results
from .checkpoint import (
    PARTY_CHECKPOINTS,
    CheckpointStore,
    OtherConfiguration,
    configuration,
    expect_type,
    expect_types,
    non_finite,
    tensor_map,
)
from .mailbox import AIM, MAX_MANIFEST_BYTES, SECURE_POLL_CAP, SERVER, Mailbox, Poller, ProtocolError
from .messages import (
    GlobalHeader,
    Hex64,
    ManifestCore,
    Message,
    MessageRefused,
    SiteReport,
    UpdateHeader,
    message,
    parse,
)
from .records import (
    Progress,
    RoundKey,
    atomic_write_bytes,
    atomic_write_json,
    build_results,
    check_progress,
    evaluate_global,
    is_better,
    round_of,
    round_record,
    selection_key,
    selects_by_median,
    validation_sites_of,
    write_model_dir,
    write_results,
)
from .robust import clip_to, default_bound, distance, robust_aggregate
from .storage import ObjectStore, ObjectTooLarge, remove_partial_writes

log = logging.getLogger("fedmedclip.server")

MANIFEST_FORMAT = 1
SWEEP_EVERY = 1.0  # seconds between a waiting server's reads of every missing object (`sweep_every`)


class FederationError(FedMedClipError):
    """The run cannot go on: no quorum at a round's timeout, a manifest of other settings, ..."""


@dataclass
class ServerOptions:
    """The server's options; those declared with `setting` are flags of `server run` and keys of the pipeline's
    `settings` (fedmedclip/flags.py). Those the manifest records (`manifest=True`) define the run, unless declared
    `resume="never"`: operational, a restart with another value goes on (quorum, round timeout, norm factor)."""

    quorum: int | None = setting(
        None,
        group="server",
        manifest=True,
        resume="never",
        minimum=1,  # 0 read as "every site" (the unset default) while 9 of 3 was refused
        help="minimum sites per round once a round times out (default: every site)",
    )
    round_timeout: float = setting(
        600.0,
        group="server",
        manifest=True,
        resume="never",
        minimum=0,
        help="seconds a round waits for updates once the global module is out (default: %(default)s)",
    )
    join_timeout: float = setting(
        3600.0,
        group="server",
        minimum=0,
        help="seconds round 1 waits, while the sites encode their images (default: %(default)s)",
    )
    report_timeout: float | None = (
        None  # seconds to wait for a present site's metrics (default: round_timeout)
    )
    norm_factor: float = setting(
        10.0,
        group="server",
        manifest=True,
        resume="never",
        minimum=0,
        help="reject an update farther from the global module than this times the median of the round's "
        "others; 0 disables (default: %(default)s)",
    )
    # The absolute bound on an update's distance to the global module it was trained from, fixed in the
    # manifest; None: DEFAULT_BOUND_FACTOR x the norm of the method's initial module; 0: none.
    max_update_norm: float | None = setting(
        None,
        group="server",
        manifest=True,
        minimum=0,
        help="the most an update may move the global module (L2 norm of the difference), fixed in the run's "
        "manifest; refused above it (see --clip-updates); 0 disables (default: 2x the norm of the method's "
        "initial global module)",
    )
    clip_updates: bool = setting(
        False,
        group="server",
        manifest=True,
        help="clip an update above --max-update-norm onto the bound instead of refusing it",
    )
    max_update_bytes: int | None = None  # cap on an inflated update (default: the template's size + headroom)
    stall_every: float = setting(
        30.0,
        group="server",
        commands=(SERVER_RUN,),
        minimum=1,  # 0 printed a 'waiting' line at every poll
        help="seconds between 'waiting for' lines (default: %(default)s)",
    )
    heartbeat_every: float = 10.0  # seconds between status writes while the server waits
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
    # What the data preparation found (exact duplicates and what was dropped): results.json's `data` and
    # provenance.json's `_dataset` (no holder is named with a leading underscore).
    dataset: dict | None = None


def tensor_template(state: dict[str, torch.Tensor]) -> dict:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()}


def _recorded_field(d):
    """A `manifest=True` option as the manifest holds it: its declared type (None where its default is), at
    least its declared minimum."""
    kind = Annotated[d.type, Field(ge=d.meta["minimum"])] if d.meta.get("minimum") is not None else d.type
    return (kind | None if d.default is None else kind), ...


# The run's manifest as every party parses it: ManifestCore and the options declared `manifest=True` above.
RunManifest = message("run_manifest", max_bytes=MAX_MANIFEST_BYTES)(
    create_model(
        "RunManifest",
        __base__=ManifestCore,
        __module__=__name__,
        **{d.name: _recorded_field(d) for d in declared(ServerOptions, nested=False) if d.meta["manifest"]},
    )
)


def read_manifest(mailbox: Mailbox) -> dict | None:
    """The run's manifest as the server wrote it, held to its declaration: None while it is not there,
    MessageRefused naming the server when it does not parse (a site then stops in one line)."""
    manifest = mailbox.get_json(mailbox.manifest_key, SERVER)
    if manifest is not None:
        parse(RunManifest, manifest, SERVER, mailbox.where(mailbox.manifest_key))
    return manifest


def make_manifest(
    run_id: str, setup: ServerSetup, options: ServerOptions, template: dict, max_update_norm: float | None
) -> dict:
    cfg, part = setup.cfg, setup.partition
    counts = {s: len(part.sites[s]["train"]) for s in part.site_names}
    # The options declared `manifest=True`, as this server resolved them: what the sites and a restart read.
    resolved = {"quorum": options.quorum or len(part.site_names), "max_update_norm": max_update_norm}
    recorded = {}
    for d in declared(type(options), nested=False):
        if d.meta["manifest"]:
            value = resolved.get(d.name, getattr(options, d.name))
            recorded[d.name] = bool(value) if d.type is bool else value
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
        **recorded,
        "aggregator": cfg.aggregator,
        "backbone": setup.backbone,
        "preprocessing": setup.preprocessing,
        "class_names": setup.class_names,
        "template": template,
    }


class UpdateRejected(Exception):
    pass


class Broadcast(Message):
    sha256: Hex64
    bytes: Annotated[int, Field(ge=0)]


class ServerState(Progress):
    """The server's checkpoint body (`FederationServer._save`)."""

    run_id: str
    phase: str
    broadcast: dict[RoundKey, Broadcast] = {}  # the global module sent out in each round
    site_provenance: dict
    info: dict
    recovery: list
    set_aside: dict
    secagg: dict | None = None  # secure aggregation's, checked where it is restored


class FederationServer:
    def __init__(
        self,
        mailbox: Mailbox,
        setup: ServerSetup,
        state: ObjectStore,
        out_dir: str | Path,
        options: ServerOptions | None = None,
        observer: RunObserver | None = None,
        verbose: bool = True,
        identities: dict[str, str] | None = None,
    ):
        self.mb, self.setup, self.state = mailbox, setup, state
        self.out = Path(out_dir)
        self.opt = options or ServerOptions()
        self.observer, self.verbose = observer or NO_OBSERVER, verbose
        cfg, part = setup.cfg, setup.partition
        self.cfg, self.method, self.sites = cfg, setup.method, list(part.site_names)
        self.rounds = int(cfg.rounds)
        self.quorum = self.opt.quorum or len(self.sites)
        if not 1 <= self.quorum <= len(self.sites):
            raise FederationError(f"--quorum {self.quorum} must be between 1 and the {len(self.sites)} sites")
        self.global_module = self.method.new_global()
        self.global_state = self.method.shared_state(self.global_module)
        self.template = tensor_template(self.global_state)
        bound, privacy = self.opt.max_update_norm, setup.method.ctx.privacy
        if (
            bound is None
            and privacy is not None
            and privacy.client_level
            and privacy.client_noise_at == "sites"
        ):
            # updates noised at the sites: their clip plus their noise's norm, not the initial module's scale
            self.max_update_norm = noised_update_bound(privacy, self.global_state)
        else:
            self.max_update_norm = (
                default_bound(self.global_state) if bound is None else (float(bound) or None)
            )
        self.manifest = make_manifest(mailbox.run_id, setup, self.opt, self.template, self.max_update_norm)
        # Its checkpoints record the run's configuration (the manifest's settings and partition): state that
        # another configuration wrote is refused, never continued.
        self.ckpt = CheckpointStore(
            state.sub(PARTY_CHECKPOINTS),
            "server",
            configuration(self.manifest["settings"], self.manifest["partition_digest"]),
            check=self._check_state,
        )
        self.counts = {s["name"]: s["n_train"] for s in self.manifest["sites"]}
        # Secure aggregation (fedmedclip/federation/secure.py): the manifest fixes the sites' identity keys,
        # the threshold and the bound each site clips to; the round gets its protocol's sub-phases.
        self.secure = None
        if cfg.secure_aggregation:
            from ..privacy.settings import PrivacySettings
            from .secure import SecureRun, ServerSecureRound, manifest_section

            try:
                self.manifest["secure_aggregation"] = manifest_section(
                    self.method,
                    self.counts,
                    identities,
                    cfg.secagg_threshold,
                    self.max_update_norm,
                    PrivacySettings.from_config(cfg.privacy),
                    cfg.codec_up,
                )
            except FedMedClipError as exc:
                raise FederationError(f"secure aggregation: {exc}") from None
            run = SecureRun.from_manifest(json.loads(json.dumps(self.manifest)))
            self.secure = ServerSecureRound(self, run)
        # Differential privacy (fedmedclip.privacy): delta checked against every site's size before any
        # training; client-level DP's aggregation when on.
        self.client_dp = server_privacy(setup.method.ctx.privacy, self.counts, self.quorum, state)
        template_bytes = sum(int(np.prod(shape)) * 8 for shape, _ in self.template.values())
        self.max_update_bytes = self.opt.max_update_bytes or template_bytes + (1 << 20)
        # An update object larger than this is refused before it is read: the inflated cap plus its header.
        self.max_payload_bytes = self.max_update_bytes + (1 << 20)
        # Progress state (checkpointed).
        self.phase, self.round = "start", 0
        self.received: dict[str, torch.Tensor] = {}
        self.best_received: dict[str, torch.Tensor] | None = None
        self.best_round: int | None = None
        self.best_val: float | None = None
        self.history: list[dict] = []
        self.reports: dict[int, dict] = {}
        # Each round's global module as broadcast: {round: {"sha256", "bytes"}}, what rounds/ is checked against.
        self.broadcast: dict[int, dict] = {}
        self.site_provenance: dict[str, dict] = {}
        self.info: dict = {}  # the round being closed: present, rejected, losses, bytes
        self.payload: bytes = b""
        # Parties that resumed from older state than their newest (results.json's `recovery`).
        self.recovery: list[dict] = []
        # Not checkpointed: the updates accepted in the current round (read again after a restart).
        self._updates: dict[str, dict] = {}
        # Checkpointed: the sites whose object of the current round was refused, set aside so that a restart
        # never reads it again.
        self._rejected: dict[str, str] = {}
        self._quorum_at: float | None = None
        self._last_status: tuple[str, str, dict] = ("waiting_updates", "", {})
        self._heartbeat_at = time.monotonic()
        self._round_started = time.monotonic()
        self._last_stall_line = time.monotonic()
        # Seconds between sweeps that read every object the server still waits for: 0 reads them all at every
        # poll (the in-process simulator's fixed order needs that); `run()` sweeps every SWEEP_EVERY s and in
        # between asks only for the first one missing, since it needs them all before the round goes on
        # (quorum and timeouts are decided at a sweep): one request per poll instead of one per site.
        self.sweep_every = 0.0
        self._swept_at = -math.inf  # never: monotonic time starts at boot, not long ago
        self.results: dict | None = None
        self.finished = False

    # ------------------------------------------------------------------ start and restart

    def start(self) -> None:
        existing = self.mb.get_json(self.mb.manifest_key, SERVER)
        mine = json.loads(json.dumps(self.manifest))
        if existing is not None:
            # Every entry defines the run except the options a restart may change (declared resume="never").
            operational = {
                d.name for d in declared(ServerOptions, nested=False) if d.meta["resume"] == "never"
            }
            diff = [
                k
                for k in sorted((existing.keys() | mine.keys()) - operational)
                if existing.get(k) != mine.get(k)
            ]
            if diff:
                raise FederationError(
                    f"run {self.mb.run_id} already exists in {self.mb.store.url} with other settings "
                    f"(differing: {', '.join(diff)}): use another --run-id, or the same settings to resume it"
                )
            self._check_noise_quorum(existing.get("quorum"))
        # The state read, and refused when another run or configuration wrote it, before anything is written:
        # a refused start leaves the mailbox's manifest, and the run's status, as it found them.
        try:
            got = self.ckpt.load()
        except OtherConfiguration as exc:
            raise FederationError(str(exc)) from None
        if got is not None and got[1].get("run_id") != self.mb.run_id:
            raise FederationError(
                f"the server's state in {self.state.url} belongs to run {got[1].get('run_id')!r}"
            )
        if existing != mine:
            from safetensors.torch import save

            shared = {"text_features": self.setup.text_features, "reference_x": self.setup.reference_x}
            self.mb.store.put(self.mb.shared_key, save({k: v.contiguous() for k, v in shared.items()}))
            self.mb.put_json(self.mb.manifest_key, self.manifest)
        # A server killed mid-write, before or after its first checkpoint, left temporary files in the folders
        # it writes (only those: a mailbox or a site's state may be a folder of the run directory too).
        for folder in (self.out, *(self.out / d for d in ("rounds", "model", "plots"))):
            remove_partial_writes(folder)
        if got is not None:
            self._restore(*got[1:])
            if self.ckpt.problems:
                self._note_recovery(SERVER, self.round, "; ".join(self.ckpt.problems))
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json", self.cfg.to_json())
            self.setup.partition.save(self.out / "partition.json")
            self._publish(0, self.global_state, [])
            self._write_global(0, self.payload)
            self.phase, self.round = self._first_phase(), 1
            self._save()
        self.observer.start(self.manifest, resumed=got is not None)
        self._round_started = self._reports_started = time.monotonic()
        if self.phase == "done":
            selected = self.results["metrics"]["best_round"]
            self._status("done", f"selected round {selected}", best_round=selected)
        else:
            self._status(self._waiting_state())

    def _check_noise_quorum(self, recorded) -> None:
        """Client-level DP with the noise at the sites: each site adds N(0, (z S)^2 / quorum) with the quorum
        of the manifest it read, so that any quorum of sites sums to the full noise. The quorum is otherwise
        operational; a lower one here would publish sums of fewer sites with less noise than the epsilon
        reported assumes."""
        settings = self.method.ctx.privacy
        at_sites = settings is not None and settings.client_level and settings.client_noise_at == "sites"
        if at_sites and isinstance(recorded, int) and self.quorum < recorded:
            raise FederationError(
                f"run {self.mb.run_id} adds client-level DP noise at the sites, each share sized for its quorum "
                f"{recorded}: --quorum {self.quorum} would aggregate fewer sites, with less noise than its "
                f"epsilon assumes; resume it with --quorum {recorded} or more"
            )

    def _waiting_state(self) -> str:
        return "waiting_reports" if self.phase == "reports" else "waiting_updates"

    def _first_phase(self) -> str:
        """A round's first phase: its updates, or under secure aggregation its key advertisements."""
        return "keys" if self.secure is not None else "updates"

    @property
    def _collecting(self) -> bool:
        """Whether the round is still gathering the sites' objects (its refusals are then checkpointed)."""
        return self.phase not in ("reports", "done", "start")

    def _note_recovery(self, party: str, r: int, reason: str) -> None:
        """Record that `party` resumed from older state than its newest (results.json's `recovery`)."""
        entry = {"party": party, "round": r, "reason": reason_line(reason)}
        if entry not in self.recovery:
            self.recovery.append(entry)
            log.warning("%s resumed from older state at round %d: %s", party, r, entry["reason"])

    def _check_state(self, body: dict, tensors) -> None:
        """CheckpointError naming what of a checkpoint's body or tensors is missing or of another type (its
        digest matched: written so by a bug, or by a hand that computed the digest again). `CheckpointStore`
        then takes the other slot, as for any damaged one."""
        state = check_progress(body, ServerState)
        phases = ("keys", "shares", "updates", "unmask") if self.secure is not None else ("updates",)
        if state.phase not in (*phases, "reports", "done"):
            raise CheckpointError(f"body.phase is {shown(state.phase)}, not a phase of this run's rounds")
        if not 1 <= state.round <= self.rounds:
            raise CheckpointError(f"body.round is {state.round}, not a round of this run (1..{self.rounds})")
        expect_type(tensors, dict, "tensors.pt")
        expect_types(tensors, {"global_state": dict, "received": dict, "payload": torch.Tensor}, "tensors")
        for name in ("global_state", "received", "best_received"):
            if name in tensors:
                tensor_map(tensors[name], f"tensors.{name}")

    def _restore(self, body: dict, tensors: dict) -> None:
        self.phase, self.round = body["phase"], int(body["round"])
        self.history, self.info = body["history"], body["info"]
        self.reports = {int(r): v for r, v in body["reports"].items()}
        self.broadcast = {int(r): v for r, v in body.get("broadcast", {}).items()}
        self.best_round, self.best_val = body["best_round"], body["best_val"]
        self.site_provenance = body["site_provenance"]
        self.recovery = list(body.get("recovery", []))
        if self._collecting:
            self._rejected = dict(body.get("set_aside", {}))
        self.global_state, self.received = tensors["global_state"], tensors["received"]
        self.best_received = tensors.get("best_received")
        self.payload = tensors["payload"].numpy().tobytes()
        self.global_module.load_state_dict(self.received, strict=False)
        if self.client_dp is not None:
            self.client_dp.restore(self.info)
        if self.secure is not None:
            self.secure.restore(body.get("secagg"))
        # The newest global module goes out again when the mailbox lacks it (a crash between this checkpoint
        # and publishing, or an in-process mailbox that did not survive): the same bytes.
        newest = self.round if self.phase == "reports" else self.round - 1
        if self.phase != "done" and not self.mb.store.exists(self.mb.global_key(newest)):
            self._write_global(newest, self.payload)
        if self.phase == "done":
            # A finished run started again (a retried pod, maybe on a fresh disk): its run directory again.
            self.results = self._finished_outputs()
            self.finished = True
        self._say(f"resuming run {self.mb.run_id}: {self.phase} of round {self.round}")

    def _save(self) -> None:
        body = {
            "run_id": self.mb.run_id,
            "phase": self.phase,
            "round": self.round,
            "history": self.history,
            "reports": {str(r): v for r, v in self.reports.items()},
            "broadcast": {str(r): v for r, v in self.broadcast.items()},
            "best_round": self.best_round,
            "best_val": self.best_val,
            "site_provenance": self.site_provenance,
            "info": self.info,
            "recovery": self.recovery,
            "set_aside": self._rejected if self._collecting else {},
        }
        if self.secure is not None:
            body["secagg"] = self.secure.state()
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
        self._last_status = (state, message, extra)
        self.mb.put_status(SERVER, state, self.round, message, **{"best_round": self.best_round, **extra})
        self._heartbeat_at = time.monotonic()

    def _beat(self) -> None:
        """The last status again, with the time of now: the sites see that the server is alive."""
        state, message, extra = self._last_status
        self._status(state, message, **extra)

    def _write_global(self, r: int, payload: bytes) -> None:
        self.mb.store.put(self.mb.global_key(r), payload)
        if r >= 1:  # the run directory keeps every round's broadcast, as `fedmedclip train` always did
            atomic_write_bytes(self.out / "rounds" / f"global_round_{r:03d}.bin", payload)

    def _publish(self, r: int, state: dict, present: list[str], payload: bytes | None = None) -> None:
        """Encode the global module after round r for the sites (unless `payload` is that already); keep what
        they will receive."""
        self.payload = payload if payload is not None else self._encoded(r, state, present)
        self.received = decode(self.payload).state
        self.global_module.load_state_dict(self.received, strict=False)

    # ------------------------------------------------------------------ validation
    def _read_update(self, site: str) -> bytes | None:
        """The bytes of `site`'s update of this round, its size checked before it is read."""
        try:
            return self.mb.store.get(self.mb.update_key(self.round, site), max_bytes=self.max_payload_bytes)
        except ObjectTooLarge as exc:
            raise UpdateRejected(f"update too large: {exc}") from None

    def _validate(self, site: str, payload: bytes) -> dict:
        """The decoded update of `site` for the current round, or UpdateRejected with the reason."""
        try:
            got = decode(
                payload,
                reference=self.received,
                template=self.template_tuples,
                max_bytes=self.max_update_bytes,
                codec=self.cfg.codec_up,  # the manifest's uplink codec, and no other
            )
        except Exception as exc:  # CodecError and anything a hostile payload provokes
            raise UpdateRejected(f"undecodable update: {exc}") from None
        try:
            header = parse(UpdateHeader, got.meta, site)
        except MessageRefused as exc:
            raise UpdateRejected(str(exc)) from None
        wrong = self._header_problem(site, header)
        if wrong:
            raise UpdateRejected(wrong)
        bad = non_finite(got.state)
        if bad:
            raise UpdateRejected(f"tensor {bad} holds NaN or Inf")
        state, clipped = got.state, None
        if self.max_update_norm is not None and not self._dp_clips_at_server:
            norm = distance(state, self.received)
            if not norm <= self.max_update_norm:
                if not self.opt.clip_updates:
                    raise UpdateRejected(
                        f"update norm {norm:.4g} (distance to the global module) is over the run's bound "
                        f"{self.max_update_norm:.4g}"
                    )
                state, clipped = clip_to(state, self.received, self.max_update_norm, norm), norm
        return {
            "state": state,
            "n_train": header.n_train,
            "loss": header.loss,
            "bytes": len(payload),
            "clipped": clipped,
        }

    def _header_problem(self, site: str, header: UpdateHeader) -> str | None:
        """What makes `site`'s update header wrong for the current round (its labels, its sample count), or
        None: the same checks for a plain update and a masked one."""
        if (header.run_id, header.round, header.site) != (self.mb.run_id, self.round, site):
            return (
                f"update is labelled run {header.run_id!r} round {header.round!r} site {header.site!r}, "
                f"expected run {self.mb.run_id!r} round {self.round} site {site!r}"
            )
        if header.n_train > self.counts[site]:
            return (
                f"reported sample count {header.n_train!r} is outside what the manifest says {site} holds "
                f"(1..{self.counts[site]})"
            )
        return None

    @property
    def template_tuples(self) -> dict:
        return {k: (tuple(shape), dtype) for k, (shape, dtype) in self.template.items()}

    @property
    def _dp_clips_at_server(self) -> bool:
        """Client-level DP with its noise added here: its clip bounds each update (`ClientPrivacy.aggregate`),
        so the norm rules stand aside. They decided which updates count by norms without noise (the outlier rule
        by the others' norms too: one site's data could drop another's update, beyond what the accountant
        composes), and their refusals published those norms."""
        return self.client_dp is not None and self.client_dp.s.client_noise_at == "server"

    def _norm_outliers(self) -> None:
        """Reject updates whose distance to the global module is far outside the round's others."""
        if not self.opt.norm_factor or len(self._updates) < 3 or self._dp_clips_at_server:
            return
        norms = {site: distance(u["state"], self.received) for site, u in self._updates.items()}
        for site, norm in norms.items():
            others = [v for s, v in norms.items() if s != site]
            median = float(np.median(others))
            if median > 0 and norm > self.opt.norm_factor * median:
                self._reject(
                    site,
                    f"update norm {norm:.4g} is over {self.opt.norm_factor:g}x the median of the round's others ({median:.4g})",
                    save=False,
                )

    def _reject(self, site: str, reason: str, save: bool = True) -> None:
        """`site` is absent from this round; its object is set aside (checkpointed: never read again)."""
        self._updates.pop(site, None)
        self._rejected[site] = reason = reason_line(reason)
        what = "the update" if self.phase == "updates" and self.secure is None else "what it sent"
        log.warning("round %d: rejected %s of %s: %s", self.round, what, site, reason)
        if save:
            self._save()

    # ------------------------------------------------------------------ the round
    def poll(self) -> bool:
        """Do what is ready; True when something was done."""
        if self.finished:
            return False
        if self.secure is not None and self.phase in ("keys", "shares", "updates", "unmask"):
            return self.secure.poll()
        if self.phase == "updates":
            return self._poll_updates()
        if self.phase == "reports":
            return self._poll_reports()
        return False

    def _waiting_for(self) -> list[str]:
        return [s for s in self.sites if s not in self._updates and s not in self._rejected]

    def _sweep_due(self) -> bool:
        """Whether this poll reads every object the server waits for, or stops at the first one missing."""
        if time.monotonic() - self._swept_at < self.sweep_every:
            return False
        self._swept_at = time.monotonic()
        return True

    def _read_waiting(self, sites: list[str], read, sweep: bool) -> list[tuple[str, object]]:
        """(site, `read(site)`'s result or the exception it raised) for the objects the server waits for, in
        the sites' order. At a sweep every one; between sweeps the first, and the others only once it is there
        (the round needs them all, so while it waits one request per poll is enough), then together
        (`Mailbox.read_all`): the last update of a round costs one round trip, not one per site after it."""
        if not sites:
            return []
        first = [] if sweep else self.mb.read_all([lambda: read(sites[0])])
        if first and first[0] is None:
            return [(sites[0], None)]
        rest = sites[len(first) :]
        got = first + self.mb.read_all([lambda s=s: read(s) for s in rest])
        return list(zip(sites, got, strict=True))

    def _poll_updates(self) -> bool:
        r, progressed, sweep = self.round, False, self._sweep_due()
        for site, payload in self._read_waiting(self._waiting_for(), self._read_update, sweep):
            try:
                if isinstance(payload, Exception):
                    raise payload
                if payload is None:
                    continue
                self._updates[site] = self._validate(site, payload)
            except UpdateRejected as exc:
                self._reject(site, str(exc))
            except Exception as exc:  # nothing a site wrote may stop the server
                self._reject(site, f"unusable update: {type(exc).__name__}: {exc}")
            progressed = True
        waiting = self._waiting_for()
        if waiting and not sweep:
            return progressed
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

    def _describe_one(self, site: str) -> str:
        try:
            st = self.mb.status(site)
        except FedMedClipError as exc:  # MessageRefused, or a store refusing the object (not a regular file)
            return f"{site} (status refused: {exc})"
        if st is None:
            return f"{site} (never seen)"
        return f"{site} ({st.state} round {st.round}, {max(0.0, time.time() - st.time):.0f} s ago)"

    def _stall_line(self, waiting: list[str], elapsed: float, what: str = "") -> None:
        if time.monotonic() - self._last_stall_line < self.opt.stall_every:
            return
        self._last_stall_line = time.monotonic()
        of = f"{what} of " if what else ""
        self._status("waiting_updates", f"waiting for {of}{', '.join(waiting)}")
        self._say(f"round {self.round}: waiting {elapsed:.0f} s for {of}{self._describe(waiting)}")

    def _describe(self, sites: list[str]) -> str:
        """What each site last said in its status (a status is advisory: one that does not parse is shown
        as refused, never trusted)."""
        return ", ".join(self._describe_one(s) for s in sites)

    def _fail_quorum(
        self,
        waiting: list[str],
        elapsed: float,
        have: int | None = None,
        what: str = "update",
        need: int | None = None,
    ) -> None:
        why = [f"{s}: {reason}" for s, reason in self._rejected.items()]
        have = len(self._updates) if have is None else have
        need = (
            f"quorum {self.quorum}"
            if need is None
            else f"{need} needed: quorum and secure aggregation's threshold"
        )
        shortfall = (
            f"round {self.round}: only {have} of {len(self.sites)} sites answered with a usable "
            f"{what} within {elapsed:.0f} s ({need})"
        ) + (f"; no {what} from {self._describe(waiting)}" if waiting else "")
        message = (
            shortfall
            + (f"; rejected: {'; '.join(why)}" if why else "")
            + f". Everything up to round {self.round - 1} is kept in {self.out} and the mailbox"
        )
        self._save()  # the records of every closed round stay, for a restart with a lower --quorum
        # Every site reads the status: whom the round lacked, not why each other site was rejected (a norm
        # rule's reason quotes the median of the others' update norms), which the operator's error and log say.
        rejected = f"; rejected: {', '.join(self._rejected)}" if self._rejected else ""
        self._status("failed", shortfall + rejected)
        self.observer.finish(None, message)
        raise FederationError(message)

    def _aggregate(self) -> None:
        new_state, payload, present, failed, client_dp = self._publishable_aggregate(
            [s for s in self.sites if s in self._updates]
        )
        self._publish_round(new_state, payload, present, failed, client_dp, self._updates)

    def _secure_aggregate(self, mean: dict | None, present: list[str], failed: str | None) -> None:
        """Under secure aggregation: the unmasked weighted mean of the survivors' updates (None when the round
        could not be unmasked, `failed` saying why), made publishable as any aggregate is (client-level DP's
        noise on it, finite, encodable for the sites) or the round fails and the global module stays."""
        r, client_dp, state, payload = self.round, None, None, None
        if failed is None:
            state = mean
            if self.client_dp is not None:
                state, client_dp = self.client_dp.aggregate_mean(self.received, mean, len(present), r)
            try:
                bad = non_finite(state)
                if bad:
                    raise CodecError(f"tensor {bad!r} is non-finite")
                payload = self._encoded(r, state, present)
            except CodecError as exc:
                failed = f"the aggregate of {', '.join(present)} cannot be published: {exc}"
        if failed:
            log.warning("round %d failed: %s; the global module stays as it was", r, failed)
            state, payload, present, client_dp = None, None, [], None
        self._publish_round(state, payload, present, failed, client_dp, self.secure.updates_info())

    def _publish_round(self, new_state, payload, present, failed, client_dp, updates: dict) -> None:
        """Publish the round's global module (the previous one again when the round failed), evaluate it,
        and move to the round's reports. `updates`: {site: its update's loss, bytes, clipped}."""
        r = self.round
        if not failed:  # a failed round keeps the previous module
            self.global_state = new_state
        downloaded = len(self.payload)  # this round's sites trained from the previous global module
        previous = self.received
        self._publish(r, self.global_state, present, payload)
        self.broadcast[r] = {"sha256": sha256_bytes(self.payload), "bytes": len(self.payload)}
        probs = self.method.global_probs(self.global_module, self.setup.global_x)
        self.reports[r] = {"global": evaluate_global(probs, self.setup.global_y), "sites": {}}
        self.info = {
            "present": present,
            "rejected": dict(self._rejected),
            "losses": {s: updates[s]["loss"] for s in present if updates[s]["loss"] is not None},
            "bytes_up": {s: updates[s]["bytes"] for s in present},
            "bytes_down": {s: downloaded for s in present},
            "seconds": time.monotonic() - self._round_started,
            "clipped": {s: updates[s]["clipped"] for s in present if updates[s].get("clipped")},
            "failed": failed,
        }
        if client_dp is not None:
            self.info["client_dp"] = client_dp
        if self.secure is not None:
            self.info["secure_aggregation"] = self.secure.record()
            self.secure.next_round(previous, self.received, present)  # the next round's grid, checkpointed
        self.phase = "reports"
        self._save()
        self._write_global(r, self.payload)
        self._updates, self._rejected, self._quorum_at = {}, {}, None
        # The next round starts now: the sites train from this module as soon as they see it (a round's
        # seconds and its timeout run from its global module going out to the next one going out).
        self._round_started = self._reports_started = time.monotonic()

    def _encoded(self, r: int, state: dict, present: list[str]) -> bytes:
        """The global module after round r as the sites will receive it (CodecError when it cannot be)."""
        meta = GlobalHeader.build(
            run_id=self.mb.run_id, round=r, sites_present=present, best_round=self.best_round
        )
        return encode(state, self.cfg.codec_down, meta=meta.to_dict()).payload

    def _publishable_aggregate(
        self, present: list[str]
    ) -> tuple[dict | None, bytes | None, list[str], str | None, dict | None]:
        """(state, its payload, the sites in it, None, client-level DP's record or None), or
        (None, None, [], why, None) when no aggregate of this round can be published.
        The aggregate is checked (finite, encodable in the downlink codec) before anything goes out. An update
        that cannot travel down on its own is set aside and the others aggregated again (quorum
        permitting); otherwise every update of the round is set aside and the round is recorded as failed."""
        r = self.round
        client_bound = self.client_dp.bound if self.client_dp is not None else None
        while present:
            client_dp = None
            if self.client_dp is not None:
                # Client-level DP clips, sums and noises the updates itself; its adaptive clip bound moves
                # once per aggregate, so an aggregate tried again starts from the round's bound.
                self.client_dp.bound = client_bound
                state, client_dp = self.client_dp.aggregate(
                    self.received, [self._updates[s]["state"] for s in present], r
                )
            else:
                state = aggregate_updates(
                    self.method,
                    self.global_state,
                    [self._updates[s]["state"] for s in present],
                    [self.counts[s] for s in present],
                    self.cfg.aggregator,
                )
            try:
                bad = non_finite(state)
                if bad:
                    raise CodecError(f"tensor {bad!r} is non-finite")
                return state, self._encoded(r, state, present), present, None, client_dp
            except CodecError as exc:
                why = f"the aggregate of {', '.join(present)} cannot be published: {exc}"
            offending = [s for s in present if not self._travels_down(self._updates[s]["state"])]
            for s in offending or present:
                self._reject(s, f"set aside: {why}", save=False)
            present = [s for s in present if s in self._updates]
            if len(present) < self.quorum:
                break
        for s in list(self._updates):
            self._reject(s, f"set aside: {why}", save=False)
        log.warning("round %d failed: %s; the global module stays as it was", r, why)
        if self.client_dp is not None:
            self.client_dp.bound = client_bound
        return None, None, [], why, None

    def _travels_down(self, state: dict) -> bool:
        try:
            encode(state, self.cfg.codec_down)
            return True
        except CodecError:
            return False

    def _poll_reports(self) -> bool:
        r, progressed, sweep = self.round, False, self._sweep_due()
        got = self.reports[r]["sites"]
        waiting = [s for s in self.info["present"] if s not in got]
        for site, report in self._read_waiting(waiting, self._read_report, sweep):
            if isinstance(report, (MessageRefused, ProtocolError)):
                self._reject_report(site, str(report))
                progressed = True
                continue
            if isinstance(report, Exception):  # nothing a site wrote may stop the server
                self._reject_report(site, f"unusable report: {type(report).__name__}: {report}")
                progressed = True
                continue
            if report is None:
                continue
            progressed = True
            got[site] = {"val": _metrics(report.val), "test": _metrics(report.test)}
            self.site_provenance[site] = report.provenance.to_dict()
            # A site's word on itself: a round it cannot have reached yet is no recovery (an entry a round).
            if report.recovered is not None and report.recovered.from_round <= r:
                self._note_recovery(site, report.recovered.from_round, report.recovered.reason)
            privacy, why = check_site_privacy(
                report.privacy.to_dict() if report.privacy is not None else None
            )
            if privacy is not None and not why:
                why = self._plan_problem(site, privacy)
                privacy = None if why else privacy
            if why:
                log.warning("round %d: ignoring the privacy report of %s: %s", r, site, why)
            if privacy is not None:
                got[site]["privacy"] = privacy
        missing = [s for s in self.info["present"] if s not in got]
        limit = self.opt.report_timeout or self.opt.round_timeout
        if missing and (not sweep or time.monotonic() - self._reports_started < limit):
            return progressed
        for s in missing:
            log.warning("round %d: no metrics from %s within %.0f s", r, s, limit)
        self._close_round()
        return True

    def _plan_problem(self, site: str, ledger: dict) -> str | None:
        """Why a site's DP-SGD ledger is not the run's plan for it, or None. Its planned steps are composed by
        the accountant when its epsilon must be bounded (an update of it went out after its last report): a
        ledger claiming 10^7 steps under PLD took the server's memory, at every restart. The plan is the run's:
        the method's steps per round for the ledger's training-set size (at most the manifest's: a site may
        have dropped unreadable images), times the rounds."""
        n, most = ledger["n_train"], self.counts[site]
        if not 1 <= n <= most:
            return (
                f"privacy.n_train = {n} is outside 1..{most}, the training images the manifest gives {site}"
            )
        # The rest of the plan is the run's too (accounting.plan_site, the same arithmetic as the site's): a
        # ledger with its own sampling rate or noise made the accountant take minutes (PLD at rate 0.5 and
        # noise 0.05: 74 s), each round a site changed them, and at every restart. A target-epsilon run's
        # noise is the site's calibration, not checked here: its plan is bounded by the budget (plan_bound).
        settings, method = self.method.ctx.privacy, self.method
        plan = {
            "planned_steps": method.dp_steps_per_round(n) * method.ctx.rounds,
            "sample_rate": sample_rate(method.dp_batch_size(), n),
            "delta": float(settings.delta),
            "budget": settings.target_epsilon,
        }
        if settings.noise_multiplier is not None:
            plan["noise_multiplier"] = float(settings.noise_multiplier)
        for key, value in plan.items():
            if ledger[key] != value:
                return (
                    f"privacy.{key} = {ledger[key]} is not the run's plan for {n} training images ({value})"
                )
        return None

    def _read_report(self, site: str) -> SiteReport | None:
        r = self.round
        report = self.mb.read_message(self.mb.report_key(r, site), SiteReport, site)
        if report is not None and (report.run_id, report.round, report.site) != (self.mb.run_id, r, site):
            raise ProtocolError(
                f"report from {site} is labelled run {report.run_id!r} round {report.round} site "
                f"{report.site!r}, expected run {self.mb.run_id!r} round {r} site {site!r}"
            )
        return report

    def _reject_report(self, site: str, reason: str) -> None:
        """The site's update stays aggregated (it is in the published module); its metrics of this round are
        absent, the reason recorded, and the refusal checkpointed (never read again)."""
        reason = reason_line(reason)
        log.warning("round %d: ignoring the report of %s: %s", self.round, site, reason)
        self.reports[self.round]["sites"][site] = None
        self.info["rejected"][site] = f"report: {reason}"
        self._save()

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
        attach_epsilon(record, self.cfg.privacy, self.sites, self.reports, self.history)
        if info.get("client_dp"):
            record["client_dp"] = info["client_dp"]
        if info.get("clipped"):
            record["clipped"] = info["clipped"]
        if info.get("failed"):
            record["failed"] = info["failed"]
        if info.get("secure_aggregation"):
            record["secure_aggregation"] = info["secure_aggregation"]
        self.history.append(record)
        median, validators = selects_by_median(self.cfg.aggregator), validation_sites_of(self.history)
        if is_better(record, round_of(self.history, self.best_round), median, validators):
            self.best_round, self.best_val = r, selection_key(record, median, validators)[1]
            self.best_received = {k: v.clone() for k, v in self.received.items()}
        self.observer.round(record)
        self._round_line(record)
        if r >= self.rounds:
            self._finish()
            return
        # No checkpoint here: a restart in the reports phase reads the same reports again and closes the same
        # record (the next round's updates stay in the mailbox).
        self.phase, self.round = self._first_phase(), r + 1
        if self.secure is not None:
            self.secure.started = time.monotonic()
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
            # A site sent updates that no ledger bounds (no report, no target): no figure is the truth.
            + (" · epsilon max unknown" if self.method.private and rec.get("epsilon_max") is None else "")
            + (f" · client epsilon {rec['client_dp']['epsilon']:.4g}" if rec.get("client_dp") else "")
        )

    # ------------------------------------------------------------------ the end
    def _finished_outputs(self) -> dict:
        """A finished run's results, its run directory written again from the server's state (a fresh disk;
        files removed, truncated or edited by hand): what is in it is never trusted, since results.json, the
        model and the partition all follow from the checkpoint. A round's module, which the mailbox may no
        longer hold, is kept where it is the one broadcast (`_write_rounds`)."""
        self._say(f"run {self.mb.run_id} is finished: writing its run directory {self.out} from its state")
        return self._write_outputs()

    def _write_rounds(self) -> None:
        """rounds/: each round's global module as it was broadcast. A file that is not those bytes (the sha256
        and size this state recorded) is written again from the mailbox; where the mailbox no longer holds that
        round, a missing file stays missing (with a warning) and a damaged one is refused, never kept."""
        for r in range(1, len(self.history) + 1):
            path = self.out / "rounds" / f"global_round_{r:03d}.bin"
            sent = self.broadcast.get(r)
            if _holds(path, sent):
                continue
            limit = sent["bytes"] if sent is not None else None
            try:
                payload = self.mb.store.get(self.mb.global_key(r), max_bytes=limit)
            except ObjectTooLarge:
                payload = None
            if payload is not None and (sent is None or sha256_bytes(payload) == sent["sha256"]):
                atomic_write_bytes(path, payload)
            elif os.path.lexists(path):
                raise FederationError(
                    f"{path} is damaged (not the global module broadcast in round {r}, whose sha256 the server's "
                    f"checkpoint records) and {self.mb.store.url} no longer holds that round's module to write it "
                    "again: remove the file, and the run finishes without it"
                )
            else:
                log.warning(
                    "rounds/global_round_%03d.bin cannot be written again: the mailbox no longer holds "
                    "round %d's global module",
                    r,
                    r,
                )

    def _write_outputs(self) -> dict:
        """The run directory from the server's state."""
        setup = self.setup
        atomic_write_json(self.out / "config.json", self.cfg.to_json())
        setup.partition.save(self.out / "partition.json")
        self._write_rounds()
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
                "recovery": self.recovery,
                **setup.extra_results,
                "privacy": privacy_results(
                    self.cfg.privacy, self.sites, self.reports, self.history, self.cfg.secure_aggregation
                ),
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
        self.observer.finish(results, None)

    def run(self) -> dict:
        """Poll until the run ends (or fails with FederationError); returns results.json's content. Whatever
        else stops it, its status says `failed` with the reason, so the sites do not wait for ever."""
        cap = self.mb.poll_cap(self.opt.poll_cap)
        poller = Poller(cap=cap)
        self.sweep_every = SWEEP_EVERY
        # How long each phase waited last time, from its start to the poll that completed it (without the
        # work that poll then did): the next round's same phase is aimed at (`Poller.reset`).
        phase, phase_at, took = (self.round, self.phase), time.monotonic(), {}
        try:
            while not self.finished:
                # Secure aggregation's shares and answers follow the server's objects within moments.
                quick = self.phase in ("keys", "shares", "unmask")
                poller.cap = min(cap, SECURE_POLL_CAP) if quick else cap
                seen_at = time.monotonic()
                if self.poll():
                    now = time.monotonic()
                    if (self.round, self.phase) != phase:
                        took[phase[1]] = seen_at - phase_at
                        phase, phase_at = (self.round, self.phase), now
                    poller.reset(phase_at + AIM * took.get(self.phase, 0.0))
                elif time.monotonic() - self._heartbeat_at > self.opt.heartbeat_every:
                    self._beat()
                else:
                    poller.sleep()
        except FederationError:
            raise  # its status already says why
        except Exception as exc:  # not an interrupt: a server stopped by hand is started again, and resumes
            self.fail(f"the server stopped: {type(exc).__name__}: {exc}")
            raise
        return self.results

    def fail(self, message: str) -> None:
        """Say `failed` in the status (best effort: the mailbox itself may be what failed)."""
        try:
            self._status("failed", message)
        except Exception as exc:
            log.error("could not write the failed status: %s", exc)


def _holds(path: Path, sent: dict | None) -> bool:
    """Whether `path` is a regular file holding what was broadcast (`sent`: its sha256 and size; None, for a
    round from before they were recorded: any file)."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode):
        return False
    return sent is None or (info.st_size == sent["bytes"] and file_digest(path) == sent["sha256"])


def aggregate_updates(
    method: Method, previous: dict, states: list[dict], sample_counts: list[int], aggregator: str = "mean"
) -> dict:
    """The present sites' decoded updates combined: with `mean` the method's own rule, whose weights come
    from `sample_counts`, the counts the server holds (the manifest's), never what a site reports,
    renormalised over the sites present; otherwise a robust rule (robust.py)."""
    if aggregator != "mean":
        return robust_aggregate(aggregator, previous, states)
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
    if setup.dataset:
        results["data"] = setup.dataset
        provenance = {**provenance, "_dataset": setup.dataset}
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


def _metrics(split) -> dict | None:
    return None if split is None else split.to_dict()


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
