"""infra/serving: the InferenceService parses, has what the GPU endpoint needs, and its container args are a
valid `fedmedclip serve` command line whose probes match the served model name."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

INFRA = Path(__file__).resolve().parents[1] / "infra" / "serving"


def _load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


@pytest.fixture(scope="module")
def isvc() -> dict:
    (doc,) = _load("inferenceservice.yaml")
    return doc


def test_inferenceservice_shape(isvc):
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    # RawDeployment without this label: KServe's own Ingress for the predictor, plain HTTP on the ingress
    # domain, reachable by anything that reaches the ingress controller.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert isvc["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container" and container["image"]

    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert str(resources[kind]["nvidia.com/gpu"]) == "1"
        assert resources[kind]["cpu"] and resources[kind]["memory"]

    ports = {p["containerPort"]: p for p in container["ports"]}
    assert set(ports) == {8080, 8081, 9090}
    assert ports[8081]["name"] == "h2c" and ports[8080]["name"] in ("http1", "http")
    assert ports[9090]["name"] == "metrics"

    env = {e["name"]: e for e in container["env"]}
    assert "MLFLOW_TRACKING_URI" in env
    secret_refs = [
        e["valueFrom"]["secretKeyRef"] for e in env.values() if "secretKeyRef" in e.get("valueFrom", {})
    ]
    # The model comes through MLflow's artifact proxy: the predictor holds MLflow credentials and no S3 key,
    # as its egress policy (MLflow only) says.
    assert {r["key"] for r in secret_refs} == {"username", "password"}
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"} & set(env)
    assert not any("value" in e and "SECRET" in e["name"] for e in env.values()), (
        "credentials must come from Secrets"
    )

    volumes = {v["name"] for v in predictor.get("volumes", [])}
    assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes


def test_container_args_are_a_valid_serve_command(isvc):
    from serving.cli import register

    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["command"] == ["fedmedclip"]
    parser = argparse.ArgumentParser(prog="fedmedclip")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(container["args"])
    assert args.command == "serve"
    (model,) = args.models
    assert model.startswith("models:/") and "@" in model  # registry + alias: the hash is verified
    assert args.model_control_token_file is None  # no model control from the network
    assert args.device == "cuda"
    assert (args.http_port, args.grpc_port) == (8080, 8081)
    # /metrics on a port of its own, where Prometheus scrapes: not on the port inference clients reach.
    assert args.metrics_port == 9090 and isvc["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    # By hand the server listens on loopback only; in the pod it must listen on the pod's network.
    assert parser.parse_args(["serve", "m.onnx"]).host == "127.0.0.1" and args.host == "0.0.0.0"
    assert args.cache_dir in {m["mountPath"] for m in container["volumeMounts"]}

    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert all(p["port"] == args.http_port for p in probes.values())
    # Server readiness turns false when a model is not loaded and first thing on SIGTERM.
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["startupProbe"]["path"] == f"/v2/models/{args.name}/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    # The pod's grace period covers the drain and the wait for requests in flight.
    readiness = container["readinessProbe"]
    assert args.drain_seconds >= readiness["periodSeconds"] * readiness["failureThreshold"]
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > args.drain_seconds + args.grace_period


def test_kustomization_lists_existing_resources(isvc):
    (kust,) = _load("kustomization.yaml")
    assert kust["kind"] == "Kustomization"
    for resource in kust["resources"]:
        assert (INFRA / resource).is_file(), resource
    (patch,) = kust["patches"]
    assert (
        patch["target"]["kind"] == "InferenceService" and patch["target"]["name"] == isvc["metadata"]["name"]
    )
    ops = yaml.safe_load(patch["patch"])
    assert ops[0]["path"] == "/spec/predictor/containers/0/image"

    (cm,) = _load("configmap.yaml")
    (container,) = isvc["spec"]["predictor"]["containers"]
    cm_refs = {
        e["valueFrom"]["configMapKeyRef"]["name"]
        for e in container["env"]
        if "configMapKeyRef" in e.get("valueFrom", {})
    }
    assert cm_refs == {cm["metadata"]["name"]}
    assert "MLFLOW_TRACKING_URI" in cm["data"]


def test_network_policy_admits_labelled_namespaces_only():
    (policy,) = _load("networkpolicy.yaml")
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert peer["namespaceSelector"].get("matchLabels"), (
                "an empty namespaceSelector admits every namespace"
            )
    grpc_rules = [r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": 8081} in r["ports"]]
    assert [r["from"][0]["namespaceSelector"]["matchLabels"] for r in grpc_rules] == [
        {"fedmedclip.io/inference-client": "true"}
    ]
    # /metrics counts what every client's requests held: the monitoring namespaces reach its port and only
    # it, and inference clients never reach it.
    admitted = {
        tuple(sorted(r["from"][0]["namespaceSelector"]["matchLabels"])): {p["port"] for p in r["ports"]}
        for r in policy["spec"]["ingress"]
    }
    assert admitted == {
        ("fedmedclip.io/inference-client",): {8080, 8081},
        ("fedmedclip.io/monitoring",): {9090},
    }


def test_alert_rules_use_metrics_the_server_exports():
    """Every series an alert reads is one serving/metrics.py defines (a renamed metric would silence it)."""
    import re

    from prometheus_client import REGISTRY

    import serving.metrics  # noqa: F401 - registers the collectors

    exported = {s.name for family in REGISTRY.collect() for s in family.samples} | {
        family.name for family in REGISTRY.collect()
    }
    (rule,) = _load("prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"FedMedClipOutOfDistributionRate", "FedMedClipFeatureDrift"} <= set(alerts)
    for name, alert in alerts.items():
        used = set(re.findall(r"fedmedclip_[a-z0-9_]+", alert["expr"]))
        assert used and used <= exported, (name, used - exported)
