"""The local development stack: a real S3-compatible server (moto) and a real MLflow server on loopback.

`start_stack` launches both as detached background processes (their own sessions, so they outlive the
command that started them and can be stopped as whole process groups), waits until they answer, creates
the artifact bucket and the data buckets with versioning enabled, and records PIDs, ports, log files and
credentials in `DATA_DIR/stack.json` (mode 0600: it holds every role's secret key).
`stop_stack` reads that file and terminates them; `stack_status` reports on them.

**The S3 server enforces per-role credentials.** moto runs with `INITIAL_NO_AUTH_ACTION_COUNT=0` (every
request is authenticated and IAM user policies are evaluated for S3 object operations) inside a small
wrapper (`python -m devstack.stack serve-s3`) that, before it serves a single request, creates one IAM
user and access key per role of mlops/policies.py (publisher, server, each site, mlflow) plus an
`admin` user for bootstrapping, so there is no unauthenticated window. The wrapper also closes what moto
leaves open: its unauthenticated control API (`/moto-api/`: it can switch authentication off, reset the
server, or dump every object and key), server-side copies (moto checks write access to the destination
only, so a site could copy another site's image into its own prefix), and anonymous requests (moto answers
them with a 500). Presigned URLs (MLflow hands them to clients downloading artifacts), which moto cannot
authenticate, are checked by the wrapper (SigV4 signature, expiry) and passed on signed in headers with the
same key, so the signer's policy applies. MLflow's server gets the mlflow role's credentials. `StackInfo.role_env(role)` gives a
role's client environment; `StackInfo.env` (what `fedmedclip stack env` prints) is the admin's.

MLflow keeps its tracking database (sqlite) in DATA_DIR, but moto keeps S3 **in memory only**: every
artifact (run files, registered models) is gone after `stack down`. A restarted stack still lists the
old runs and model versions, whose artifacts can no longer be downloaded; use a fresh DATA_DIR (or
`stack down --purge`) when that matters.

Only the standard library is imported at module level (the CLI imports this module lazily anyway);
boto3 is imported where the bucket is created.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedmedclip.errors import FedMedClipError
from fedmedclip.tracking_server import DEFAULT_STACK_DIR, STACK_STATE_FILE, recorded_stack_dir  # noqa: F401

DEFAULT_DATA_DIR = DEFAULT_STACK_DIR
DEFAULT_S3_PORT = 9000
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_BUCKET = "fedmedclip"  # MLflow's artifacts, under mlartifacts/
DEFAULT_DATA_BUCKET = "fedmedclip-data"  # the data bucket every role is granted on at start (the cluster's)
MLFLOW_PREFIX = "mlartifacts"
# Placeholders of a state file written before the stack enforced credentials; real keys are generated.
DEFAULT_ACCESS_KEY = "fedmedclip"
DEFAULT_SECRET_KEY = "fedmedclip-secret"
DEFAULT_REGION = "us-east-1"  # the one region where create_bucket needs no LocationConstraint
STATE_FILE = STACK_STATE_FILE
STATE_FORMAT = 2
# What points a client at the central MLflow: a site's or the publisher's shell must hold none of them.
MLFLOW_CLIENT_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
ADMIN = "admin"  # the bootstrap user: every S3 and IAM action (creates buckets, grants roles)
BOOTSTRAP_FILE = "s3-bootstrap.json"  # users and policies for the S3 wrapper (no secrets)
CREDENTIALS_FILE = "s3-credentials.json"  # the keys the wrapper generated, until stack.json holds them

# First start on 2 cores creates the sqlite schema: about 10 s. Leave generous room for loaded CI machines.
S3_START_TIMEOUT = 30.0
MLFLOW_START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0


_log = logging.getLogger("fedmedclip.stack")


class StackError(FedMedClipError):
    """The local stack cannot be started, found or stopped."""


@dataclass
class ServiceInfo:
    name: str
    pid: int
    port: int
    log: str
    command: list[str] = field(default_factory=list)


@dataclass
class RoleCredentials:
    """A role's IAM user on the local S3 server (mlops/policies.py defines what it may do)."""

    kind: str  # publisher | server | site | mlflow
    access_key: str
    secret_key: str
    site_index: int | None = None


@dataclass
class StackInfo:
    data_dir: str
    host: str
    s3_port: int
    mlflow_port: int
    bucket: str = DEFAULT_BUCKET
    access_key: str = DEFAULT_ACCESS_KEY  # the admin's
    secret_key: str = DEFAULT_SECRET_KEY
    region: str = DEFAULT_REGION
    services: dict[str, ServiceInfo] = field(default_factory=dict)
    started_at: float = 0.0
    site_names: list[str] = field(default_factory=list)  # site k = site_names[k]
    data_roots: list[str] = field(default_factory=list)  # buckets (or BUCKET/PREFIX) the roles are granted on
    roles: dict[str, RoleCredentials] = field(default_factory=dict)

    @property
    def tracking_uri(self) -> str:
        return f"http://{_url_host(self.host)}:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{_url_host(self.host)}:{self.s3_port}"

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.bucket}/mlartifacts"

    @property
    def mlflow_root(self) -> str:
        """Where MLflow's server keeps artifacts, as a policy root (`BUCKET/PREFIX`)."""
        return f"{self.bucket}/{MLFLOW_PREFIX}"

    @property
    def env(self) -> dict[str, str]:
        """The ADMIN's client environment (bootstrap, tests, operators): `role_env("admin")`. A party of the
        federation uses its own role's."""
        return self.role_env(ADMIN)

    @property
    def role_names(self) -> list[str]:
        """The roles with credentials: publisher, server, the sites, mlflow (and `admin`)."""
        return [*self.roles, ADMIN]

    def credentials(self, role: str) -> tuple[str, str]:
        """(access key, secret key) of `role` (`admin` included); StackError naming the known roles."""
        if role == ADMIN:
            return self.access_key, self.secret_key
        creds = self.roles.get(role)
        if creds is None:
            raise StackError(
                f"the local stack in {self.data_dir} has no role {role!r}; its roles: {', '.join(self.role_names)}"
                + ("" if self.roles else " (it was started before roles existed: restart it)")
            )
        return creds.access_key, creds.secret_key

    def role_env(self, role: str) -> dict[str, str]:
        """The environment of a client acting as `role`: its S3 credentials, region and endpoint
        (`AWS_ENDPOINT_URL_S3`, which boto3 reads itself). The server (and admin) also get the MLflow
        tracking URI; a site and the publisher do not: nothing of a site goes to the central MLflow."""
        access_key, secret_key = self.credentials(role)
        env = {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
        }
        if role in (ADMIN, "server"):
            env["MLFLOW_TRACKING_URI"] = self.tracking_uri
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        return env

    def export_lines(self, role: str | None = None) -> str:
        """Shell lines giving the admin's environment (`env`) or `role`'s (`role_env`): `export` of each of its
        variables, then `unset` of the MLflow ones a role does not get (a site's shell that held the admin's
        or the server's before gets no MLflow address)."""
        env = self.role_env(role or ADMIN)
        lines = [f"export {k}={_shell_quote(v)}" for k, v in env.items()]
        absent = [k for k in MLFLOW_CLIENT_VARIABLES if k not in env]
        if absent:
            lines.append(f"unset {' '.join(absent)}")
        return "\n".join(lines)

    def s3_client(self, role: str | None = None):
        """A boto3 S3 client of the admin, or of `role`."""
        from mlops.s3 import s3_client

        return s3_client(self.s3_endpoint, *self.credentials(role or ADMIN), region=self.region)

    def to_json(self) -> dict:
        d = asdict(self)
        d["format"] = STATE_FORMAT
        d["tracking_uri"] = self.tracking_uri
        d["s3_endpoint"] = self.s3_endpoint
        return d

    @classmethod
    def from_json(cls, d: dict) -> StackInfo:
        services = {k: ServiceInfo(**v) for k, v in d.get("services", {}).items()}
        roles = {k: RoleCredentials(**v) for k, v in d.get("roles", {}).items()}
        return cls(
            data_dir=d["data_dir"],
            host=d["host"],
            s3_port=int(d["s3_port"]),
            mlflow_port=int(d["mlflow_port"]),
            bucket=d.get("bucket", DEFAULT_BUCKET),
            access_key=d.get("access_key", DEFAULT_ACCESS_KEY),
            secret_key=d.get("secret_key", DEFAULT_SECRET_KEY),
            region=d.get("region", DEFAULT_REGION),
            services=services,
            started_at=float(d.get("started_at", 0.0)),
            site_names=list(d.get("site_names", [])),
            data_roots=list(d.get("data_roots", [])),
            roles=roles,
        )


@dataclass
class ServiceStatus:
    name: str
    pid: int
    port: int
    running: bool
    healthy: bool
    log: str


@dataclass
class StackStatus:
    data_dir: str
    recorded: bool  # a stack.json exists
    services: list[ServiceStatus]
    info: StackInfo | None

    @property
    def running(self) -> bool:
        return self.recorded and bool(self.services) and all(s.running and s.healthy for s in self.services)

    def describe(self) -> str:
        if not self.recorded:
            return f"stack: not running (no {STATE_FILE} in {self.data_dir})"
        lines = [f"stack in {self.data_dir}: {'running' if self.running else 'NOT healthy'}"]
        for s in self.services:
            state = "healthy" if s.healthy else ("running, not answering" if s.running else "not running")
            lines.append(f"  {s.name:<7} pid {s.pid:<8} port {s.port:<6} {state}   log: {s.log}")
        if self.info is not None:
            lines.append(f"  MLflow UI / tracking URI: {self.info.tracking_uri}")
            lines.append(f"  S3 endpoint: {self.info.s3_endpoint}  bucket: {self.info.bucket} (versioned)")
            if self.info.roles:
                lines.append(
                    f"  S3 credentials enforced; roles: {', '.join(self.info.roles)} (and admin); "
                    f"data buckets: {', '.join(self.info.data_roots)}"
                )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- helpers


def _url_host(host: str) -> str:
    # A wildcard bind address is reachable on loopback; IPv6 literals need brackets in URLs.
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def _state_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / STATE_FILE


def use_stack_s3(info: StackInfo, role: str | None = None) -> None:
    """Point this process, and the task processes it starts, at the stack's S3 (credentials and endpoint)
    as the admin, or as `role`. The tracking URI is left alone: each command chooses it explicitly."""
    env = info.role_env(role or ADMIN)
    os.environ.update({k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"})


def use_recorded_stack_s3(stack_dir: str | Path | None = None, role: str | None = None) -> StackInfo | None:
    """Without S3 credentials in the environment, those of the recorded local stack (the admin's, or
    `role`'s), if there is one; returns that stack (None when the environment's credentials are kept)."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return None
    info = read_state(stack_dir or recorded_stack_dir())
    if info is not None:
        use_stack_s3(info, role)
    return info


def read_state(data_dir: str | Path) -> StackInfo | None:
    path = _state_path(data_dir)
    if not path.exists():
        return None
    try:
        return StackInfo.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise StackError(
            f"{path} is not a valid stack state file ({e}); remove it if no stack is running"
        ) from e


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable and writable by its owner only (it holds secret keys), atomically:
    atomic_write_bytes's temporary file is mkstemp's, mode 0600 and this write's own (two processes writing at
    once each replace the file whole; a shared name let one truncate the other's half-written file)."""
    from fedmedclip.federation.storage import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def _state_lock(data_dir: str | Path, on_wait: Callable[[], None] = lambda: None):
    """One process at a time changes a stack's state file (a lock of its folder): starting the stack, granting
    a data root and stopping it read the state, act, and write or remove it, and two commands at once (two
    `data publish`, the demo and a test) lost each other's roots. `on_wait`: lock_folder's."""
    from fedmedclip.paths import lock_folder

    Path(data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    with lock_folder(data_dir, on_wait=on_wait):
        yield


def _write_state(info: StackInfo) -> None:
    _write_private(_state_path(info.data_dir), json.dumps(info.to_json(), indent=2))


def _tool(name: str) -> str:
    """The console script installed next to the running interpreter (the venv), else on PATH."""
    import shutil

    # Do not resolve symlinks: a venv's python is a link to the system one, the scripts are in the venv.
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    extra = "test" if name == "moto_server" else "pipelines"
    raise StackError(
        f"cannot find the `{name}` executable next to {sys.executable} or on PATH; "
        f'install the project with the `{extra}` extra (pip install -c constraints.txt -e ".[{extra}]")'
    )


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # Same option the servers use, so a port in TIME_WAIT is not reported as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise StackError(f"cannot bind {host}:{port}: {e}") from e
    return True


def _log_tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.strip().splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (empty log)"


# Popen objects of servers started by this process: kept so that they can be reaped (no zombies, no
# ResourceWarning) when the same process stops them, as the test fixtures do.
_CHILDREN: dict[int, subprocess.Popen] = {}


def _pid_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still accepts signal 0; it is not running.
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True


def _cmdline(pid: int) -> str | None:
    """The command line of `pid` (Linux), None where /proc does not tell."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def _runs_service(pid: int, svc: ServiceInfo) -> bool:
    """Guard against PID reuse: the process must still run the recorded program on the recorded port."""
    text = _cmdline(pid)
    if text is None:
        return not Path("/proc").is_dir()  # not Linux: trust the record
    programs = ("devstack.stack", "moto_server") if svc.name == "s3" else ("mlflow",)
    return any(p in text for p in programs) and str(svc.port) in text


def _is_our_process(svc: ServiceInfo) -> bool:
    return _pid_alive(svc.pid) and _runs_service(svc.pid, svc)


def _group_members(svc: ServiceInfo) -> list[int]:
    """Live processes of the service's process group (pgid == leader pid: it was started in its own
    session) still running the service, e.g. MLflow's uvicorn worker after its parent died."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        if fields[0] != "Z" and int(fields[2]) == svc.pid and _runs_service(pid, svc):
            members.append(pid)
    return members


def _launch(name: str, command: list[str], log: Path, env: dict[str, str], cwd: Path) -> ServiceInfo:
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # detached: survives this command, and is its own process group
        )
    _CHILDREN[proc.pid] = proc
    return ServiceInfo(name=name, pid=proc.pid, port=0, log=str(log), command=command)


def _fail(msg: str, svc: ServiceInfo | None, started: list[ServiceInfo]) -> StackError:
    for s in started:
        _terminate(s)
    if svc is not None:
        msg += f"\n  last lines of {svc.log}:\n{_log_tail(svc.log)}"
    return StackError(msg)


def _wait_s3(info: StackInfo, svc: ServiceInfo, started: list[ServiceInfo]) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=info.s3_endpoint,
        aws_access_key_id=info.access_key,
        aws_secret_access_key=info.secret_key,
        region_name=info.region,
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + S3_START_TIMEOUT
    last = None
    while time.monotonic() < deadline:
        if not _pid_alive(svc.pid):
            raise _fail(f"the S3 server (moto) exited during start-up on port {info.s3_port}", svc, started)
        try:
            client.list_buckets()
            break
        except Exception as e:  # connection refused until it listens
            last = e
            time.sleep(0.2)
    else:
        raise _fail(
            f"the S3 server did not answer on {info.s3_endpoint} within {S3_START_TIMEOUT:.0f} s ({last})",
            svc,
            started,
        )
    buckets = [info.bucket, *(root.split("/")[0] for root in info.data_roots)]
    for bucket in dict.fromkeys(buckets):
        try:
            status = _versioned_bucket(client, bucket)
        except Exception as e:
            raise _fail(f"cannot create the versioned bucket {bucket!r}: {e}", svc, started) from e
        if status != "Enabled":
            raise _fail(f"bucket {bucket!r} versioning is {status!r}, expected 'Enabled'", svc, started)


def _versioned_bucket(client, bucket: str) -> str | None:
    """Create `bucket` if missing, enable versioning; returns the versioning status read back."""
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return client.get_bucket_versioning(Bucket=bucket).get("Status")


def mlflow_healthy(tracking_uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_mlflow(info: StackInfo, svc: ServiceInfo, started: list[ServiceInfo]) -> None:
    deadline = time.monotonic() + MLFLOW_START_TIMEOUT
    while time.monotonic() < deadline:
        if not _pid_alive(svc.pid):
            raise _fail(f"the MLflow server exited during start-up on port {info.mlflow_port}", svc, started)
        if mlflow_healthy(info.tracking_uri, timeout=1.0):
            return
        time.sleep(0.25)
    raise _fail(
        f"the MLflow server did not become healthy at {info.tracking_uri}/health within "
        f"{MLFLOW_START_TIMEOUT:.0f} s",
        svc,
        started,
    )


def _s3_healthy(info: StackInfo) -> bool:
    # A bare TCP + HTTP probe (anonymous: answered 403 by the enforcing server): avoids importing boto3
    # for `stack status`.
    try:
        with urllib.request.urlopen(f"{info.s3_endpoint}/", timeout=2.0) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _terminate(svc: ServiceInfo, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM the service's process group (MLflow runs uvicorn as a child), SIGKILL what lingers.
    Returns True when something was stopped."""
    leader = _is_our_process(svc)
    if not leader and not _group_members(svc):
        child = _CHILDREN.pop(svc.pid, None)
        if child is not None:
            child.poll()  # reap
        return False
    # The service leads its own group (start_new_session), so pgid == pid; never signal our own group.
    as_group = svc.pid != os.getpgid(0)

    def signal_all(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if as_group:
                os.killpg(svc.pid, sig)
            else:
                os.kill(svc.pid, sig)

    def alive() -> bool:
        return _is_our_process(svc) or bool(_group_members(svc))

    def workers() -> set[int]:
        return set(_group_members(svc)) - {svc.pid}

    # Once its workers have stopped (MLflow's uvicorn), a leader that had some (`mlflow server`, which only
    # waited on them) has nothing left to do but tear its interpreter down, about a second: not waited for.
    leader_only_waits = leader and bool(workers())

    def stopped() -> bool:  # one scan of /proc for the workers per check
        return not workers() and (leader_only_waits or not _is_our_process(svc))

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopped():
        time.sleep(0.05)
    if alive():
        signal_all(signal.SIGKILL)
    child = _CHILDREN.pop(svc.pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    return True


# ------------------------------------------------------------------------------------------- public API


S3_PORT_ENV = "FEDMEDCLIP_S3_PORT"
MLFLOW_PORT_ENV = "FEDMEDCLIP_MLFLOW_PORT"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stack_ports(host: str = DEFAULT_HOST, s3_port: int | None = None, mlflow_port: int | None = None):
    """The ports a new local stack listens on, and what the choice needs saying: ([s3, mlflow], notes).

    A port that was asked for (the argument, else $FEDMEDCLIP_S3_PORT / $FEDMEDCLIP_MLFLOW_PORT) is used as
    it is, and a taken one is a StackError naming it and the option. A default port (9000, 5000) that is taken
    is replaced by a free one the system picks, and a note says which. `stack up` and `demo` both start
    the stack through this."""
    chosen, notes = [], []
    for label, port, env, default, flag in (
        ("S3", s3_port, S3_PORT_ENV, DEFAULT_S3_PORT, "--s3-port"),
        ("MLflow", mlflow_port, MLFLOW_PORT_ENV, DEFAULT_MLFLOW_PORT, "--mlflow-port"),
    ):
        raw = os.environ.get(env, "")
        if port is None and raw:
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise StackError(f"${env}={raw!r} is not a port number")
            port = int(raw)
        elif port is not None and not 0 < int(port) < 65536:  # bind() would raise, or port 0 pick any
            raise StackError(f"{flag} {port}: not a port number (1 to 65535)")
        asked = port is not None
        port = default if port is None else int(port)
        if port in chosen or not _port_free(host, port):
            if asked:
                raise StackError(
                    f"port {port} on {host} is already in use, so the {label} server cannot start there; "
                    f"stop whatever listens on it or choose another port with {flag} (or ${env})"
                )
            taken = port
            while port == taken or port in chosen:
                port = _free_port(host)
            notes.append(
                f"port {taken} is taken: the {label} server listens on {port} instead ({flag} or ${env} choose)"
            )
        chosen.append(port)
    return chosen, notes


def start_stack(
    data_dir: str | Path = DEFAULT_DATA_DIR,
    s3_port: int | None = None,
    mlflow_port: int | None = None,
    host: str = DEFAULT_HOST,
    bucket: str = DEFAULT_BUCKET,
    mlflow_args: list[str] | tuple[str, ...] = (),
    site_names: list[str] | tuple[str, ...] | None = None,
    data_roots: list[str] | tuple[str, ...] = (DEFAULT_DATA_BUCKET,),
) -> StackInfo:
    """Start the enforcing S3 server and MLflow in the background; return once both answer and the
    buckets exist.

    One IAM user and key per role of mlops/policies.py: publisher, server, one per site of
    `site_names` (default site_0..site_2; site k's data prefix is `sites/<k>/`), mlflow, granted on each
    of `data_roots` (buckets, or `BUCKET/PREFIX` mailbox roots; their buckets are created, versioned; grant
    more later with `add_data_root`), and an admin. `mlflow_args` are appended to `mlflow server` (e.g.
    `--allowed-hosts myhost:*` when binding a non-loopback `host`: MLflow rejects Host headers other than
    localhost and private IPs by default). Ports: `stack_ports` (a port asked for is used or refused; a taken
    default is replaced by a free one, logged). If a healthy stack is already recorded in `data_dir`, it is
    returned unchanged (ports, sites and buckets as recorded). Raises StackError naming the problem (port
    taken, server died, with its log tail)."""
    data_dir = Path(data_dir).resolve()
    with _state_lock(data_dir):  # a second `stack up` at once waits, then finds this one running
        return _start_stack(data_dir, s3_port, mlflow_port, host, bucket, mlflow_args, site_names, data_roots)


def _start_stack(
    data_dir, s3_port, mlflow_port, host, bucket, mlflow_args, site_names, data_roots
) -> StackInfo:
    from mlops.policies import check_root, default_site_names, roles

    current = stack_status(data_dir)
    if current.running:
        return current.info  # type: ignore[return-value]
    if current.recorded:
        # Leftovers of a crashed or half-stopped stack: clean them up before starting again.
        _stop_stack(data_dir)

    names = list(site_names) if site_names is not None else default_site_names()
    roles(names)  # validates the names before anything starts
    roots = list(dict.fromkeys(root.strip("/") for root in data_roots))
    for root in roots:
        check_root(root)
    if s3_port is not None and s3_port == mlflow_port:
        raise StackError(f"the S3 and MLflow ports must differ (both are {s3_port})")
    (s3_port, mlflow_port), notes = stack_ports(host, s3_port, mlflow_port)
    for note in notes:
        _log.warning("%s", note)

    info = StackInfo(
        data_dir=str(data_dir),
        host=host,
        s3_port=s3_port,
        mlflow_port=mlflow_port,
        bucket=bucket,
        site_names=names,
        data_roots=roots,
    )
    info.started_at = time.time()
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(key, None)  # the servers must not act as clients of another server, or with another's key
    env.pop("MOTO_ACCOUNT_ID", None)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # fewer processes, faster start
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"  # as in the images: no usage events sent to mlflow.org
    # A configured HTTP proxy must not intercept loopback traffic between the two servers.
    env["NO_PROXY"] = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1", "localhost", "::1"]))
    env["no_proxy"] = env["NO_PROXY"]

    bootstrap, credentials = data_dir / BOOTSTRAP_FILE, data_dir / CREDENTIALS_FILE
    credentials.unlink(missing_ok=True)
    _write_private(bootstrap, json.dumps({"users": _iam_users(info)}))
    s3_cmd = [
        sys.executable,
        "-m",
        "devstack.stack",
        "serve-s3",
        "--host",
        host,
        "--port",
        str(s3_port),
        "--bootstrap",
        str(bootstrap),
        "--credentials",
        str(credentials),
    ]
    # moto authenticates every request from the first on: the wrapper creates the users in-process.
    s3_env = {**env, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    started: list[ServiceInfo] = []
    s3 = _launch("s3", s3_cmd, data_dir / "s3.log", s3_env, data_dir)
    s3.port = s3_port
    started.append(s3)
    info.services = {"s3": s3}
    # Record before waiting, so that `stack down` can clean up even if this process is interrupted.
    _write_state(info)
    try:
        _take_credentials(info, s3, started, bootstrap, credentials)
        mlflow_cmd = [
            _tool("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{data_dir / 'mlflow.db'}",
            "--artifacts-destination",
            info.artifacts_destination,
            "--serve-artifacts",
            "--host",
            host,
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
            *mlflow_args,
        ]
        # MLflow's server reaches S3 as the mlflow role: its artifact prefix, nothing else.
        ml_env = {**env, **info.role_env("mlflow"), "MLFLOW_S3_ENDPOINT_URL": info.s3_endpoint}
        # Its start-up (seconds) overlaps the buckets' creation; it only touches S3 on first upload.
        ml = _launch("mlflow", mlflow_cmd, data_dir / "mlflow.log", ml_env, data_dir)
        ml.port = mlflow_port
        started.append(ml)
        info.services["mlflow"] = ml
        _write_state(info)
        _wait_s3(info, s3, started)
        _wait_mlflow(info, ml, started)
    except BaseException:
        for svc in started:
            _terminate(svc)
        _state_path(data_dir).unlink(missing_ok=True)
        raise
    finally:
        bootstrap.unlink(missing_ok=True)
        credentials.unlink(missing_ok=True)
    return info


def _iam_users(info: StackInfo) -> dict[str, dict[str, dict]]:
    """{user: {inline policy name: document}}: the admin, and every role on every data root."""
    from mlops.policies import MLFLOW, data_policy, mlflow_policy, roles

    admin = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:*", "iam:*", "sts:*"], "Resource": ["*"]}],
    }
    users: dict[str, dict[str, dict]] = {ADMIN: {"admin": admin}}
    for role in roles(info.site_names):
        if role.kind == MLFLOW:
            users[role.name] = {"mlflow": mlflow_policy(info.mlflow_root)}
        else:
            users[role.name] = {
                _data_policy_name(root): data_policy(role, root, len(info.site_names))
                for root in info.data_roots
            }
    return users


def _data_policy_name(root: str) -> str:
    # IAM policy names allow [\w+=,.@-]: one inline policy per data root, replaced when granted again.
    return "data@" + root.replace("/", "+")


def _take_credentials(
    info: StackInfo, svc: ServiceInfo, started: list[ServiceInfo], bootstrap: Path, credentials: Path
) -> None:
    """Wait for the keys the S3 wrapper generated and move them into `info` (then the state file)."""
    from mlops.policies import roles

    deadline = time.monotonic() + S3_START_TIMEOUT
    while not credentials.exists():
        if not _pid_alive(svc.pid):
            raise _fail(f"the S3 server (moto) exited during start-up on port {info.s3_port}", svc, started)
        if time.monotonic() > deadline:
            raise _fail(
                f"the S3 server did not create its users within {S3_START_TIMEOUT:.0f} s", svc, started
            )
        time.sleep(0.05)
    keys = json.loads(credentials.read_text())
    info.access_key, info.secret_key = keys[ADMIN]["access_key"], keys[ADMIN]["secret_key"]
    info.roles = {
        r.name: RoleCredentials(r.kind, keys[r.name]["access_key"], keys[r.name]["secret_key"], r.site_index)
        for r in roles(info.site_names)
    }
    _write_state(info)


def add_data_root(data_dir: str | Path, root: str) -> StackInfo:
    """Grant every data role of the running local stack its policy on `root` (a bucket, or `BUCKET/PREFIX`),
    creating the bucket, versioned, if it is missing (as the admin). Idempotent; returns the updated stack.
    In a cluster the buckets and policies come from infra/training instead."""
    from mlops.policies import check_root

    root = root.strip("/")
    check_root(root)
    with _state_lock(data_dir):  # the state as it is now, not as another command is about to write it
        info = running_stack(data_dir)
        if root not in info.data_roots:
            _grant_data_root(info, root)
            info.data_roots.append(root)
            _write_state(info)
    return info


def _grant_data_root(info: StackInfo, root: str) -> None:
    from botocore.config import Config

    from mlops.policies import MLFLOW, check_root, data_policy, roles

    bucket, _ = check_root(root)
    if not info.roles:
        raise StackError(f"the local stack in {info.data_dir} predates per-role credentials: restart it")
    access_key, secret_key = info.credentials(ADMIN)
    client_args = dict(
        endpoint_url=info.s3_endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=info.region,
        config=Config(retries={"max_attempts": 2}),
    )
    import boto3

    try:
        status = _versioned_bucket(boto3.client("s3", **client_args), bucket)
        iam = boto3.client("iam", **client_args)
        for role in roles(info.site_names):
            if role.kind != MLFLOW:
                iam.put_user_policy(
                    UserName=role.name,
                    PolicyName=_data_policy_name(root),
                    PolicyDocument=json.dumps(data_policy(role, root, len(info.site_names))),
                )
    except Exception as e:
        raise StackError(f"cannot grant the stack's roles on {root!r}: {e}") from e
    if status != "Enabled":
        raise StackError(f"bucket {bucket!r} versioning is {status!r}, expected 'Enabled'")


def stop_stack(data_dir: str | Path = DEFAULT_DATA_DIR, purge: bool = False) -> list[str]:
    """Stop the recorded servers (MLflow first). Idempotent: returns the names of what was stopped.
    `purge` also deletes the MLflow database (whose artifacts are gone with moto's memory anyway).
    Under the state lock, as `stack up` and grants: a `stack down` during a grant removed the state file that
    the grant then wrote back (a stack recorded again, its servers stopped), and one during `stack up` stopped
    the S3 server that `up` went on waiting for. It now waits for them, saying so, then stops what they left."""
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        return []  # nothing recorded there: no folder made for the lock

    def say_why() -> None:
        _log.info("%s: another stack command (`stack up`, a grant) is changing it; waiting for it", data_dir)

    with _state_lock(data_dir, on_wait=say_why):
        return _stop_stack(data_dir, purge)


def _stop_stack(data_dir: Path, purge: bool = False) -> list[str]:
    """stop_stack's work, its caller holding the state lock."""
    info = read_state(data_dir)
    stopped: list[str] = []
    if info is not None:
        for name in ("mlflow", "s3"):
            svc = info.services.get(name)
            if svc is not None and _terminate(svc):
                stopped.append(name)
        _state_path(data_dir).unlink(missing_ok=True)
    if purge:
        (data_dir / "mlflow.db").unlink(missing_ok=True)
    return stopped


def earlier_registry_note(data_dir: str | Path) -> str | None:
    """A line for `stack up` where an earlier stack's MLflow database (kept by `stack down` without --purge)
    lists registered model versions: their artifacts were in moto's memory, so `serve` and `card` of them
    failed (`card` after minutes of MLflow's retries) with nothing saying why. None where there are none."""
    import sqlite3

    db = Path(data_dir) / "mlflow.db"
    if not db.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            (versions,) = conn.execute("SELECT count(*) FROM model_versions").fetchone()
    except sqlite3.Error:  # not MLflow's schema (yet): nothing registered to warn of
        return None
    if not versions:
        return None
    return (
        f"kept from an earlier stack: {db} lists {versions} registered model version(s) whose files did not "
        "survive `stack down` (S3 lives in memory): serving, carding or promoting them fails; register again, "
        f"or `fedmedclip stack down --purge --data-dir {data_dir}` and up again for a clean registry"
    )


def stack_status(data_dir: str | Path = DEFAULT_DATA_DIR) -> StackStatus:
    data_dir = Path(data_dir).resolve()
    info = read_state(data_dir)
    if info is None:
        return StackStatus(str(data_dir), False, [], None)
    services = []
    for name in ("s3", "mlflow"):
        svc = info.services.get(name)
        if svc is None:
            continue
        running = _is_our_process(svc)
        if not running:
            healthy = False
        elif name == "s3":
            healthy = _s3_healthy(info)
        else:
            healthy = mlflow_healthy(info.tracking_uri)
        services.append(ServiceStatus(name, svc.pid, svc.port, running, healthy, svc.log))
    return StackStatus(str(data_dir), True, services, info)


def running_stack(data_dir: str | Path = DEFAULT_DATA_DIR) -> StackInfo:
    """The recorded stack if it is up, else a StackError saying how to start it."""
    status = stack_status(data_dir)
    if not status.running:
        raise StackError(
            f"no running local stack in {Path(data_dir).resolve()}: start it with `fedmedclip stack up"
            f"{'' if str(data_dir) == DEFAULT_DATA_DIR else f' --data-dir {data_dir}'}`"
            + ("" if not status.recorded else f"\n{status.describe()}")
        )
    return status.info  # type: ignore[return-value]


# ------------------------------------------------------------------------------- the enforcing S3 server


def _refusal(environ, start_response, message: str) -> list[bytes]:
    """A 403 in S3's error format (botocore reads the code): AccessDenied with our reason."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>AccessDenied</Code><Message>{message}</Message></Error>"
    ).encode()
    start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


_PRESIGN_PARAMS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
)


def _hmac(key: bytes, text: str) -> bytes:
    import hashlib
    import hmac

    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _presigned_as_signed_request(environ, secret_of) -> str | None:
    """Check a SigV4 presigned URL (MLflow hands them to clients that download artifacts) and turn it into
    the same request signed in headers, which moto authenticates and authorises as usual. Returns None when
    done, else why the URL is refused. `secret_of(access_key)` -> secret key or None."""
    import calendar
    import hashlib
    import hmac
    from urllib.parse import unquote

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    query = environ.get("QUERY_STRING", "")
    pairs = [p.partition("=") for p in query.split("&") if p]
    params = {k: unquote(v) for k, _, v in pairs}
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or "X-Amz-Security-Token" in params:
        return "only SigV4 presigned URLs of a role's key are accepted"
    try:
        access_key, date, region, service, terminator = params["X-Amz-Credential"].split("/")
        amz_date, expires = params["X-Amz-Date"], int(params["X-Amz-Expires"])
        signed_headers, signature = params["X-Amz-SignedHeaders"], params["X-Amz-Signature"]
        issued = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
    except (KeyError, ValueError):
        return "malformed presigned URL"
    if not 0 < expires <= 7 * 24 * 3600 or time.time() > issued + expires or not amz_date.startswith(date):
        return "the presigned URL has expired"
    secret = secret_of(access_key)
    if secret is None:
        return "the presigned URL's access key does not exist"
    raw_path = environ.get("RAW_URI", "").split("?", 1)[0] or environ.get("PATH_INFO", "/")
    unsigned = sorted((k, v) for k, _, v in pairs if k != "X-Amz-Signature")
    headers = "".join(
        f"{h}:{(environ.get('HTTP_' + h.upper().replace('-', '_')) or '').strip()}\n"
        for h in signed_headers.split(";")
    )
    canonical = "\n".join(
        [
            environ.get("REQUEST_METHOD", "GET"),
            raw_path,
            "&".join(f"{k}={v}" for k, v in unsigned),
            headers,
            signed_headers,
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = f"{date}/{region}/{service}/{terminator}"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret}".encode(), date), region), service), terminator)
    if not hmac.compare_digest(hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(), signature):
        return "the presigned URL's signature does not match"
    # The same request, signed in headers with the same key: moto then applies that user's policies.
    rest = "&".join(f"{k}={v}" for k, _, v in pairs if k not in _PRESIGN_PARAMS)
    host = environ.get("HTTP_HOST", "")
    request = AWSRequest(
        method=environ.get("REQUEST_METHOD", "GET"),
        url=f"http://{host}{raw_path}" + (f"?{rest}" if rest else ""),
        headers={"Host": host, "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"},
    )
    S3SigV4Auth(Credentials(access_key, secret), "s3", region).add_auth(request)
    environ["QUERY_STRING"] = rest
    for name in ("RAW_URI", "REQUEST_URI"):
        if name in environ:
            environ[name] = raw_path + (f"?{rest}" if rest else "")
    for header in ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256"):
        environ["HTTP_" + header.upper().replace("-", "_")] = request.headers[header]
    return None


def guard_moto(app, secret_of=lambda access_key: None):
    """WSGI middleware in front of moto closing what its IAM enforcement leaves open. `secret_of` gives
    an access key's secret, to check presigned URLs."""

    def guarded(environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/moto-api"):
            # Unauthenticated: it can switch authentication off (reset-auth), wipe the server, or dump
            # every object and secret key (data.json).
            return _refusal(environ, start_response, "moto's control API is disabled on the fedmedclip stack")
        if not environ.get("HTTP_AUTHORIZATION"):
            if "X-Amz-Signature=" not in environ.get("QUERY_STRING", ""):
                # Anonymous requests: moto would fail them with a 500; S3 answers 403.
                return _refusal(
                    environ, start_response, "anonymous requests are refused: sign with a role's key"
                )
            problem = _presigned_as_signed_request(environ, secret_of)
            if problem:
                return _refusal(environ, start_response, problem)
        if "HTTP_X_AMZ_COPY_SOURCE" in environ:
            # moto checks write access to the destination only: a copy would read any object.
            return _refusal(environ, start_response, "server-side copies are refused on the fedmedclip stack")
        environ.pop("HTTP_X_MOTO_ACCOUNT_ID", None)  # the account follows from the access key, not a header
        return app(environ, start_response)

    return guarded


def serve_enforcing_s3(argv: list[str] | None = None) -> int:
    """`python -m devstack.stack serve-s3`: create the IAM users of --bootstrap in-process, write their
    generated keys to --credentials (mode 0600), then serve moto's S3 and IAM behind `guard_moto`, every
    request authenticated (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m devstack.stack serve-s3")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bootstrap", required=True, help="JSON {users: {name: {policy name: document}}}")
    parser.add_argument("--credentials", required=True, help="where the generated keys are written")
    args = parser.parse_args(argv)

    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    os.environ.pop("MOTO_ACCOUNT_ID", None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    from moto import settings
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    settings.INITIAL_NO_AUTH_ACTION_COUNT = (
        0  # also if moto.settings was imported before the variable was set
    )
    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    keys = {}
    for user, policies in json.loads(Path(args.bootstrap).read_text())["users"].items():
        iam.create_user(region_name=DEFAULT_REGION, user_name=user)
        for name, document in policies.items():
            iam.put_user_policy(user, name, json.dumps(document))
        key = iam.create_access_key(user)
        keys[user] = {"access_key": key.access_key_id, "secret_key": key.secret_access_key}
    _write_private(Path(args.credentials), json.dumps(keys))

    def secret_of(access_key: str) -> str | None:
        key = iam.access_keys.get(access_key)
        return key.secret_access_key if key is not None and key.status == "Active" else None

    class Dispatcher(DomainDispatcherApplication):
        # moto finds each request's backend by listing its package folder (a stat per service) and trying
        # every service's URL patterns: an eighth of the server's CPU in the test suite. A host's backend
        # never changes while the server runs.
        @functools.lru_cache(maxsize=256)  # noqa: B019 - one dispatcher per process
        def get_backend_for_host(self, host):
            return super().get_backend_for_host(host)

    app = guard_moto(Dispatcher(create_backend_app), secret_of)
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve-s3"]:
        sys.exit("usage: python -m devstack.stack serve-s3 --port PORT --bootstrap FILE --credentials FILE")
    sys.exit(serve_enforcing_s3(sys.argv[2:]))
