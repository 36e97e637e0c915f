"""The model card of a trained model: what it is for, what it was trained on, how well it does (with bootstrap
intervals) and how well calibrated it is, what privacy it gives, and where every piece came from. Built from a
run directory (docs/contracts.md) plus what the registry knows (name, version, tags, the KFP and MLflow run
ids); rendered as JSON (the facts, `CARD_FORMAT`) and Markdown. Anchors: Google's Model Card Toolkit, Hugging
Face model cards, and the documentation FDA's good machine learning practice and the EU AI Act ask of medical AI.

Every figure comes from the run's own files: per-class counts from partition.json, metrics and confusion
counts from results.json (the counts written by each site about its own test split, checked here since another
party wrote them), privacy from results.json's `privacy` section; the out-of-distribution score's calibration
from the registered ONNX file's metadata (`ood_facts`, passed by the registry). No image and no image id enters
a card.
`mlops/model_card.py` logs it to MLflow at registration; `fedmedclip card NAME@ALIAS` prints it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .digests import ONNX_SHA256_TAG, canonical_digest
from .errors import FedMedClipError, class_names_problem
from .jsonfiles import read_json
from .metrics import bootstrap_intervals, metrics_from_confusion
from .privacy.report import privacy_summary, rounded

CARD_FORMAT = 1
SECTIONS = (
    "Model",
    "Intended use and limits",
    "Data",
    "Partition",
    "Method and hyperparameters",
    "Performance",
    "Calibration",
    "Out-of-distribution detection",
    "Privacy",
    "Provenance",
)
RELIABILITY_PLOT = "reliability.png"
RUN_PLOT = f"plots/{RELIABILITY_PLOT}"  # where a run directory holds it
N_BOOT = 2000


class CardError(FedMedClipError):
    """A run directory from which no card can be built (a file missing or unreadable)."""


def _read(run_dir: Path, name: str) -> dict:
    path = run_dir / name
    try:
        return read_json(path)
    except FileNotFoundError:
        raise CardError(f"cannot build a model card: {path} is missing") from None
    except ValueError as exc:
        raise CardError(f"cannot build a model card: {path} is not JSON ({exc})") from None


# The JSON type of each entry of results.json that a reader (the card, `fedmedclip track`) takes apart, where it
# is present (docs/contracts.md): a damaged file is refused naming the entry, not met with a traceback.
RESULTS_SHAPES = {
    "metrics": dict,
    "metrics.global": dict,
    "metrics.sites": list,
    "metrics.site_mean": dict,
    "metrics.last_round": dict,
    "history": list,
    "partition": dict,
    "backbone": dict,
    "comm": dict,
    "timing": dict,
    "privacy": dict,
}
ROUND_SHAPES = {"global": dict, "sites": list, "client_dp": dict}  # of each history record
# Of the other files' entries a reader takes apart, where present: partition.json's `counts` is
# {site: {split: {class: n}}}; model/model.json's are those a card falls back on (export checks the whole file).
FILE_SHAPES = {
    "partition.json": {
        "class_names": list,
        "split_ratio": list,
        "sites": dict,
        "reference": list,
        "global_test": list,
        "counts": dict,
    },
    "model/model.json": {
        "class_names": list,
        "backbone": dict,
        "preprocessing": dict,
        "method_options": dict,
        "sites": list,
    },
}


def _shape_problem(value, kind: type, where: str) -> str | None:
    if value is None or isinstance(value, kind):
        return None
    name = "a JSON object" if kind is dict else "a JSON list"
    return f'{where} must be {name}, got {type(value).__name__} (see docs/contracts.md, "Run directory")'


def run_files_problem(run_dir: Path, files: dict) -> str | None:
    """What is wrong with the shapes of a run directory's parsed JSON files (`files`: name -> content, e.g.
    results.json, config.json, partition.json, provenance.json, model/model.json), or None."""
    checks = [(content, dict, str(run_dir / name)) for name, content in files.items()]
    checks += [
        (p, dict, f"{run_dir / 'provenance.json'}: holder {h!r}") for h, p in _items(files, "provenance.json")
    ]
    for name, shapes in FILE_SHAPES.items():
        content = files.get(name)
        if isinstance(content, dict):
            checks += [(content.get(k), kind, f"{run_dir / name}: `{k}`") for k, kind in shapes.items()]
    where = run_dir / "partition.json"
    for site, splits in _items(files, "partition.json", "counts"):
        checks.append((splits, dict, f"{where}: `counts.{site}`"))
        if isinstance(splits, dict):
            checks += [(per, dict, f"{where}: `counts.{site}.{split}`") for split, per in splits.items()]
    results, where = files.get("results.json"), run_dir / "results.json"
    if isinstance(results, dict):
        for key, kind in RESULTS_SHAPES.items():
            head, _, tail = key.partition(".")
            value = results.get(head)
            if tail:
                value = value.get(tail) if isinstance(value, dict) else None
            checks.append((value, kind, f"{where}: `{key}`"))
        metrics, history = results.get("metrics"), results.get("history")
        rows = (metrics.get("sites") if isinstance(metrics, dict) else None) or []
        checks += [(row, dict, f"{where}: each of `metrics.sites`") for row in rows if isinstance(rows, list)]
        for i, rec in enumerate(history if isinstance(history, list) else []):
            checks.append((rec, dict, f"{where}: `history[{i}]`"))
            if isinstance(rec, dict):
                checks += [
                    (rec.get(k), kind, f"{where}: `history[{i}].{k}`") for k, kind in ROUND_SHAPES.items()
                ]
                sites = rec.get("sites")
                if isinstance(sites, list):
                    checks += [(row, dict, f"{where}: each of `history[{i}].sites`") for row in sites]
    return next((p for p in (_shape_problem(*c) for c in checks) if p), None)


def _items(files: dict, name: str, entry: str = "") -> list:
    """The (key, value) pairs of file `name`'s object (of its `entry`, when given), [] where it is none."""
    content = files.get(name)
    if entry:
        content = content.get(entry) if isinstance(content, dict) else None
    return list(content.items()) if isinstance(content, dict) else []


def dataset_digest(provenance: dict) -> str:
    """One digest of which images (and labels) every holder's feature store was built from."""
    return canonical_digest(
        {h: (p or {}).get("image_list_sha256", "") for h, p in sorted(provenance.items())}
    )


def random_backbone(identity: dict) -> bool:
    """Whether the backbone is one of the built-in seeded random CLIPs (`tiny@seed3` included)."""
    from .backbone import BUILTIN_BACKBONES  # torch: imported only when a card is built

    return str(identity.get("name", "")).split("@", 1)[0] in BUILTIN_BACKBONES


def _confusion(report: dict | None, num_classes: int) -> list[list[int]] | None:
    """A report's confusion counts when they are a C x C matrix of counts summing to its n, else None."""
    cm = (report or {}).get("confusion")
    if not (isinstance(cm, list) and len(cm) == num_classes):
        return None
    for row in cm:
        if not (isinstance(row, list) and len(row) == num_classes):
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row):
            return None
    if sum(map(sum, cm)) != (report or {}).get("n"):
        return None
    return cm


def _metrics(report: dict | None, num_classes: int, seed: int) -> dict:
    """Point metrics as reported, with 95% bootstrap intervals from the confusion counts when present."""
    report = report or {}
    out = {k: report.get(k) for k in ("acc", "bacc", "f1", "ece", "n")}
    cm = _confusion(report, num_classes)
    out["confusion"] = cm
    out["ci95"] = bootstrap_intervals(cm, n_boot=N_BOOT, seed=seed) if cm else None
    if cm:  # the counts must say what the report says, or they are not this report's
        derived = metrics_from_confusion(cm)
        if any(
            report.get(k) is not None and abs(float(derived[k]) - report[k]) > 1e-6 for k in ("acc", "bacc")
        ):
            out["ci95"], out["confusion"] = None, None
    return out


def _class_counts(partition: dict, class_names: list[str]) -> dict:
    """{holder: {split: {class: n}}}: every site's, and the server's global test and reference sets."""
    counts = {
        site: {split: {c: int((per or {}).get(c, 0)) for c in class_names} for split, per in splits.items()}
        for site, splits in (partition.get("counts") or {}).items()
    }
    return counts


def _global_counts(report: dict | None, class_names: list[str]) -> dict | None:
    """The global test set's images per class: the rows of its confusion counts."""
    cm = _confusion(report, len(class_names))
    return {c: sum(row) for c, row in zip(class_names, cm, strict=True)} if cm else None


def build_card(run_dir: str | Path, registry: dict | None = None) -> dict:
    """The card's facts (JSON-able) from a run directory. `registry`: what the registry adds (name, version,
    tags, mlflow_run_id, kfp_run_id, git_commit, onnx_sha256, registered_at), all optional. A figure of
    another type or range than a run writes (a word for a count, a negative epsilon: the files were edited, or
    replaced in MLflow) is a CardError naming the run directory, not a traceback."""
    try:
        return _build_card(Path(run_dir), registry)
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as exc:
        raise CardError(
            f"cannot build a model card: {run_dir} holds a figure of another type or range than a run writes "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _build_card(run: Path, registry: dict | None) -> dict:
    results = _read(run, "results.json")
    config = _read(run, "config.json")
    partition = _read(run, "partition.json")
    provenance = _read(run, "provenance.json")
    model_json = _read(run, "model/model.json") if (run / "model" / "model.json").is_file() else {}
    files = {"results.json": results, "config.json": config, "partition.json": partition}
    files |= {"provenance.json": provenance, "model/model.json": model_json}
    problem = run_files_problem(run, files)
    if problem:
        raise CardError(f"cannot build a model card: {problem}")
    registry = dict(registry or {})
    tags = registry.get("tags") or {}
    backbone = results.get("backbone") or model_json.get("backbone") or {}
    class_names = list(partition.get("class_names") or model_json.get("class_names") or [])
    if problem := class_names_problem(map(str, class_names)):  # the card is printed to terminals and logs
        raise CardError(f"cannot build a model card: {run / 'partition.json'}: {problem}")
    num_classes = len(class_names)
    m = results.get("metrics") or {}
    seed = int(config.get("seed") or 0)

    sites = []
    for k, row in enumerate(m.get("sites") or []):
        sites.append({"site": row.get("site"), **_metrics(row, num_classes, seed + 1 + k)})
    with_bacc = [s for s in sites if isinstance(s.get("bacc"), (int, float))]
    worst = min(with_bacc, key=lambda s: s["bacc"]) if with_bacc else None

    privacy = results.get("privacy") or {}
    summary = privacy_summary(results)
    card = {
        "format": CARD_FORMAT,
        "model": {
            "name": registry.get("name"),
            "version": registry.get("version"),
            "method": results.get("method"),
            "federation": results.get("federation", "federated"),
            "site_exported": registry.get("site") or tags.get("site"),
            "classes": class_names,
            "registered_at": registry.get("registered_at"),
        },
        "warnings": [],
        "intended_use": _intended_use(results, class_names, registry.get("ood")),
        "data": {
            "source": str(config.get("data", "")),
            "classes": class_names,
            "counts_per_class": _class_counts(partition, class_names),
            "global_test_counts": _global_counts(m.get("global"), class_names),
            "dataset_digest": dataset_digest(provenance),
            "holders": {
                h: {"images": p.get("n_images"), "image_list_sha256": p.get("image_list_sha256")}
                for h, p in sorted(provenance.items())
                if isinstance(p, dict)
            },
        },
        "partition": {
            "scheme": (results.get("partition") or {}).get("scheme", partition.get("scheme")),
            "alpha": (results.get("partition") or {}).get("alpha", partition.get("alpha")),
            "seed": (results.get("partition") or {}).get("seed", partition.get("seed")),
            "split": partition.get("split_ratio"),
            "reference_fraction": partition.get("reference_fraction"),
            "sites": results.get("site_names") or list((partition.get("counts") or {}).keys()),
            "digest": partition.get("digest"),
        },
        "method": {
            "name": results.get("method"),
            "options": results.get("method_options") or model_json.get("method_options") or {},
            "rounds": results.get("rounds"),
            "batch_size": config.get("batch_size"),
            "codec_up": (results.get("comm") or {}).get("codec_up"),
            "codec_down": (results.get("comm") or {}).get("codec_down"),
            "preprocessing": results.get("preprocessing"),
            "prompt_template": config.get("prompt_template") or model_json.get("prompt_template"),
            "selection": m.get("selection"),
            "selected_round": m.get("best_round"),
        },
        "performance": {
            "confidence": "95% percentile bootstrap over the test examples (2000 resamples of the confusion counts)",
            "global": _metrics(m.get("global"), num_classes, seed),
            "sites": sites,
            "site_mean": m.get("site_mean"),
            "worst_site": {
                "site": worst["site"],
                "bacc": worst["bacc"],
                "ci95": (worst.get("ci95") or {}).get("bacc"),
            }
            if worst
            else None,
        },
        "calibration": {
            "global_ece": (m.get("global") or {}).get("ece"),
            "site_ece": {s["site"]: s.get("ece") for s in sites},
            "reliability": results.get("reliability"),
            # The plot as the card links it: from the run directory; write_card puts a copy beside the card.
            "plot": RUN_PLOT if (run / RUN_PLOT).is_file() else None,
        },
        # None: no ONNX file was registered (a run directory's card, or a model folder) or it has no OOD score.
        "ood": registry.get("ood"),
        "privacy": {
            **summary,
            "record_level": privacy.get("record_level"),
            "client_level": privacy.get("client_level"),
            "not_covered": _not_covered(registry.get("ood")),
        },
        "provenance": {
            "code_commit": registry.get("git_commit") or tags.get("git_commit") or results.get("git_commit"),
            "backbone": backbone,
            "backbone_sha256": backbone.get("weights_sha256"),
            "kfp_run_id": registry.get("kfp_run_id"),
            "mlflow_run_id": registry.get("mlflow_run_id"),
            "federation_run_id": results.get("run_id"),
            "dataset_digest": dataset_digest(provenance),
            "partition_digest": partition.get("digest"),
            "feature_stores": {
                h: p.get("digest") for h, p in sorted(provenance.items()) if isinstance(p, dict)
            },
            "onnx_sha256": registry.get("onnx_sha256") or tags.get(ONNX_SHA256_TAG),
        },
    }
    if random_backbone(backbone):
        card["warnings"].append(
            f"The backbone {backbone.get('name')!r} has RANDOM weights (a built-in seeded CLIP for tests and "
            "benchmarks): its features carry no learned visual knowledge, so the absolute accuracy of this model "
            "means nothing clinically. Use it to compare methods and settings, never to classify patients."
        )
    if summary["dp.mode"] == "none":
        card["warnings"].append(
            "Trained WITHOUT differential privacy: nothing bounds what the shared updates or this model reveal "
            "about an individual patient of a site."
        )
    if summary["dp.mode"] != "none" and results.get("federation") == "centralized":
        card["warnings"].append(
            "CENTRALIZED reference run: every site's training images were pooled at one holder, so they left "
            "their sites. Its differential privacy protects their patients from the users of this model only, "
            "not from that holder, and each site's record-level row below is the pooled training's."
        )
    unaccounted = (privacy.get("record_level") or {}).get("unaccounted_rounds") or {}
    if unaccounted:
        card["warnings"].append(
            "Some updates left their site after its last privacy report ("
            + "; ".join(
                f"{site}: round(s) {', '.join(map(str, rounds))}" for site, rounds in unaccounted.items()
            )
            + "): the site was gone, or its reports were refused, before it reported the steps behind them. "
            + (
                "Such a site's epsilon here is the most its DP-SGD plan allows, not a figure it reported."
                if summary.get("dp.epsilon")
                else "Nothing bounds the epsilon of a site that never reported: this model's record-level "
                "epsilon is unknown."
            )
        )
    if worst is None or m.get("global", {}).get("confusion") is None:
        card["warnings"].append(
            "Some metrics have no confusion counts in the run directory (a run from before they were recorded, "
            "or a site whose counts did not check out): their confidence intervals are missing."
        )
    return card


NOT_COVERED = [
    "the metric reports and confusion counts the sites send",
    "sample counts and other summaries that travel",
    "the selection of the round on validation accuracy",
    "the features cache at each site",
    "the server's data: the reference set, whose features every site receives, and the global test set",
    "partition.json (logged with the run): every image's id, split and label per site",
]


def _not_covered(ood: dict | None) -> list[str]:
    """What no differential privacy of the run covers (docs/privacy.md), this model's OOD score included."""
    if ood is None:
        return list(NOT_COVERED)
    cal = ood.get("calibration") or {}
    holder = cal.get("holder", "the exporting party")
    holder = "the server" if holder == "server" else holder
    return [
        *NOT_COVERED,
        f"this model's out-of-distribution score and drift reference, fitted without DP on {holder}'s images: "
        f"the Gaussians on {cal.get('fit_images', '?')} of them ({cal.get('fitted_on', 'n/a')}), the threshold on "
        f"{cal.get('calibration_images', '?')} ({cal.get('calibrated_on', 'n/a')}), and the embeddings of "
        f"{cal.get('reference_images', '?')} of those, one per image, stored in the model; every ood_score "
        "depends on them",
    ]


def ood_facts(ood) -> dict | None:
    """What a card says of an exported OOD score (an onnx_contract.OodContract, or None for none)."""
    if ood is None:
        return None
    return {
        "method": ood.method,
        "threshold": ood.threshold,
        "false_alarm_rate": ood.false_alarm_rate,
        "calibration": dict(ood.calibration),
    }


def _unlike_training(ood: dict | None) -> str:
    if ood is None:
        return "Classes outside the list above: every image is assigned one of them, however unlike it is."
    return (
        "Classes outside the list above: every image is still assigned one of them; the out-of-distribution "
        "score flags images unlike the training data, a screen with a stated false-alarm rate, not a guarantee."
    )


def _intended_use(results: dict, class_names: list[str], ood: dict | None) -> dict:
    method = results.get("method")
    return {
        "use": (
            f"Research on federated adaptation of a frozen CLIP image encoder ({method}): classifying an image "
            f"into one of {len(class_names)} classes ({', '.join(class_names)}) of the data set it was trained on, "
            "by sites of a federation like the one that trained it."
        ),
        "users": "Machine-learning researchers and engineers evaluating federated, privacy-preserving training.",
        "out_of_scope": [
            "Diagnosis or any clinical decision: this is not a medical device and has not been clinically "
            "validated (no prospective study, no regulatory clearance).",
            "Images of other modalities, body parts, scanners, protocols or populations than the training data: "
            "performance there is unknown.",
            _unlike_training(ood),
        ],
        "limits": [
            "Metrics come from the sites' own test splits and one global test set of the same data source; "
            "the intervals cover resampling of those test examples only, not other hospitals.",
            "The selected round was chosen on the sites' validation accuracy.",
            "A site's model (FedMedCLIP) includes its private head: it is meant for that site's own images.",
        ],
    }


# ------------------------------------------------------------------------------------------ Markdown


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}"


def _ci(ci: dict | None, key: str) -> str:
    if not ci or key not in ci:
        return ""
    lo, hi = ci[key]
    return f" [{_pct(lo)}, {_pct(hi)}]"


def _row(name: str, mt: dict) -> str:
    ci = mt.get("ci95")
    return (
        f"| {name} | {mt.get('n') if mt.get('n') is not None else 'n/a'} | {_pct(mt.get('acc'))}{_ci(ci, 'acc')} "
        f"| {_pct(mt.get('bacc'))}{_ci(ci, 'bacc')} | {_pct(mt.get('f1'))}{_ci(ci, 'f1')} | {_pct(mt.get('ece'))} |"
    )


def render_markdown(card: dict) -> str:
    """The card as Markdown: one `## ` section per SECTIONS entry, warnings first and prominent."""
    model, perf, cal, priv, prov = (
        card["model"],
        card["performance"],
        card["calibration"],
        card["privacy"],
        card["provenance"],
    )
    name, version = model.get("name"), model.get("version")
    # A run directory's card names what it is, not "model"
    title = (
        f"{name} version {version}"
        if name and version
        else name or f"{model.get('method')} run (not registered)"
    )
    out = [f"# Model card: {title}", ""]
    for w in card["warnings"]:
        out += [f"> **WARNING** {w}", ""]
    out += [
        "## Model",
        "",
        f"- Method: **{model['method']}** ({model['federation']}); exported predictor: {model.get('site_exported') or 'see registry'}",
        f"- Classes: {', '.join(model['classes'])}",
        f"- Registered: {model.get('registered_at') or 'n/a'}",
        "",
        "## Intended use and limits",
        "",
        card["intended_use"]["use"],
        "",
        f"Users: {card['intended_use']['users']}",
        "",
        "Out of scope:",
        *[f"- {x}" for x in card["intended_use"]["out_of_scope"]],
        "",
        "Limits:",
        *[f"- {x}" for x in card["intended_use"]["limits"]],
        "",
        "## Data",
        "",
        f"Source: `{card['data']['source']}`; data digest `{card['data']['dataset_digest']}` (no images or image "
        "ids in this card).",
        "",
    ]
    classes = card["data"]["classes"]
    out += [
        "| holder | split | " + " | ".join(classes) + " | total |",
        "|---|---|" + "---|" * (len(classes) + 1),
    ]
    for holder, splits in card["data"]["counts_per_class"].items():
        for split, per in splits.items():
            out.append(
                f"| {holder} | {split} | "
                + " | ".join(str(per.get(c, 0)) for c in classes)
                + f" | {sum(per.values())} |"
            )
    if card["data"].get("global_test_counts"):
        per = card["data"]["global_test_counts"]
        out.append(
            "| server | global test | "
            + " | ".join(str(per.get(c, 0)) for c in classes)
            + f" | {sum(per.values())} |"
        )
    part = card["partition"]
    out += [
        "",
        "## Partition",
        "",
        f"- Scheme: {part['scheme']}"
        + (f" (alpha {part['alpha']})" if part.get("alpha") else "")
        + f", seed {part['seed']}",
        f"- Per-site split train/val/test: {part.get('split')}; unlabelled reference fraction: {part.get('reference_fraction')}",
        f"- Sites: {', '.join(map(str, part.get('sites') or []))}",
        f"- Partition digest: `{part.get('digest')}`",
        "",
        "## Method and hyperparameters",
        "",
    ]
    meth = card["method"]
    for k in (
        "rounds",
        "batch_size",
        "codec_up",
        "codec_down",
        "prompt_template",
        "selection",
        "selected_round",
    ):
        out.append(f"- {k}: {meth.get(k)}")
    out.append(f"- preprocessing: `{json.dumps(meth.get('preprocessing'), sort_keys=True)}`")
    out.append(f"- method options: `{json.dumps(meth.get('options'), sort_keys=True)}`")
    worst = perf.get("worst_site")
    out += [
        "",
        "## Performance",
        "",
        f"Test metrics in %, with {perf['confidence']} in brackets.",
        "",
        "| model | n | accuracy | balanced accuracy | macro-F1 | ECE |",
        "|---|---|---|---|---|---|",
        _row("global test", perf["global"]),
        *[_row(s["site"], s) for s in perf["sites"]],
        "",
        (
            f"**Worst site's balanced accuracy: {_pct(worst['bacc'])}** ({worst['site']})"
            + (f" [{_pct(worst['ci95'][0])}, {_pct(worst['ci95'][1])}]" if worst.get("ci95") else "")
            if worst
            else "Worst site's balanced accuracy: n/a (no site reported test metrics)"
        ),
        "",
        "## Calibration",
        "",
        f"Global expected calibration error (10 equal-width bins): {_pct(cal.get('global_ece'))}%; per site: "
        + ", ".join(f"{s} {_pct(v)}%" for s, v in cal["site_ece"].items()),
        "",
    ]
    rel = cal.get("reliability") or {}
    if rel.get("count"):
        out += ["| confidence bin | n | mean confidence | accuracy |", "|---|---|---|---|"]
        edges = rel["edges"]
        for i, n in enumerate(rel["count"]):
            if n:
                out.append(
                    f"| ({edges[i]:.1f}, {edges[i + 1]:.1f}] | {n} | {rel['confidence'][i]:.3f} | {rel['accuracy'][i]:.3f} |"
                )
        out.append("")
    if cal.get("plot"):
        out += [f"![reliability diagram of the global test]({cal['plot']})", ""]
    out += ["## Out-of-distribution detection", "", *_ood_lines(card.get("ood")), "", "## Privacy", ""]
    mode = priv.get("dp.mode", "none")
    if mode == "none":
        out.append("- Differential privacy: **none**")
    if priv.get("record_level"):
        out += [
            f"- Record level (each patient of a site): **epsilon {priv.get('dp.epsilon') or 'unknown'}** (largest "
            "over sites), "
            f"delta {priv.get('dp.delta')}, per-example clip C = {priv.get('dp.clip')}, noise multiplier sigma "
            f">= {priv.get('dp.noise_multiplier')}, accountant {priv.get('dp.accountant')}",
            *[_site_privacy_line(name, s) for name, s in (priv["record_level"].get("sites") or {}).items()],
        ]
    if priv.get("client_level"):
        noise_at = priv.get("dp.client_noise_at")
        if noise_at == "sites":
            seen = "each site's update with only its share of the noise"
        elif priv.get("dp.secure_aggregation") == "on":
            seen = "the exact sum of the updates before the noise"
        else:
            seen = "every site's update in the clear"
        out.append(
            f"- Client level (what a whole site's data contributed, not whether it took part: each round's sites "
            f"are public): epsilon {priv.get('dp.client_epsilon')}, noise multiplier "
            f"{priv.get('dp.client_noise_multiplier')}, update clip {priv.get('dp.client_clip')}, noise added at the "
            f"{noise_at}; against everyone who sees the published modules, not against the server, which saw {seen}; "
            "against a neighbour that swaps a site's update for another (not only removes it) the sensitivity is "
            "twice the clip, so this epsilon then needs twice the noise; each site's own model (its private head, "
            "trained on its data without this noise) is outside it"
        )
    out += [
        f"- Secure aggregation: {priv.get('dp.secure_aggregation', 'off')}",
        "- Not covered (docs/privacy.md): " + "; ".join(priv.get("not_covered") or NOT_COVERED) + ".",
        "",
        "## Provenance",
        "",
        f"- Code commit: `{prov.get('code_commit') or 'unknown'}`",
        f"- Backbone: `{(prov.get('backbone') or {}).get('name')}`, weights sha256 `{prov.get('backbone_sha256')}`",
        f"- KFP run: {prov.get('kfp_run_id') or 'n/a'}; MLflow run: {prov.get('mlflow_run_id') or 'n/a'}; "
        f"federation run: {prov.get('federation_run_id') or 'n/a'}",
        f"- Data digest `{prov.get('dataset_digest')}`; partition digest `{prov.get('partition_digest')}`",
        *[f"- Feature store of {h}: `{d}`" for h, d in (prov.get("feature_stores") or {}).items()],
        f"- ONNX sha256: `{prov.get('onnx_sha256') or 'n/a'}`",
        "",
    ]
    return "\n".join(out)


def _site_privacy_line(name: str, s: dict) -> str:
    """A site's record-level line of the card: its epsilon (the most its plan allows when updates of it went
    out after its last report; unknown when that plan bounds nothing), its noise, steps and sampling rate."""
    line = (
        f"  - {name}: epsilon {rounded(s.get('epsilon'), 4) or 'unknown'}, sigma "
        f"{rounded(s.get('noise_multiplier'), 4, up=False)}, "
        f"{s.get('steps')} steps at sampling rate {s.get('sample_rate'):.4g}"
    )
    if s.get("reported_epsilon") is not None:
        line += f" as of its last report (it reported epsilon {rounded(s['reported_epsilon'], 4)}; " + (
            "the epsilon is the most its plan allows)"
            if s.get("epsilon") is not None
            else "updates went out after it, and its plan bounds nothing)"
        )
    if s.get("stopped_at_round"):
        line += f", stopped by its budget in round {s['stopped_at_round']}"
    return line


def _ood_lines(ood: dict | None) -> list[str]:
    if ood is None:
        return [
            "None recorded: this card was built without an exported ONNX file (a run directory, or a version "
            "registered from its model folder), or the file has no OOD score (`fedmedclip export --no-ood`). "
            "Every image is then classified, whatever it shows."
        ]
    cal = ood.get("calibration") or {}
    holder = cal.get("holder", "the exporting party")
    holder = "the server" if holder == "server" else holder
    fitted = f"{cal.get('fit_images', '?')} images held by {holder}"
    return [
        f"- Score: `ood_score`, {ood['method']} on the frozen CLIP features, fitted on {fitted} "
        f"({cal.get('fitted_on', 'n/a')})",
        f"- Threshold: {ood['threshold']:.6g}, calibrated for a {_pct(ood['false_alarm_rate'])}% false-alarm rate "
        f"on {cal.get('calibration_images', '?')} held-out images ({cal.get('calibrated_on', 'n/a')})",
        "- The endpoint answers every image with its class probabilities and `ood_score`, and `out_of_distribution` "
        "true above the threshold; `/metrics` reports the share flagged and a drift test against "
        f"the embeddings of {cal.get('reference_images', '?')} of {holder}'s held-out images, stored in the model "
        "(no differential privacy covers them: see Privacy).",
        "- What the rate does not say: how many images of another kind go unflagged (README, *Performance*: "
        "measured on data the model never saw).",
    ]


def write_card(run_dir: str | Path, out_dir: str | Path, registry: dict | None = None) -> dict:
    """model_card.json, model_card.md and the reliability plot in `out_dir`; returns the card."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = build_card(run_dir, registry)
    plot = Path(run_dir) / RUN_PLOT
    if card["calibration"]["plot"]:  # the card's link names its own copy, beside it
        shutil.copyfile(plot, out / RELIABILITY_PLOT)
        card["calibration"]["plot"] = RELIABILITY_PLOT
    (out / "model_card.json").write_text(json.dumps(card, indent=1, allow_nan=False))
    (out / "model_card.md").write_text(render_markdown(card))
    return card
