"""What each image installs, derived from pyproject.toml at build time (the Dockerfile's `reqs` stage), and the
check that the serving image holds what it must not. Standard library only (Python 3.11+: tomllib).

    python docker/requirements.py lists pyproject.toml OUT_DIR   # OUT_DIR/train.txt, OUT_DIR/serve.txt
    python docker/requirements.py check-serve                    # in the serve image, after installing

- train: the core (less torch, installed first and alone in its own layer) + `pipelines` + `gpu`. One CUDA
  stack: the CUDA libraries of the PyPI wheels (torch, onnxruntime-gpu[cuda,cudnn]); the base image has none.
- serve: what `fedmedclip.preprocess` needs from the core (numpy, pillow, simplejpeg) + `serving` + `gpu`, with mlflow
  replaced by `mlflow-skinny` of the same version (the server only resolves and downloads a registered model)
  and without `tritonclient` (a client library for tests and benchmarks). Never torch, transformers or the CPU
  onnxruntime, whose files onnxruntime-gpu's would clobber.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

SERVE_NEVER = {"torch", "onnxruntime", "transformers"}
SERVE_DROPPED = {"tritonclient"}


def name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower()


def lists(pyproject: str | Path) -> dict[str, list[str]]:
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    extras = project["optional-dependencies"]
    core = project["dependencies"]
    train = [r for r in core if name(r) != "torch"] + extras["pipelines"] + extras["gpu"]
    serve = (
        [r for r in core if name(r) in {"numpy", "pillow", "simplejpeg"}] + extras["serving"] + extras["gpu"]
    )
    serve = [
        re.sub(r"^mlflow(?=[=<>~!\s]|$)", "mlflow-skinny", r) for r in serve if name(r) not in SERVE_DROPPED
    ]
    serve = list(dict.fromkeys(serve))
    forbidden = SERVE_NEVER & {name(r) for r in serve}
    if forbidden:
        raise SystemExit(f"the serving image must not install {sorted(forbidden)}")
    if "onnxruntime" in {name(r) for r in train}:
        raise SystemExit("train must use onnxruntime-gpu, not the cpu extra")
    return {"train": train, "serve": serve}


def check_serve() -> None:
    from importlib.metadata import PackageNotFoundError, distribution

    for dist in (*SERVE_NEVER, "mlflow", *SERVE_DROPPED):
        try:
            distribution(dist)
        except PackageNotFoundError:
            continue
        raise SystemExit(f"the serving image must not contain {dist}")
    import mlflow.artifacts  # noqa: F401  (mlflow-skinny)
    import onnxruntime  # noqa: F401
    import simplejpeg  # noqa: F401  (the JPEG scan check training makes too: the server does not start without it)

    import fedmedclip.preprocess  # noqa: F401


def main(argv: list[str]) -> int:
    if argv[:1] == ["lists"] and len(argv) == 3:
        out = Path(argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for image, requirements in lists(argv[1]).items():
            (out / f"{image}.txt").write_text("\n".join(requirements) + "\n")
        return 0
    if argv == ["check-serve"]:
        check_serve()
        return 0
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
