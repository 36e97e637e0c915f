"""Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017), one round, for an honest-but-curious server: the server learns the weighted sum of the
updates of the sites that stayed, and nothing about any one of them, even with up to t - 1 sites colluding.

The steps of round r, with U1 >= U2 >= U3 the sites still taking part after each:

0. each site derives fresh X25519 key pairs (one to encrypt shares, one to agree masks) and a self-mask seed
   b_u, and advertises the public keys and a commitment to b_u, signed with its identity key
   (`SiteRound.advertisement`). The server accepts only advertisements signed by the key the manifest holds
   for that site (`check_advertisement`) and publishes them (U1, `make_roster`).
1. each site checks every signature of the roster itself, splits the seeds of its mask key pair and of b_u
   into Shamir shares (threshold t), one for each site of the manifest, and seals the share of every site of
   U1 to it, its own share to itself (ChaCha20-Poly1305 under an X25519 key only the two agree, for its own
   one only it) (`share_bundle`). The server forwards to each site what was sealed to it, its own share
   included, and who shared: U2 (`make_inboxes`).
2. each site masks its update: y_u = x_u + PRG(b_u) + sum over v in U2 of +-PRG(s_uv) mod 2^k, s_uv agreed
   from the two mask keys, + when u comes before v in the manifest (`SiteRound.masks`, applied by the codec's
   secagg-mask stage). Pairwise masks cancel in the sum over U2.
3. the server fixes the survivors U3 (whose masked updates it has) (`make_survivors`); each site answers
   with its shares of b_u for u in U3 (its own share of its own b_u among them) and of the mask key seed for
   u in U2 - U3 (others only), never both for one site, and never a seed itself (`unmask_response`). From
   any t answers the server rebuilds those seeds, checks each against what its owner advertised, and
   computes the total to subtract: the survivors' self-masks and the dropped sites' pairwise masks with the
   survivors (`unmask_total`).

A site that drops after step 1 (even after uploading its masked update) does not spoil the round as long as
t sites answer step 3. Every derived secret comes from the site's per-run secret, the run, the round and the
site (HKDF), so a restarted site derives the same keys again. The consistency round of the paper's active
model is not implemented; with t > n/2 (enforced) a server that shows different survivors to different sites
still cannot gather t shares of both seeds of one honest site from honest sites alone: every answer, the
site's own about itself included, is one share, and a site answers one set of survivors only. (A site
that handed over its own b_u when told it survived, as this protocol once did, let such a server rebuild
its mask key from the others, told it dropped, and read its update.)"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FedMedClipError
from ..federation.messages import (
    SHARE_PLAINTEXT,
    Inbox,
    KeyAdvertisement,
    Roster,
    ShareBundle,
    Survivors,
    UnmaskShares,
    signed_bytes,
)
from . import primitives as P
from .identity import IdentityKey, public_key, verify

MAX_RECONSTRUCTION_TRIES = 64  # subsets of answers tried when some site sent a wrong share


class SecAggRefused(FedMedClipError):
    """A secure-aggregation object or step that breaks the protocol; the message names the party."""


def raw(text: str) -> bytes:
    return base64.b64decode(text)


def text(data: bytes) -> str:
    return base64.b64encode(data).decode()


def default_threshold(sites: int) -> int:
    """floor(n / 2) + 1: the smallest threshold above n / 2."""
    return sites // 2 + 1


@dataclass(frozen=True)
class SecureSettings:
    """What the run manifest fixes: the sites in manifest order (site i's shares are at x = i + 1), each
    one's registered identity key, and the threshold t (n/2 < t <= n)."""

    sites: tuple[str, ...]
    identities: Mapping[str, str]
    threshold: int
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        n = len(self.sites)
        if n < 2 or len(set(self.sites)) != n:
            raise SecAggRefused(
                f"secure aggregation needs two or more distinct sites, got {list(self.sites)}"
            )
        missing = [s for s in self.sites if s not in self.identities]
        if missing:
            raise SecAggRefused(
                f"no identity key is registered for {', '.join(missing)}: each site generates one "
                "(`fedmedclip site keygen`) and the operator adds its public key to the run"
            )
        for s in self.sites:
            public_key(self.identities[s], s)
        if not default_threshold(n) <= self.threshold <= n:
            raise SecAggRefused(
                f"the secure-aggregation threshold {self.threshold} must be above half the {n} sites and at "
                f"most {n} (default {default_threshold(n)})"
            )
        self._index.update({s: i for i, s in enumerate(self.sites)})

    def index(self, site: str) -> int:
        return self._index[site]

    def order(self, sites) -> list[str]:
        return sorted(sites, key=self._index.__getitem__)

    def check_identity(self, site: str, identity: IdentityKey) -> None:
        """A site refuses to start with a key other than the one registered for it."""
        if site not in self._index:
            raise SecAggRefused(f"{site} is not a site of this run")
        if identity.public != self.identities[site]:
            raise SecAggRefused(
                f"the identity key of {site} ({identity.public}) is not the one registered in the run "
                f"manifest ({self.identities[site]})"
            )


def pair_label(settings: SecureSettings, run_id: str, r: int, u: str, v: str) -> bytes:
    lo, hi = settings.order([u, v])
    return P.label("pairwise mask", run_id, r, lo, hi)


def share_label(run_id: str, r: int, sender: str, recipient: str) -> bytes:
    return P.label("sealed share", run_id, r, sender, recipient)


def self_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    return P.prg(P.hkdf(seed, P.label("self mask")), length, bits)


def self_commitment(seed: bytes) -> str:
    return text(P.commitment(seed, "self mask"))


def mask_public(seed: bytes) -> str:
    return text(P.public_bytes(P.x25519_from_seed(seed, "mask")))


def as_tensors(vector: np.ndarray, shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """A mask over every float value, in the module's tensor order, cut into its tensors (int64)."""
    out, at = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = torch.from_numpy(np.ascontiguousarray(vector[at : at + n])).reshape(shape)
        at += n
    if at != len(vector):
        raise ValueError(f"a mask of {len(vector)} values for tensors of {at}")
    return out


# ------------------------------------------------------------------ checks both sides run
def check_advertisement(
    settings: SecureSettings, run_id: str, r: int, site: str, adv: KeyAdvertisement
) -> None:
    """An advertisement `site` wrote for round r: labelled so, and signed by the key the manifest holds."""
    if site not in settings.identities:
        raise SecAggRefused(f"key advertisement from {site}: not a site of this run (no registered identity)")
    if (adv.run_id, adv.round, adv.site) != (run_id, r, site):
        raise SecAggRefused(
            f"key advertisement from {site} is labelled run {adv.run_id!r} round {adv.round} site "
            f"{adv.site!r}, expected run {run_id!r} round {r} site {site!r}"
        )
    if not verify(settings.identities[site], adv.signed_bytes(), raw(adv.signature)):
        raise SecAggRefused(
            f"key advertisement from {site}: the signature is not by the identity key registered for "
            f"{site}: forged or altered, refused"
        )
    # Signed by the site itself, yet a key no party can agree with: every other site's `agree` would raise.
    for name in ("cipher_key", "mask_key"):
        if not P.usable_public(raw(getattr(adv, name))):
            raise SecAggRefused(
                f"key advertisement from {site}: its {name} is a low-order X25519 point, with which no key can "
                "be agreed: refused"
            )


def verified_roster(
    settings: SecureSettings, run_id: str, r: int, roster: Roster
) -> dict[str, KeyAdvertisement]:
    """{site: advertisement} of a roster whose every entry is signed by its site's registered key, in
    manifest order, with at least t sites; SecAggRefused otherwise (the round cannot be trusted)."""
    if (roster.run_id, roster.round) != (run_id, r):
        raise SecAggRefused(f"the roster is labelled run {roster.run_id!r} round {roster.round}")
    out = {}
    for adv in roster.advertisements:
        if adv.site in out:
            raise SecAggRefused(f"the roster lists {adv.site} twice")
        check_advertisement(settings, run_id, r, adv.site, adv)
        out[adv.site] = adv
    if len(out) < settings.threshold:
        raise SecAggRefused(
            f"round {r}: only {len(out)} sites advertised keys, fewer than the threshold {settings.threshold}"
        )
    return {s: out[s] for s in settings.order(out)}


def _enough(settings: SecureSettings, what: str, sites) -> None:
    if len(sites) < settings.threshold:
        raise SecAggRefused(
            f"{what}: {len(sites)} sites ({', '.join(sites) or 'none'}), fewer than the threshold "
            f"{settings.threshold}: the round cannot be unmasked"
        )


# ------------------------------------------------------------------ a site's round
class SiteRound:
    """One site's part in one round. Stateless beyond its derived keys: every step takes the objects the
    server published (re-read after a restart)."""

    def __init__(self, settings: SecureSettings, run_id: str, r: int, site: str, run_secret: bytes):
        if site not in settings.identities:
            raise SecAggRefused(f"{site} is not a site of this run")
        self.settings, self.run_id, self.round, self.site = settings, run_id, r, site
        seed = lambda purpose: P.hkdf(run_secret, P.label(purpose, run_id, r, site), P.SEED_BYTES)  # noqa: E731
        self._cipher = P.x25519_from_seed(seed("cipher key seed"), "cipher")
        self._mask_seed = seed("mask key seed")
        self._mask = P.x25519_from_seed(self._mask_seed, "mask")
        self._self_seed = seed("self-mask seed")

    def advertisement(self, identity: IdentityKey) -> KeyAdvertisement:
        self.settings.check_identity(self.site, identity)
        fields = {
            "run_id": self.run_id,
            "round": self.round,
            "site": self.site,
            "cipher_key": text(P.public_bytes(self._cipher)),
            "mask_key": text(P.public_bytes(self._mask)),
            "self_mask_commitment": self_commitment(self._self_seed),
        }
        signature = identity.sign(signed_bytes(*fields.values()))
        return KeyAdvertisement.build(**fields, signature=text(signature))

    def _roster(self, roster: Roster) -> dict[str, KeyAdvertisement]:
        advs = verified_roster(self.settings, self.run_id, self.round, roster)
        mine = advs.get(self.site)
        if mine is None or (mine.cipher_key, mine.mask_key) != (
            text(P.public_bytes(self._cipher)),
            text(P.public_bytes(self._mask)),
        ):
            raise SecAggRefused(f"round {self.round}: the roster does not hold {self.site}'s own keys")
        return advs

    def share_bundle(self, roster: Roster) -> ShareBundle:
        """Shares of both seeds for every site of the manifest; those of the roster's sites sealed, this site's
        own to itself: the server keeps it with the others, and a restarted site reads it back from its inbox
        (the shares are random, so it could not derive the same again)."""
        advs = self._roster(roster)
        n, t = len(self.settings.sites), self.settings.threshold
        key_shares = P.split_secret(self._mask_seed, t, n)
        self_shares = P.split_secret(self._self_seed, t, n)
        sealed = {}
        for v, adv in advs.items():
            i = self.settings.index(v)
            aad = share_label(self.run_id, self.round, self.site, v)
            key = P.agree(self._cipher, raw(adv.cipher_key), aad)
            sealed[v] = text(P.seal(key, key_shares[i] + self_shares[i], aad))
        return ShareBundle.build(run_id=self.run_id, round=self.round, site=self.site, shares=sealed)

    def _inbox(self, roster: Roster, inbox: Inbox) -> tuple[dict[str, KeyAdvertisement], list[str]]:
        advs = self._roster(roster)
        if (inbox.run_id, inbox.round, inbox.site) != (self.run_id, self.round, self.site):
            raise SecAggRefused(f"the inbox of {self.site} is labelled for another run, round or site")
        senders = list(dict.fromkeys(inbox.senders))
        if (
            self.site not in senders
            or any(s not in advs for s in senders)
            or len(senders) != len(inbox.senders)
        ):
            raise SecAggRefused(
                f"round {self.round}: the sites that shared must be distinct sites of the roster, {self.site} among them"
            )
        _enough(self.settings, f"round {self.round}: sites that shared keys", senders)
        return advs, self.settings.order(senders)

    def opened_shares(self, roster: Roster, inbox: Inbox) -> dict[str, tuple[bytes, bytes]]:
        """{sender: (share of its mask key seed, share of its self-mask seed)} of every share that opens, this
        site's own included; one that does not (altered, or sealed to another key) is left out: this site then
        cannot help unmask that sender, which other sites can."""
        advs, senders = self._inbox(roster, inbox)
        out = {}
        for u in senders:
            sealed = inbox.shares.get(u)
            if sealed is None:
                continue
            aad = share_label(self.run_id, self.round, u, self.site)
            plain = P.open_sealed(P.agree(self._cipher, raw(advs[u].cipher_key), aad), raw(sealed), aad)
            if plain is not None and len(plain) == SHARE_PLAINTEXT:
                out[u] = (plain[: P.SEED_BYTES], plain[P.SEED_BYTES :])
        return out

    def masks(self, roster: Roster, inbox: Inbox, length: int, bits: int) -> np.ndarray:
        """This site's mask over `length` values in Z_(2^bits): its self-mask plus +-its pairwise mask with
        every other site that shared (U2)."""
        advs, senders = self._inbox(roster, inbox)
        total = P.RingSum(length, bits)
        total.add(self_mask(self._self_seed, length, bits))
        me = self.settings.index(self.site)
        for v in senders:
            if v == self.site:
                continue
            key = P.agree(
                self._mask,
                raw(advs[v].mask_key),
                pair_label(self.settings, self.run_id, self.round, self.site, v),
            )
            total.add(P.prg(key, length, bits), 1 if me < self.settings.index(v) else -1)
        return total.value()

    def unmask_response(self, roster: Roster, inbox: Inbox, survivors: Survivors) -> UnmaskShares:
        """Shares of the survivors' self-mask seeds (this site's own share of its own among them) and of the
        dropped sites' mask key seeds; one share each, never a seed. The caller keeps the survivors it
        answered and never answers other survivors of the same round."""
        _, senders = self._inbox(roster, inbox)
        survived = check_survivors(self.settings, self.run_id, self.round, senders, survivors)
        opened = self.opened_shares(roster, inbox)
        return UnmaskShares.build(
            run_id=self.run_id,
            round=self.round,
            site=self.site,
            self_mask={u: text(opened[u][1]) for u in survived if u in opened},
            mask_key={
                u: text(opened[u][0]) for u in senders if u not in survived and u != self.site and u in opened
            },
        )


def check_survivors(
    settings: SecureSettings, run_id: str, r: int, shared: list[str], survivors: Survivors
) -> list[str]:
    if (survivors.run_id, survivors.round) != (run_id, r):
        raise SecAggRefused(f"the survivors are labelled run {survivors.run_id!r} round {survivors.round}")
    if settings.order(set(shared)) != settings.order(set(survivors.shared)) or len(survivors.shared) != len(
        shared
    ):
        raise SecAggRefused(f"round {r}: the survivors name other sites as having shared than the inbox did")
    survived = list(dict.fromkeys(survivors.survivors))
    if len(survived) != len(survivors.survivors) or any(s not in shared for s in survived):
        raise SecAggRefused(f"round {r}: the survivors must be distinct sites that shared")
    _enough(settings, f"round {r}: survivors", survived)
    return settings.order(survived)


# ------------------------------------------------------------------ the server's round
def make_roster(
    settings: SecureSettings,
    run_id: str,
    r: int,
    accepted: dict[str, KeyAdvertisement],
    steps: dict[str, float],
) -> Roster:
    """The accepted advertisements (each already `check_advertisement`ed), in manifest order: U1; and the
    round's public quantisation steps (fedmedclip/codec/secure.py)."""
    sites = settings.order(accepted)
    _enough(settings, f"round {r}: sites that advertised keys", sites)
    return Roster.build(
        run_id=run_id, round=r, advertisements=[accepted[s].to_dict() for s in sites], steps=steps
    )


def check_bundle(settings: SecureSettings, roster: Roster, site: str, bundle: ShareBundle) -> None:
    """A share bundle from `site`: labelled so, from a site of the roster, one share for each site of it
    (its own to itself)."""
    if (bundle.run_id, bundle.round, bundle.site) != (roster.run_id, roster.round, site):
        raise SecAggRefused(
            f"shares from {site} are labelled run {bundle.run_id!r} round {bundle.round} site {bundle.site!r}"
        )
    listed = [a.site for a in roster.advertisements]
    if site not in listed:
        raise SecAggRefused(f"shares from {site}, which is not in the round's roster")
    want = sorted(listed)
    if sorted(bundle.shares) != want:
        raise SecAggRefused(
            f"shares from {site} are addressed to {sorted(bundle.shares)}, the roster's sites are {want}"
        )


def make_inboxes(
    settings: SecureSettings, roster: Roster, bundles: dict[str, ShareBundle]
) -> dict[str, Inbox]:
    """For each site that shared (U2), the shares sealed to it by every site of U2, its own included."""
    shared = settings.order(bundles)
    _enough(settings, f"round {roster.round}: sites that shared keys", shared)
    return {
        v: Inbox.build(
            run_id=roster.run_id,
            round=roster.round,
            site=v,
            senders=shared,
            shares={u: bundles[u].shares[v] for u in shared},
        )
        for v in shared
    }


def make_survivors(
    settings: SecureSettings, run_id: str, r: int, shared: list[str], masked: list[str]
) -> Survivors:
    """U3: the sites of U2 whose masked updates the server accepted."""
    survived = settings.order(s for s in set(masked) if s in shared)
    _enough(settings, f"round {r}: masked updates", survived)
    return Survivors.build(run_id=run_id, round=r, shared=settings.order(shared), survivors=survived)


def check_unmask(settings: SecureSettings, survivors: Survivors, site: str, answer: UnmaskShares) -> None:
    """An answer from `site`: labelled so, from a site that shared, only shares the survivors ask for
    (self-mask shares of survivors, its own among them, key shares of the others that dropped), never both for
    one site."""
    if (answer.run_id, answer.round, answer.site) != (survivors.run_id, survivors.round, site):
        raise SecAggRefused(f"unmasking shares from {site} are labelled for another run, round or site")
    if site not in survivors.shared:
        raise SecAggRefused(f"unmasking shares from {site}, which did not share keys this round")
    survived = set(survivors.survivors)
    dropped = set(survivors.shared) - survived
    if not set(answer.self_mask) <= survived or not set(answer.mask_key) <= dropped - {site}:
        raise SecAggRefused(f"unmasking shares from {site} name sites the survivors do not ask about")


def _subsets(xs: list[int], t: int):
    """Subsets of t of the answers' x, in the order to try them: the first t; then, for one wrong share
    wherever it is, the first t without each answer in turn; then the others in lexicographic order (whose
    first ones all hold the first answer when there are many), MAX_RECONSTRUCTION_TRIES in all at most."""
    leave_one_out = ([x for x in xs if x != left][:t] for left in xs)
    ordered = itertools.chain([xs[:t]], leave_one_out, (list(c) for c in itertools.combinations(xs, t)))
    seen = set()
    for subset in ordered:
        if len(subset) == t and tuple(subset) not in seen:
            seen.add(tuple(subset))
            yield subset
            if len(seen) == MAX_RECONSTRUCTION_TRIES:
                return


def _rebuild(
    settings: SecureSettings, owner: str, what: str, shares: dict[int, bytes], public, expected
) -> bytes:
    """The seed of `owner` from {x: share} whose `public(seed)` is what the owner advertised (`expected`);
    other subsets of t shares are tried when some site sent a wrong share."""
    t = settings.threshold
    if len(shares) < t:
        raise SecAggRefused(
            f"only {len(shares)} shares of {owner}'s {what} arrived, the threshold is {t}: the round cannot be unmasked"
        )
    for subset in _subsets(sorted(shares), t):
        seed = P.combine_secret({x: shares[x] for x in subset})
        if public(seed) == expected:
            return seed
    raise SecAggRefused(
        f"the shares of {owner}'s {what} do not rebuild the seed it advertised: some site sent a wrong share"
    )


def unmask_total(
    settings: SecureSettings,
    roster: Roster,
    survivors: Survivors,
    answers: dict[str, UnmaskShares],
    length: int,
    bits: int,
) -> np.ndarray:
    """What to subtract from the sum of the survivors' masked updates: their self-masks, and the pairwise
    masks between them and the sites that shared but dropped."""
    advs = {a.site: a for a in roster.advertisements}
    run_id, r = roster.run_id, roster.round
    total = P.RingSum(length, bits)
    survived = settings.order(survivors.survivors)
    dropped = settings.order(set(survivors.shared) - set(survived))
    for u in survived:
        shares = {settings.index(s) + 1: raw(a.self_mask[u]) for s, a in answers.items() if u in a.self_mask}
        seed = _rebuild(settings, u, "self-mask seed", shares, self_commitment, advs[u].self_mask_commitment)
        total.add(self_mask(seed, length, bits))
    for u in dropped:
        shares = {settings.index(s) + 1: raw(a.mask_key[u]) for s, a in answers.items() if u in a.mask_key}
        seed = _rebuild(settings, u, "mask key seed", shares, mask_public, advs[u].mask_key)
        key_u = P.x25519_from_seed(seed, "mask")
        for v in survived:
            stream = P.prg(
                P.agree(key_u, raw(advs[v].mask_key), pair_label(settings, run_id, r, u, v)), length, bits
            )
            # v added +stream when v comes before u in the manifest, -stream otherwise.
            total.add(stream, 1 if settings.index(v) < settings.index(u) else -1)
    return total.value()
