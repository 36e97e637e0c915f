#!/usr/bin/env python3
"""Check the cluster manifests before `kubectl apply`: no Secret may still hold a placeholder, and the
hospitals' S3 endpoint (the Ingress host) must not be the example one.

    python infra/check.py                          # infra/training and infra/serving, as kustomize renders them
    python infra/check.py infra/training           # one kustomization (a folder holding kustomization.yaml)
    kubectl kustomize infra/training | python infra/check.py -     # what kubectl would really apply

Every value of every Secret is read (stringData, and data after base64 decoding), including the Secrets a
kustomization generates with `secretGenerator` (envs, files, literals). A value that contains `CHANGE-ME`,
or is empty, is reported by Secret and key (never by value); the exit status is then 1, and 0 when every
Secret holds real values. Needs Python 3.9+ and PyYAML only: no fedmedclip, no cluster.

`render(folder)` is a small stand-in for `kustomize build` (resources, namespace, secretGenerator, images); the
manifest tests use it too. It ignores patches, which do not change what is checked.
"""

from __future__ import annotations

import base64
import binascii
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("infra/check.py needs PyYAML: pip install pyyaml")

PLACEHOLDER = "CHANGE-ME"
EXAMPLE_HOST_SUFFIX = ".example.org"  # minio-ingress.yaml's host, until replaced
INFRA = Path(__file__).resolve().parent
DEFAULT_TARGETS = (INFRA / "training", INFRA / "serving")
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
# Kinds the namespace transformer leaves alone (kustomize knows them from the API's schema).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}


@dataclass
class Rendered:
    doc: dict
    source: Path  # the manifest (or kustomization, for generated objects) it comes from


class ManifestError(Exception):
    """A kustomization that cannot be rendered (missing file, not YAML)."""


def kustomization_file(folder: Path) -> Path | None:
    return next((folder / n for n in KUSTOMIZATION_NAMES if (folder / n).is_file()), None)


def _load(path: Path) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: {exc}") from None
    bad = [d for d in docs if not isinstance(d, dict)]
    if bad:
        raise ManifestError(f"{path}: a document that is not a mapping")
    return docs


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def _generated_secrets(kustomization: dict, folder: Path, kfile: Path) -> list[Rendered]:
    out = []
    for spec in kustomization.get("secretGenerator") or []:
        values: dict[str, str] = {}
        for env in spec.get("envs") or []:
            path = folder / env
            if not path.is_file():
                raise ManifestError(
                    f"{kfile}: secretGenerator {spec.get('name')!r}: env file {env!r} not found"
                )
            values.update(_env_file(path))
        for entry in spec.get("files") or []:
            key, _, name = str(entry).rpartition("=")
            path = folder / name
            if not path.is_file():
                raise ManifestError(f"{kfile}: secretGenerator {spec.get('name')!r}: file {name!r} not found")
            values[key or path.name] = path.read_text()
        for literal in spec.get("literals") or []:
            key, _, value = str(literal).partition("=")
            values[key] = value
        doc = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": spec["name"],
                **({"namespace": spec["namespace"]} if "namespace" in spec else {}),
            },
            "type": spec.get("type", "Opaque"),
            "stringData": values,
        }
        out.append(Rendered(doc, kfile))
    return out


def _set_images(doc: dict, images: list[dict]) -> None:
    """kustomize's `images:` transformer: a container image named `name` becomes newName[:newTag|@digest]."""
    if not images:
        return
    spec = doc.get("spec") or {}
    pods = [
        spec.get("template", {}).get("spec"),
        spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec"),
    ]
    pods.append(spec.get("predictor") if doc.get("kind") == "InferenceService" else None)
    for pod in filter(None, pods):
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            current = str(c.get("image", ""))
            base = (
                current.split("@")[0].rsplit(":", 1)[0]
                if ":" in current.split("/")[-1]
                else current.split("@")[0]
            )
            for entry in images:
                if entry.get("name") == base:
                    image = entry.get("newName", base)
                    tag = current[len(base) :] if not (entry.get("newTag") or entry.get("digest")) else ""
                    if entry.get("digest"):
                        tag = f"@{entry['digest']}"
                    elif entry.get("newTag"):
                        tag = f":{entry['newTag']}"
                    c["image"] = image + tag


def render(folder: str | Path, used_files: set[Path] | None = None) -> list[Rendered]:
    """Everything the kustomization in `folder` renders, with its namespace applied. `used_files` collects
    every file read (to find manifests that no kustomization includes)."""
    folder = Path(folder)
    kfile = kustomization_file(folder)
    if kfile is None:
        raise ManifestError(f"{folder} has no kustomization.yaml")
    if used_files is not None:
        used_files.add(kfile.resolve())
    (kustomization,) = _load(kfile) or [{}]
    out: list[Rendered] = []
    for entry in kustomization.get("resources") or []:
        target = (folder / entry).resolve()
        if not target.exists():
            raise ManifestError(f"{kfile}: resource {entry!r} does not exist")
        if target.is_dir():
            out += render(target, used_files)
        else:
            if used_files is not None:
                used_files.add(target)
            out += [Rendered(doc, target) for doc in _load(target)]
    out += _generated_secrets(kustomization, folder, kfile)
    for item in out:
        _set_images(item.doc, kustomization.get("images") or [])
    namespace = kustomization.get("namespace")
    if namespace:
        for item in out:
            if item.doc.get("kind") not in CLUSTER_SCOPED:
                item.doc = {**item.doc, "metadata": {**item.doc.get("metadata", {}), "namespace": namespace}}
    return out


def _secret_values(doc: dict) -> dict[str, str | None]:
    """key -> value of a Secret (None: `data` that is not base64 of UTF-8 text, i.e. not a placeholder)."""
    values: dict[str, str | None] = {}
    for key, raw in (doc.get("data") or {}).items():
        try:
            values[key] = base64.b64decode(str(raw), validate=True).decode()
        except (binascii.Error, ValueError):
            values[key] = None
    for key, value in (doc.get("stringData") or {}).items():
        values[key] = "" if value is None else str(value)
    return values


def _hosts(doc: dict) -> list[str]:
    """The host names an Ingress serves or a cert-manager Certificate is for."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "Ingress":
        return [r.get("host", "") for r in spec.get("rules") or []] + [
            h for t in spec.get("tls") or [] for h in t.get("hosts") or []
        ]
    if doc.get("kind") == "Certificate":
        return list(spec.get("dnsNames") or [])
    return []


def placeholder_problems(items: list[Rendered]) -> list[str]:
    """One line per Secret key that holds a placeholder or nothing, and per host still the example one
    (`EXAMPLE_HOST_SUFFIX`: the hospitals' S3 endpoint); [] when all are set."""
    problems = []
    for item in items:
        doc = item.doc
        meta = doc.get("metadata") or {}
        for host in dict.fromkeys(_hosts(doc)):
            if host.endswith(EXAMPLE_HOST_SUFFIX):
                problems.append(
                    f"{item.source}: {doc['kind']} {meta.get('namespace', '-')}/{meta.get('name')}: host {host} is "
                    "still the example host (the S3 endpoint the hospitals use)"
                )
        if doc.get("kind") != "Secret":
            continue
        name = f"{meta.get('namespace', '-')}/{meta.get('name')}"
        for key, value in sorted(_secret_values(doc).items()):
            if value is None:
                continue
            if PLACEHOLDER.lower() in value.lower():
                problems.append(f"{item.source}: Secret {name}: {key} is still a {PLACEHOLDER} placeholder")
            elif not value.strip():
                problems.append(f"{item.source}: Secret {name}: {key} is empty")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    items: list[Rendered] = []
    try:
        for target in args or [str(t) for t in DEFAULT_TARGETS]:
            if target == "-":
                items += [
                    Rendered(d, Path("<stdin>")) for d in yaml.safe_load_all(sys.stdin) if isinstance(d, dict)
                ]
            elif Path(target).is_file():
                items += [Rendered(d, Path(target)) for d in _load(Path(target))]
            else:
                items += render(target)
    except (ManifestError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = placeholder_problems(items)
    secrets = sum(1 for i in items if i.doc.get("kind") == "Secret")
    if problems:
        print(
            f"{len(problems)} placeholder(s): replace them before `kubectl apply` (infra/README.md, "
            '"Credentials" and "The hospitals\' S3 endpoint"):',
            file=sys.stderr,
        )
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"ok: {secrets} Secret(s), no placeholder left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
