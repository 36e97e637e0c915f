"""The federation runtime: long-lived site workers and an aggregator exchanging codec payloads through an
object store (S3 or a local directory), with quorum, timeouts, update validation and restart.
See docs/contracts.md ("Federation runtime: the mailbox")."""

from .mailbox import SERVER, Mailbox, ProtocolError
from .runner import prepare_site, run_server, run_site
from .server import FederationError, FederationServer, ServerOptions, ServerSetup
from .site import SiteFailure, SiteSetup, SiteWorker
from .storage import LocalDirStore, MemoryStore, ObjectStore, StoreAccessDenied, StoreError, open_store

__all__ = [
    "SERVER",
    "FederationError",
    "FederationServer",
    "LocalDirStore",
    "Mailbox",
    "MemoryStore",
    "ObjectStore",
    "ProtocolError",
    "ServerOptions",
    "ServerSetup",
    "SiteFailure",
    "SiteSetup",
    "SiteWorker",
    "StoreAccessDenied",
    "StoreError",
    "open_store",
    "prepare_site",
    "run_server",
    "run_site",
]
