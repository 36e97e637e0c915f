"""A site worker: one long-lived party per hospital. It reads only its own data, encodes its features once,
then loops: wait for the global module, evaluate its own predictor with it (metrics only leave), train one
round, upload its update. Its private state (its own modules, optimiser, error-feedback memory, the model part
of the candidate rounds, checkpoints) stays in storage that only it reads.

`poll()` does whatever is ready and returns at once, so the in-process simulator drives the very same object
that `fedmedclip site run` drives with `run()`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from ..codec import decode, encode
from ..codec.wire import template_cap, unpack
from ..errors import CheckpointError, FedMedClipError, shown
from ..methods import Method, SiteData
from ..privacy.client import site_client_privacy
from .checkpoint import (
    PARTY_CHECKPOINTS,
    Body,
    CheckpointStore,
    configuration,
    expect_type,
    expect_types,
    fit_state,
    non_finite,
    parse_body,
    tensor_map,
)
from .mailbox import AIM, SECURE_POLL_CAP, SERVER, Mailbox, Poller, ProtocolError
from .messages import GlobalHeader, MessageRefused, Recovery, SiteReport, Status, UpdateHeader, parse
from .records import evaluate_site, save_safetensors
from .storage import ObjectStore, ObjectTooLarge, StoreError

log = logging.getLogger("fedmedclip.site")

SERVER_STATUS_EVERY = 2.0  # seconds between reads of the server's status while waiting
# The server rewrites its status at least every 10 s while it waits (its heartbeat). A site says so when it
# has seen none for this long, and gives up after --silence-timeout (DEFAULT_SILENCE_TIMEOUT) without one.
HEARTBEAT_STALE = 60.0
DEFAULT_SILENCE_TIMEOUT = 1800.0


class SiteFailure(FedMedClipError):
    """This site cannot go on (its own training diverged, or the server ended the run)."""


@dataclass
class SiteSetup:
    """What a site trains with, prepared from its own data only."""

    name: str
    index: int  # the site's position in the manifest: seeds its random draws
    method: Method
    data: SiteData
    provenance: dict  # its feature store's provenance (hashes only; no image ids leave)


def template_of(manifest: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(shape), dtype) for k, (shape, dtype) in manifest["template"].items()}


def model_part(trainer, own_shared: bool = False) -> dict[str, torch.Tensor]:
    """A site's part of the exported model: its private modules (FedMedCLIP's MLP, FAM); with `own_shared`
    (local-only training, where the site's shared module never reached the global file) that module too."""
    return {k: v.detach().clone().contiguous() for k, v in trainer.model_tensors(own_shared).items()}


class SiteWorker:
    def __init__(
        self,
        mailbox: Mailbox,
        manifest: dict,
        setup: SiteSetup,
        state: ObjectStore,
        model_dir=None,
        verbose: bool = True,
        identity=None,
    ):
        self.mb, self.manifest, self.setup = mailbox, manifest, setup
        self.name, self.rounds = setup.name, int(manifest["rounds"])
        self.codec_up, self.codec_down = manifest["codec_up"], manifest["codec_down"]
        self.template = template_of(manifest)
        self.state, self.model_dir, self.verbose = state, model_dir, verbose
        # Its checkpoints record the run's configuration (the manifest's settings and partition): state that
        # another configuration wrote is refused, never continued.
        self.ckpt = CheckpointStore(
            state.sub(PARTY_CHECKPOINTS),
            f"site {self.name}",
            configuration(manifest["settings"], manifest["partition_digest"]),
            check=_check_state,
        )
        self.trainer = setup.method.new_site(setup.data, setup.index)
        self.trained = 0  # the last round this site trained (its update of that round exists)
        self.reported = 0  # the last round whose global module this site evaluated
        self.memory: dict | None = None  # the uplink codec's error feedback, kept here only
        self.candidates: dict[int, dict[str, torch.Tensor]] = {}  # round -> this site's model part
        self.pending: bytes | None = None  # the update of round `trained`, kept to re-upload after a restart
        self.last_report: dict | None = None  # the metrics of round `reported`, likewise
        self.finished = False
        self.final_round: int | None = None
        # Set when this site resumed from older state than its newest (a damaged or removed checkpoint):
        # said in its next report, so that the server's results record it.
        self.recovered: dict | None = None
        self._resent = False  # whether what a restart may have lost was sent again
        self._server_checked = -math.inf  # never: monotonic time starts at boot, not long ago
        # Seconds between the checks a waiting site needs only rarely (whether the server went on without it,
        # and its status): 0 checks at every poll, as the in-process simulator's fixed order requires; `run()`
        # checks every SERVER_STATUS_EVERY s, so that its polls while it waits are one request each.
        self.rare_checks_every, self._rare_checked = 0.0, -math.inf
        self._uploaded: int | None = None  # the last round this process uploaded itself
        self.client_dp = site_client_privacy(setup.method.ctx.privacy, manifest, state, self.name)
        self._server_beat: float | None = None  # the `time` of the server's status when last read
        self._server_beat_at = time.monotonic()  # when (this site's clock) that status last changed
        self._server_said: Status | None = None
        # A payload of the template's size in any codec, plus its header.
        self.max_global_bytes = template_cap(self.template) + (1 << 20)
        self._received: tuple[int, dict] | None = None  # the newest global module received, by round
        self._fetched: tuple[int, bytes] | None = None  # a global module's bytes read while waiting for it
        self.seen_global: int | None = None  # the round of the newest global module this site acted on
        self._report_out = None  # waits until the report being sent is written (`Mailbox.put_soon`)
        self._status_at, self._status_due = -math.inf, None  # when its status was written; one not yet
        # Secure aggregation (fedmedclip/federation/secure.py), when the manifest turns it on: with this site's
        # registered identity key.
        self.secure = None
        if manifest.get("secure_aggregation"):
            from .secure import SecureRun, SiteSecureRound

            if identity is None:
                raise SiteFailure(
                    f"site {self.name}: run {mailbox.run_id} uses secure aggregation and this site has no "
                    "identity key (`fedmedclip site keygen`, then `site run --identity FILE`)"
                )
            try:
                self.secure = SiteSecureRound(self, SecureRun.from_manifest(manifest), identity)
            except FedMedClipError as exc:
                raise SiteFailure(f"site {self.name}: {exc}") from None
        self._restore()

    # ------------------------------------------------------------------ state
    def _restore(self) -> None:
        got = self.ckpt.load()
        if got is None:
            return
        _, body, tensors = got
        if body.get("run_id") != self.mb.run_id:
            raise SiteFailure(
                f"site {self.name}: its state store {self.state.url} holds run {body.get('run_id')!r}, not "
                f"{self.mb.run_id!r}: give each run its own --state"
            )
        fit_state(
            lambda: self.trainer.load_state_dict(tensors["trainer"]),
            f"site {self.name}: its state in {self.state.url}",
            "start this site with an empty --state",
        )
        self.memory = tensors.get("memory")
        self.candidates = {int(r): t for r, t in tensors["candidates"].items()}
        self.trained, self.reported = int(body["trained"]), int(body["reported"])
        self.last_report = body.get("last_report")
        self.recovered = body.get("recovered")
        if self.reported >= self.rounds:  # it had evaluated the last round: only the end is left
            self.final_round = self.reported
        self.pending = bytes(tensors["pending"].numpy().tobytes()) if "pending" in tensors else None
        if self.secure is not None:
            self.secure.restore(body.get("secagg"), tensors)
        if self.ckpt.problems:
            self._recovered("; ".join(self.ckpt.problems))
        self._say(f"resuming after round {self.trained} (state in {self.state.url})")

    def _recovered(self, reason: str) -> None:
        if self.recovered is None:
            self.recovered = {"from_round": self.trained, "reason": reason[:3900]}
            log.warning("%s: resumed from its state after round %d: %s", self.name, self.trained, reason)

    def _checkpoint(self) -> None:
        tensors = {
            "trainer": self.trainer.state_dict(),
            "candidates": {str(r): t for r, t in self.candidates.items()},
        }
        if self.memory is not None:
            tensors["memory"] = self.memory
        if self.pending is not None:
            tensors["pending"] = torch.frombuffer(bytearray(self.pending), dtype=torch.uint8)
        body = {"run_id": self.mb.run_id, "trained": self.trained, "reported": self.reported}
        if self.secure is not None:
            tensors.update(self.secure.tensors())
            body["secagg"] = self.secure.body()
        self.ckpt.save({**body, "last_report": self.last_report, "recovered": self.recovered}, tensors)

    def _say(self, message: str) -> None:
        if self.verbose:
            log.info("%s: %s", self.name, message)

    def _status(self, state: str, r: int, message: str = "") -> None:
        self.mb.put_status(self.name, state, r, message)
        self._status_at, self._status_due = time.monotonic(), None

    def _status_soon(self, state: str, r: int, message: str = "") -> None:
        """A status of every round (`uploaded`): written now when the last one is `rare_checks_every` s old
        (the in-process simulator: always), else once the site has waited that long (`run`), unless a newer
        one replaces it first. A status is advisory (the server's "waiting for" lines), and one request per
        site and round less is one fewer on the S3 server the round's updates queue at."""
        self._status_due = (state, r, message)
        self._flush_status()

    def _flush_status(self) -> None:
        if self._status_due is not None and time.monotonic() - self._status_at >= self.rare_checks_every:
            self._status(*self._status_due)

    # ------------------------------------------------------------------ the protocol
    def _newest_global(self) -> int | None:
        """The newest published global module this site has not trained past: the one after its last trained
        round, or a later one when the server went on without this site (it then takes the current one).
        The server publishes rounds in order, so when round `floor` is not there, no later one is, unless it
        was removed since (old rounds of the in-process mailbox). A site that finds its own update of a round
        past its state (its newest checkpoint was damaged or removed after it sent it) redoes that round from
        the global module before it: what it sends is then byte-identical to what it sent before."""
        floor = max(self.trained, self.reported)
        rare = time.monotonic() - self._rare_checked >= self.rare_checks_every
        if self._fetch_global(floor):
            g = floor
        elif rare and floor < self.rounds and self.mb.store.exists(self.mb.global_key(floor + 1)):
            if self._sent_before(floor + 1):
                raise SiteFailure(
                    f"site {self.name}: its state ends after round {floor}, but it had sent its update of round "
                    f"{floor + 1} and the global module of round {floor} it would redo that round from is no "
                    f"longer in {self.mb.store.url}: restore this site's newest state, or start it with an "
                    "empty --state (it then rejoins with the current global module)"
                )
            g = floor + 1
        else:
            if rare:
                self._rare_checked = time.monotonic()
            # The server's status says whether it ended the run; read every few seconds, not every poll.
            if time.monotonic() - self._server_checked > SERVER_STATUS_EVERY:
                self._server_checked = time.monotonic()
                self._check_server()
            return None
        # Whether the server went on without this site since: at every rare check (an update it then sends
        # for round g + 1 comes too late, and it catches up with the next global module).
        while rare and g < self.rounds and self.mb.store.exists(self.mb.global_key(g + 1)):
            if self._sent_before(g + 1):
                self._recovered(
                    f"its update of round {g + 1} was in the mailbox although its state ended before it"
                )
                break
            g += 1
        return g

    def _fetch_global(self, g: int) -> bool:
        """Whether round g's global module is in the mailbox; its bytes are kept for `_receive` (one GET
        while a site waits, rather than a HEAD and then a GET)."""
        try:
            raw = self.mb.store.get(self.mb.global_key(g), max_bytes=self.max_global_bytes)
        except ObjectTooLarge:
            return True  # `_receive` refuses it, naming the server
        if raw is None:
            return False
        self._fetched = (g, raw)
        return True

    def _sent_before(self, r: int) -> bool:
        """Whether this site's update of round r went out (it is in the mailbox, or the server's global
        module of round r lists this site among those it aggregated)."""
        if self.mb.store.exists(self.mb.update_key(r, self.name)):
            return True
        try:
            raw = self.mb.store.get(self.mb.global_key(r), max_bytes=self.max_global_bytes)
            header = parse(GlobalHeader, unpack(raw)[1].get("meta"), SERVER) if raw is not None else None
        except Exception:  # an unreadable module is refused where it is received
            return False
        return header is not None and self.name in header.sites_present

    def _server_status(self) -> Status | None:
        """The server's heartbeat, and when it last changed by this site's clock (no clock is shared)."""
        try:
            st = self.mb.status(SERVER)
        except (MessageRefused, StoreError) as exc:  # StoreError: a FIFO or link another site put there
            log.warning("%s: %s", self.name, exc)
            return None
        if st is not None and st.time != self._server_beat:
            self._server_beat, self._server_beat_at = st.time, time.monotonic()
        self._server_said = st
        return st

    def _check_server(self) -> Status | None:
        st = self._server_status()
        if st is not None and st.state == "failed":
            raise SiteFailure(f"the server ended run {self.mb.run_id}: {st.message}")
        return st

    def _receive(self, g: int) -> tuple[dict, GlobalHeader]:
        """The global module of round g (its size checked before it is read, the manifest's downlink codec
        and template, its header parsed), or ProtocolError."""
        fetched, self._fetched = self._fetched, None
        try:
            payload = (
                fetched[1]
                if fetched is not None and fetched[0] == g
                else self.mb.store.get(self.mb.global_key(g), max_bytes=self.max_global_bytes)
            )
            got = decode(payload, template=self.template, codec=self.codec_down)
            meta = parse(GlobalHeader, got.meta, SERVER)
        except Exception as exc:  # ObjectTooLarge, CodecError, MessageRefused, ...
            raise ProtocolError(
                f"site {self.name}: the server's global module of round {g} is unusable: {exc}"
            ) from None
        if meta.run_id != self.mb.run_id or meta.round != g:
            raise ProtocolError(
                f"site {self.name}: {self.mb.where(self.mb.global_key(g))} belongs to run "
                f"{meta.run_id!r} round {meta.round!r}, not run {self.mb.run_id!r} round {g}: a file put there "
                "by hand or by another run. Remove that file and start the parties again: the server publishes "
                f"round {g}'s global module itself (from its checkpoint, when it had already)"
            )
        self._received = (g, got.state)
        return got.state, meta

    def received_for(self, r: int) -> dict:
        """The global module this site trained round r from (round r - 1's), as it received it."""
        if self._received is not None and self._received[0] == r - 1:
            return self._received[1]
        return self._receive(r - 1)[0]

    def poll(self) -> bool:
        """Do what is ready; True when something was done."""
        if self.finished:
            return False
        if self.final_round is not None:
            return self._finish_if_done()
        if self.secure is not None and self.secure.untrained:
            return self.secure.advance()  # secure aggregation: the round's first steps, before training
        if not self._resent:
            # After a restart, what this site already sent goes out again if the mailbox lost it (same bytes).
            self._resent = True
            if self.pending is not None and not self.mb.store.exists(
                self.mb.update_key(self.trained, self.name)
            ):
                self.mb.store.put(self.mb.update_key(self.trained, self.name), self.pending)
            if self.last_report is not None and not self.mb.store.exists(
                self.mb.report_key(self.reported, self.name)
            ):
                self.mb.put_message(
                    self.mb.report_key(self.reported, self.name), SiteReport.model_validate(self.last_report)
                )
        g = self._newest_global()
        if g is None:
            # Secure aggregation: the protocol's steps of the round this site trained.
            return self.secure.advance() if self.secure is not None else False
        received, meta = self._receive(g)
        self.seen_global = g
        if g == self.trained and g >= 1 and self.name not in meta.sites_present:
            self._say(f"round {g}: the server aggregated without this site's update")
            self._keep_unused_update(g)
        if self.secure is not None and self.secure.round is not None:
            self.secure.finish()  # the round it trained is closed
        self.trainer.load_shared(received)
        if g >= 1 and g > self.reported:
            report = SiteReport.build(
                format=1,
                run_id=self.mb.run_id,
                round=g,
                site=self.name,
                provenance=self.setup.provenance,
                recovered=self.recovered,
                privacy=self.trainer.privacy_report(),  # its DP-SGD ledger (fedmedclip.privacy), or None
                **evaluate_site(self.trainer, self.setup.data),
            )
            # The report travels while this site trains; it is out before the update (`_upload`), so the
            # server still sees a site's report of round g before its update of round g + 1.
            self._report_out = self.mb.put_soon(self.mb.report_key(g, self.name), report.to_bytes())
            self.last_report = report.to_dict()
            if self.recovered is not None and g > self.recovered["from_round"]:
                self.recovered = (
                    None  # said in a round the server had not closed when this site lost its state
                )
            self.candidates[g] = model_part(self.trainer)
            self.reported = g
        best = meta.best_round
        self.candidates = {r: t for r, t in self.candidates.items() if r in (best, g)}
        try:
            if g >= self.rounds:
                self.final_round = g
                self._checkpoint()
                self._status("finishing", g, "waiting for the server to select the round")
                return True
            self._train(g + 1, received)
            return True
        finally:
            self._wait_report()

    def _wait_report(self) -> None:
        """Wait until the report this site started sending is written (raises what the write raised)."""
        out, self._report_out = self._report_out, None
        if out is not None:
            out()

    def _keep_unused_update(self, g: int) -> None:
        """With error feedback, the memory assumed the update of round g would arrive. It did not (rejected,
        or too late): add what it carried back to the memory, so that it is sent in a later round instead of
        being lost."""
        if self.secure is not None and self.secure.round == g:
            self.memory = self.secure.unused_memory(self._receive(g - 1)[0])
            return
        if self.memory is None or self.pending is None:
            return
        ref, _ = self._receive(g - 1)
        sent = decode(self.pending, reference=ref, template=self.template).state
        self.memory = {k: m + (sent[k] - ref[k]) for k, m in self.memory.items()}

    def _train(self, r: int, received: dict) -> None:
        if self.secure is not None:
            # Secure aggregation: advertise the round's keys now; training waits until this site's shares are
            # out (`secure.advance` calls `secure_train`), so that the server forwards them while it trains.
            self.secure.start(r)
            return
        update, header, done, privacy = self._local_update(r, received)
        enc = encode(update, self.codec_up, reference=received, memory=self.memory, meta=header.to_dict())
        self._upload(r, enc)
        self._say(f"{done}, sent {len(enc.payload) / 1e3:.1f} kB{privacy}")

    def secure_train(self, r: int) -> None:
        """Train round r under secure aggregation: the update waits for this site's inbox (masked, uploaded and
        checkpointed by `secure.advance`)."""
        update, header, done, privacy = self._local_update(r, self.received_for(r))
        self.secure.begin(r, update, self.memory, header.to_dict())
        self.trained, self.pending = r, None
        self._status_soon("waiting", r, "trained; in secure aggregation")
        self._say(f"{done}{privacy}; masked and sent once its inbox is out")

    def _local_update(self, r: int, received: dict):
        """Train round r: (the update to send, its header, the log line's parts)."""
        t0 = time.perf_counter()
        stats = self.trainer.train_round(r)
        update = self.trainer.shared_update()
        loss = float(stats["loss"])
        bad = non_finite(update)
        if not math.isfinite(loss) or bad:
            message = (
                f"round {r}: local training diverged (loss {loss}, "
                f"{'parameter ' + bad + ' is non-finite' if bad else 'parameters finite'}); nothing was uploaded"
            )
            self._status("failed", r, message)
            raise SiteFailure(f"site {self.name}: {message}")
        eps = stats.get("epsilon")
        if self.client_dp is not None:  # client-level DP with the noise added here (fedmedclip.privacy)
            update, _ = self.client_dp.apply(update, received, r)
        # Under DP (DP-SGD, or client level, which protects the whole site's data) the training loss, an average
        # over the site's examples without noise, stays here: the round records publish it.
        privacy = self.setup.method.ctx.privacy  # PrivacySettings, or None without DP
        private = eps is not None or (privacy is not None and privacy.client_level)
        header = UpdateHeader.build(
            run_id=self.mb.run_id,
            round=r,
            site=self.name,
            n_train=self.setup.data.n_train,
            loss=None if private else loss,
            steps=int(stats.get("steps", 0)),
        )
        done = f"round {r}: trained {stats.get('steps', 0)} steps in {time.perf_counter() - t0:.2f} s, loss {loss:.4f}"
        privacy = (
            f", epsilon {eps:.4g} (delta {self.trainer.privacy_report()['delta']:g})"
            if eps is not None
            else ""
        )
        return update, header, done, privacy

    def _upload(self, r: int, enc) -> None:
        """Send the update of round r (`enc`: its payload and this site's new error-feedback memory), once: a
        site redoing a round it had sent (its newest state was lost) must find the same bytes in the mailbox."""
        # A site that uploaded round r - 1 itself has not sent round r before (only a restart loses state).
        sent = (
            None
            if self._uploaded == r - 1
            else self.mb.store.get(self.mb.update_key(r, self.name), max_bytes=len(enc.payload) + (1 << 20))
        )
        if sent is not None and sent != enc.payload:
            message = (
                f"round {r}: this site's state ended before round {r}, and redoing it gave another update than "
                "the one it had sent; its private state cannot be made the run's again. Restore its newest "
                "state, or start it with an empty --state (it then rejoins with the current global module)"
            )
            self._status("failed", r, message)
            raise SiteFailure(f"site {self.name}: {message}")
        if sent is not None:
            self._recovered(f"its update of round {r} was in the mailbox although its state ended before it")
        self.memory, self.pending, self.trained = enc.memory, enc.payload, r
        self._checkpoint()
        self._wait_report()
        if sent is None:
            self.mb.store.put(self.mb.update_key(r, self.name), enc.payload)
        self._uploaded = r
        self._status_soon("uploaded", r, f"{len(enc.payload)} bytes")

    def _finish_if_done(self) -> bool:
        server = self._check_server()
        if server is None or server.state != "done" or server.best_round is None:
            return False
        best = server.best_round
        part = self.candidates.get(best)
        if part is None:
            self._say(f"the selected round {best} is not one this site evaluated: no model part written")
        elif part:
            save_safetensors_to(self.state, f"model/site_{self.name}.safetensors", part)
            if self.model_dir is not None:
                save_safetensors(self.model_dir / f"site_{self.name}.safetensors", part)
        self.finished = True
        self._status("done", self.final_round or 0, f"selected round {best}")
        self._say(f"done: the server selected round {best}")
        return True

    def run(self, timeout: float = DEFAULT_SILENCE_TIMEOUT, poll_cap: float = 0.25) -> None:
        """Poll until the run ends. `timeout`: seconds without progress and without a heartbeat of the
        server (its status changing) before giving up; after HEARTBEAT_STALE seconds of silence the site
        says so."""
        poll_cap = self.mb.poll_cap(poll_cap)
        poller = Poller(cap=poll_cap)
        self.rare_checks_every = SERVER_STATUS_EVERY
        self._status("waiting", self.trained, "waiting for the global module")
        last, warned = time.monotonic(), False
        # When this site saw the newest global module: the next one is due about as long after it as it came
        # after the one before (the round's period, the same for every site), rather than after as long a
        # wait as this site's last, which is short when it trained last and long when it trained first.
        seen, seen_when = self.seen_global, None
        while not self.finished:
            seen_at = time.monotonic()
            if self.poll():
                due = None
                if self.seen_global != seen:
                    if seen_when is not None:
                        due = seen_at + AIM * (seen_at - seen_when)
                    seen, seen_when = self.seen_global, seen_at
                poller.reset(due, seen_at=seen_at)
                last, warned = time.monotonic(), False
                continue
            if time.monotonic() - self._server_checked > SERVER_STATUS_EVERY:
                self._server_checked = time.monotonic()
                self._check_server()
            self._flush_status()
            # In a secure round the server's next object follows this site's within moments: poll sooner.
            poller.cap = min(poll_cap, SECURE_POLL_CAP) if self.secure and self.secure.round else poll_cap
            silent = time.monotonic() - max(last, self._server_beat_at)
            if silent > min(HEARTBEAT_STALE, timeout) and not warned:
                warned = True
                log.warning("%s: %s", self.name, self._silence(silent))
            if silent > timeout:
                raise SiteFailure(
                    f"site {self.name}: {self._silence(silent)}; giving up after --silence-timeout "
                    f"{timeout:g} s (after round {self.trained}). Start it again with the same arguments once "
                    "the server runs: it continues from its state"
                )
            poller.sleep()

    def _silence(self, seconds: float) -> str:
        st = self._server_said
        said = (
            f"its status still says {st.state} round {st.round}"
            if st is not None
            else "it has no readable status"
        )
        return f"no heartbeat from the server for {seconds:.0f} s ({said})"


class SiteState(Body):
    """A site's checkpoint body (`SiteWorker._checkpoint`)."""

    run_id: str
    trained: int
    reported: int
    last_report: SiteReport | None  # the report it sends again: checked here too, not only as it went out
    recovered: Recovery | None
    secagg: dict | None = None  # secure aggregation's, checked where it is restored


def _check_state(body: dict, tensors) -> None:
    """CheckpointError naming what of a site's checkpoint is missing or of another type (its digest matched:
    written so by a bug, or by a hand that computed the digest again). `CheckpointStore` then takes the other
    slot, as for any damaged one (a traceback at every restart, when the report was checked only as it went
    out)."""
    parse_body(SiteState, body)
    expect_type(tensors, dict, "tensors.pt")
    expect_types(tensors, {"trainer": dict, "candidates": dict}, "tensors")
    for r, part in tensors["candidates"].items():
        if not isinstance(r, str) or not r.isdigit():
            raise CheckpointError(f"tensors.candidates has the key {shown(r)}, not a round number")
        tensor_map(part, f"tensors.candidates.{r}")
    if "memory" in tensors:
        tensor_map(tensors["memory"], "tensors.memory")
    if "pending" in tensors:
        expect_type(tensors["pending"], torch.Tensor, "tensors.pending")


def save_safetensors_to(store: ObjectStore, key: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    store.put(key, save({k: v.contiguous() for k, v in tensors.items()}))
