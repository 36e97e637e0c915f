"""Static checks of the cluster manifests in infra/training and infra/serving (no cluster here).

A small stand-in for `kustomize build` (infra/check.py's `render`) collects the objects each kustomization
produces, with its namespace applied, then checks what `kubectl apply` would only reveal at run time:
required fields, references (secrets, config maps, claims, volumes, selectors, named ports, in-cluster URLs)
that resolve within the object's namespace, and the hardening (issue 12): Pod Security "restricted" on every
workload and enforced on the namespace, NetworkPolicies evaluated for who may reach whom, the admission
policy on site credentials evaluated (CEL) on the pods the compiled pipeline creates and on forbidden ones,
MLflow behind authentication, and no placeholder credential passing `infra/check.py`.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from mlops.sites import (
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
PUBLISHER_SECRET = (
    "fedmedclip-publisher-s3"  # central uploads' key (platform/secrets.yaml), outside the pipeline
)
SERVING = INFRA / "serving"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _infra_check():
    """infra/check.py (not a package: it runs with PyYAML alone, before `kubectl apply`)."""
    spec = importlib.util.spec_from_file_location("infra_check", INFRA / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


check = _infra_check()
CLUSTER_SCOPED = check.CLUSTER_SCOPED


def build(directory: Path, used_files: set[Path] | None = None) -> list[tuple[dict, Path]]:
    """(object, source file) for everything the kustomization in `directory` renders, namespaces applied."""
    return [(r.doc, r.source) for r in check.render(directory, used_files)]


@pytest.fixture(scope="module")
def rendered() -> list[tuple[dict, Path]]:
    return build(TRAINING) + build(SERVING)


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
    if kind == "InferenceService":  # KServe: the predictor is a pod spec
        return [doc["spec"]["predictor"]]
    return []


def _pod_labels(doc: dict) -> dict[str, str]:
    """Labels of the pods a workload creates (KServe adds its own to the predictor's)."""
    if doc["kind"] == "InferenceService":
        return {
            **doc["metadata"].get("labels", {}),
            "serving.kserve.io/inferenceservice": doc["metadata"]["name"],
        }
    if doc["kind"] == "Pod":
        return doc["metadata"].get("labels", {})
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return doc["spec"]["template"]["metadata"].get("labels", {})


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


def test_every_manifest_is_used():
    for root in (TRAINING, SERVING):
        used: set[Path] = set()
        build(root, used)
        files = {p.resolve() for p in root.rglob("*.y*ml")}
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
                        if field in ref and not ref[field].get("optional"):
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
                if selector.items() <= _pod_labels(d).items()
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
        # What each policy allows is tests/test_isolation.py's (the file is generated from mlops/policies.py).
        assert f"{DATA_BUCKET}/{own}" in text
        assert all(s["Effect"] == "Allow" for s in policy["Statement"])
        # the Job creates this site's user from the site's own secret
        for var, key in (
            (f"SITE_{k}_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
            (f"SITE_{k}_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
        ):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (site_secret_name(k), key)
    assert 'add_user "site-$k"' in script and "/policies/$1.json" in script
    # and every other user from its own Secret, the publisher's included (platform/secrets.yaml defines it)
    for user, secret in (
        ("SERVER", SERVER_SECRET_NAME),
        ("MLFLOW", "mlflow-s3"),
        ("PUBLISHER", PUBLISHER_SECRET),
    ):
        assert ("Secret", PLATFORM_NS, secret) in index, secret
        for var, key in (
            (f"{user}_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
            (f"{user}_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
        ):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret, key), var
        assert f'add_user {user.lower()} "${user}_ACCESS_KEY" "${user}_SECRET_KEY"' in script
    # every bucket is created and versioned
    for bucket in (DATA_BUCKET, MLFLOW_BUCKET):
        assert bucket in script
    assert "mc mb --ignore-existing" in script and "mc version enable" in script
    assert {f"site-{k}.json" for k in range(DEFAULT_SITES)} | {"server.json", "mlflow.json"} <= set(policies)


def test_mlflow_uses_postgres_and_the_versioned_artifact_bucket(index):
    mlflow = index[("Deployment", PLATFORM_NS, "mlflow")]
    env = {e["name"]: e for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    store = urlparse(env["MLFLOW_BACKEND_STORE_URI"]["value"])
    assert store.scheme == "postgresql" and ("Service", PLATFORM_NS, store.hostname) in index
    assert ("StatefulSet", PLATFORM_NS, "postgres") in index
    dest = urlparse(env["MLFLOW_ARTIFACTS_DESTINATION"]["value"])
    assert dest.scheme == "s3" and dest.netloc == MLFLOW_BUCKET
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert "--serve-artifacts" in " ".join(container["command"] + container["args"])
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
    sensitive = re.compile(r"secret|password|key$", re.IGNORECASE)
    for doc, source in rendered:
        if doc["kind"] == "Secret":
            secrets = {
                k: v
                for k, v in (doc.get("stringData") or {}).items()
                if sensitive.search(k) and k != "AWS_ACCESS_KEY_ID"
            }
            assert secrets and all(v.startswith("CHANGE-ME") for v in secrets.values()), (
                f"{source}: {doc['metadata']['name']}"
            )
    counts = defaultdict(int)
    for doc, _ in rendered:
        counts[doc["kind"]] += 1
    assert counts["Namespace"] == 1


# -------------------------------------------------------------------- placeholders refused before deploying


def _run_check(*args: str, stdin: str | None = None):
    import subprocess

    return subprocess.run(
        [sys.executable, str(INFRA / "check.py"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_check_refuses_the_shipped_placeholders():
    """`python infra/check.py` (run before `kubectl apply`) fails while any CHANGE-ME is left, naming every
    Secret key, never a value."""
    proc = _run_check()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for name, key in (
        ("fedmedclip/minio-root", "MINIO_ROOT_PASSWORD"),
        ("fedmedclip/mlflow-auth", "MLFLOW_AUTH_ADMIN_PASSWORD"),
        ("kubeflow/fedmedclip-site-0-s3", "AWS_SECRET_ACCESS_KEY"),
        ("kubeflow/fedmedclip-mlflow-pipeline", "password"),
        ("fedmedclip/fedmedclip-mlflow", "password"),
    ):
        assert f"Secret {name}: {key} is still a CHANGE-ME placeholder" in proc.stderr, (name, key)
    assert "CHANGE-ME-minio-root-password" not in proc.stderr
    assert (
        "Ingress fedmedclip/minio-s3: host s3.fedmedclip.example.org is still the example host" in proc.stderr
    )


def test_check_passes_real_values_and_reads_generated_and_rendered_secrets(tmp_path):
    import shutil

    copy = Path(shutil.copytree(INFRA, tmp_path / "infra"))
    for f in copy.rglob("*.yaml"):
        text = re.sub(r"CHANGE-ME[-\w]*", "s3cr3t-value", f.read_text())
        f.write_text(text.replace("s3.fedmedclip.example.org", "s3.fedmedclip.hospital-net.eu"))
    proc = _run_check(str(copy / "training"), str(copy / "serving"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ")

    # Secrets from a secretGenerator (the README's way to keep real values out of git) are read too.
    sites = copy / "training" / "sites"
    (sites / "site-0.env").write_text(
        "AWS_ACCESS_KEY_ID=fedmedclip-site-0\nAWS_SECRET_ACCESS_KEY=CHANGE-ME\n"
    )
    kfile = sites / "kustomization.yaml"
    kfile.write_text(
        kfile.read_text()
        + "generatorOptions: {disableNameSuffixHash: true}\n"
        + "secretGenerator:\n  - name: extra-site-0\n    envs: [site-0.env]\n"
    )
    proc = _run_check(str(copy / "training"))
    assert proc.returncode == 1 and "Secret kubeflow/extra-site-0: AWS_SECRET_ACCESS_KEY" in proc.stderr
    # `kubectl kustomize ... | python infra/check.py -`: base64 `data`, as kubectl renders generated Secrets.
    encoded = base64.b64encode(b"CHANGE-ME-later").decode()
    doc = f"apiVersion: v1\nkind: Secret\nmetadata: {{name: s, namespace: n}}\ndata: {{token: {encoded}}}\n"
    proc = _run_check("-", stdin=doc)
    assert proc.returncode == 1 and "Secret n/s: token is still a CHANGE-ME placeholder" in proc.stderr
    empty = "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: n}\nstringData: {token: ''}\n"
    proc = _run_check("-", stdin=empty)
    assert proc.returncode == 1 and "token is empty" in proc.stderr


# ---------------------------------------------------------------------------------------- Pod Security

RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def _workloads(rendered):
    return [(doc, source, spec) for doc, source in rendered for spec in _pod_specs(doc)]


def test_every_workload_meets_pod_security_restricted(rendered):
    """The Pod Security Standard "restricted", field by field, plus our own: read-only root filesystems
    (with an emptyDir for /tmp) and no service-account token."""
    workloads = _workloads(rendered)
    assert {d["metadata"]["name"] for d, _, _ in workloads} >= {
        "minio", "postgres", "mlflow", "fedmedclip-minio-setup", "fedmedclip-mlflow-users", "fedmedclip",
    }  # fmt: skip
    for doc, source, spec in workloads:
        where = f"{source.relative_to(REPO)} {doc['kind']}/{doc['metadata']['name']}"
        pod = spec.get("securityContext") or {}
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert spec.get("automountServiceAccountToken") is False, (
            f"{where}: mounts an API token it never uses"
        )
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            kinds = set(v) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{where}: volume {v['name']} of type {kinds}"
        for c in _containers(spec):
            ctx = c.get("securityContext") or {}
            what = f"{where} container {c['name']}"
            assert ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, f"{what}: runAsNonRoot"
            assert ctx.get("runAsUser", pod.get("runAsUser", 1)) != 0, f"{what}: runs as root"
            seccomp = (ctx.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
            assert seccomp in ("RuntimeDefault", "Localhost"), f"{what}: seccompProfile {seccomp}"
            assert ctx.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation"
            assert not ctx.get("privileged"), f"{what}: privileged"
            caps = ctx.get("capabilities") or {}
            assert "ALL" in caps.get("drop", []), f"{what}: capabilities.drop ALL"
            assert set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, f"{what}: adds {caps.get('add')}"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{what}: writable root filesystem"
            mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in c.get("volumeMounts", [])}
            assert "emptyDir" in mounts.get("/tmp", {}), f"{what}: no writable /tmp on a read-only root"


def test_namespace_enforces_restricted_and_holds_every_platform_workload(rendered):
    namespaces = {d["metadata"]["name"]: d for d, _ in rendered if d["kind"] == "Namespace"}
    labels = namespaces[PLATFORM_NS]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc, _, _ in _workloads(rendered):
        assert _ns(doc) == PLATFORM_NS, f"{doc['kind']}/{doc['metadata']['name']} outside {PLATFORM_NS}"
    # The pipeline's namespace is Kubeflow's: shipping it would delete it on `kubectl delete -k`.
    assert _pipeline_namespace() not in namespaces and _pipeline_namespace() != PLATFORM_NS


def test_images_run_as_the_uid_the_manifests_expect():
    """The Dockerfile's images run as uid 10001 (tests/test_dockerfile.py), which the manifests set."""
    (isvc,) = [d for d in _load_docs(SERVING / "inferenceservice.yaml") if d["kind"] == "InferenceService"]
    assert isvc["spec"]["predictor"]["securityContext"]["runAsUser"] == 10001
    mlflow = _load_docs(TRAINING / "platform" / "mlflow.yaml")[0]
    assert mlflow["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


# Workloads whose image fixes its uid below 10000: the official Postgres (alpine) image's postgres user
# (infra/README.md, "checkov").
LOW_UID_ALLOWED = {"postgres": 70}


def test_workloads_pull_always_run_as_high_uids_and_read_secrets_as_files_where_they_can(rendered):
    """checkov's CKV_K8S_15 (pull policy Always) and CKV_K8S_40 (uid >= 10000) hold for every container,
    the InferenceService included (checkov itself does not look at it); Postgres reads its credentials as
    files. What checkov still reports is listed and justified in infra/README.md."""
    for doc, source, spec in _workloads(rendered):
        name = doc["metadata"]["name"]
        pod = spec.get("securityContext") or {}
        for c in _containers(spec):
            where = f"{source.relative_to(REPO)} {name}/{c['name']}"
            assert c.get("imagePullPolicy") == "Always", where
            uid = (c.get("securityContext") or {}).get("runAsUser", pod.get("runAsUser"))
            assert uid == LOW_UID_ALLOWED.get(name, uid) and (uid >= 10000 or name in LOW_UID_ALLOWED), where
    postgres = [
        c for d, _, s in _workloads(rendered) if d["metadata"]["name"] == "postgres" for c in _containers(s)
    ]
    (container,) = postgres
    assert "envFrom" not in container and not [e for e in container["env"] if "valueFrom" in e]
    assert {e["name"] for e in container["env"]} >= {"POSTGRES_PASSWORD_FILE", "POSTGRES_USER_FILE"}
    readme = (INFRA / "README.md").read_text()
    for check in ("CKV_K8S_43", "CKV_K8S_35", "CKV_K8S_40"):
        assert check in readme, f"infra/README.md does not justify the remaining {check} findings"


# --------------------------------------------------------------------------------------- NetworkPolicies


def _selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return False
    if selector.get("matchLabels") and not selector["matchLabels"].items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        ok = {
            "In": value in expr.get("values", []),
            "NotIn": value not in expr.get("values", []),
            "Exists": expr["key"] in labels,
            "DoesNotExist": expr["key"] not in labels,
        }[expr["operator"]]
        if not ok:
            return False
    return True


class Network:
    """NetworkPolicy semantics for the rendered policies: a pod selected by a policy of a type (Ingress,
    Egress) is isolated in that direction and gets only what some selecting policy's rule allows."""

    def __init__(self, rendered):
        self.policies = [d for d, _ in rendered if d["kind"] == "NetworkPolicy"]
        self.namespace_labels = {
            d["metadata"]["name"]: d["metadata"].get("labels", {})
            for d, _ in rendered
            if d["kind"] == "Namespace"
        }

    def ns_labels(self, ns: str) -> dict:
        return {**self.namespace_labels.get(ns, {}), "kubernetes.io/metadata.name": ns}

    def _peer_matches(self, peer: dict, policy_ns: str, pod: tuple[str, dict]) -> bool:
        ns, labels = pod
        if "ipBlock" in peer:
            return False  # no policy here uses addresses
        if "namespaceSelector" in peer:
            if not _selects(peer["namespaceSelector"], self.ns_labels(ns)):
                return False
        elif ns != policy_ns:
            return False
        return "podSelector" not in peer or _selects(peer["podSelector"], labels)

    def _allowed(self, direction: str, pod, peer_pod, port: int, protocol: str) -> bool:
        ns, labels = pod
        selecting = [
            p
            for p in self.policies
            if _ns(p) == ns
            and _selects(p["spec"]["podSelector"], labels)
            and direction in p["spec"].get("policyTypes", ["Ingress"])
        ]
        if not selecting:
            return True  # not isolated in that direction
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for policy in selecting:
            for rule in policy["spec"].get(key, []):
                peers = rule.get(peers_key)
                ports = rule.get("ports")
                if peers and not any(self._peer_matches(x, ns, peer_pod) for x in peers):
                    continue
                if ports and not any(
                    x.get("port") == port and x.get("protocol", "TCP") == protocol for x in ports
                ):
                    continue
                return True
        return False

    def reaches(self, src, dst, port: int, protocol: str = "TCP") -> bool:
        return self._allowed("Egress", src, dst, port, protocol) and self._allowed(
            "Ingress", dst, src, port, protocol
        )


def test_network_policies_allow_what_each_component_needs_and_nothing_else(rendered):
    net = Network(rendered)
    pods = {
        d["metadata"]["name"]: (_ns(d), _pod_labels(d)) for d, _, _ in _workloads(rendered)
    }  # minio, postgres, mlflow, the two Jobs, fedmedclip (the inference service)
    pipeline_task = (_pipeline_namespace(), {"pipelines.kubeflow.org/v2_component": "true"})
    elsewhere = ("some-other-namespace", {"app": "curious"})
    dns = ("kube-system", {"k8s-app": "kube-dns"})
    minio, postgres, mlflow = pods["minio"], pods["postgres"], pods["mlflow"]
    setup, users, inference = (
        pods["fedmedclip-minio-setup"],
        pods["fedmedclip-mlflow-users"],
        pods["fedmedclip"],
    )

    # Inference clients and Prometheus live in namespaces labelled for it (infra/serving/networkpolicy.yaml).
    net.namespace_labels["clinic-apps"] = {"fedmedclip.io/inference-client": "true"}
    net.namespace_labels["monitoring"] = {"fedmedclip.io/monitoring": "true"}
    client, prometheus = ("clinic-apps", {"app": "viewer"}), ("monitoring", {"app": "prometheus"})
    allowed = [
        (pipeline_task, minio, 9000), (pipeline_task, mlflow, 5000),
        (mlflow, postgres, 5432), (mlflow, minio, 9000),
        (setup, minio, 9000), (users, mlflow, 5000), (inference, mlflow, 5000),
        (client, inference, 8080), (client, inference, 8081), (prometheus, inference, 9090),
    ]  # fmt: skip
    for src, dst, port in allowed:
        assert net.reaches(src, dst, port), (src, dst, port)
    for pod in pods.values():
        assert net.reaches(pod, dns, 53, "UDP"), pod
    denied = [
        (pipeline_task, postgres, 5432), (pipeline_task, minio, 9001),
        (elsewhere, minio, 9000), (elsewhere, mlflow, 5000), (elsewhere, postgres, 5432),
        (inference, minio, 9000), (inference, postgres, 5432), (inference, elsewhere, 443),
        (setup, mlflow, 5000), (setup, postgres, 5432), (users, postgres, 5432), (users, minio, 9000),
        (mlflow, elsewhere, 443), (minio, elsewhere, 443), (postgres, minio, 9000),
        (elsewhere, inference, 8080), (elsewhere, inference, 8081), (pipeline_task, inference, 8080),
        (prometheus, inference, 8081), (prometheus, inference, 8080), (client, inference, 9090),
    ]  # fmt: skip
    for src, dst, port in denied:
        assert not net.reaches(src, dst, port), (src, dst, port)
    # The default deny covers every pod of the namespace, both ways.
    (deny,) = [p for p in net.policies if p["metadata"]["name"] == "default-deny"]
    assert deny["spec"]["podSelector"] == {} and set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}


# ------------------------------------------------------------------------ serving points at the platform


def test_serving_configmap_points_at_the_installed_mlflow(index):
    cm = index[("ConfigMap", PLATFORM_NS, "fedmedclip-serving")]["data"]
    # What the server is configured to reach is what its egress policy lets it reach: MLflow only (the
    # model's bytes come through MLflow's --serve-artifacts), no S3 endpoint, no S3 credentials.
    assert set(cm) == {"MLFLOW_TRACKING_URI"}
    (isvc,) = [d for (kind, _, _), d in index.items() if kind == "InferenceService"]
    env = isvc["spec"]["predictor"]["containers"][0]["env"]
    assert not [e["name"] for e in env if e["name"].startswith(("AWS_", "MLFLOW_S3"))]
    for key in ("MLFLOW_TRACKING_URI",):
        url = urlparse(cm[key])
        service, namespace = url.hostname.split(".")[:2]
        assert url.hostname == f"{service}.{namespace}.svc.cluster.local", key
        svc = index.get(("Service", namespace, service))
        assert svc is not None, (
            f"{key} points at {service}.{namespace}, which infra/training does not install"
        )
        assert url.port in {p["port"] for p in svc["spec"]["ports"]}, key


# ------------------------------------------------------------------------------- MLflow authentication


def test_mlflow_requires_authentication_and_every_client_has_a_user(index):
    mlflow = index[("Deployment", PLATFORM_NS, "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(mlflow["command"] + mlflow["args"])
    assert "mlflow server --app-name basic-auth" in script
    assert "default_permission = READ" in script and "MLFLOW_AUTH_CONFIG_PATH" in script
    env = {e["name"]: e for e in mlflow["env"]}
    for name in (
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth", name
    # The users Job creates the users whose credentials the inference service and the pipeline read.
    job = index[("Job", PLATFORM_NS, "fedmedclip-mlflow-users")]["spec"]["template"]["spec"]["containers"][0]
    job_secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in job["env"] if "valueFrom" in e}
    assert {"mlflow-auth", "fedmedclip-mlflow", "fedmedclip-mlflow-pipeline"} <= job_secrets
    (isvc,) = [d for (kind, _, _), d in index.items() if kind == "InferenceService"]
    serving_env = {e["name"]: e for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        ref = serving_env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "fedmedclip-mlflow" and not ref.get("optional"), name
    assert {"username", "password"} <= _keys(
        index[("Secret", _pipeline_namespace(), "fedmedclip-mlflow-pipeline")]
    )


# --------------------------------------------------------------------- admission policy on site credentials


def _cel():
    return pytest.importorskip("cel", reason="needs a CEL evaluator: pip install common-expression-language")


def _policy(index) -> tuple[dict, dict, dict]:
    vap = index[("ValidatingAdmissionPolicy", "", "fedmedclip-site-credentials")]
    binding = index[("ValidatingAdmissionPolicyBinding", "", "fedmedclip-site-credentials")]
    params = index[("ConfigMap", _pipeline_namespace(), binding["spec"]["paramRef"]["name"])]
    return vap, binding, params


def admit(vap: dict, params: dict | None, pod: dict, user: str, operation: str = "CREATE") -> list[str]:
    """The messages of the failed validations (empty: admitted), evaluating the policy's CEL like the API
    server: variables in order, then each validation, with `object`, `params`, `request`."""
    cel = _cel()
    context = {
        "object": pod,
        "params": params,
        "request": {"operation": operation, "userInfo": {"username": user}},
    }
    variables: dict = {}
    for var in vap["spec"].get("variables", []):
        variables[var["name"]] = cel.evaluate(var["expression"], {**context, "variables": variables})
    failed = []
    for rule in vap["spec"]["validations"]:
        if cel.evaluate(rule["expression"], {**context, "variables": variables}) is not True:
            if "messageExpression" in rule:
                failed.append(cel.evaluate(rule["messageExpression"], {**context, "variables": variables}))
            else:
                failed.append(rule["message"])
    return failed


def _secret_name(ref: dict, party: dict) -> str:
    """A Secret's name in a compiled executor: a constant, or (workers, extraction) a field of the party's loop
    item reaching the task as an input parameter."""
    param = ref.get("secretNameParameter", {})
    if "componentInputParameter" in param:
        return party[param["componentInputParameter"]]
    return ref.get("secretName") or param["runtimeValue"]["constant"]


def _pipeline_pods() -> list[dict]:
    """The pods a KFP backend creates for the compiled pipeline: one per executor and, for the tasks of the
    parties' loop, one per party (the server and DEFAULT_SITES sites, each loop item naming its own Secrets as
    prepare_step does), their secrets and config maps as env (kfp-kubernetes secretAsEnv / configMapAsEnv),
    created by the workflow controller."""
    from pipelines.pipeline import DEFAULT_YAML

    platform = list(yaml.safe_load_all(DEFAULT_YAML.read_text()))[1]
    parties = [{"secret": SERVER_SECRET_NAME, "tracking_secret": "fedmedclip-mlflow-pipeline"}] + [
        {"secret": site_secret_name(k), "tracking_secret": site_secret_name(k)} for k in range(DEFAULT_SITES)
    ]
    pods = []
    for name, executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        per_party = any(
            "componentInputParameter" in s.get("secretNameParameter", {})
            for s in executor.get("secretAsEnv", [])
        )
        for party in parties if per_party else parties[:1]:
            env = [
                {
                    "name": e["envVar"],
                    "valueFrom": {"secretKeyRef": {"name": _secret_name(s, party), "key": e["secretKey"]}},
                }
                for s in executor.get("secretAsEnv", [])
                for e in s["keyToEnv"]
            ] + [
                {
                    "name": e["envVar"],
                    "valueFrom": {"configMapKeyRef": {"name": m["configMapName"], "key": e["configMapKey"]}},
                }
                for m in executor.get("configMapAsEnv", [])
                for e in m["keyToEnv"]
            ]
            labels = {
                "pipelines.kubeflow.org/v2_component": "true",
                **(executor.get("podMetadata") or {}).get("labels", {}),
            }
            pods.append(
                {
                    "metadata": {
                        "name": f"{name}-{party['secret']}" if per_party else name,
                        "labels": labels,
                    },
                    "spec": {
                        "initContainers": [{"name": "kfp-launcher", "image": "kfp-launcher"}],
                        "containers": [{"name": "main", "image": "fedmedclip-train", "env": env}],
                    },
                }
            )
    return pods


def _site_pod(*secrets: str, labels: dict | None = None, how: str = "env") -> dict:
    if how == "volume":
        return {
            "metadata": {"name": "p", "labels": labels or {}},
            "spec": {
                "containers": [{"name": "c", "image": "i"}],
                "volumes": [{"name": f"v{i}", "secret": {"secretName": s}} for i, s in enumerate(secrets)],
            },
        }
    if how == "envFrom":
        container = {"name": "c", "image": "i", "envFrom": [{"secretRef": {"name": s}} for s in secrets]}
    else:
        container = {
            "name": "c",
            "image": "i",
            "env": [
                {"name": f"E{i}", "valueFrom": {"secretKeyRef": {"name": s, "key": "AWS_SECRET_ACCESS_KEY"}}}
                for i, s in enumerate(secrets)
            ],
        }
    return {"metadata": {"name": "p", "labels": labels or {}}, "spec": {"containers": [container]}}


def test_site_credentials_policy_admits_the_pipeline_and_refuses_the_rest(index):
    cel = _cel()
    vap, binding, params = _policy(index)
    assert binding["spec"]["policyName"] == vap["metadata"]["name"] and binding["spec"][
        "validationActions"
    ] == ["Deny"]
    assert vap["spec"]["failurePolicy"] == "Fail"
    assert binding["spec"]["paramRef"]["parameterNotFoundAction"] == "Allow"  # other namespaces: not checked
    controller = params["data"]["podCreators"].split(",")[0]

    # Every pod of the compiled pipeline is admitted, and some of them do read site credentials.
    pods = _pipeline_pods()
    assert any(site_secret_name(0) in json.dumps(p) for p in pods)
    for pod in pods:
        assert admit(vap, params, pod, controller) == [], pod["metadata"]["name"]

    site0, site1, server = site_secret_name(0), site_secret_name(1), SERVER_SECRET_NAME
    # Two parties' credentials in one pod, however they are read.
    for how in ("env", "envFrom", "volume"):
        assert admit(vap, params, _site_pod(site0, site1, how=how), controller), how
        assert admit(vap, params, _site_pod(site0, server, how=how), controller), how
    two_containers = _site_pod(site0)
    two_containers["spec"]["initContainers"] = _site_pod(site1)["spec"]["containers"]
    assert admit(vap, params, two_containers, controller)
    # A pod labelled for a site reads only that site's Secret.
    assert admit(vap, params, _site_pod(site0, labels={"fedmedclip.io/site": "0"}), controller) == []
    assert admit(vap, params, _site_pod(site1, labels={"fedmedclip.io/site": "0"}), controller)
    assert admit(vap, params, _site_pod(server, labels={"fedmedclip.io/site": "0"}), controller)
    # Only the pipeline's pod creator: not a person, not another service account.
    for user in ("alice@hospital-1.example", "system:serviceaccount:kubeflow:default-editor"):
        assert admit(vap, params, _site_pod(site0), user), user
        assert admit(vap, params, _site_pod("unrelated-secret"), user) == [], (
            user
        )  # other Secrets: not our business
    # No debug container reading them.
    debug = _site_pod("unrelated-secret")
    debug["spec"]["ephemeralContainers"] = _site_pod(site0)["spec"]["containers"]
    assert admit(vap, params, debug, "alice", operation="UPDATE")
    # The names it guards are exactly the pipeline's (mlops/sites.py).
    pattern = cel.evaluate(vap["spec"]["variables"][0]["expression"], {})
    assert all(re.match(pattern, n) for n in (site0, "fedmedclip-site-hospital-a-s3", server))
    assert not any(
        re.match(pattern, n) for n in ("mlflow-s3", "fedmedclip-mlflow-pipeline", "fedmedclip-site--s3")
    )


# ------------------------------------------------------- the MLflow manifests' scripts, run for real


@pytest.mark.slow
# MLflow's server package, imported here by the Job's script, warns about its own dependencies (SQLAlchemy, Starlette).
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")
def test_mlflow_basic_auth_scripts_run(index, tmp_path, monkeypatch):
    """The MLflow container's start script and the users Job's script from the manifests, run on this machine
    (sqlite instead of Postgres, a folder instead of MinIO): anonymous requests are refused, the Job creates
    the pipeline's and the inference service's users (twice: it is idempotent), and they can work."""
    import contextlib
    import io
    import os
    import subprocess
    import time

    import requests
    from conftest import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow = index[("Deployment", PLATFORM_NS, "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    script = (
        mlflow["args"][0]
        .replace("/tmp/", f"{tmp_path}/")
        .replace("--host=0.0.0.0 --port=5000 --workers=2", f"--host=127.0.0.1 --port={port} --workers=1")
    )
    secrets = {"MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1",
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-key"}  # fmt: skip
    # The container's own settings (MLFLOW_SERVER_ENABLE_JOB_EXECUTION among them: without it the server
    # starts job-runner processes), then what differs on this machine.
    settings = {e["name"]: e["value"] for e in mlflow["env"] if "value" in e and "$(" not in e["value"]}
    settings.pop("MLFLOW_S3_ENDPOINT_URL")  # a folder instead of MinIO
    assert settings["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    env = {
        **os.environ,
        **settings,
        **secrets,
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_SERVER_ALLOWED_HOSTS": f"127.0.0.1:{port}",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    log = tmp_path / "mlflow.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["/bin/sh", "-ec", script], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # Event wait: until /health answers (a slow answer on a loaded machine is waited for, not an error),
        # the server exits, or a generous ceiling passes.
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=60).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)  # a refused connection is answered at once: this is the poll's whole cost
        search = f"{url}/api/2.0/mlflow/experiments/search"
        assert requests.post(search, json={"max_results": 1}, timeout=10).status_code == 401

        job = index[("Job", PLATFORM_NS, "fedmedclip-mlflow-users")]["spec"]["template"]["spec"][
            "containers"
        ][0]
        users = {"PIPELINE_USERNAME": "fedmedclip-pipeline", "PIPELINE_PASSWORD": "pipeline-password-1",
                 "SERVING_USERNAME": "fedmedclip-serving", "SERVING_PASSWORD": "serving-password-1"}  # fmt: skip
        job_env = {"ADMIN_USERNAME": "admin", "ADMIN_PASSWORD": "admin-password-1", **users}
        code = compile(job["args"][0].replace("http://mlflow:5000", url), "fedmedclip-mlflow-users", "exec")
        # The Job's `python -c` script, run in this process (its imports of MLflow's server package cost 3 s of
        # CPU per process): with the Job's environment, as a main program, twice.
        for _ in range(2):
            printed = io.StringIO()
            with monkeypatch.context() as patch, contextlib.redirect_stdout(printed):
                for key, value in job_env.items():
                    patch.setenv(key, value)
                exec(code, {"__name__": "__main__"})
        assert "password set again" in printed.getvalue()

        pipeline, serving = (
            ("fedmedclip-pipeline", "pipeline-password-1"),
            ("fedmedclip-serving", "serving-password-1"),
        )
        created = requests.post(
            f"{url}/api/2.0/mlflow/experiments/create", json={"name": "fedmedclip"}, auth=pipeline, timeout=10
        )
        assert created.status_code == 200, created.text
        experiment = created.json()["experiment_id"]
        assert requests.post(search, json={"max_results": 5}, auth=serving, timeout=10).status_code == 200
        # READ for every user: the inference service cannot change what the pipeline made.
        deleted = requests.post(
            f"{url}/api/2.0/mlflow/experiments/delete",
            json={"experiment_id": experiment},
            auth=serving,
            timeout=10,
        )
        assert deleted.status_code == 403, deleted.text
        assert (
            requests.post(
                search, json={"max_results": 1}, auth=("fedmedclip-serving", "wrong"), timeout=10
            ).status_code
            == 401
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ------------------------------------------------------------------- the hospitals' way in: S3 over TLS


INGRESS_CONTROLLER = ("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})  # class nginx's pods


def test_hospitals_reach_the_s3_api_over_tls_and_nothing_else(rendered, index):
    """A site outside the cluster needs outbound HTTPS to one host: an Ingress with TLS routes that host to
    MinIO's S3 port only (never the console), its certificate covers that host, the NetworkPolicy admits the
    ingress controller to that port only, and the onboarding instructions name the same endpoint."""
    (ingress,) = [d for d, _ in rendered if d["kind"] == "Ingress"]
    assert _ns(ingress) == PLATFORM_NS and ingress["spec"]["ingressClassName"] == "nginx"
    rules, tls = ingress["spec"]["rules"], ingress["spec"]["tls"]
    hosts = {r["host"] for r in rules}
    assert hosts and hosts == {h for t in tls for h in t["hosts"]}, "every routed host is served over TLS"
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
    minio = index[("Service", PLATFORM_NS, "minio")]
    s3_port = next(p for p in minio["spec"]["ports"] if p["port"] == 9000)
    for rule in rules:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == "minio", backend
            assert backend["port"] in ({"name": s3_port["name"]}, {"number": 9000}), "the S3 API only"
    # the certificate: cert-manager's, for exactly the routed hosts, into the Secret the Ingress serves
    (secret_name,) = {t["secretName"] for t in tls}
    certificate = next(
        d
        for (kind, ns, _), d in index.items()
        if kind == "Certificate" and d["spec"]["secretName"] == secret_name
    )
    assert _ns(certificate) == PLATFORM_NS and set(certificate["spec"]["dnsNames"]) == hosts
    assert certificate["spec"]["issuerRef"]["name"]
    # the controller reaches MinIO's S3 port, and nothing else of the platform; others still do not
    net = Network(rendered)
    pods = {d["metadata"]["name"]: (_ns(d), _pod_labels(d)) for d, _, _ in _workloads(rendered)}
    assert net.reaches(INGRESS_CONTROLLER, pods["minio"], 9000)
    for target, port in ((pods["minio"], 9001), (pods["mlflow"], 5000), (pods["postgres"], 5432)):
        assert not net.reaches(INGRESS_CONTROLLER, target, port), (target, port)
    assert not net.reaches(("ingress-nginx", {"app": "something-else"}), pods["minio"], 9000)
    assert not net.reaches(("other", INGRESS_CONTROLLER[1]), pods["minio"], 9000)
    # the onboarding instructions give a site this endpoint and how to trust its CA
    (host,) = hosts
    for doc in (REPO / "README.md", INFRA / "README.md"):
        text = doc.read_text()
        assert f"AWS_ENDPOINT_URL_S3=https://{host}" in text, doc
        assert "AWS_CA_BUNDLE" in text, doc
