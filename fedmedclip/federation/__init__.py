"""The federation runtime: long-lived site workers and an aggregator exchanging codec payloads through an
object store (S3 or a local directory), with quorum, timeouts, update validation and restart.
See docs/contracts.md ("Federation runtime: the mailbox").

The names below are imported on first use: a task that only reads the mailbox (the pipeline's report, the
object stores of mlops/) imports `storage` and `mailbox` without the training side's torch.
"""

from importlib import import_module

_WHERE = {
    "SERVER": "mailbox",
    "Mailbox": "mailbox",
    "ProtocolError": "mailbox",
    "prepare_site": "runner",
    "run_server": "runner",
    "run_site": "runner",
    "FederationError": "server",
    "FederationServer": "server",
    "ServerOptions": "server",
    "ServerSetup": "server",
    "SiteFailure": "site",
    "SiteSetup": "site",
    "SiteWorker": "site",
    "LocalDirStore": "storage",
    "MemoryStore": "storage",
    "ObjectStore": "storage",
    "StoreAccessDenied": "storage",
    "StoreError": "storage",
    "open_store": "storage",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
