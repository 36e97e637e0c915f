"""What secure aggregation costs per site per round: bytes and seconds, at 3, 10 and 30 sites.

Two measurements, FedMedCLIP's FAM at ViT-B/32 width (525,312 float values) and the 4-bit uplink codec
(`delta-ef-q4-zlib`) against its secure form:

`--mode runtime` (the default; what a federation sees): the real runtime, `fedmedclip train`'s server and site
workers (FederationServer, SiteWorker) each polling in its own thread as `server run` and `site run` do, over a
local-directory mailbox, on synthetic images encoded by a random ViT-B/32 (`--backbone random-vit-b32`). The
same run with and without `--secure-aggregation`; a round's seconds are from one global module going out to
the next (results.json's history, rounds after the first; the median over `--repeats` alternated plain and
secure runs, since the machine's other load drifts). Every site shares this machine's cores, so a
round's extra time also holds the other sites' protocol work, which in a federation runs on their own machines.
Bytes per site per round: the masked update and the protocol's objects a site writes (advertisement, shares,
answer) and reads (roster, inbox, survivors), from the mailbox.

`--mode compute`: every party of the protocol runs its real code (fedmedclip/secagg, fedmedclip/codec/secure.py)
with real keys, shares and masks, one after another in this process, on updates with the spread of real FAM
updates, with no mailbox. Reported per round:

- bytes a site uploads: the plain 4-bit payload, the masked payload, and the protocol's messages (its key
  advertisement, its sealed shares, its unmasking answer); bytes it downloads besides the global module (the
  roster, its inbox, the survivors);
- seconds: a site's own work (the plain encode, or advertise + share + mask + encode + answer), the
  server's (plain: decode and average every update; secure: check, roster, inboxes, unmask, sum). Sites work
  at the same time in a federation, so the round's extra time is one site's extra plus the server's extra.
  `--drop 1` makes one site vanish after its masked upload (its self-mask seed is rebuilt from shares).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_secagg.py --sites 3,10,30 --json runs/bench-secagg.json
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_secagg.py --mode compute --sites 3,10,30
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from json_results import write_json

from fedmedclip.codec import decode, encode, get_codec, template_of
from fedmedclip.codec.secure import decode_masked_sum
from fedmedclip.codec.wire import unpack
from fedmedclip.federation.secure import SecureRun
from fedmedclip.methods import MethodContext
from fedmedclip.methods.fedmedclip_method import FedMedClip
from fedmedclip.secagg.identity import IdentityKey
from fedmedclip.secagg.primitives import random_secret
from fedmedclip.secagg.protocol import (
    SecureSettings,
    SiteRound,
    check_advertisement,
    check_bundle,
    check_unmask,
    default_threshold,
    make_inboxes,
    make_roster,
    make_survivors,
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


class Costs:
    """What each party of a secure round spends: a site's seconds and the protocol bytes it sends and
    receives, the server's seconds."""

    def __init__(self, names: list[str]):
        self.up = dict.fromkeys(names, 0)
        self.down = dict.fromkeys(names, 0)
        self.site_s = dict.fromkeys(names, 0.0)
        self.server_s = 0.0

    def sites(self, names: list[str], step, received=None) -> dict:
        """Each site's message of one protocol step, `step(site)`, after reading `received(site)`: timed,
        both counted in its bytes."""
        out = {}
        for s in names:
            if received is not None:
                self.down[s] += len(received(s).to_bytes())
            with self.clock(s):
                out[s] = step(s)
            self.up[s] += len(out[s].to_bytes())
        return out

    @contextmanager
    def clock(self, site: str | None = None):
        """Times the block as `site`'s work, or the server's."""
        t0 = time.perf_counter()
        yield
        spent = time.perf_counter() - t0
        if site is None:
            self.server_s += spent
        else:
            self.site_s[site] += spent


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
    run = SecureRun.create(
        settings, get_codec(BASE), {s: 1.0 / n for s in names}, 10.0, template_of(reference)
    )
    # A grid at the steady state of `next_steps` for these updates: 3 sd of a weighted update at L.
    steps = {
        name: 3 * float(ups[0][name].sub(reference[name]).std()) / n / run.levels for name, _ in run.shapes
    }
    sites = {s: SiteRound(settings, RUN, 1, s, random_secret()) for s in names}
    costs = Costs(names)

    advs = costs.sites(names, lambda s: sites[s].advertisement(ids[s]))
    with costs.clock():
        for s, adv in advs.items():
            check_advertisement(settings, RUN, 1, s, adv)
        roster = make_roster(settings, RUN, 1, advs, steps)
    bundles = costs.sites(names, lambda s: sites[s].share_bundle(roster), received=lambda s: roster)
    with costs.clock():
        for s, b in bundles.items():
            check_bundle(settings, roster, s, b)
        inboxes = make_inboxes(settings, roster, bundles)
    payloads = {}
    for i, s in enumerate(names):
        costs.down[s] += len(inboxes[s].to_bytes())
        with costs.clock(s):
            inputs = run.site_inputs(sites[s], roster, inboxes[s])
            payloads[s] = run.codec.encode(ups[i], reference=reference, inputs=inputs).payload
    with costs.clock():
        survivors = make_survivors(settings, RUN, 1, list(inboxes), list(payloads))
    answers = costs.sites(
        names[drop:],
        lambda s: sites[s].unmask_response(roster, inboxes[s], survivors),
        received=lambda s: survivors,
    )
    with costs.clock():
        for s, a in answers.items():
            check_unmask(settings, survivors, s, a)
        total = unmask_total(settings, roster, survivors, answers, run.length, run.bits)
        decoded, _ = decode_masked_sum(
            run.codec,
            payloads,
            unmask=run.masks(total),
            weights=run.weights,
            steps=steps,
            reference=reference,
            template=template_of(reference),
            cap=1 << 26,
        )
    mean = {name: sum(u[name] for u in ups) / n for name in reference}
    err = max(float((decoded.state[name] - mean[name]).abs().max()) for name in reference)
    body = len(unpack(payloads[names[0]])[2])
    return {
        "modulus_bits": run.bits,
        "levels": run.levels,
        "threshold": settings.threshold,
        "masked_bytes": float(np.mean([len(p) for p in payloads.values()])),
        "masked_body_bytes": body,
        "protocol_upload_bytes": float(np.mean([costs.up[s] for s in names[drop:]])),
        "protocol_download_bytes": float(np.mean([costs.down[s] for s in names[drop:]])),
        "site_seconds": float(np.mean([costs.site_s[s] for s in names[drop:]])),
        "server_seconds": costs.server_s,
        "max_abs_error_vs_plain_mean": err,
        "step": max(steps.values()),
    }


def runtime_run(sites: int, rounds: int, secure: bool, work: Path, cache: Path) -> dict:
    """One run of the real runtime (every party in its own thread, over a directory mailbox): its results,
    and the bytes of the protocol's objects in the mailbox."""
    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import method_for, server_setup, site_setups
    from fedmedclip.federation.mailbox import Mailbox
    from fedmedclip.federation.server import FederationServer, ServerOptions
    from fedmedclip.federation.site import SiteWorker
    from fedmedclip.federation.storage import LocalDirStore
    from fedmedclip.preparation import prepare

    cfg = TrainConfig(
        method="fedmedclip",
        backbone="random-vit-b32",
        sites=sites,
        rounds=rounds,
        synthetic={"per_class_per_site": 3, "test_per_class": 2, "size": 32},
        cache_dir=str(cache),
        out=str(work / "out"),
        codec_up=BASE,
        secure_aggregation=secure,
        min_class_images=1,
    ).validate()
    p = prepare(cfg, progress=False)
    method = method_for(cfg, p)
    store = LocalDirStore(work / "mailbox")
    mailbox = Mailbox(store, RUN)
    setups = site_setups(cfg, p, method)
    keys = {s.name: IdentityKey.generate() for s in setups} if secure else {}
    server = FederationServer(
        mailbox,
        server_setup(cfg, p, method),
        store.sub("server-state"),
        work / "out",
        ServerOptions(),
        verbose=False,
        identities={n: k.public for n, k in keys.items()},
    )
    server.start()
    workers = [
        SiteWorker(
            mailbox,
            server.manifest,
            s,
            store.sub(f"state/{s.name}"),
            verbose=False,
            identity=keys.get(s.name),
        )
        for s in setups
    ]
    errors = []

    def guarded(f):
        try:
            f()
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(w.run,)) for w in workers]
    threads.append(threading.Thread(target=guarded, args=(server.run,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    objects = {"up": [], "down": []}
    if secure:
        for r in range(2, rounds + 1):
            for s in workers:
                for what, way in (("keys", "up"), ("shares", "up"), ("unmask", "up"), ("inbox", "down")):
                    raw = store.get(mailbox.secagg_key(r, what, s.name))
                    objects[way].append(len(raw or b""))
            for what in ("roster", "survivors"):
                objects["down"] += [len(store.get(mailbox.secagg_key(r, what)) or b"")] * len(workers)
    return {"results": server.results, "objects": objects, "manifest": server.manifest}


def runtime_row(sites: int, rounds: int, cache: Path, repeats: int) -> dict:
    """Plain and secure runs, alternated `repeats` times (the machine's other load drifts); a mode's seconds per
    round is the median over its timed rounds."""
    rows: dict[str, dict] = {}
    for _ in range(repeats):
        for secure in (False, True):
            with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
                got = runtime_run(sites, rounds, secure, Path(tmp), cache)
            history = got["results"]["history"][1:]  # round 1 also waits for the sites to start
            row = rows.setdefault(
                "secure" if secure else "plain", {"seconds": [], "ups": [], "up": [], "down": []}
            )
            row["seconds"] += [rec["seconds"] for rec in history]
            row["ups"] += [b for rec in history for b in rec["bytes_up"] if b is not None]
            row["up"].append(sum(got["objects"]["up"]) / max(1, sites * len(history)))
            row["down"].append(sum(got["objects"]["down"]) / max(1, sites * len(history)))
            if secure:
                sec = got["manifest"]["secure_aggregation"]
                row.update(threshold=sec["threshold"], modulus_bits=sec["modulus_bits"])
    for row in rows.values():
        row.update(
            seconds_per_round=float(np.median(row["seconds"])),
            update_bytes=float(np.mean(row.pop("ups"))),
            protocol_upload_bytes=float(np.mean(row.pop("up"))),
            protocol_download_bytes=float(np.mean(row.pop("down"))),
        )
    plain, secure = rows["plain"], rows["secure"]
    return {
        "sites": sites,
        "rounds_timed": (rounds - 1) * repeats,
        "plain": plain,
        "secure": secure,
        "upload_bytes_per_site": secure["update_bytes"] + secure["protocol_upload_bytes"],
        "extra_upload_bytes_per_site": secure["update_bytes"]
        + secure["protocol_upload_bytes"]
        - plain["update_bytes"],
        "extra_seconds_per_round": secure["seconds_per_round"] - plain["seconds_per_round"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("runtime", "compute"), default="runtime")
    ap.add_argument("--sites", default="3,10,30")
    ap.add_argument("--rounds", type=int, default=6, help="runtime: rounds per run (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=2, help="runtime: plain and secure runs, alternated")
    ap.add_argument("--cache-dir", default=".cache/bench-secagg", help="runtime: images and feature stores")
    ap.add_argument("--dim", type=int, default=512, help="feature width (512: ViT-B/32)")
    ap.add_argument("--rms", type=float, default=1e-3, help="spread of the synthetic updates")
    ap.add_argument("--drop", type=int, default=0, help="sites gone after their masked upload")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.mode == "runtime":
        rows = []
        for n in [int(x) for x in args.sites.split(",")]:
            row = runtime_row(n, args.rounds, Path(args.cache_dir), args.repeats)
            rows.append(row)
            p, s = row["plain"], row["secure"]
            print(
                f"{n:3d} sites · t={s['threshold']} k={s['modulus_bits']} · up/site: plain {p['update_bytes'] / 1e3:.1f} kB, "
                f"secure {row['upload_bytes_per_site'] / 1e3:.1f} kB (masked {s['update_bytes'] / 1e3:.1f} + protocol "
                f"{s['protocol_upload_bytes'] / 1e3:.1f}) · down/site extra {s['protocol_download_bytes'] / 1e3:.1f} kB · "
                f"round {p['seconds_per_round']:.2f} -> {s['seconds_per_round']:.2f} s · extra "
                f"{row['extra_seconds_per_round']:.2f} s/round",
                flush=True,
            )
        write_json(args.json, rows)
        return 0
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
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
