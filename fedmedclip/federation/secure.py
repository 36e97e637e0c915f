"""Secure aggregation in the federation runtime: the protocol of fedmedclip/secagg/protocol.py as sub-phases of
the server's round and steps of a site's, over the mailbox, each party's protocol state in its checkpoint.

The server's round, when the manifest turns secure aggregation on (`manifest["secure_aggregation"]`):

    keys     the sites' signed key advertisements      -> the roster (U1) and the round's public grid
    shares   the sealed shares of the roster's sites   -> each site's inbox (U2)
    updates  the masked updates of U2, each checked and added to the sum as it arrives -> the survivors (U3)
    unmask   the unmasking answers of U2               -> the masks rebuilt, the sum unmasked: the aggregate

then its reports, as without secure aggregation. Each sub-phase waits for every expected site, or once it
has at least max(t, quorum) of them for the round timeout more (round 1's keys: the join timeout, while the
sites encode their images); fewer than that at the timeout ends the run, as a round without quorum does.
Fewer than t unmasking answers, shares that do not rebuild a seed, or an unmasked aggregate beyond what
bounded updates can give fail the round: the global module stays as it was.

A site advertises its keys for round r as soon as it has the global module of round r - 1, shares once the
roster is out, then trains (while the server forwards the shares), masks and uploads once its inbox is out,
and answers once the survivors are out. It never answers two different survivor sets of one round (it keeps
the one it answered in its private state). A site the roster leaves out (its keys came too late) sits the round
out without training it, as an absent site does.

Restarts: a party's step is checkpointed before what it writes goes out, and what it wrote is written again
(the same bytes) when the mailbox lacks it. The server checkpoints the roster, the shares and the survivors
once it has fixed them, and reads the rest of the round again; a site derives every key of a round from its
per-run secret (kept in its private state), so its advertisement and masked update are the same bytes again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..aggregation import aggregation_weights
from ..codec import CodecError, get_codec
from ..codec.chain import Codec
from ..codec.secure import MaskedSum, float_entries, grid_levels, initial_steps, next_steps, secure_codec
from ..jsonfiles import loads
from ..privacy.client import party_key
from ..privacy.settings import PrivacySettings
from ..secagg.identity import IdentityKey
from ..secagg.protocol import (
    SecAggRefused,
    SecureSettings,
    SiteRound,
    as_tensors,
    check_advertisement,
    check_bundle,
    check_unmask,
    default_threshold,
    make_inboxes,
    make_roster,
    make_survivors,
    unmask_total,
)
from .mailbox import SERVER, Mailbox, ProtocolError
from .messages import (
    Inbox,
    KeyAdvertisement,
    MessageRefused,
    Roster,
    ShareBundle,
    Survivors,
    UnmaskShares,
    UpdateHeader,
    parse,
)
from .storage import StoreError

log = logging.getLogger("fedmedclip.secagg")

PHASES = ("keys", "shares", "updates", "unmask")
SECRET_KEY = "secagg/run_secret"  # a site's per-run secret, in its private state
ANSWERED_KEY = "secagg/answered.json"  # the survivors it answered last, likewise


def secure_weights(method, counts: dict[str, int], privacy: PrivacySettings) -> dict[str, float]:
    """Each site's aggregation weight over the whole manifest, applied before masking: the method's own
    (sample counts or equal), or equal under client-level DP (its mechanism averages with equal weights)."""
    names = list(counts)
    rule = "equal" if privacy.client_level else method.weighting
    weights = aggregation_weights(method.aggregation_counts([counts[s] for s in names]), rule)
    return dict(zip(names, weights, strict=True))


def manifest_section(
    method,
    counts: dict[str, int],
    identities: dict[str, str] | None,
    threshold: int | None,
    bound: float | None,
    privacy: PrivacySettings,
    codec_up: str,
) -> dict:
    """The run manifest's `secure_aggregation` entry: the threshold t, each site's registered identity key,
    the bound every site clips its update to, the secure codec, and each site's weight (declared, for every
    reader, by messages.ManifestSecureAggregation). SecAggRefused (or a ConfigError about a key) when the keys,
    the threshold or the bound cannot make a secure run."""
    sites = list(counts)
    t = int(threshold) if threshold else default_threshold(len(sites))
    SecureSettings(tuple(sites), dict(identities or {}), t)  # every site registered, t in (n/2, n]
    # Under client-level DP each site clips to S / 2: the server cannot clip a single update any more, and
    # rounding to the nearest grid point at most doubles a coordinate it keeps (it zeroes the others), so each
    # site's contribution to the sum stays within S, the sensitivity the accountant uses.
    clip = float(privacy.client_clip) / 2 if privacy.client_level else bound
    if not clip:
        raise SecAggRefused(
            "secure aggregation needs a bound on each site's update (--max-update-norm 0 turns it off): each "
            "site clips its own update to it before masking, and the server checks the unmasked aggregate "
            "against it"
        )
    codec = secure_codec(get_codec(codec_up, "up"), sites=len(sites), bound=clip)
    return {
        "threshold": t,
        "identities": {s: identities[s] for s in sites},
        "bound": clip,
        "codec": codec.name,
        "modulus_bits": codec.quantiser.bits,
        "weights": secure_weights(method, counts, privacy),
    }


@dataclass(frozen=True)
class SecureRun:
    """What both sides derive from the manifest: the sites and their keys, the secure codec, the weights,
    and the float tensors the masks cover (in the template's order)."""

    settings: SecureSettings
    codec: Codec
    weights: dict[str, float]
    bound: float
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    levels: int

    @classmethod
    def create(
        cls, settings: SecureSettings, base: Codec, weights: dict[str, float], bound: float, template: dict
    ) -> SecureRun:
        """The run of `settings`' sites masking updates of `template`'s float tensors with the secure form
        of `base` (each clipped to `bound`), each site's update weighted by `weights` before masking."""
        codec = secure_codec(base, sites=len(settings.sites), bound=bound)
        shapes = tuple((n, tuple(shape)) for n, shape in float_entries(template))
        levels = grid_levels(codec.quantiser.bits, len(settings.sites))
        return cls(settings, codec, dict(weights), float(bound), shapes, levels)

    @classmethod
    def from_manifest(cls, manifest: dict) -> SecureRun:
        sec = manifest["secure_aggregation"]
        sites = [s["name"] for s in manifest["sites"]]
        run = cls.create(
            SecureSettings(tuple(sites), dict(sec["identities"]), int(sec["threshold"])),
            get_codec(manifest["codec_up"], "up"),
            {s: float(sec["weights"][s]) for s in sites},
            float(sec["bound"]),
            manifest["template"],
        )
        if run.codec.name != sec["codec"] or run.bits != sec["modulus_bits"]:
            raise ProtocolError(
                f"the run's secure codec is {sec['codec']} in Z_(2^{sec['modulus_bits']}), this version makes "
                f"{run.codec.name} in Z_(2^{run.bits}): the parties run different versions"
            )
        return run

    @property
    def length(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in self.shapes)

    @property
    def bits(self) -> int:
        return self.codec.quantiser.bits

    def masks(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        return as_tensors(vector, list(self.shapes))

    def site_inputs(self, protocol: SiteRound, roster: Roster, inbox: Inbox) -> dict:
        """The secure stages' inputs for `protocol`'s site's update of its round: the site's weight on the
        roster's grid, and its masks."""
        vector = protocol.masks(roster, inbox, self.length, self.bits)
        return {
            "fixed-point": {"weight": self.weights[protocol.site], "steps": dict(roster.steps)},
            "secagg-mask": self.masks(vector),
        }


# ====================================================================== the server's side
class ServerSecureRound:
    """The server's sub-phases of secure rounds (`server.phase` in PHASES); `server` is the FederationServer
    whose mailbox, timeouts, rejections and checkpoint it uses."""

    def __init__(self, server, run: SecureRun):
        self.srv, self.run = server, run
        self.need = max(run.settings.threshold, server.quorum)
        template = {n: (shape, "float32") for n, shape in run.shapes}
        self.steps = initial_steps(template, run.bound, len(server.sites), run.levels)
        self._reset()

    def _reset(self) -> None:
        # Checkpointed once fixed: the roster (U1), the shares (U2), the survivors (U3).
        self.roster: Roster | None = None
        self.bundles: dict[str, ShareBundle] = {}
        self.survivors: Survivors | None = None
        # Read again after a restart.
        self.advertisements: dict[str, KeyAdvertisement] = {}
        self.sum: MaskedSum | None = None
        self.headers: dict[str, dict] = {}
        self.answers: dict[str, UnmaskShares] = {}
        self.started = time.monotonic()
        self._open_at: float | None = None
        self._broken: str | None = None  # why this round's sum cannot be unmasked, known before the answers

    # ---------------------------------------------------------------- checkpoint
    def state(self) -> dict:
        return {
            "steps": self.steps,
            "roster": self.roster.to_dict() if self.roster is not None else None,
            "bundles": {s: b.to_dict() for s, b in self.bundles.items()} if self.survivors_due else {},
            "survivors": self.survivors.to_dict() if self.survivors is not None else None,
        }

    @property
    def survivors_due(self) -> bool:
        return self.srv.phase in ("updates", "unmask")

    def restore(self, body: dict | None) -> None:
        """After a restart: what the checkpoint fixed, and every object of the current sub-phase published
        again where the mailbox lacks it (the same bytes)."""
        self._reset()
        body = body or {}
        if body.get("steps") is not None:
            self.steps = {k: float(v) for k, v in body["steps"].items()}
        if self.srv.phase not in PHASES:
            return
        if body.get("roster") is not None:
            self.roster = parse(Roster, body["roster"], SERVER, "checkpoint")
        self.bundles = {
            s: parse(ShareBundle, b, s, "checkpoint") for s, b in (body.get("bundles") or {}).items()
        }
        if body.get("survivors") is not None:
            self.survivors = parse(Survivors, body["survivors"], SERVER, "checkpoint")
        self._publish_current()
        if self.srv.phase in ("updates", "unmask"):
            self._new_sum()
        if self.srv.phase == "unmask":
            # The survivors' masked updates were accepted before: add them again. One that is gone or changed
            # since fails the round (the survivors are fixed: the sum cannot be unmasked without it).
            for site in self.survivors.survivors:
                try:
                    payload = self.srv._read_update(site)
                    if payload is None:
                        raise ProtocolError("it is no longer in the mailbox")
                    self._add_masked(site, payload)
                except Exception as exc:
                    self._broken = f"the masked update of survivor {site} cannot be read again: {exc}"
                    break

    def _publish_current(self) -> None:
        mb, r, phase = self.srv.mb, self.srv.round, self.srv.phase
        put = {}
        if phase in ("shares", "updates", "unmask") and self.roster is not None:
            put[mb.secagg_key(r, "roster")] = self.roster
        if phase in ("updates", "unmask"):
            for site, inbox in self._inboxes().items():
                put[mb.secagg_key(r, "inbox", site)] = inbox
        if phase == "unmask" and self.survivors is not None:
            put[mb.secagg_key(r, "survivors")] = self.survivors
        for key, msg in put.items():
            if not mb.store.exists(key):
                mb.put_message(key, msg)

    def _inboxes(self) -> dict[str, Inbox]:
        return make_inboxes(self.run.settings, self.roster, self.bundles)

    # ---------------------------------------------------------------- the sub-phases
    def poll(self) -> bool:
        return {
            "keys": self._poll_keys,
            "shares": self._poll_shares,
            "updates": self._poll_updates,
            "unmask": self._poll_unmask,
        }[self.srv.phase]()

    def _collect(self, expected: list[str], have: dict, read, what: str) -> bool:
        """Read what each expected site wrote for this sub-phase (`read(site)` -> the object or None, raising
        when it is refused): a refused object makes its site absent from the round, set aside."""
        progressed = False
        for site in expected:
            if site in have or site in self.srv._rejected:
                continue
            try:
                got = read(site)
                if got is None:
                    continue
                have[site] = got
            except (MessageRefused, SecAggRefused) as exc:  # these name the object and the site already
                self.srv._reject(site, str(exc))
            except (ProtocolError, CodecError) as exc:
                self.srv._reject(site, f"{what}: {exc}")
            except Exception as exc:  # nothing a site wrote may stop the server
                self.srv._reject(site, f"unusable {what}: {type(exc).__name__}: {exc}")
            progressed = True
        return progressed

    def _due(self, expected: list[str], have: dict, need: int, what: str) -> bool:
        waiting = [s for s in expected if s not in have and s not in self.srv._rejected]
        joining = self.srv.round == 1 and self.srv.phase == "keys"
        if not waiting:
            return True
        now = time.monotonic()
        if len(have) >= need:
            if self._open_at is None:
                self._open_at = now
            start = self._open_at if joining else self.started
            if now - start < self.srv.opt.round_timeout:
                self.srv._stall_line(waiting, now - self.started, what)
                return False
            return True
        limit = self.srv.opt.join_timeout if joining else self.srv.opt.round_timeout
        if now - self.started < limit:
            self.srv._stall_line(waiting, now - self.started, what)
            return False
        return True

    def _next(self, phase: str, publish: dict) -> None:
        """Move to `phase`: checkpoint what was fixed, then publish it."""
        self.srv.phase = phase
        self.started, self._open_at = time.monotonic(), None
        self.srv._save()
        for key, msg in publish.items():
            self.srv.mb.put_message(key, msg)

    def _read(self, what: str, cls, check):
        """`read(site)` for `_collect`: the site's `what` object of this round, or None; `check(site, obj)`
        raises when it is refused."""
        mb, r = self.srv.mb, self.srv.round

        def read(site):
            got = mb.read_message(mb.secagg_key(r, what, site), cls, site)
            if got is not None:
                check(site, got)
            return got

        return read

    def _poll_keys(self) -> bool:
        srv, r = self.srv, self.srv.round
        read = self._read(
            "keys",
            KeyAdvertisement,
            lambda site, adv: check_advertisement(self.run.settings, srv.mb.run_id, r, site, adv),
        )
        progressed = self._collect(srv.sites, self.advertisements, read, "key advertisement")
        if not self._due(srv.sites, self.advertisements, self.need, "key advertisements"):
            return progressed
        self._enough(self.advertisements, srv.sites, "key advertisements")
        self.roster = make_roster(self.run.settings, srv.mb.run_id, r, self.advertisements, self.steps)
        self._next("shares", {srv.mb.secagg_key(r, "roster"): self.roster})
        return True

    def _poll_shares(self) -> bool:
        srv, r = self.srv, self.srv.round
        listed = [a.site for a in self.roster.advertisements]
        read = self._read(
            "shares",
            ShareBundle,
            lambda site, bundle: check_bundle(self.run.settings, self.roster, site, bundle),
        )
        progressed = self._collect(listed, self.bundles, read, "shares")
        if not self._due(listed, self.bundles, self.need, "shares"):
            return progressed
        self._enough(self.bundles, listed, "shares")
        inboxes = self._inboxes()
        self._new_sum()
        self._next("updates", {srv.mb.secagg_key(r, "inbox", s): box for s, box in inboxes.items()})
        return True

    def _new_sum(self) -> None:
        srv = self.srv
        self.sum = MaskedSum(
            self.run.codec,
            weights=self.run.weights,
            steps=self.roster.steps,
            reference=srv.received,
            template=srv.template_tuples,
            cap=srv.max_update_bytes,
        )
        self.headers = {}

    def _add_masked(self, site: str, payload: bytes) -> None:
        srv = self.srv

        def check_header(meta) -> None:
            header = parse(UpdateHeader, meta, site)
            wrong = srv._header_problem(site, header)
            if wrong:
                raise ProtocolError(wrong)
            self.headers[site] = {"loss": header.loss, "n_train": header.n_train, "bytes": len(payload)}

        try:
            self.sum.add(site, payload, check_header)
        except CodecError as exc:
            raise CodecError(f"masked update refused: {exc}") from None

    def _poll_updates(self) -> bool:
        srv = self.srv
        shared = self.run.settings.order(self.bundles)

        def read(site):
            payload = srv._read_update(site)
            if payload is not None:
                self._add_masked(site, payload)
            return payload is not None or None

        have = {s: True for s in self.sum.sites}
        progressed = self._collect(shared, have, read, "masked update")
        if not self._due(shared, have, self.need, "masked updates"):
            return progressed
        self._enough(have, shared, "masked updates")
        self.survivors = make_survivors(self.run.settings, srv.mb.run_id, srv.round, shared, self.sum.sites)
        self._next("unmask", {srv.mb.secagg_key(srv.round, "survivors"): self.survivors})
        return True

    def _poll_unmask(self) -> bool:
        srv = self.srv
        shared = list(self.survivors.shared)
        read = self._read(
            "unmask",
            UnmaskShares,
            lambda site, answer: check_unmask(self.run.settings, self.survivors, site, answer),
        )
        progressed = self._collect(shared, self.answers, read, "unmasking shares")
        if not self._due(shared, self.answers, len(shared), "unmasking shares"):
            return progressed
        state, failed = None, self._broken
        try:
            if failed:
                raise SecAggRefused(failed)
            total = unmask_total(
                self.run.settings, self.roster, self.survivors, self.answers, self.run.length, self.run.bits
            )
            decoded, _ = self.sum.unmasked(self.run.masks(total))
            state = decoded.state
        except (SecAggRefused, CodecError) as exc:
            failed = f"round {srv.round} cannot be unmasked: {exc}"
        srv._secure_aggregate(state, list(self.survivors.survivors), failed)
        return True

    def _enough(self, have: dict, expected: list[str], what: str) -> None:
        if len(have) < self.need:
            waiting = [s for s in expected if s not in have and s not in self.srv._rejected]
            self.srv._fail_quorum(waiting, time.monotonic() - self.started, len(have), what, self.need)

    # ---------------------------------------------------------------- the round's end
    def record(self) -> dict:
        """What the round record keeps of the protocol (results.json's history): who took part in each step,
        and the bytes each site sent besides its masked update (its advertisement, shares and answer: the
        objects' canonical JSON, what the site wrote)."""
        advertised = {a.site: len(a.to_bytes()) for a in self.roster.advertisements} if self.roster else {}
        sent = dict(advertised)
        for got in (self.bundles, self.answers):
            for site, msg in got.items():
                sent[site] = sent.get(site, 0) + len(msg.to_bytes())
        order = self.run.settings.order
        return {
            "threshold": self.run.settings.threshold,
            "advertised": order(advertised),
            "shared": list(self.survivors.shared) if self.survivors else [],
            "survivors": list(self.survivors.survivors) if self.survivors else [],
            "answered": order(self.answers),
            "protocol_bytes_up": {s: sent[s] for s in order(sent)},
        }

    def updates_info(self) -> dict[str, dict]:
        return dict(self.headers)

    def next_round(self, previous: dict, published: dict, present: list[str]) -> None:
        """The next round's public grid from the module this round published, and a fresh protocol state."""
        if present:
            update = {n: published[n].double() - previous[n].double() for n, _ in self.run.shapes}
            weight = sum(self.run.weights[s] for s in present)
            self.steps = next_steps(self.steps, update, weight, len(present), self.run.levels)
        self._reset()


# ====================================================================== a site's side
class SiteSecureRound:
    """A site's steps of secure rounds. `worker` is the SiteWorker whose mailbox, checkpoint and error
    feedback it uses; `identity`: the site's registered identity key; `secret`: its per-run secret."""

    def __init__(self, worker, run: SecureRun, identity: IdentityKey):
        self.w, self.run, self.identity = worker, run, identity
        run.settings.check_identity(worker.name, identity)
        self.secret = party_key(worker.state, SECRET_KEY)
        # Checkpointed with the masked update (SiteWorker._upload): the round, its trained update, the
        # error-feedback memory before it, its header. Before it, a restart trains the round again (the same
        # update: training is deterministic from the last checkpoint).
        self.round: int | None = None
        self.update: dict[str, torch.Tensor] | None = None
        self.memory_before: dict[str, torch.Tensor] | None = None
        self.header: dict | None = None
        self._forget()

    def _forget(self) -> None:
        self._protocol: SiteRound | None = None
        self._roster: Roster | None = None
        self._inbox: Inbox | None = None
        self._out: str | None = None  # why this site sits this round out

    def protocol(self, r: int) -> SiteRound:
        if self._protocol is None or self._protocol.round != r:
            self._protocol = SiteRound(self.run.settings, self.w.mb.run_id, r, self.w.name, self.secret)
        return self._protocol

    def _put_once(self, key: str, data: bytes) -> None:
        """A site's protocol object goes out once: after a restart it is not replaced (the same bytes for the
        advertisement, the unmasking answer and the masked update; the shares are random, and the server may
        have forwarded the first ones already)."""
        if not self.w.mb.store.exists(key):
            self.w.mb.store.put(key, data)

    # ---------------------------------------------------------------- checkpoint
    def tensors(self) -> dict:
        out = {}
        if self.update is not None:
            out["secagg_update"] = self.update
        if self.memory_before is not None:
            out["secagg_memory_before"] = self.memory_before
        return out

    def body(self) -> dict:
        return {"round": self.round, "header": self.header}

    def restore(self, body: dict | None, tensors: dict) -> None:
        body = body or {}
        self.round, self.header = body.get("round"), body.get("header")
        self.update = tensors.get("secagg_update")
        self.memory_before = tensors.get("secagg_memory_before")
        self._forget()

    # ---------------------------------------------------------------- the round
    def start(self, r: int) -> None:
        """Round r begins for this site (it has the global module of round r - 1): advertise its keys."""
        self.finish()
        self.round = r
        adv = self.protocol(r).advertisement(self.identity)
        self._put_once(self.w.mb.secagg_key(r, "keys", self.w.name), adv.to_bytes())

    @property
    def untrained(self) -> bool:
        """Round r started and not trained yet (nothing of it is checkpointed: a restart starts it again)."""
        return self.round is not None and self.update is None

    def begin(self, r: int, update: dict, memory: dict | None, header: dict) -> None:
        """This site trained round r: its update waits for its inbox (checkpointed by the worker)."""
        self.round, self.header = r, header
        self.update = {k: v.detach().clone() for k, v in update.items()}
        self.memory_before = None if memory is None else {k: v.clone() for k, v in memory.items()}

    def finish(self) -> None:
        self.round = self.update = self.memory_before = self.header = None
        self._forget()

    def unused_memory(self, reference: dict) -> dict:
        """The error-feedback memory when this round's update never reached the aggregate: everything it
        carried (`ErrorFeedback`'s input: the memory before it plus the update's difference)."""
        return {
            n: (self.memory_before[n] if self.memory_before is not None else 0)
            + (self.update[n].float() - reference[n].float())
            for n, _ in self.run.shapes
        }

    def _sit_out(self, why: str) -> None:
        if self._out is None:
            self._out = why
            log.warning("%s: round %d: %s; this site waits for the next round", self.w.name, self.round, why)

    def advance(self) -> bool:
        """Do the protocol's next step that is ready; True when something was done."""
        r = self.round
        if r is None:
            return False
        mb, name = self.w.mb, self.w.name
        if self.update is None and mb.store.exists(mb.global_key(r)):
            self.finish()  # the round ended without this site: the worker takes the newest global module
            return True
        if self._out is not None:
            return False
        try:
            if self._roster is None:
                self._roster = mb.read_message(mb.secagg_key(r, "roster"), Roster, SERVER)
                if self._roster is None:
                    return False
                if name not in [a.site for a in self._roster.advertisements]:
                    self._sit_out("the server's roster does not list this site (its keys came too late)")
                    return False
                bundle = self.protocol(r).share_bundle(self._roster)  # checks every signature
                self._put_once(mb.secagg_key(r, "shares", name), bundle.to_bytes())
            if self.update is None:
                self.w.secure_train(r)
                return True
            if self._inbox is None:
                self._inbox = mb.read_message(mb.secagg_key(r, "inbox", name), Inbox, SERVER)
                if self._inbox is None:
                    return False
                return self._upload(r)
            return self._answer(r)
        except (MessageRefused, SecAggRefused, ProtocolError, CodecError) as exc:
            self._sit_out(f"the server's secure-aggregation objects are refused: {exc}")
            return False

    def _upload(self, r: int) -> bool:
        """Mask this site's update with its masks of the round and upload it (once)."""
        w = self.w
        if w.pending is not None:
            return False
        enc = self.run.codec.encode(
            self.update,
            reference=w.received_for(r),
            memory=self.memory_before,
            meta=self.header,
            inputs=self.run.site_inputs(self.protocol(r), self._roster, self._inbox),
        )
        w._upload(r, enc)
        return True

    def _answer(self, r: int) -> bool:
        mb, name = self.w.mb, self.w.name
        survivors = mb.read_message(mb.secagg_key(r, "survivors"), Survivors, SERVER)
        if survivors is None:
            return False
        key = mb.secagg_key(r, "unmask", name)
        # Kept in this site's private state before the answer goes out: after a restart it answers the same
        # survivors only.
        try:
            raw = self.w.state.get(ANSWERED_KEY, max_bytes=1 << 20)
            answered = loads(raw) if raw is not None else {}
        except (StoreError, ValueError):  # too large, not JSON (UnicodeDecodeError is a ValueError)
            answered = None
        if not isinstance(answered, dict):
            # Damaged on this site's disk: whether it answered other survivors of this round is unknown, and
            # answering these too could hand over both seeds of one site. It sits the round out (the others
            # unmask it), a restart alike (the record says so: survivors unknown); the next round answers.
            unknown = {"run_id": mb.run_id, "round": r, "survivors": None}
            self.w.state.put(ANSWERED_KEY, json.dumps(unknown).encode())
            self._sit_out(
                f"its record of the survivors it answered ({self.w.state.where(ANSWERED_KEY)}) is damaged: it "
                "does not answer this round"
            )
            return False
        if answered.get("run_id") == mb.run_id and answered.get("round") == r:
            if answered.get("survivors") != list(survivors.survivors):
                self._sit_out(
                    f"the survivors now name {list(survivors.survivors)}, this site answered for "
                    f"{answered.get('survivors')}: it never answers two survivor sets of one round"
                )
                return False
        else:
            record = {"run_id": mb.run_id, "round": r, "survivors": list(survivors.survivors)}
            self.w.state.put(ANSWERED_KEY, json.dumps(record).encode())
        self._answer_now(r, survivors, key)
        return True

    def _answer_now(self, r: int, survivors: Survivors, key: str) -> None:
        answer = self.protocol(r).unmask_response(self._roster, self._inbox, survivors)
        self._put_once(key, answer.to_bytes())
        self._out = "answered"  # nothing left to do in this round


# ====================================================================== onboarding
def read_site_keys(path: str) -> dict[str, str]:
    """The sites' public identity keys the operator collected (`fedmedclip site keygen` prints each): a JSON
    object {site: "ed25519:..."}; ConfigError naming the problem."""
    from pathlib import Path

    from ..errors import ConfigError

    try:
        keys = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--site-keys {path}: not a readable JSON file ({exc})") from None
    if not isinstance(keys, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in keys.items()
    ):
        raise ConfigError(f'--site-keys {path} must hold a JSON object {{"site_0": "ed25519:...", ...}}')
    return keys


def register_identity(mailbox: Mailbox, site: str, identity: IdentityKey) -> None:
    """A site created by the system (the pipeline's) registers its own public key through the mailbox."""
    from .messages import IdentityRegistration

    msg = IdentityRegistration.build(run_id=mailbox.run_id, site=site, identity=identity.public)
    mailbox.put_message(mailbox.identity_key(site), msg)


def registered_identities(mailbox: Mailbox, sites: list[str], timeout: float) -> dict[str, str]:
    """Every site's public key as it registered it through the mailbox (`register_identity`), waiting up to
    `timeout` seconds for the last; trusted as far as the storage role that wrote each one is."""
    from .mailbox import Poller, wait_until
    from .messages import IdentityRegistration

    found: dict[str, str] = {}

    def ready():
        for site in sites:
            if site in found:
                continue
            msg = mailbox.read_message(mailbox.identity_key(site), IdentityRegistration, site)
            if msg is not None:
                if (msg.run_id, msg.site) != (mailbox.run_id, site):
                    raise ProtocolError(
                        f"the identity registered for {site} is labelled run {msg.run_id!r} site {msg.site!r}"
                    )
                found[site] = msg.identity
        return len(found) == len(sites)

    try:
        wait_until(ready, "the sites' identity keys", timeout, Poller(first=0.1, cap=2.0))
    except TimeoutError:
        missing = [s for s in sites if s not in found]
        raise ProtocolError(
            f"no identity key registered by {', '.join(missing)} within {timeout:.0f} s "
            f"({mailbox.where(mailbox.identity_key(missing[0]))})"
        ) from None
    return found
