"""Where the MLflow tracking server is: ONE rule for every command that talks to it (`train --track`,
`server run --track`, `track`, `register`, `promote`, `backbone push --to models:/`, `pipeline run --local`,
`demo`, `serve models:/...`).

1. an explicit address (`--tracking-uri`, the pipeline's `tracking_uri` parameter);
2. else `$MLFLOW_TRACKING_URI`;
3. else the local development stack recorded in `$FEDMEDCLIP_STACK_DIR` (default `.stack`), as
   `fedmedclip stack up` writes it (`stack.json`, its `tracking_uri`);
4. else nothing: the caller says so in one line. Never MLflow's own default, which silently creates
   `./mlflow.db` (or `./mlruns`) in whatever directory the command runs in.

Standard library only: the core never imports mlflow, and `serving` (which must not import the MLOps layer)
uses the same rule.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import FedMedClipError

STACK_DIR_ENV = "FEDMEDCLIP_STACK_DIR"
DEFAULT_STACK_DIR = ".stack"
DEFAULT_EXPERIMENT = "fedmedclip"  # the MLflow experiment of every command and the pipeline unless told
STACK_STATE_FILE = "stack.json"
NO_TRACKING_SERVER = (
    "no MLflow tracking server: pass --tracking-uri, set MLFLOW_TRACKING_URI, or start the local stack with "
    "`fedmedclip stack up`"
)


def recorded_stack_dir() -> str:
    """Where commands look for a running local stack: $FEDMEDCLIP_STACK_DIR, else .stack."""
    return os.environ.get(STACK_DIR_ENV) or DEFAULT_STACK_DIR


def find_tracking_uri(explicit: str | None = None, stack_dir: str | Path | None = None) -> str | None:
    """The tracking server by the rule above; None when there is none."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    state = Path(stack_dir or recorded_stack_dir()) / STACK_STATE_FILE
    try:
        uri = json.loads(state.read_text()).get("tracking_uri")
    except (OSError, ValueError, AttributeError):
        return None
    return uri if isinstance(uri, str) and uri.startswith(("http://", "https://")) else None


def unreachable(tracking_uri: str, timeout: float = 5.0) -> str | None:
    """Why `tracking_uri` cannot be reached (None when it answers). MLflow's client retries a dead server for
    minutes; this answers in seconds."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answers; an auth proxy may guard /health
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))


def require_tracking_uri(explicit: str | None = None, purpose: str = "", error=FedMedClipError) -> str:
    """The tracking server by the rule, answering: else `error` (a FedMedClipError class) in one line, led by
    `purpose` (what needed it)."""
    lead = f"{purpose}: " if purpose else ""
    uri = find_tracking_uri(explicit)
    if uri is None:
        raise error(
            f"{lead}{NO_TRACKING_SERVER} (then `eval $(fedmedclip stack env)` for other shells); no running stack "
            f"is recorded in {recorded_stack_dir()} (${STACK_DIR_ENV}, else {DEFAULT_STACK_DIR}: where commands look)"
        )
    if not uri.startswith(("http://", "https://")):  # MLflow would take a path or a database, here or later
        raise error(
            f"{lead}{uri!r} is not a tracking server's address: give http(s)://HOST:PORT in --tracking-uri or "
            "MLFLOW_TRACKING_URI (runs and models are tracked by a server, whose artifacts are on S3)"
        )
    problem = unreachable(uri)
    if problem is not None:
        raise error(
            f"{lead}the MLflow tracking server at {uri} is not reachable ({problem}); start the local one with "
            "`fedmedclip stack up` or check --tracking-uri / MLFLOW_TRACKING_URI"
        )
    return uri
