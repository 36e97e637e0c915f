"""The privacy facts of a run, written where every other fact of it is: each site's DP-SGD ledger in its
per-round report (checked here, since another party wrote it), epsilon in the round records (results.json's
`history`, MLflow's live metrics, the server's round line), results.json's `privacy` section, and the flat
summary that the registry tags, the exported model's metadata and the model card show."""

from __future__ import annotations

import math

from .settings import ACCOUNTANTS, PrivacySettings

# A site's privacy report: each entry's check. Anything else in it is dropped.
_NUMBER = ("epsilon", "delta", "noise_multiplier", "clip", "sample_rate")
_COUNT = ("steps", "planned_steps", "n_train")


def _finite(v, lo: float = 0.0) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= lo


def check_site_privacy(obj) -> tuple[dict | None, str | None]:
    """(the usable part of a site's privacy report, None) or (None, why it is refused). None: no report."""
    if obj is None:
        return None, None
    if not isinstance(obj, dict):
        return None, "privacy is not an object"
    out = {}
    for k in _NUMBER:
        if not _finite(obj.get(k)):
            return None, f"privacy.{k} = {obj.get(k)!r} is not a finite non-negative number"
        out[k] = float(obj[k])
    if not (0 < out["delta"] < 1 and 0 < out["sample_rate"] <= 1):
        return None, "privacy.delta or privacy.sample_rate is outside (0, 1]"
    for k in _COUNT:
        v = obj.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return None, f"privacy.{k} = {v!r} is not a count"
        out[k] = v
    out["accountant"] = obj.get("accountant") if obj.get("accountant") in ACCOUNTANTS else None
    budget = obj.get("budget")
    out["budget"] = float(budget) if _finite(budget) else None
    stopped = obj.get("stopped_at_round")
    out["stopped_at_round"] = stopped if isinstance(stopped, int) and not isinstance(stopped, bool) else None
    return out, None


def attach_epsilon(
    record: dict, cfg_privacy: dict, site_names: list[str], reports: dict[int, dict], history: list[dict]
) -> dict:
    """Each site row of a round record gets its epsilon reported that round (None without a report), the
    record the run's largest epsilon so far (`epsilon_max`): what the server's round line and MLflow's live
    metrics show. `history`: the records of the rounds before (the record's own round is taken from
    `record`, later ones are ignored), `reports` the run's per-round reports.

    `epsilon_max` is results.json's `privacy.record_level.epsilon_max` as if the run had ended with this round
    (`record_level_sites` over the rounds up to it): a site without a report this round counts at its newest
    ledger, or at its plan bound when an update of its went out after that ledger, never left out; null when
    a site that sent updates has no ledger at all and no target bounds it, and without record-level DP."""
    r = record["round"]
    site_privacy = (reports.get(r) or {}).get("sites") or {}
    for row in record.get("sites", []):
        row["epsilon"] = ((site_privacy.get(row["site"]) or {}).get("privacy") or {}).get("epsilon")
    settings = PrivacySettings.from_config(cfg_privacy)
    record["epsilon_max"] = None
    if settings.record_level:
        so_far = [rec for rec in history if rec["round"] < r] + [record]
        _, _, record["epsilon_max"] = record_level_sites(
            settings, site_names, {k: v for k, v in reports.items() if k <= r}, so_far
        )
    return record


def last_site_privacy(site_names: list[str], reports: dict[int, dict]) -> dict[str, tuple[int, dict]]:
    """Each site's newest privacy report over the rounds (`reports[r]["sites"][name]["privacy"]`), with its
    round."""
    out: dict[str, tuple[int, dict]] = {}
    for r in sorted(reports):
        for name, rep in (reports[r].get("sites") or {}).items():
            if name in site_names and isinstance(rep, dict) and rep.get("privacy"):
                out[name] = (r, rep["privacy"])
    return {n: out[n] for n in site_names if n in out}


def sent_rounds(history: list[dict], site: str) -> list[int]:
    """The rounds in which `site`'s update reached the server: aggregated, or read and set aside (it left the
    site either way). A refused report is no update."""
    out = []
    for rec in history:
        why = (rec.get("rejected") or {}).get(site)
        refused = isinstance(why, str) and not why.startswith("report:")
        if site in (rec.get("sites_present") or ()) or refused:
            out.append(rec["round"])
    return out


def plan_bound(ledger: dict, accountant: str) -> float | None:
    """The most a site's DP-SGD plan lets it spend: its budget when it has one (it takes no step beyond it),
    else its planned steps at its sampling rate and noise; None when the plan has no finite figure. Another
    party wrote the plan (the server checks it is the run's: _plan_problem): it is accounted with the run's
    `accountant` (every honest site's), never one the ledger names, and a plan the accountant cannot compose (a
    noise multiplier of 1e-300 divides by zero, 1e300 overflows, 0 gives inf) bounds nothing rather than
    stopping the server that closes the round."""
    from .accounting import dpsgd_epsilon

    if ledger.get("budget") is not None:  # the noise behind it is the site's own calibration: not composed
        return ledger["budget"]
    try:
        eps = dpsgd_epsilon(
            ledger["sample_rate"],
            ledger["noise_multiplier"],
            ledger["planned_steps"],
            ledger["delta"],
            accountant,
        )
    except (ArithmeticError, ValueError, MemoryError):
        eps = math.inf
    return eps if math.isfinite(eps) else None


def record_level_sites(
    settings: PrivacySettings, site_names: list[str], reports: dict[int, dict], history: list[dict]
) -> tuple[dict[str, dict], dict[str, list[int]], float | None]:
    """(each site's ledger, the rounds no ledger covers per site, the largest epsilon over the sites).

    A site's ledger is its newest report's. An update that reached the server after that report (the site
    was gone before reporting that round, or its reports were refused) cost steps the ledger does not count:
    that site's epsilon is then the most its plan allows (`reported_epsilon` keeps its own figure). A site
    that sent updates and no usable report at all is bounded by the target epsilon, the most any site of the
    run may spend; without a target nothing bounds it and the largest epsilon is unknown (None)."""
    ledgers = last_site_privacy(site_names, reports)
    sites: dict[str, dict] = {}
    unaccounted: dict[str, list[int]] = {}
    bounds: list[float | None] = []
    for name in site_names:
        reported_round, ledger = ledgers.get(name, (0, None))
        late = [r for r in sent_rounds(history, name) if r > reported_round]
        if late:
            unaccounted[name] = late
        if ledger is None:
            if late:
                bounds.append(settings.target_epsilon)
            continue
        sites[name] = dict(ledger)
        if late:
            sites[name]["reported_epsilon"] = ledger["epsilon"]
            # A plan without a finite bound is bounded as a site without a ledger is: by the target, or unknown.
            bound = plan_bound(ledger, settings.accountant)
            if bound is None:
                bound = settings.target_epsilon
            sites[name]["epsilon"] = None if bound is None else max(ledger["epsilon"], bound)
        bounds.append(sites[name]["epsilon"])
    if any(b is None for b in bounds):
        return sites, unaccounted, None
    return sites, unaccounted, max(bounds) if bounds else None


def privacy_results(
    cfg_privacy: dict,
    site_names: list[str],
    reports: dict[int, dict],
    history: list[dict],
    secure_aggregation: bool = False,
) -> dict:
    """results.json's `privacy` section (docs/contracts.md). `secure_aggregation`: whether the server saw
    only the sum of the updates (fedmedclip/federation/secure.py)."""
    settings = PrivacySettings.from_config(cfg_privacy)
    section: dict = {
        "record_level": None,
        "client_level": None,
        "secure_aggregation": bool(secure_aggregation),
        "epsilon": None,
        "delta": settings.delta if settings.enabled else None,
        "settings": settings.to_config(),
    }
    if settings.record_level:
        sites, unaccounted, epsilon_max = record_level_sites(settings, site_names, reports, history)
        section["record_level"] = {
            "mechanism": "DP-SGD (Poisson sampling, per-example clipping, Gaussian noise) at each site",
            "accountant": settings.accountant,
            "target_epsilon": settings.target_epsilon,
            "clip": settings.clip,
            "delta": settings.delta,
            "sites": sites,
            "sites_without_report": [n for n in site_names if n not in sites],
            "unaccounted_rounds": unaccounted,
            "epsilon_max": epsilon_max,
        }
        section["epsilon"] = section["record_level"]["epsilon_max"]
    if settings.client_level:
        last = next((rec["client_dp"] for rec in reversed(history) if rec.get("client_dp")), None)
        section["client_level"] = {
            "mechanism": "clipped update differences, equal-weight mean, Gaussian noise on the sum",
            "noise_multiplier": settings.client_noise,
            "noise_at": settings.client_noise_at,
            "clip": settings.client_clip,
            "adaptive_quantile": settings.client_quantile,
            "final_clip": last.get("clip") if last else None,
            "epsilon": last.get("epsilon") if last else None,
            "delta": settings.delta,
        }
    return section


def privacy_summary(results: dict) -> dict[str, str]:
    """The flat privacy facts of a run (registry tags `dp.*`, the exported model's metadata, the model card).
    A run without a `privacy` section, or without DP, says `dp.mode = none`."""
    p = results.get("privacy") or {}
    rec, cli = p.get("record_level"), p.get("client_level")
    modes = [m for m, on in (("record", rec), ("client", cli)) if on]
    out = {
        "dp.mode": "+".join(modes) or "none",
        "dp.secure_aggregation": "on" if p.get("secure_aggregation") else "off",
    }
    if rec:
        sites = rec.get("sites") or {}
        sigmas = [_figure(s, "noise_multiplier", f"record_level.sites.{n}.") for n, s in sites.items()]
        sigmas = [v for v in sigmas if v is not None]
        out.update(
            {
                "dp.epsilon": rounded(_figure(rec, "epsilon_max", "record_level.")),
                "dp.delta": rounded(_figure(rec, "delta", "record_level.")),
                "dp.clip": _fmt(_figure(rec, "clip", "record_level.")),
                "dp.noise_multiplier": rounded(min(sigmas), up=False) if sigmas else "",
                "dp.accountant": str(rec.get("accountant")),
                "dp.sites": ",".join(
                    f"{n}:eps={rounded(_figure(s, 'epsilon', f'record_level.sites.{n}.'))}"
                    f":sigma={rounded(s.get('noise_multiplier'), up=False)}"
                    for n, s in sites.items()
                ),
            }
        )
    if cli:
        out.update(
            {
                "dp.client_epsilon": rounded(_figure(cli, "epsilon", "client_level.")),
                "dp.client_noise_multiplier": rounded(
                    _figure(cli, "noise_multiplier", "client_level."), up=False
                ),
                "dp.client_clip": _fmt(
                    _figure(cli, "final_clip", "client_level.") or _figure(cli, "clip", "client_level.")
                ),
                "dp.client_noise_at": str(cli.get("noise_at")),
            }
        )
        out.setdefault("dp.delta", rounded(_figure(cli, "delta", "client_level.")))
    return out


def _figure(section, key: str, where: str) -> float | None:
    """`section[key]`, a privacy figure: None, or a finite number of at least 0 (a ValueError naming it
    otherwise). results.json reaches the registry through whoever may log to the run: a negative epsilon
    would pass any --max-epsilon, a word would end registration in a traceback."""
    v = section.get(key) if isinstance(section, dict) else None
    if v is not None and (
        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
    ):
        raise ValueError(f"privacy.{where}{key} is {str(v)[:40]!r}, not a finite number of at least 0")
    return v


def _fmt(v) -> str:
    return "" if v is None else f"{float(v):.6g}"


def rounded(v, digits: int = 6, up: bool = True) -> str:
    """`v` in `digits` significant digits, rounded up (an epsilon or a delta: the text never claims less
    than the run spent, which `promote --max-epsilon` compares with) or down (a noise multiplier: never more
    noise than it had); "" for None. Rounding to the nearest printed 3.9998802 as 3.99988."""
    from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

    if v is None:
        return ""
    # Its shortest repr, which reads back as the same float: a bound on it reads back as a float on the same
    # side of it (the float's exact binary value would turn 1e-05 into 1.00001e-05).
    exact = Decimal(repr(float(v)))
    if not exact:
        return "0"
    step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    bound = float(exact.quantize(step, rounding=ROUND_CEILING if up else ROUND_FLOOR))
    return f"{bound:.{digits}g}"
