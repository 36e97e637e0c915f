"""Static checks of the cluster manifests in infra/training (no cluster here).

A small stand-in for `kustomize build` collects the objects each kustomization produces, with its namespace
applied, then checks what `kubectl apply` would only reveal at run time: required fields, and references
(secrets, config maps, claims, volumes, selectors, named ports, in-cluster URLs) that resolve within the
object's namespace.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from components.sites import (
    DATA_BUCKET,
    DEFAULT_SITES,
    ENDPOINTS_CONFIGMAP,
    MLFLOW_BUCKET,
    SECRET_KEYS,
    SERVER_SECRET_NAME,
    SITE_SECRET_TEMPLATE,
    site_prefix,
    site_secret_name,
)

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
TRAINING = INFRA / "training"
PLATFORM_NS = "fedmedclip"
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization_file(directory: Path) -> Path | None:
    return next((directory / n for n in KUSTOMIZATION_NAMES if (directory / n).is_file()), None)


def build(directory: Path, used_files: set[Path] | None = None) -> list[tuple[dict, Path]]:
    """(object, source file) for everything the kustomization in `directory` renders, namespaces applied."""
    kfile = _kustomization_file(directory)
    assert kfile is not None, f"{directory} has no kustomization.yaml"
    if used_files is not None:
        used_files.add(kfile.resolve())
    k = yaml.safe_load(kfile.read_text())
    out: list[tuple[dict, Path]] = []
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{kfile}: resource {entry!r} does not exist"
        if target.is_dir():
            out += build(target, used_files)
        else:
            if used_files is not None:
                used_files.add(target)
            out += [(doc, target) for doc in _load_docs(target)]
    if k.get("namespace"):
        out = [
            (
                {**d, "metadata": {**d["metadata"], "namespace": k["namespace"]}}
                if d.get("kind") not in CLUSTER_SCOPED
                else d,
                f,
            )
            for d, f in out
        ]
    return out


@pytest.fixture(scope="module")
def rendered() -> list[tuple[dict, Path]]:
    return build(TRAINING)


@pytest.fixture(scope="module")
def index(rendered) -> dict[tuple[str, str, str], dict]:
    """(kind, namespace, name) -> object; duplicates are an error kustomize would raise."""
    out: dict[tuple[str, str, str], dict] = {}
    for doc, source in rendered:
        key = (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])
        assert key not in out, f"{source}: {key} defined twice"
        out[key] = doc
    return out


def _pod_specs(doc: dict) -> list[dict]:
    kind = doc["kind"]
    if kind == "Pod":
        return [doc["spec"]]
    if kind in WORKLOADS:
        return [doc["spec"]["template"]["spec"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def _containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def _keys(doc: dict) -> set[str]:
    return set(doc.get("data") or {}) | set(doc.get("stringData") or {})


def _ns(doc: dict) -> str:
    return doc["metadata"].get("namespace", "")


# ------------------------------------------------------------------------------------------------ parse


def test_every_yaml_under_infra_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert files
    for f in files:
        for doc in _load_docs(f):
            assert isinstance(doc, dict), f"{f}: a document that is not a mapping"


def test_every_training_manifest_is_used():
    used: set[Path] = set()
    build(TRAINING, used)
    files = {p.resolve() for p in TRAINING.rglob("*.y*ml")}
    assert not files - used, f"manifests no kustomization includes: {sorted(map(str, files - used))}"


def test_required_fields(rendered):
    for doc, source in rendered:
        where = f"{source.relative_to(REPO)} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        assert doc.get("apiVersion") and doc.get("kind"), where
        assert doc.get("metadata", {}).get("name"), where
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"]), f"{where}: bad name"
        if doc["kind"] not in CLUSTER_SCOPED:
            assert _ns(doc), f"{where}: no namespace after kustomize"
        for spec in _pod_specs(doc):
            assert _containers(spec), f"{where}: no containers"
            for c in _containers(spec):
                assert c.get("name") and c.get("image"), f"{where}: container without name or image"
                res = c.get("resources") or {}
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(part) or {}), (
                        f"{where} {c['name']}: resources.{part}"
                    )
        if doc["kind"] in WORKLOADS - {"Job"}:
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{where}: selector does not match its pod labels"
        if doc["kind"] == "Job":
            assert _pod_specs(doc)[0].get("restartPolicy") in ("Never", "OnFailure"), where


# ------------------------------------------------------------------------------------------- references


def test_references_resolve(rendered, index):
    def has(kind, ns, name):
        return (kind, ns, name) in index

    for doc, source in rendered:
        ns = _ns(doc)
        where = f"{source.relative_to(REPO)} {doc['kind']}/{doc['metadata']['name']}"
        for spec in _pod_specs(doc):
            claim_templates = {
                t["metadata"]["name"] for t in doc.get("spec", {}).get("volumeClaimTemplates", [])
            }
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for v in volumes.values():
                if "persistentVolumeClaim" in v:
                    claim = v["persistentVolumeClaim"]["claimName"]
                    assert has("PersistentVolumeClaim", ns, claim), f"{where}: PVC {claim!r} undefined"
                if "configMap" in v:
                    cm = v["configMap"]["name"]
                    assert has("ConfigMap", ns, cm), f"{where}: ConfigMap {cm!r} undefined"
                    for item in v["configMap"].get("items", []):
                        assert item["key"] in _keys(index[("ConfigMap", ns, cm)]), (
                            f"{where}: {cm}/{item['key']}"
                        )
                if "secret" in v:
                    assert has("Secret", ns, v["secret"]["secretName"]), f"{where}: Secret volume undefined"
            for c in _containers(spec):
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes or m["name"] in claim_templates, (
                        f"{where}: volume {m['name']!r}"
                    )
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {})
                    for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                        if field in ref:
                            name, key = ref[field]["name"], ref[field]["key"]
                            assert has(kind, ns, name), f"{where}: {kind} {name!r} undefined in {ns}"
                            assert key in _keys(index[(kind, ns, name)]), (
                                f"{where}: {kind} {name!r} has no key {key!r}"
                            )
                for e in c.get("envFrom", []):
                    for kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                        if field in e:
                            assert has(kind, ns, e[field]["name"]), (
                                f"{where}: {kind} {e[field]['name']!r} undefined"
                            )
                port_names = {p["name"] for p in c.get("ports", []) if "name" in p}
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    port = (c.get(probe) or {}).get("httpGet", {}).get("port")
                    if isinstance(port, str):
                        assert port in port_names, f"{where}: {probe} uses unknown port {port!r}"
        if doc["kind"] == "StatefulSet":
            assert has("Service", ns, doc["spec"]["serviceName"]), f"{where}: serviceName undefined"
        if doc["kind"] == "Service" and doc["spec"].get("selector"):
            selector = doc["spec"]["selector"]
            targets = [
                (d, c)
                for d, _ in rendered
                if _ns(d) == ns
                for spec in _pod_specs(d)
                if selector.items() <= d["spec"]["template"]["metadata"].get("labels", {}).items()
                for c in _containers(spec)
            ]
            assert targets, f"{where}: selector {selector} matches no pod template in {ns}"
            names = {p["name"] for _, c in targets for p in c.get("ports", []) if "name" in p}
            numbers = {p["containerPort"] for _, c in targets for p in c.get("ports", [])}
            for p in doc["spec"]["ports"]:
                target = p.get("targetPort", p["port"])
                assert target in names or target in numbers, (
                    f"{where}: targetPort {target!r} not a container port"
                )


def test_kustomize_images_are_used(rendered):
    used = {c["image"].split(":")[0] for d, _ in rendered for s in _pod_specs(d) for c in _containers(s)}
    for kfile in TRAINING.rglob("kustomization.yaml"):
        for image in yaml.safe_load(kfile.read_text()).get("images", []):
            assert image["name"] in used, f"{kfile}: images entry {image['name']!r} matches no container"


# ----------------------------------------------------------------------------------- the site contract


def _pipeline_namespace() -> str:
    return yaml.safe_load((TRAINING / "pipeline" / "kustomization.yaml").read_text())["namespace"]


def test_site_secrets_follow_the_pipeline_template(index):
    assert SITE_SECRET_TEMPLATE == "fedmedclip-site-{site}-s3"
    pattern = re.compile(
        "^" + re.escape(SITE_SECRET_TEMPLATE).replace(r"\{site\}", "(?P<site>[a-z0-9-]+)") + "$"
    )
    for ns in (_pipeline_namespace(), PLATFORM_NS):
        for k in range(DEFAULT_SITES):
            key = ("Secret", ns, site_secret_name(k))
            assert key in index, f"missing {key}"
            assert set(SECRET_KEYS) <= _keys(index[key]), f"{key} lacks {SECRET_KEYS}"
        assert set(SECRET_KEYS) <= _keys(index[("Secret", ns, SERVER_SECRET_NAME)])
        sites = sorted(
            int(m["site"])
            for kind, n, name in index
            if kind == "Secret" and n == ns and (m := pattern.match(name))
        )
        assert sites == list(range(DEFAULT_SITES)), f"site secrets in {ns}: {sites}"


def test_one_policy_per_site_limited_to_its_prefix(index):
    policies = index[("ConfigMap", PLATFORM_NS, "minio-policies")]["data"]
    setup = index[("Job", PLATFORM_NS, "fedmedclip-minio-setup")]
    container = setup["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["SITES"]["value"].split() == [str(k) for k in range(DEFAULT_SITES)]
    script = "\n".join(container.get("command", []) + container.get("args", []))
    for k in range(DEFAULT_SITES):
        policy = json.loads(policies[f"site-{k}.json"])
        text = json.dumps(policy)
        own = site_prefix(k)
        for other in range(DEFAULT_SITES):
            if other != k:
                assert site_prefix(other) not in text, f"site {k}'s policy mentions site {other}'s prefix"
        object_resources = [
            r
            for s in policy["Statement"]
            for r in s["Resource"]
            if any(a.startswith("s3:GetObject") for a in s["Action"])
        ]
        assert object_resources == [f"arn:aws:s3:::{DATA_BUCKET}/{own}*"]
        listing = [s for s in policy["Statement"] if "s3:ListBucket" in s["Action"]]
        assert listing and all(
            all(p.startswith(own) for p in s["Condition"]["StringLike"]["s3:prefix"]) for s in listing
        ), f"site {k} may list outside {own}"
        assert all(s["Effect"] == "Allow" for s in policy["Statement"])
        # the Job creates this site's user from the site's own secret
        for var, key in (
            (f"SITE_{k}_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
            (f"SITE_{k}_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
        ):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (site_secret_name(k), key)
    assert 'add_user "site-$k"' in script and "/policies/$1.json" in script
    # every bucket is created and versioned
    for bucket in (DATA_BUCKET, MLFLOW_BUCKET):
        assert bucket in script
    assert "mc mb --ignore-existing" in script and "mc version enable" in script
    assert set(policies) == {f"site-{k}.json" for k in range(DEFAULT_SITES)} | {"server.json", "mlflow.json"}


def test_mlflow_uses_postgres_and_the_versioned_artifact_bucket(index):
    mlflow = index[("Deployment", PLATFORM_NS, "mlflow")]
    env = {e["name"]: e for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    store = urlparse(env["MLFLOW_BACKEND_STORE_URI"]["value"])
    assert store.scheme == "postgresql" and ("Service", PLATFORM_NS, store.hostname) in index
    assert ("StatefulSet", PLATFORM_NS, "postgres") in index
    dest = urlparse(env["MLFLOW_ARTIFACTS_DESTINATION"]["value"])
    assert dest.scheme == "s3" and dest.netloc == MLFLOW_BUCKET
    assert "--serve-artifacts" in mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    s3 = urlparse(env["MLFLOW_S3_ENDPOINT_URL"]["value"])
    assert ("Service", PLATFORM_NS, s3.hostname) in index
    policy = json.loads(index[("ConfigMap", PLATFORM_NS, "minio-policies")]["data"]["mlflow.json"])
    assert any(f"arn:aws:s3:::{MLFLOW_BUCKET}/*" in s["Resource"] for s in policy["Statement"])


def test_pipeline_endpoints_point_at_platform_services(index):
    cm = index[("ConfigMap", _pipeline_namespace(), ENDPOINTS_CONFIGMAP)]["data"]
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        url = urlparse(cm[key])
        service, namespace = url.hostname.split(".")[:2]
        assert url.hostname == f"{service}.{namespace}.svc.cluster.local", key
        svc = index.get(("Service", namespace, service))
        assert svc is not None, f"{key} points at {service}.{namespace}, which is not defined"
        assert url.port in {p["port"] for p in svc["spec"]["ports"]}, f"{key}: port {url.port}"
    assert cm["FEDMEDCLIP_DATA_BUCKET"] == DATA_BUCKET
    # Every key the compiled pipeline maps from this ConfigMap into its tasks exists in it.
    from pipelines.pipeline import DEFAULT_YAML

    platform = list(yaml.safe_load_all(DEFAULT_YAML.read_text()))[1]
    wanted = {
        e["configMapKey"]
        for ex in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
        for m in ex.get("configMapAsEnv", [])
        if m["configMapName"] == ENDPOINTS_CONFIGMAP
        for e in m["keyToEnv"]
    }
    assert {"AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI"} <= wanted
    assert wanted <= set(cm), wanted - set(cm)


def test_placeholders_are_marked(rendered):
    # Every credential shipped here is a placeholder, recognisable so that nobody mistakes it for a real one.
    for doc, source in rendered:
        if doc["kind"] == "Secret":
            secrets = {
                k: v for k, v in (doc.get("stringData") or {}).items() if "SECRET" in k or "PASSWORD" in k
            }
            assert secrets and all(v.startswith("CHANGE-ME") for v in secrets.values()), (
                f"{source}: {doc['metadata']['name']}"
            )
    counts = defaultdict(int)
    for doc, _ in rendered:
        counts[doc["kind"]] += 1
    assert counts["Namespace"] == 1
