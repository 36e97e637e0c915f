"""What watches a federated run while it goes on: ONE interface for `train`, `server run` and the pipeline's
server worker. The core calls it; a layer implements it (the MLOps layer's MLflow logging, found through the
entry-point group `fedmedclip.observers`), so the core never imports mlflow.

Calls, in order: `start(manifest, resumed)` once the run's manifest exists (a resumed run: `resumed=True`),
`round(record)` after each round (a results.json `history` entry), then `finish(results, None)` at the end or
`finish(None, message)` when the run fails. An observer must never stop the federation: it logs its own
failures and goes on.
"""

from __future__ import annotations


class RunObserver:
    """The interface, with no-op defaults: an observer overrides what it listens to."""

    # The id of the record the observer keeps of the run elsewhere (the MLflow run id); None when it keeps
    # none, or it could not (tracking never stops a run, so a command checks this to say it was not tracked).
    tracked_run_id: str | None = None

    def start(self, manifest: dict, resumed: bool = False) -> None:
        """The run's manifest (its sites, codecs, quorum) exists; `resumed`: it continues an earlier start."""

    def round(self, record: dict) -> None:
        """A round finished: its results.json `history` record."""

    def finish(self, results: dict | None, error: str | None = None) -> None:
        """The run ended: results.json (`error` None), or the reason it failed (`results` None)."""


NO_OBSERVER = RunObserver()  # what runs without tracking are watched by
