"""Secure aggregation's core, every party in this process: the protocol of fedmedclip/secagg driven round by
round with real keys (Ed25519, X25519), real Shamir shares and real ChaCha20 masks, through the secure form of
the 4-bit codec. The unmasked aggregate equals the plain weighted aggregate of the same updates (with every
site, with a site dropping after its masked upload, with one dropping before it), a stored masked payload
is uniform bytes, and forged or unregistered keys, wrong shares and too few answers are refused."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import torch
from aggregation_oracle import weighted_mean
from scipy.stats import chisquare

from fedmedclip.codec import CodecError, encode, get_codec, template_of
from fedmedclip.codec.secure import (
    decode_masked_sum,
    grid_levels,
    initial_steps,
    modulus_bits,
    next_steps,
    secure_codec,
)
from fedmedclip.codec.wire import unpack
from fedmedclip.errors import ConfigError
from fedmedclip.federation.messages import (
    KeyAdvertisement,
    MessageRefused,
    ShareBundle,
    UnmaskShares,
    parse,
)
from fedmedclip.federation.secure import SecureRun
from fedmedclip.secagg.identity import IdentityKey
from fedmedclip.secagg.primitives import random_secret
from fedmedclip.secagg.protocol import (
    SecAggRefused,
    SecureSettings,
    SiteRound,
    check_advertisement,
    check_bundle,
    check_unmask,
    make_inboxes,
    make_roster,
    make_survivors,
    unmask_total,
)

RUN = "run-sa"
BASE = "delta-ef-q4-zlib"
COUNTS = {"site_0": 30, "site_1": 50, "site_2": 20, "site_3": 40, "site_4": 60}
SITES = list(COUNTS)
BOUND = 0.5  # the updates below have norm about 0.4: honest ones are not clipped
STEPS = {BASE: 2e-3, "int8-zlib": 2e-4}


def _reference(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(48, 32, generator=g) * 0.1,
        "fc1.bias": torch.randn(48, generator=g) * 0.1,
        "bn.num_batches_tracked": torch.tensor(7),
    }


def _update(reference, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return {
        n: (v + torch.randn(v.shape, generator=g) * 1e-2 if v.is_floating_point() else v.clone())
        for n, v in reference.items()
    }


@pytest.fixture(scope="module")
def identities() -> dict[str, IdentityKey]:
    return {s: IdentityKey.generate() for s in SITES}


def _settings(identities, threshold=3) -> SecureSettings:
    return SecureSettings(tuple(SITES), {s: k.public for s, k in identities.items()}, threshold)


class Round:
    """One secure round over a dict standing in for the mailbox: every message goes through its bytes."""

    def __init__(self, identities, *, r=1, threshold=3, steps=None, base=BASE, reference=None):
        self.identities, self.r = identities, r
        self.reference = _reference() if reference is None else reference
        self.template = template_of(self.reference)
        total = sum(COUNTS.values())
        weights = {s: c / total for s, c in COUNTS.items()}
        self.run = SecureRun.create(
            _settings(identities, threshold), get_codec(base), weights, BOUND, self.template
        )
        # Steps at which no weighted value of these updates (sd 1e-2, weights <= 0.3) reaches +-L: the
        # 4-bit codec over 5 sites leaves L = 6, int8 L = 102.
        self.steps = steps or {n: STEPS[base] for n, _ in self.run.shapes}
        self.sites = {s: SiteRound(self.run.settings, RUN, r, s, random_secret()) for s in SITES}

    def keys(self, sites=SITES):
        accepted = {}
        for s in sites:
            adv = self.sites[s].advertisement(self.identities[s])
            adv = parse(KeyAdvertisement, adv.to_bytes(), s)
            check_advertisement(self.run.settings, RUN, self.r, s, adv)
            accepted[s] = adv
        self.roster = make_roster(self.run.settings, RUN, self.r, accepted, self.steps)
        return self.roster

    def share(self, sites=SITES):
        bundles = {}
        for s in sites:
            b = self.sites[s].share_bundle(self.roster)
            b = parse(ShareBundle, b.to_bytes(), s)
            check_bundle(self.run.settings, self.roster, s, b)
            bundles[s] = b
        self.inboxes = make_inboxes(self.run.settings, self.roster, bundles)
        self.shared = list(self.inboxes)

    def mask(self, site, update):
        inputs = self.run.site_inputs(self.sites[site], self.roster, self.inboxes[site])
        meta = {"run_id": RUN, "round": self.r, "site": site}
        enc = self.run.codec.encode(update, reference=self.reference, meta=meta, inputs=inputs)
        return enc.payload, inputs

    def unmasked_own(self, payload, inputs):
        """What the site itself can decode of its payload (it knows its mask): the plain value it sent."""
        _, header, body = unpack(payload)
        return self.run.codec.decode(
            header, body, reference=self.reference, template=self.template, cap=1 << 24, inputs=inputs
        ).state

    def unmask(self, payloads, answering):
        survivors = make_survivors(self.run.settings, RUN, self.r, self.shared, list(payloads))
        answers = {}
        for s in answering:
            a = self.sites[s].unmask_response(self.roster, self.inboxes[s], survivors)
            a = parse(UnmaskShares, a.to_bytes(), s)
            check_unmask(self.run.settings, survivors, s, a)
            answers[s] = a
        return self.aggregate(payloads, self.total(survivors, answers))

    def total(self, survivors, answers):
        """The unmasking total the server rebuilds from the answers."""
        return unmask_total(
            self.run.settings, self.roster, survivors, answers, self.run.length, self.run.bits
        )

    def aggregate(self, payloads, total):
        return decode_masked_sum(
            self.run.codec,
            payloads,
            unmask=self.run.masks(total),
            weights={s: self.run.weights[s] for s in payloads},
            steps=self.steps,
            reference=self.reference,
            template=self.template,
            cap=1 << 24,
        )


def _secure_round(identities, *, masked=SITES, answering=SITES, base=BASE):
    rd = Round(identities, base=base)
    rd.keys()
    rd.share()
    updates = {s: _update(rd.reference, i) for i, s in enumerate(SITES)}
    payloads, own = {}, {}
    for s in masked:
        payloads[s], inputs = rd.mask(s, updates[s])
        own[s] = rd.unmasked_own(payloads[s], inputs)
    decoded, sums = rd.unmask(payloads, answering)
    return rd, updates, own, decoded, sums


def _assert_matches_plain(rd, updates, own, decoded, present):
    weights = {s: rd.run.weights[s] for s in present}
    # Exactly the plain weighted mean of what each site sent (up to float rounding) ...
    plain = weighted_mean({s: own[s] for s in present}, weights)
    for n, v in plain.items():
        assert torch.allclose(decoded.state[n], v, atol=1e-6), n
    # ... and the plain weighted mean of the raw updates to the quantisation step: each site's rounding is at
    # most half a step of its weighted value, the sum's at most n half-steps, over the weights' sum.
    raw = weighted_mean({s: updates[s] for s in present}, weights)
    tol = len(present) * rd.steps["fc1.weight"] / 2 / sum(weights.values()) + 1e-6
    for n, v in raw.items():
        err = float((decoded.state[n] - v).abs().max())
        assert err <= tol, (n, err, tol)
        assert err > 0  # it is quantised, not the plain values in disguise
    assert torch.equal(decoded.state["bn.num_batches_tracked"], rd.reference["bn.num_batches_tracked"])


@pytest.mark.parametrize("base", [BASE, "int8-zlib"])
def test_secure_aggregate_equals_plain_aggregate_with_every_site(identities, base):
    rd, updates, own, decoded, sums = _secure_round(identities, base=base)
    _assert_matches_plain(rd, updates, own, decoded, SITES)
    # The integer sums never wrapped: each site's integers lie in [-L, L] and n L < 2^(k-1).
    levels = grid_levels(rd.run.bits, len(SITES))
    assert all(int(s.abs().max()) <= len(SITES) * levels < 2 ** (rd.run.bits - 1) for s in sums.values())


def test_a_site_dropping_after_its_masked_upload_does_not_spoil_the_round(identities):
    """site_2 uploads its masked update and is gone before unmasking: the others' shares rebuild its self-mask
    seed, and its update is in the aggregate."""
    rd, updates, own, decoded, _ = _secure_round(
        identities, answering=["site_0", "site_1", "site_3", "site_4"]
    )
    _assert_matches_plain(rd, updates, own, decoded, SITES)


def test_a_site_dropping_before_its_masked_upload_is_left_out_exactly(identities):
    """site_1 shared its seeds and never uploaded: its pairwise masks are rebuilt and removed, and the
    aggregate is the others' weighted mean, weights renormalised over them."""
    present = ["site_0", "site_2", "site_3", "site_4"]
    rd, updates, own, decoded, _ = _secure_round(identities, masked=present, answering=present)
    _assert_matches_plain(rd, updates, own, decoded, present)


def test_a_stored_masked_update_is_indistinguishable_from_uniform_bytes(identities):
    """A chi-square test on the body's bytes: uniform for the masked payload; the same update without the
    mask (the same integers, packed the same way) is far from uniform, so the test has power."""
    rd = Round(identities, reference={"w": torch.zeros(40_000)}, steps={"w": 2e-3})
    rd.keys()
    rd.share()
    update = {"w": torch.randn(40_000, generator=torch.Generator().manual_seed(3)) * 1e-2}
    payload, inputs = rd.mask("site_0", update)
    _, header, body = unpack(payload)
    assert len(body) == -(-40_000 * rd.run.bits // 8)  # k bits per value, nothing compressible left
    counts = np.bincount(np.frombuffer(body, dtype=np.uint8), minlength=256)
    assert chisquare(counts).pvalue > 1e-4
    inputs["secagg-mask"] = {"w": torch.zeros(40_000, dtype=torch.int64)}
    plain = rd.run.codec.encode(update, reference=rd.reference, inputs=inputs).payload
    counts = np.bincount(np.frombuffer(unpack(plain)[2], dtype=np.uint8), minlength=256)
    assert chisquare(counts).pvalue < 1e-12


def test_a_forged_key_advertisement_is_refused_by_the_server_and_the_sites(identities):
    rd = Round(identities)
    honest = rd.sites["site_1"].advertisement(identities["site_1"])
    # Someone with write access to the bucket swaps in their own mask key: the signature no longer holds.
    forged = honest.model_copy(
        update={"mask_key": rd.sites["site_2"].advertisement(identities["site_2"]).mask_key}
    )
    with pytest.raises(SecAggRefused, match="site_1.*not by the identity key registered"):
        check_advertisement(rd.run.settings, RUN, 1, "site_1", forged)
    # Or replays it for another round or as another site.
    with pytest.raises(SecAggRefused, match="labelled run"):
        check_advertisement(rd.run.settings, RUN, 2, "site_1", honest)
    with pytest.raises(SecAggRefused, match="labelled"):
        check_advertisement(rd.run.settings, RUN, 1, "site_3", honest)
    # A roster that carries it (a server that does not check) is refused by every site.
    advs = {s: rd.sites[s].advertisement(identities[s]) for s in SITES}
    advs["site_1"] = forged
    roster = type(rd.keys()).model_construct(run_id=RUN, round=1, advertisements=list(advs.values()))
    with pytest.raises(SecAggRefused, match="site_1"):
        rd.sites["site_0"].share_bundle(roster)


def test_a_site_whose_identity_key_is_not_in_the_manifest_is_refused(identities):
    rd = Round(identities)
    stranger = IdentityKey.generate()
    # The site itself refuses to advertise with a key other than its registered one ...
    with pytest.raises(SecAggRefused, match="not the one registered"):
        rd.sites["site_2"].advertisement(stranger)
    # ... and an advertisement signed with it is refused by the server.
    adv = rd.sites["site_2"].advertisement(identities["site_2"])
    resigned = adv.model_copy(
        update={"signature": base64.b64encode(stranger.sign(adv.signed_bytes())).decode()}
    )
    with pytest.raises(SecAggRefused, match="not by the identity key registered for site_2"):
        check_advertisement(rd.run.settings, RUN, 1, "site_2", resigned)
    # A party that is no site of the run at all.
    with pytest.raises(SecAggRefused, match="not a site of this run"):
        check_advertisement(rd.run.settings, RUN, 1, "site_9", adv)
    with pytest.raises(SecAggRefused, match="no identity key is registered for site_3"):
        SecureSettings(tuple(SITES), {s: identities[s].public for s in SITES[:3]}, 3)


def test_unmasking_survives_a_wrong_share_and_refuses_too_few(identities):
    rd = Round(identities)
    rd.keys()
    rd.share()
    updates = {s: _update(rd.reference, i) for i, s in enumerate(SITES)}
    payloads = {s: rd.mask(s, updates[s])[0] for s in SITES}
    survivors = make_survivors(rd.run.settings, RUN, 1, rd.shared, SITES)
    answers = {s: rd.sites[s].unmask_response(rd.roster, rd.inboxes[s], survivors) for s in SITES}
    honest = rd.total(survivors, answers)
    # site_0 is gone after its upload, and site_1 lies about its share of site_0's self-mask seed: every
    # subset of t shares holding the lie rebuilds a seed that misses site_0's commitment, and the one without
    # it rebuilds the right seed.
    del answers["site_0"]
    liar = dict(answers["site_1"].self_mask, site_0=base64.b64encode(bytes(16)).decode())
    answers["site_1"] = answers["site_1"].model_copy(update={"self_mask": liar})
    total = rd.total(survivors, answers)
    assert np.array_equal(total, honest)
    rd.aggregate(payloads, total)
    # With no subset left without the lie, the round is refused, naming whose seed cannot be rebuilt.
    del answers["site_4"]
    with pytest.raises(SecAggRefused, match="shares of site_0's self-mask seed do not rebuild"):
        rd.total(survivors, answers)
    # Fewer answers than the threshold: refused.
    del answers["site_2"]
    with pytest.raises(SecAggRefused, match="only 2 shares of site_0's self-mask seed.*threshold is 3"):
        rd.total(survivors, answers)
    # A site never hands over both seeds of one site: an answer asking for a survivor's key seed is refused.
    greedy = answers["site_1"].model_copy(update={"mask_key": {"site_0": liar["site_0"]}})
    with pytest.raises(SecAggRefused, match="name sites the survivors do not ask about"):
        check_unmask(rd.run.settings, survivors, "site_1", greedy)


def test_a_server_showing_different_survivors_cannot_unmask_one_site(identities):
    """The active server the consistency round would stop: it tells site_0 and site_1 that site_0 survived and
    the three others (the threshold) that site_0 dropped. site_0's answer is a share, never its seed (once it
    handed over its own self-mask seed here, and the others' shares of its mask key then gave its update away):
    the server rebuilds site_0's mask key, as for a site that dropped, but not its self-mask seed, which still
    hides its update. With t > n/2 no split of the sites gives the threshold on both sides."""
    rd = Round(identities)
    rd.keys()
    rd.share()
    told_survived = make_survivors(rd.run.settings, RUN, 1, rd.shared, SITES)
    told_dropped = make_survivors(rd.run.settings, RUN, 1, rd.shared, SITES[1:])
    answers = {
        s: rd.sites[s].unmask_response(
            rd.roster, rd.inboxes[s], told_survived if s in SITES[:2] else told_dropped
        )
        for s in SITES
    }
    assert set(json.loads(answers["site_0"].to_bytes())) == {
        "run_id",
        "round",
        "site",
        "self_mask",
        "mask_key",
    }
    assert [s for s, a in answers.items() if "site_0" in a.self_mask] == ["site_0", "site_1"]
    assert [s for s, a in answers.items() if "site_0" in a.mask_key] == SITES[2:]
    with pytest.raises(
        SecAggRefused, match="only 2 shares of site_0's self-mask seed arrived, the threshold is 3"
    ):
        rd.total(told_survived, answers)


def test_with_three_sites_a_survivor_silent_at_unmasking_does_not_spoil_the_round(identities):
    """Threshold 2 of 3: every survivor's self-mask seed is rebuilt from the two that answer, each answering
    with its own share of its own seed too (a site's share of itself comes back to it in its inbox, sealed to
    itself, so a restarted site still has it)."""
    three = {s: identities[s] for s in SITES[:3]}
    settings = SecureSettings(tuple(three), {s: k.public for s, k in three.items()}, 2)
    rounds = {s: SiteRound(settings, RUN, 1, s, random_secret()) for s in three}
    accepted = {}
    for s, site in rounds.items():
        accepted[s] = site.advertisement(three[s])
        check_advertisement(settings, RUN, 1, s, accepted[s])
    roster = make_roster(settings, RUN, 1, accepted, {})
    bundles = {}
    for s, site in rounds.items():
        bundles[s] = site.share_bundle(roster)
        check_bundle(settings, roster, s, bundles[s])
    inboxes = make_inboxes(settings, roster, bundles)
    updates = {s: np.random.default_rng(k).integers(0, 256, 32) for k, s in enumerate(three)}
    masked = {s: (updates[s] + rounds[s].masks(roster, inboxes[s], 32, 8)) % 256 for s in three}
    survivors = make_survivors(settings, RUN, 1, list(three), list(three))
    answers = {}
    for s in SITES[:2]:  # site_2 uploaded its masked update, then fell silent
        answers[s] = rounds[s].unmask_response(roster, inboxes[s], survivors)
        check_unmask(settings, survivors, s, answers[s])
    total = unmask_total(settings, roster, survivors, answers, 32, 8)
    assert np.array_equal((sum(masked.values()) - total) % 256, sum(updates.values()) % 256)


def test_one_wrong_share_anywhere_among_many_answers_is_passed_over():
    """Ten answers at threshold 6: the first 64 subsets in lexicographic order all hold the first answer, so a
    liar there failed the round; the subsets without each answer in turn come first now, whichever one lies."""
    from fedmedclip.secagg import primitives as P
    from fedmedclip.secagg.protocol import _rebuild, self_commitment

    sites = tuple(f"site_{k}" for k in range(10))
    settings = SecureSettings(sites, {s: IdentityKey.generate().public for s in sites}, 6)
    seed = bytes(range(1, 17))  # a 16-byte seed, as every secret a site shares
    shares = {x + 1: share for x, share in enumerate(P.split_secret(seed, 6, 10))}
    for liar in (1, 5, 10):
        lied = {**shares, liar: bytes(16)}
        assert (
            _rebuild(settings, "site_0", "self-mask seed", lied, self_commitment, self_commitment(seed))
            == seed
        )


def test_a_wrapped_or_wrongly_masked_sum_is_refused(identities):
    """A site that masks with something else (or sends integers outside its range) makes the unmasked sum
    garbage: integers beyond what n sites' values in [-L, L] can sum to. It is refused, never published."""
    rd = Round(identities)
    rd.keys()
    rd.share()
    payloads = {s: rd.mask(s, _update(rd.reference, i))[0] for i, s in enumerate(SITES)}
    magic, header, body = unpack(payloads["site_2"])
    noise = np.random.default_rng(0).integers(0, 256, len(body), dtype=np.uint8).tobytes()
    hb = json.dumps(header).encode()
    payloads["site_2"] = magic + struct.pack("<I", len(hb)) + hb + noise[:-1] + b"\x00"
    survivors = make_survivors(rd.run.settings, RUN, 1, rd.shared, SITES)
    answers = {s: rd.sites[s].unmask_response(rd.roster, rd.inboxes[s], survivors) for s in SITES}
    total = rd.total(survivors, answers)
    with pytest.raises(
        CodecError, match="unmasked sum has .* values beyond the \\+-30 that 5 sites' integers"
    ):
        rd.aggregate(payloads, total)


def test_a_payload_on_another_grid_or_weight_is_refused_naming_its_site(identities):
    rd = Round(identities)
    rd.keys()
    rd.share()
    payloads = {s: rd.mask(s, _update(rd.reference, i))[0] for i, s in enumerate(SITES)}
    rd.run.weights["site_1"] *= 2  # the site claimed another weight than the manifest gives it
    with pytest.raises(CodecError, match="masked update of site_1: coded on grid"):
        rd.aggregate(payloads, np.zeros(rd.run.length, dtype=np.int64))
    plain = encode(_update(rd.reference, 0), BASE, reference=rd.reference).payload
    with pytest.raises(CodecError, match="masked update of site_0: payload is coded with 'delta-ef-q4-zlib'"):
        rd.aggregate({**payloads, "site_0": plain}, np.zeros(rd.run.length, dtype=np.int64))


def test_ring_sizes_and_the_public_grid():
    """k = b + ceil(log2 n) - 1 for the 4-bit codec: FedMedCLIP's FAM at ViT-B/32 width (525,312 values)
    over 10 sites is 460 kB masked; the grid gets finer after an all-zero round and follows the aggregate."""
    assert [(modulus_bits(4, n), grid_levels(modulus_bits(4, n), n)) for n in (3, 10, 30)] == [
        (5, 5),
        (7, 6),
        (8, 4),
    ]
    assert -(-525_312 * modulus_bits(4, 10) // 8) == 459_648
    # More sites than the ring holds at float width (k = 16 + 10 - 1 > 24): refused by name.
    with pytest.raises(CodecError, match="ring needs 2..24 bits, got 25"):
        secure_codec(get_codec("fp32-zlib"), sites=600, bound=1.0)
    template = {"w": ((100,), "float32")}
    s0 = initial_steps(template, bound=1.0, sites=4, levels=6)
    assert s0["w"] == pytest.approx(3 * 1.0 / 4096 / (6 * 10 * 2))
    assert next_steps(s0, {"w": torch.zeros(100)}, 1.0, 4, 6)["w"] == pytest.approx(s0["w"] / 16)
    published = {"w": torch.full((100,), 0.02)}
    assert next_steps({"w": 1e-3}, published, 0.5, 4, 6)["w"] == pytest.approx(3 * 0.02 * 0.5 / (6 * 2))
    # Every site clamped at L in the same direction (the sum of integers is n L everywhere): 16 times coarser.
    clamped = {"w": torch.full((100,), 4 * 6 * 1e-4)}
    assert next_steps({"w": 1e-4}, clamped, 1.0, 4, 6)["w"] == pytest.approx(1.6e-3)


def test_a_site_clips_its_update_to_the_bound_and_keeps_the_rest_in_its_error_feedback(identities):
    """An update four times the bound leaves the site clipped to it (what the server can sum is bounded),
    and what clipping and rounding left out is the site's error-feedback memory: sent later, never lost."""
    rd = Round(identities)
    rd.keys()
    rd.share()
    delta = {"fc1.weight": torch.full((48, 32), 1.0), "fc1.bias": torch.full((48,), 1.0)}
    norm = float(torch.sqrt(sum((v**2).sum() for v in delta.values())))
    delta = {n: v * (4 * BOUND / norm) for n, v in delta.items()}
    update = {**{n: rd.reference[n] + v for n, v in delta.items()}, "bn.num_batches_tracked": torch.tensor(7)}
    m = rd.sites["site_4"].masks(rd.roster, rd.inboxes["site_4"], rd.run.length, rd.run.bits)
    inputs = {
        "fixed-point": {"weight": rd.run.weights["site_4"], "steps": {n: 1e-3 for n in delta}},
        "secagg-mask": rd.run.masks(m),
    }
    enc = rd.run.codec.encode(update, reference=rd.reference, inputs=inputs)
    sent = rd.unmasked_own(enc.payload, inputs)
    sent_delta = {n: sent[n] - rd.reference[n] for n in delta}
    sent_norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in sent_delta.values())))
    rounding = (rd.run.length**0.5) * 1e-3 / 2 / rd.run.weights["site_4"]  # half a step per value, unweighted
    assert BOUND * 0.9 <= sent_norm <= BOUND + rounding
    for n, v in delta.items():
        assert torch.allclose(sent_delta[n] + enc.memory[n], v, atol=1e-5), n


def test_an_identity_key_is_kept_private_at_the_site_and_never_overwritten(tmp_path):
    key = IdentityKey.generate()
    path = tmp_path / "site_0" / "identity.pem"
    key.save(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert IdentityKey.load(path).public == key.public
    with pytest.raises(ConfigError, match="never overwritten"):
        IdentityKey.generate().save(path)
    assert IdentityKey.load(path).public == key.public
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        IdentityKey.load(tmp_path / "bad.pem")
    with pytest.raises(ConfigError, match="must read 'ed25519:<base64>'"):
        SecureSettings(tuple(SITES[:3]), {"site_0": key.public, "site_1": "rsa:xyz", "site_2": key.public}, 2)


def test_protocol_objects_are_parsed_against_their_declaration(identities):
    """What another party wrote is parsed against the one declaration its writer used: keys of the wrong
    length, unknown fields and oversized objects are refused naming the kind and the party."""
    rd = Round(identities)
    adv = rd.sites["site_1"].advertisement(identities["site_1"]).to_dict()
    short = {**adv, "mask_key": base64.b64encode(bytes(31)).decode()}
    with pytest.raises(MessageRefused, match="secagg_key_advertisement from site_1 refused: mask_key"):
        parse(KeyAdvertisement, json.dumps(short).encode(), "site_1")
    with pytest.raises(MessageRefused, match="note: extra inputs are not permitted"):
        parse(KeyAdvertisement, json.dumps({**adv, "note": "hi"}).encode(), "site_1")
    with pytest.raises(MessageRefused, match="secagg_shares from site_2 takes .* over its limit"):
        parse(ShareBundle, b" " * (ShareBundle.max_bytes + 1), "site_2")


def test_a_zero_length_identity_file_left_by_a_killed_keygen_is_replaced_by_a_working_key(tmp_path):
    """Older code created the key file, then wrote it: a kill in between left an empty file that every restart
    refused. Nothing can have been read from it, so the next start that creates the key replaces it."""
    from fedmedclip.secagg.identity import site_identity, verify

    path = tmp_path / ".fedmedclip-state" / "identity.pem"
    path.parent.mkdir()
    path.write_bytes(b"")
    key, created = site_identity(path, create=True)
    assert created and (path.stat().st_mode & 0o777) == 0o600
    assert IdentityKey.load(path).public == key.public
    assert verify(key.public, b"round 1", IdentityKey.load(path).sign(b"round 1"))
    again, created = site_identity(path, create=True)
    assert again.public == key.public and not created
    assert sorted(p.name for p in path.parent.iterdir()) == ["identity.pem"]  # no temporary file left
    empty = tmp_path / "other" / "identity.pem"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=f"the identity key {empty} is empty"):
        site_identity(empty)  # without `create` it is only named


def test_a_non_empty_identity_file_that_is_not_a_key_is_refused_naming_it_and_kept(tmp_path):
    """Half a key (a kill mid-write of older code) or anything else: it may be a key a server has registered,
    so it is never replaced; the message names the file and says what to do."""
    from fedmedclip.secagg.identity import site_identity

    path = tmp_path / "identity.pem"
    half = IdentityKey.generate().to_pem()[:40]
    path.write_bytes(half)
    for create in (True, False):
        with pytest.raises(ConfigError, match="never replaced automatically") as err:
            site_identity(path, create=create)
        assert str(path) in str(err.value) and "not an unencrypted PEM private key" in str(err.value)
    assert path.read_bytes() == half
    with pytest.raises(ConfigError, match="never overwritten"):
        IdentityKey.generate().save(path)
    assert path.read_bytes() == half


_CREATE_AT_ONCE = """
import json, os, sys, threading
from pathlib import Path
from fedmedclip.secagg.identity import site_identity
root, me, n, trials = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = []
for t in range(trials):
    gate = root / f"gate{t}"
    gate.mkdir(exist_ok=True)
    (gate / me).touch()
    while len(os.listdir(gate)) < n:  # every process starts this trial at the same moment
        pass
    got = []

    def create():
        try:
            key, created = site_identity(root / f"k{t}" / "identity.pem", create=True)
            got.append([key.public, created])
        except Exception as exc:
            got.append(["error", f"{type(exc).__name__}: {exc}"])

    threads = [threading.Thread(target=create) for _ in range(3)]  # and three threads in each
    [th.start() for th in threads]
    [th.join() for th in threads]
    out.append(got)
print(json.dumps(out))
"""


def test_processes_creating_one_identity_key_at_once_all_get_the_one_written(tmp_path):
    """Several sites started at once with the same identity path (`site run --register-identity` from one
    working directory), here processes of three threads each: none errors or reads a half-written key,
    exactly one creates it, and all use that one."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import fedmedclip

    n, trials = 4, 25
    env = {**os.environ, "PYTHONPATH": str(Path(fedmedclip.__file__).parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CREATE_AT_ONCE, str(tmp_path), f"p{i}", str(n), str(trials)],
            stdout=subprocess.PIPE,
            env=env,
        )
        for i in range(n)
    ]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for t in range(trials):
        got = [g for r in results for g in r[t]]
        assert len(got) == 3 * n
        assert [g for g in got if g[0] == "error"] == [], t
        path = tmp_path / f"k{t}" / "identity.pem"
        assert {g[0] for g in got} == {IdentityKey.load(path).public}, t
        assert sum(g[1] for g in got) == 1, t
        assert (path.stat().st_mode & 0o777) == 0o600
        assert sorted(p.name for p in path.parent.iterdir()) == ["identity.pem"]
