"""What secure aggregation costs per site per round: bytes and seconds, at 3, 10 and 30 sites.

FedMedCLIP's FAM at ViT-B/32 width (525,312 float values), the 4-bit uplink codec (`delta-ef-q4-zlib`) and its
secure form; every party of the protocol runs its real code (fedmedclip/secagg, fedmedclip/codec/secure.py)
with real keys, shares and masks, one after another in this process, on updates with the spread of real FAM
updates. Reported per round:

- bytes a site uploads: the plain 4-bit payload, the masked payload, and the protocol's messages (its key
  advertisement, its sealed shares, its unmasking answer); bytes it downloads besides the global module (the
  roster, its inbox, the survivors);
- seconds: a site's own work (the plain encode, or advertise + share + mask + encode + answer), the
  server's (plain: decode and average every update; secure: check, roster, inboxes, unmask, sum). Sites work
  at the same time in a federation, so the round's extra time is one site's extra plus the server's extra.
  `--drop 1` makes one site vanish after its masked upload (its self-mask seed is rebuilt from shares).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_secagg.py --sites 3,10,30 --json runs/bench-secagg.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fedmedclip.codec import decode, encode, get_codec, template_of
from fedmedclip.codec.secure import decode_masked_sum, secure_codec
from fedmedclip.codec.wire import unpack
from fedmedclip.methods import MethodContext
from fedmedclip.methods.fedmedclip_method import FedMedClip
from fedmedclip.secagg import (
    IdentityKey,
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
    random_secret,
    unmask_total,
)

BASE = "delta-ef-q4-zlib"
RUN = "bench"


def fam_reference(dim: int = 512) -> dict[str, torch.Tensor]:
    m = FedMedClip(MethodContext(dim, 4, torch.randn(4, dim, generator=torch.Generator().manual_seed(0))))
    return m.shared_state(m.new_global())


def updates(reference, n: int, rms: float) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    common = {k: torch.randn(v.shape, generator=g) * rms for k, v in reference.items()}
    return [
        {k: v + common[k] + torch.randn(v.shape, generator=g) * rms for k, v in reference.items()}
        for _ in range(n)
    ]


def timed(f, *a, **kw):
    t0 = time.perf_counter()
    out = f(*a, **kw)
    return out, time.perf_counter() - t0


def plain_round(reference, ups) -> dict:
    site_s, payloads = [], []
    for u in ups:
        enc, s = timed(encode, u, BASE, reference=reference)
        payloads.append(enc.payload)
        site_s.append(s)
    t0 = time.perf_counter()
    states = [decode(p, reference=reference).state for p in payloads]
    _ = {k: sum(s[k] for s in states) / len(states) for k in reference}
    return {
        "upload_bytes": float(np.mean([len(p) for p in payloads])),
        "site_seconds": float(np.mean(site_s)),
        "server_seconds": time.perf_counter() - t0,
    }


def secure_round(reference, ups, drop: int) -> dict:
    n = len(ups)
    names = [f"site_{i}" for i in range(n)]
    ids = {s: IdentityKey.generate() for s in names}
    settings = SecureSettings(tuple(names), {s: k.public for s, k in ids.items()}, default_threshold(n))
    codec = secure_codec(get_codec(BASE), sites=n, bound=10.0)
    k = codec.quantiser.bits
    shapes = [(name, tuple(t.shape)) for name, t in reference.items()]
    length = sum(int(np.prod(s)) for _, s in shapes)
    # A grid at the steady state of `next_steps` for these updates: 3 sd of a weighted update at L.
    levels = codec.transforms[3].levels
    steps = {name: 3 * float(ups[0][name].sub(reference[name]).std()) / n / levels for name, _ in shapes}
    weights = {s: 1.0 / n for s in names}
    sites = {s: SiteRound(settings, RUN, 1, s, random_secret()) for s in names}
    up = {s: 0 for s in names}
    down = {s: 0 for s in names}
    site_s = {s: 0.0 for s in names}
    server_s = 0.0

    advs = {}
    for s in names:
        adv, t = timed(sites[s].advertisement, ids[s])
        site_s[s] += t
        up[s] += len(adv.to_bytes())
        advs[s] = adv
    t0 = time.perf_counter()
    for s, adv in advs.items():
        check_advertisement(settings, RUN, 1, s, adv)
    roster = make_roster(settings, RUN, 1, advs)
    server_s += time.perf_counter() - t0
    bundles = {}
    for s in names:
        down[s] += len(roster.to_bytes())
        b, t = timed(sites[s].share_bundle, roster)
        site_s[s] += t
        up[s] += len(b.to_bytes())
        bundles[s] = b
    t0 = time.perf_counter()
    for s, b in bundles.items():
        check_bundle(settings, roster, s, b)
    inboxes = make_inboxes(settings, roster, bundles)
    server_s += time.perf_counter() - t0
    payloads, masked_bytes = {}, []
    for i, s in enumerate(names):
        down[s] += len(inboxes[s].to_bytes())
        t0 = time.perf_counter()
        m = sites[s].masks(roster, inboxes[s], length, k)
        inputs = {
            "fixed-point": {"weight": weights[s], "steps": steps},
            "secagg-mask": as_tensors(m, shapes),
        }
        enc = codec.encode(ups[i], reference=reference, inputs=inputs)
        site_s[s] += time.perf_counter() - t0
        payloads[s] = enc.payload
        masked_bytes.append(len(enc.payload))
    t0 = time.perf_counter()
    survivors = make_survivors(settings, RUN, 1, list(inboxes), list(payloads))
    server_s += time.perf_counter() - t0
    answers = {}
    for s in names[drop:]:
        down[s] += len(survivors.to_bytes())
        a, t = timed(sites[s].unmask_response, roster, inboxes[s], survivors)
        site_s[s] += t
        up[s] += len(a.to_bytes())
        answers[s] = a
    t0 = time.perf_counter()
    for s, a in answers.items():
        check_unmask(settings, survivors, s, a)
    total = unmask_total(settings, roster, survivors, answers, length, k)
    decoded, _ = decode_masked_sum(
        codec,
        payloads,
        unmask=as_tensors(total, shapes),
        weights=weights,
        steps=steps,
        reference=reference,
        template=template_of(reference),
        cap=1 << 26,
    )
    server_s += time.perf_counter() - t0
    mean = {name: sum(u[name] for u in ups) / n for name in reference}
    err = max(float((decoded.state[name] - mean[name]).abs().max()) for name in reference)
    body = len(unpack(payloads[names[0]])[2])
    return {
        "modulus_bits": k,
        "levels": levels,
        "threshold": settings.threshold,
        "masked_bytes": float(np.mean(masked_bytes)),
        "masked_body_bytes": body,
        "protocol_upload_bytes": float(np.mean([up[s] for s in names[drop:]])),
        "protocol_download_bytes": float(np.mean([down[s] for s in names[drop:]])),
        "site_seconds": float(np.mean([site_s[s] for s in names[drop:]])),
        "server_seconds": server_s,
        "max_abs_error_vs_plain_mean": err,
        "step": max(steps.values()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="3,10,30")
    ap.add_argument("--dim", type=int, default=512, help="feature width (512: ViT-B/32)")
    ap.add_argument("--rms", type=float, default=1e-3, help="spread of the synthetic updates")
    ap.add_argument("--drop", type=int, default=0, help="sites gone after their masked upload")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    reference = fam_reference(args.dim)
    values = sum(t.numel() for t in reference.values())
    rows = []
    for n in [int(x) for x in args.sites.split(",")]:
        ups = updates(reference, n, args.rms)
        plain = plain_round(reference, ups)
        secure = secure_round(reference, ups, args.drop)
        row = {"sites": n, "values": values, "plain": plain, "secure": secure}
        row["extra_upload_bytes_per_site"] = (
            secure["masked_bytes"] + secure["protocol_upload_bytes"] - plain["upload_bytes"]
        )
        row["upload_bytes_per_site"] = secure["masked_bytes"] + secure["protocol_upload_bytes"]
        row["extra_seconds_per_round"] = (
            secure["site_seconds"]
            - plain["site_seconds"]
            + secure["server_seconds"]
            - plain["server_seconds"]
        )
        rows.append(row)
        print(
            f"{n:3d} sites · k={secure['modulus_bits']} L={secure['levels']} t={secure['threshold']} · "
            f"up/site: plain {plain['upload_bytes'] / 1e3:.1f} kB, secure {row['upload_bytes_per_site'] / 1e3:.1f} kB "
            f"(masked {secure['masked_bytes'] / 1e3:.1f} + protocol {secure['protocol_upload_bytes'] / 1e3:.1f}) "
            f"· down/site extra {secure['protocol_download_bytes'] / 1e3:.1f} kB · "
            f"site {plain['site_seconds']:.3f} -> {secure['site_seconds']:.3f} s · "
            f"server {plain['server_seconds']:.3f} -> {secure['server_seconds']:.3f} s · "
            f"extra {row['extra_seconds_per_round']:.3f} s/round",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
