"""A bounded schemathesis run against the real server, from the Open Inference Protocol's own OpenAPI file
(tests/specs/open-inference-protocol/open_inference_rest.yaml). Not a test: fuzzing takes minutes and finds
what it finds; the suite checks every endpoint against the same file deterministically
(tests/test_serving_protocol.py).

The file writes its path parameters as `${MODEL_NAME}`; the run uses a copy (in a temporary folder, the
schemas untouched) with `{MODEL_NAME}` templates, once as it is (random model names: the 404 paths) and once
with MODEL_NAME and MODEL_VERSION fixed to the served model, so that random request bodies reach the
inference endpoint. Every check schemathesis has runs (no 5xx, status codes and content types the file
declares, response schemas). The server's log is then searched for tracebacks.

    .venv/bin/pip install -c constraints.txt 'schemathesis==4.32.5'   # the `bench` extra
    nice -n 10 .venv/bin/python bench/bench_schemathesis.py --max-examples 50 --max-time 300
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
SPEC = ROOT / "tests" / "specs" / "open-inference-protocol" / "open_inference_rest.yaml"


def templated(spec: dict, model: str | None, version: str | None) -> dict:
    out = copy.deepcopy(spec)
    out["paths"] = {}
    for path, item in spec["paths"].items():
        item = copy.deepcopy(item)
        for param in item.get("parameters", []):
            fixed = {"MODEL_NAME": model, "MODEL_VERSION": version}.get(param["name"])
            if fixed is not None:
                param["schema"] = {"type": "string", "enum": [fixed]}
        out["paths"][path.replace("${", "{")] = item
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=50)
    parser.add_argument("--max-time", type=int, default=300, help="seconds per schemathesis run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from serving_fixtures import make_contract_onnx, running_server

    from fedmedclip.digests import sha256_file

    spec = yaml.safe_load(SPEC.read_text())
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_contract_onnx(tmp / "m.onnx", image_size=32)
        version = sha256_file(model)[:12]
        with running_server([str(model)], tmp) as server:
            for label, fixed in (
                ("random names", (None, None)),
                ("the served model", ("fedmedclip", version)),
            ):
                path = tmp / f"spec-{label.replace(' ', '-')}.yaml"
                path.write_text(yaml.safe_dump(templated(spec, *fixed)))
                cmd = [
                    sys.executable, "-m", "schemathesis.cli", "run", str(path), "--url", f"http://{server.http}",
                    "--checks", "all", "--max-examples", str(args.max_examples), "--max-time", str(args.max_time),
                    "--seed", str(args.seed), "--workers", "1", "--suppress-health-check", "all",
                ]  # fmt: skip
                print(f"--- schemathesis against {label}: {' '.join(cmd[3:])}", flush=True)
                rc = subprocess.run(cmd, cwd=ROOT).returncode
                print(f"--- exit status {rc} ({'no failures' if rc == 0 else 'failures above'})", flush=True)
                failures += rc != 0
            log = server.log()
    print(
        f"server log: {log.count(' refused ')} refused requests logged, {log.count('Traceback')} tracebacks"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
