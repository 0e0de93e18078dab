"""deploy/k8s/gateway: renders (the kustomize subset of tests/test_deploy.py), validates strictly against the pinned
Kubernetes schema, and agrees with the gateway's settings, the server's Service and the CPU image."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.settings import GatewaySettings
from test_deploy import K8S, _instructions, _one, _validate, render_kustomization

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render_kustomization(K8S / "gateway")


def test_the_gateway_manifests_validate(objects):
    assert sorted(o["kind"] for o in objects) == ["Deployment", "Ingress", "PersistentVolumeClaim", "Service"]
    _validate(objects)


def test_the_gateway_deployment_matches_its_settings_and_the_server(objects):
    deploy = _one(objects, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = GatewaySettings.from_env_and_args(env=env)  # the gateway accepts the manifest's settings
    assert settings.effective_host() == ("0.0.0.0", None)  # network bind allowed: keys are configured
    assert container["image"].endswith("-cpu") and container["command"][-1] == "gateway"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts[str(settings.data_dir)] == "data"
    pvc = _one(objects, "PersistentVolumeClaim")
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    keys_dir = str(Path(settings.api_keys_file).parent)
    assert volumes[mounts[keys_dir]]["secret"]["secretName"] == "triton-tts-gateway-keys"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and "/tmp" in mounts

    # Same non-root user as the image; Triton reached at the base Service's gRPC port.
    uid = int([v for i, v in _instructions("Dockerfile.cpu") if i == "USER"][-1].split(":")[0])
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"] is True
    server_svc = _one(render_kustomization(K8S / "base"), "Service")
    grpc_port = {p["name"]: p["port"] for p in server_svc["spec"]["ports"]}["grpc"]
    assert settings.triton_url == f"{server_svc['metadata']['name']}:{grpc_port}"

    # Service -> pods -> container port; Ingress -> Service port, with buffering off for streamed audio.
    svc = _one(objects, "Service")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    ingress = _one(objects, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == svc["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    body_mb = int(re.fullmatch(r"(\d+)m", notes["nginx.ingress.kubernetes.io/proxy-body-size"]).group(1))
    assert body_mb * 2**20 >= settings.max_upload_bytes


def test_the_images_install_the_gateway():
    assert "gateway" in re.search(r'"/opt/triton-tts\[([a-z,]+)\]"', (ROOT / "Dockerfile.cpu").read_text()).group(1)
    assert "gateway" in re.search(r'"/opt/triton-tts\[([a-z,]+)\]"', (ROOT / "Dockerfile.triton").read_text()).group(1)
