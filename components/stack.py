"""The local development stack: a real S3-compatible server (moto) and a real MLflow server on loopback.

`start_stack` launches both as detached background processes (their own sessions, so they outlive the
command that started them and can be stopped as whole process groups), waits until they answer, creates
the artifact bucket with versioning enabled, and records PIDs, ports and log files in `DATA_DIR/stack.json`.
`stop_stack` reads that file and terminates them; `stack_status` reports on them.

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
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedmedclip.errors import FedMedClipError

DEFAULT_DATA_DIR = ".stack"
DEFAULT_S3_PORT = 9000
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_BUCKET = "fedmedclip"
# moto accepts any credentials; these only have to be consistent between the servers and the clients.
DEFAULT_ACCESS_KEY = "fedmedclip"
DEFAULT_SECRET_KEY = "fedmedclip-secret"
DEFAULT_REGION = "us-east-1"  # the one region where create_bucket needs no LocationConstraint
STATE_FILE = "stack.json"
STATE_FORMAT = 1

# First start on 2 cores creates the sqlite schema: about 10 s. Leave generous room for loaded CI machines.
S3_START_TIMEOUT = 30.0
MLFLOW_START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0


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
class StackInfo:
    data_dir: str
    host: str
    s3_port: int
    mlflow_port: int
    bucket: str = DEFAULT_BUCKET
    access_key: str = DEFAULT_ACCESS_KEY
    secret_key: str = DEFAULT_SECRET_KEY
    region: str = DEFAULT_REGION
    services: dict[str, ServiceInfo] = field(default_factory=dict)
    started_at: float = 0.0

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
    def env(self) -> dict[str, str]:
        """What a client needs to talk to the stack (MLflow needs only the first; boto3 the rest)."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def export_lines(self) -> str:
        return "\n".join(f"export {k}={_shell_quote(v)}" for k, v in self.env.items())

    def s3_client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["format"] = STATE_FORMAT
        d["tracking_uri"] = self.tracking_uri
        d["s3_endpoint"] = self.s3_endpoint
        return d

    @classmethod
    def from_json(cls, d: dict) -> StackInfo:
        services = {k: ServiceInfo(**v) for k, v in d.get("services", {}).items()}
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


def recorded_stack_dir() -> str:
    """Where commands look for a running local stack: $FEDMEDCLIP_STACK_DIR, else .stack."""
    return os.environ.get("FEDMEDCLIP_STACK_DIR") or DEFAULT_DATA_DIR


def use_stack_s3(info: StackInfo) -> None:
    """Point this process, and the task processes it starts, at the stack's S3 (credentials and endpoint).
    The tracking URI is left alone: each command chooses it explicitly."""
    os.environ.update({k: v for k, v in info.env.items() if k != "MLFLOW_TRACKING_URI"})
    os.environ["AWS_ENDPOINT_URL_S3"] = info.s3_endpoint


def use_recorded_stack_s3(stack_dir: str | Path | None = None) -> None:
    """Without S3 credentials in the environment, those of the recorded local stack, if there is one."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return
    info = read_state(stack_dir or recorded_stack_dir())
    if info is not None:
        use_stack_s3(info)


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
    program = "moto_server" if svc.name == "s3" else "mlflow"
    return program in text and str(svc.port) in text


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
    try:
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if info.bucket not in existing:
            client.create_bucket(Bucket=info.bucket)
        client.put_bucket_versioning(Bucket=info.bucket, VersioningConfiguration={"Status": "Enabled"})
        status = client.get_bucket_versioning(Bucket=info.bucket).get("Status")
    except Exception as e:
        raise _fail(f"cannot create the versioned bucket {info.bucket!r}: {e}", svc, started) from e
    if status != "Enabled":
        raise _fail(f"bucket {info.bucket!r} versioning is {status!r}, expected 'Enabled'", svc, started)


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
    # A bare TCP + HTTP probe: avoids importing boto3 for `stack status`.
    try:
        with urllib.request.urlopen(f"{info.s3_endpoint}/moto-api/", timeout=2.0) as r:
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

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        time.sleep(0.1)
    if alive():
        signal_all(signal.SIGKILL)
    child = _CHILDREN.pop(svc.pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    return True


# ------------------------------------------------------------------------------------------- public API


def start_stack(
    data_dir: str | Path = DEFAULT_DATA_DIR,
    s3_port: int = DEFAULT_S3_PORT,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    host: str = DEFAULT_HOST,
    bucket: str = DEFAULT_BUCKET,
    mlflow_args: list[str] | tuple[str, ...] = (),
) -> StackInfo:
    """Start moto (S3) and MLflow in the background; return once both answer and the bucket exists.

    `mlflow_args` are appended to `mlflow server` (e.g. `--allowed-hosts myhost:*` when binding a
    non-loopback `host`: MLflow rejects Host headers other than localhost and private IPs by default).
    If a healthy stack is already recorded in `data_dir`, it is returned unchanged (ports as recorded).
    Raises StackError naming the problem (port taken, server died, with its log tail)."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)

    current = stack_status(data_dir)
    if current.running:
        return current.info  # type: ignore[return-value]
    if current.recorded:
        # Leftovers of a crashed or half-stopped stack: clean them up before starting again.
        stop_stack(data_dir)

    if s3_port == mlflow_port:
        raise StackError(f"the S3 and MLflow ports must differ (both are {s3_port})")
    for label, port, flag in (("S3", s3_port, "--s3-port"), ("MLflow", mlflow_port, "--mlflow-port")):
        if not _port_free(host, port):
            raise StackError(
                f"port {port} on {host} is already in use, so the {label} server cannot start there; "
                f"stop whatever listens on it or choose another port with {flag}"
            )

    info = StackInfo(
        data_dir=str(data_dir), host=host, s3_port=s3_port, mlflow_port=mlflow_port, bucket=bucket
    )
    info.started_at = time.time()
    env = dict(os.environ)
    env.update(info.env)
    env.pop("MLFLOW_TRACKING_URI", None)  # the server must not act as a client of another server
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # fewer processes, faster start
    # A configured HTTP proxy must not intercept loopback traffic between the two servers.
    env["NO_PROXY"] = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1", "localhost", "::1"]))
    env["no_proxy"] = env["NO_PROXY"]

    s3_cmd = [_tool("moto_server"), "-H", host, "-p", str(s3_port)]
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
    started: list[ServiceInfo] = []
    s3 = _launch("s3", s3_cmd, data_dir / "s3.log", env, data_dir)
    s3.port = s3_port
    started.append(s3)
    # Launched together: MLflow's start-up (seconds) overlaps moto's; it only touches S3 on first upload.
    ml = _launch("mlflow", mlflow_cmd, data_dir / "mlflow.log", env, data_dir)
    ml.port = mlflow_port
    started.append(ml)
    info.services = {"s3": s3, "mlflow": ml}
    # Record before waiting, so that `stack down` can clean up even if this process is interrupted.
    _state_path(data_dir).write_text(json.dumps(info.to_json(), indent=2))
    try:
        _wait_s3(info, s3, started)
        _wait_mlflow(info, ml, started)
    except BaseException:
        for s in started:
            _terminate(s)
        _state_path(data_dir).unlink(missing_ok=True)
        raise
    return info


def stop_stack(data_dir: str | Path = DEFAULT_DATA_DIR, purge: bool = False) -> list[str]:
    """Stop the recorded servers (MLflow first). Idempotent: returns the names of what was stopped.
    `purge` also deletes the MLflow database (whose artifacts are gone with moto's memory anyway)."""
    data_dir = Path(data_dir).resolve()
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
