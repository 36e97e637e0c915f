"""`fedmedclip compare`: every method on the same data, backbone, partitions and seeds, side by side.

A grid of cells (method x partition x seed), each an ordinary run directory under
OUT/runs/<method>/<partition>/seed<k>/. A cell with a results.json is finished and is never rerun, a
cell with a checkpoint resumes, so an interrupted grid continues where it stopped. Every cell shares
one --cache-dir, so each holder's feature store is encoded once per (backbone, preprocessing) and
reused by every method with that preprocessing.

Methods are named as in `fedmedclip train --method`; `NAME@local` and `NAME@centralized` run the same
method with `--federation local` (each site alone) or `centralized` (all training data pooled): the
lower and upper references. Groups come from the methods' own declarations (`Method.group`,
`Method.compare_references`): `all`, `cached` (methods on cached features, with their references), `finetune`.

Every cell's configuration is checked before any cell trains. The grid's options for the updates the sites send
(--aggregator, --secure-aggregation, client-level DP, the codecs) apply to the cells that send updates; the others
run without them (`TrainConfig.drop_unsent`), as the outputs record.

Outputs: OUT/comparison.md (table), OUT/comparison.json (every cell and the summary),
OUT/comparison.png (global and mean-site accuracy per method and partition)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError, ConfigError, shown
from .jsonfiles import read_json_object

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = "iid,dirichlet:0.1,dirichlet:0.5,dirichlet:1.0"
# The most seeds per cell: a billion was a MemoryError building the grid, 10**30 an OverflowError.
MAX_SEEDS = 1000
METRICS = ("acc", "bacc", "f1", "ece")


@dataclass(frozen=True)
class Cell:
    method: str
    federation: str
    partition: str  # label, e.g. "dirichlet:0.5"
    scheme: str
    alpha: float | None
    seed: int

    @property
    def label(self) -> str:
        return self.method if self.federation == "federated" else f"{self.method}@{self.federation}"

    def directory(self, out: Path) -> Path:
        return (
            out
            / "runs"
            / self.label.replace("@", "-")
            / self.partition.replace(":", "-")
            / f"seed{self.seed}"
        )


def parse_methods(spec: str) -> list[tuple[str, str]]:
    """`all`, a group, or a comma list of NAME / NAME@local / NAME@centralized -> [(method, federation)]."""
    from .config import FEDERATIONS
    from .methods import METHODS, method_groups

    groups = method_groups()
    out: list[tuple[str, str]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        for name in groups.get(item, (item,)):
            method, _, federation = name.partition("@")
            federation = federation or "federated"
            if method not in METHODS:
                raise ConfigError(
                    f"unknown method {method!r} in --methods; choose from {', '.join(METHODS)} "
                    f"(optionally @local / @centralized) or a group: {', '.join(groups)}"
                )
            if federation not in FEDERATIONS:
                raise ConfigError(
                    f"unknown federation {federation!r} in {name!r}; choose one of {FEDERATIONS}"
                )
            if (method, federation) not in out:
                out.append((method, federation))
    if not out:
        raise ConfigError("--methods selects nothing")
    return out


def parse_partitions(spec: str) -> list[tuple[str, str, float | None]]:
    """`iid,dirichlet:0.5,natural` -> [(label, scheme, alpha)]."""
    from .flags import is_finite_number

    out, given = [], {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        scheme, _, alpha = item.partition(":")
        if scheme == "dirichlet":
            try:
                a = float(alpha)
            except ValueError:
                raise ConfigError(f"partition {item!r} needs a concentration, e.g. dirichlet:0.5") from None
            if not (is_finite_number(a) and a > 0):
                raise ConfigError(f"partition {item!r}: the concentration must be a finite number > 0")
            entry = (f"dirichlet:{a:g}", scheme, a)
        elif scheme in ("iid", "natural") and not alpha:
            entry = (scheme, scheme, None)
        else:
            raise ConfigError(f"unknown partition {item!r}; use iid, natural or dirichlet:ALPHA")
        # One cell per partition: a second spelling of one (dirichlet:0.50) ran it twice as a fake spread, and two
        # concentrations that print alike (0.5, 0.5000001) would share its run directory.
        if entry[0] in given:
            raise ConfigError(
                f"--partitions names {entry[0]} twice ({given[entry[0]]!r} and {item!r}): give each partition once"
            )
        given[entry[0]] = item
        out.append(entry)
    if not out:
        raise ConfigError("--partitions selects nothing")
    return out


def options_for(method: str, options: dict, grid_methods: list[str]) -> dict:
    """`METHOD.KEY` applies to that method only; a bare `KEY` to every method that has that option."""
    from .methods import METHODS

    out = {}
    for key, value in options.items():
        target, _, name = key.rpartition(".")
        if target:
            if target not in METHODS:
                raise ConfigError(f"--method-opt {key}: unknown method {target!r}")
            if name not in METHODS[target].options:
                raise ConfigError(f"--method-opt {key}: {target} has no option {name!r}")
            if target == method:
                out[name] = value
        else:
            if not any(name in METHODS[m].options for m in grid_methods):
                raise ConfigError(f"--method-opt {key}: no method in the grid has that option")
            if name in METHODS[method].options:
                out[name] = value
    return out


def build_cells(methods, partitions, seeds: list[int]) -> list[Cell]:
    return [
        Cell(m, fed, label, scheme, alpha, seed)
        for (m, fed) in methods
        for (label, scheme, alpha) in partitions
        for seed in seeds
    ]


def _cell_config(base, cell: Cell, out: Path, method_options: dict, grid_methods: list[str]):
    """The cell's validated TrainConfig, and the grid's options it runs without (as flags)."""
    from dataclasses import replace

    cfg = replace(
        base,
        method=cell.method,
        federation=cell.federation,
        partition=cell.scheme,
        alpha=cell.alpha,
        seed=cell.seed,
        out=str(cell.directory(out)),
        method_options=options_for(cell.method, method_options, grid_methods),
    )
    # The grid's options for what the sites send (--aggregator, --secure-aggregation, client-level DP, the
    # codecs) are for the cells that send it: a reference or a method that sends nothing runs the same without
    # them, and a single run would refuse them. What a cell ran without is recorded in the outputs.
    not_applied = cfg.drop_unsent()
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"compare cell {_where(cell)}: {exc}") from None
    return cfg, not_applied


def _where(cell: Cell) -> str:
    return f"{cell.label} ({cell.partition}, seed {cell.seed})"


def finished_results(cfg) -> dict | None:
    """The results of a finished cell (None when unfinished); an error when it was run with other settings,
    so that a table never mixes configurations."""
    d = Path(cfg.out)
    results_path = d / "results.json"
    if not results_path.exists():
        return None
    from .config import TrainConfig

    stored_json = _cell_file(d, "config.json")  # names the cell itself
    try:
        stored_cfg = TrainConfig.from_json(stored_json)
        # A reference cell finished before its grid's codecs were dropped there (they never acted) still matches.
        stored_cfg.drop_unsent()
        stored = stored_cfg.resume_key()
    except (TypeError, ConfigError) as exc:
        raise _damaged(d, "config.json", exc) from None
    if stored != cfg.resume_key():
        raise ConfigError(
            f"{d} holds a finished run with another configuration than this grid asks for "
            "(different rounds, backbone, options?): use another --out, or delete that cell to redo it"
        )
    results = _cell_file(d, "results.json")
    try:  # the numbers the table reads: a damaged file is named here, not a KeyError in the summary
        _cell_numbers(results), results["rounds"]
    except (KeyError, TypeError) as exc:
        raise _damaged(d, "results.json", f"no {exc}" if isinstance(exc, KeyError) else exc) from None
    return results


def _damaged(d: Path, name: str, why) -> ConfigError:
    return ConfigError(f"{d}: its {name} is unreadable ({why}): delete that cell to redo it")


def _cell_file(d: Path, name: str) -> dict:
    """A finished cell's JSON object `name`, or a one-line error naming the cell: a file damaged by hand or by
    the disk gave a traceback (JSONDecodeError, RecursionError) in the middle of the grid."""
    try:
        return read_json_object(d / name)
    except FileNotFoundError:
        raise _damaged(d, name, "missing") from None
    except ValueError as exc:
        raise _damaged(d, name, exc) from None


def run_grid(
    base, cells: list[Cell], out: Path, method_options: dict, progress: bool = True, report_only: bool = False
) -> list[dict]:
    """Run every unfinished cell (`report_only`: skip them). `base` is a TrainConfig with the shared settings
    (data, backbone, rounds, cache_dir, ...). Returns one record per cell: its identity and its results.json."""
    from tqdm.auto import tqdm

    from .engine import check_resumable, train

    grid_methods = sorted({c.method for c in cells})
    # Every cell is checked before any trains: a cell the grid cannot run, a finished one with other settings
    # or a started one that cannot resume stops the grid here, not after the cells before it have trained.
    planned = []
    for cell in cells:
        cfg, not_applied = _cell_config(base, cell, out, method_options, grid_methods)
        results = finished_results(cfg)
        d = Path(cfg.out)
        if results is None and not report_only:
            started = (d / "config.json").exists()
            if not started and d.is_dir() and any(d.iterdir()):
                # engine's advice for this, --resume, is not a flag of compare: a started cell resumes by itself.
                raise ConfigError(
                    f"compare cell {_where(cell)}: {d} holds files but no run of it (no config.json): remove "
                    "them, or give the grid another --out"
                )
            try:
                check_resumable(cfg, d, resume=started)
            except (ConfigError, CheckpointError) as exc:  # a started cell that cannot resume, a full folder
                raise type(exc)(f"compare cell {_where(cell)}: {exc}") from None
        planned.append((cell, cfg, not_applied, results))
    if not report_only:  # a bare `compare` is every method x 4 partitions x 3 seeds: say what is coming
        todo = sum(results is None for *_, results in planned)
        n = [len({getattr(c, attr) for c in cells}) for attr in ("label", "partition", "seed")]
        log.info(
            "compare: %d cells (%d methods x %d partitions x %d seeds), %d to run, %d rounds each; --methods, "
            "--partitions and --seeds narrow it",
            len(cells),
            *n,
            todo,
            base.rounds,
        )
    for label, flags in dict.fromkeys((c.label, tuple(n)) for c, _, n, _ in planned if n):
        log.warning("%s runs without %s: it sends no update to the server", label, ", ".join(flags))
    records = []
    bar = tqdm(planned, desc="compare", unit="cell", disable=not progress or report_only)
    for cell, cfg, not_applied, results in bar:
        bar.set_postfix_str(f"{cell.label} {cell.partition} seed{cell.seed}")
        d = Path(cfg.out)
        if results is not None:
            if not report_only:
                log.info("cell %s is finished: not rerun", d)
        elif report_only:
            continue
        else:
            # A started cell resumes (its configuration was checked above).
            results = train(cfg, resume=(d / "config.json").exists(), progress=progress)
        records.append({**_identity(cell), "not_applied": not_applied, "dir": str(d), "results": results})
    return records


def _identity(cell: Cell) -> dict:
    return {
        "method": cell.label,
        "base_method": cell.method,
        "federation": cell.federation,
        "partition": cell.partition,
        "seed": cell.seed,
    }


def _stat(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def summarise(records: list[dict]) -> list[dict]:
    """Per (method, partition): mean and sample std over seeds of every reported number."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["partition"]), []).append(r["results"])
    rows = []
    for (method, partition), rs in groups.items():
        row = {"method": method, "partition": partition, "seeds": len(rs)}
        for k in METRICS:
            row[f"global_{k}"] = _stat([r["metrics"]["global"][k] for r in rs])
            row[f"sites_{k}"] = _stat([r["metrics"]["site_mean"][k] for r in rs])
        row["bytes_per_site_per_round"] = _stat([r["comm"]["bytes_up_per_site_per_round"] for r in rs])
        row["seconds_per_round"] = _stat([r["timing"]["seconds_per_round"] for r in rs])
        row["rounds"] = rs[0]["rounds"]
        rows.append(row)
    return rows


def _pct(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    # One seed has no spread to show.
    return f"{100 * s['mean']:.1f}" if s["n"] < 2 else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| partition | method | global ACC | global BACC | global F1 | global ECE "
        "| sites ACC | sites BACC | sites F1 | sites ECE | bytes/site/round | s/round |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        metrics = [_pct(r[f"global_{k}"]) for k in METRICS] + [_pct(r[f"sites_{k}"]) for k in METRICS]
        sec = r["seconds_per_round"]["mean"]
        lines.append(
            f"| {r['partition']} | {r['method']} | "
            + " | ".join(metrics)
            + f" | {_bytes(r['bytes_per_site_per_round']['mean'])} | {sec:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    partitions = list(dict.fromkeys(r["partition"] for r in rows))
    by = {(r["method"], r["partition"]): r for r in rows}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(methods) + 3), 7.5), sharex=True)
    width = 0.8 / max(len(partitions), 1)
    for ax, key, title in zip(
        axes, ("global_acc", "sites_acc"), ("global test", "mean of sites' local tests"), strict=True
    ):
        for j, part in enumerate(partitions):
            xs, ys, es = [], [], []
            for i, m in enumerate(methods):
                s = by.get((m, part), {}).get(key)
                if s and s["mean"] is not None:
                    xs.append(i + (j - (len(partitions) - 1) / 2) * width)
                    ys.append(s["mean"])
                    es.append(s["std"])
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=part)
        ax.set_ylabel(f"accuracy ({title})")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="partition", fontsize=8, ncol=len(partitions))
    axes[1].set_xticks(range(len(methods)))
    axes[1].set_xticklabels(methods, rotation=35, ha="right")
    seeds = max((r["seeds"] for r in rows), default=1)
    fig.suptitle(
        f"Method comparison: mean ± std over {seeds} seeds" if seeds > 1 else "Method comparison (one seed)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(records: list[dict], out: Path, settings: dict) -> list[dict]:
    rows = summarise(records)
    # as the cells' results.json name it (the median under a robust --aggregator, the last round without validation)
    selections = "; ".join(sorted({r["results"]["metrics"]["selection"] for r in records}))
    out.mkdir(parents=True, exist_ok=True)
    cells = [{k: v for k, v in r.items() if k != "results"} | _cell_numbers(r["results"]) for r in records]
    (out / "comparison.json").write_text(
        json.dumps({"settings": settings, "summary": rows, "cells": cells}, indent=1)
    )
    body = (
        f"# Comparison\n\nbackbone `{settings['backbone']}`, data `{settings['data']}`, {settings['rounds']} rounds, "
        f"seeds {settings['seeds']} ({len(records)} finished cells); mean ± sample std over seeds, in %. Global: the global test set with each "
        "method's global rule; sites: mean over sites of their local test metrics (selected round: "
        f"{selections}). Bytes: measured payload length uploaded per site per round.\n\n"
    )
    (out / "comparison.md").write_text(body + markdown_table(rows) + not_applied_note(records))
    plot(rows, out / "comparison.png")
    return rows


def not_applied_note(records: list[dict]) -> str:
    """Which methods ran without which of the grid's options (they send no update: `_cell_config`), one line
    per set of options; empty when every cell ran with all of them."""
    labels: dict[tuple[str, ...], list[str]] = {}
    for r in records:
        if r.get("not_applied"):
            methods = labels.setdefault(tuple(r["not_applied"]), [])
            if r["method"] not in methods:
                methods.append(r["method"])
    return "".join(
        f"\nNot applied to {', '.join(methods)} (no update sent to the server; `train` refuses them there): "
        f"{', '.join(f'`{flag}`' for flag in flags)}.\n"
        for flags, methods in labels.items()
    )


def _cell_numbers(results: dict) -> dict:
    """The numbers the table reads; each must be a number or null (a TypeError names the first that is not, by
    where it is in results.json: the summary would stop on it with numpy's message)."""

    def number(value, name: str):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{name} is {json.dumps(value)[:40]}, not a number")
        return value

    m = results["metrics"]
    for k in METRICS:
        number(m["site_mean"][k], f"metrics.site_mean.{k}")
    return {
        "global": {k: number(m["global"][k], f"metrics.global.{k}") for k in METRICS},
        "site_mean": m["site_mean"],
        "best_round": number(m["best_round"], "metrics.best_round"),
        "bytes_per_site_per_round": number(
            results["comm"]["bytes_up_per_site_per_round"], "comm.bytes_up_per_site_per_round"
        ),
        "seconds_per_round": number(results["timing"]["seconds_per_round"], "timing.seconds_per_round"),
    }


# ---------------------------------------------------------------- command line
def add_arguments(p) -> None:
    """The grid's own flags, then every configuration field declared for compare (fedmedclip.flags); the fields
    the grid sets per cell (`_cell_config`) are declared `grid=True`, so compare takes no flag of theirs."""
    from .flags import COMPARE, add_config_arguments

    p.add_argument(
        "--methods",
        default="all",
        help="all | cached | finetune | comma list of methods, NAME@local / NAME@centralized for the "
        "references (default: %(default)s; `fedmedclip methods` lists them)",
    )
    p.add_argument("--partitions", default=DEFAULT_PARTITIONS, help="comma list (default: %(default)s)")
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help=f"seeds 0..N-1 per cell, N at most {MAX_SEEDS} (default: %(default)s)",
    )
    p.add_argument(
        "--method-opt",
        action="append",
        default=[],
        metavar="[METHOD.]KEY=VALUE",
        help="e.g. facmic.local_steps=50 (that method only) or local_steps=50 (every method having it)",
    )
    p.add_argument("--out", default="runs/compare", help="grid directory (default: %(default)s)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: tabulate the cells of this grid that are already finished",
    )
    add_config_arguments(p, COMPARE, defaults={"rounds": 10})


def cmd_compare(args) -> int:
    from .config import parse_method_options
    from .flags import config_from_args

    if not 1 <= args.seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds must be from 1 to {MAX_SEEDS}, got {shown(args.seeds)}")
    methods = parse_methods(args.methods)
    partitions = parse_partitions(args.partitions)
    base = config_from_args(args, method_options={})
    out = Path(args.out)
    if (out / "config.json").exists() or (out / "checkpoint").exists():  # a grid's runs are under out/runs/
        raise ConfigError(f"--out {out} is the run directory of a `train`: give the grid a folder of its own")
    cells = build_cells(methods, partitions, list(range(args.seeds)))
    records = run_grid(
        base, cells, out, parse_method_options(args.method_opt), not args.quiet, report_only=args.report_only
    )
    if not records:
        raise ConfigError(f"no finished cell of this grid under {out}")
    settings = {
        "data": args.data,
        "backbone": args.backbone,
        "rounds": args.rounds,
        "seeds": args.seeds,
        "sites": args.sites,
        "methods": [f"{m}@{f}" if f != "federated" else m for m, f in methods],
        "partitions": [p[0] for p in partitions],
        "method_options": args.method_opt,
    }
    write_outputs(records, out, settings)
    print((out / "comparison.md").read_text())
    print(f"table: {out}/comparison.md\njson : {out}/comparison.json\nplot : {out}/comparison.png")
    return 0
