"""Container entrypoint: verify the mounted model offline, export and build plans only when stale, then serve.

Pods must start fast, never hang on a network they do not have, and fail with one line an operator can act on.
So every start runs the same short pipeline, each step a `triton-tts` subcommand (never re-implemented here):

    [download (ALLOW_DOWNLOAD=1 only)] -> verify -> export (no-op when fresh) -> build-plans (gpu, only when the
    plan cache is absent or stale) -> build-repo (into RUN_DIR) -> exec serve (which runs and watches tritonserver)

Settings come from environment variables (defaults in `ENV_DEFAULTS`, documented in docs/deploy.md). Every step
but an explicit download runs with HF_HUB_OFFLINE=1. Steps that write the shared cache hold a file lock, so pods
that start together on one cache volume build once instead of racing. The plan-cache decision is a pure function
(`plan_cache_decision`) so it can be tested without a GPU; the subprocess runner is injectable for the same reason.

Commands: `run` (default: the whole pipeline), `verify` (download if allowed, then verify: the Kubernetes init
container), `healthcheck` (probes /v2/health/ready: the images' HEALTHCHECK, so neither image needs curl).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

from engine_ref.errors import ConfigError, ModelFilesError, TTSError

log = logging.getLogger("triton_tts.entrypoint")

# Every setting, its default, and what it means (docs/deploy.md repeats this table).
ENV_DEFAULTS: dict[str, str] = {
    "MODEL_DIR": "/models/indextts",  # model directory (config.yaml, gpt.pth, bigvgan_generator.pth, bpe.model)
    "MODEL_REPO_ID": "",  # used when MODEL_DIR is empty: resolved from the local HF cache (HF_HOME), or downloaded
    "ALLOW_DOWNLOAD": "0",  # 1: download MODEL_REPO_ID first when MODEL_DIR is empty (the only network use)
    "CACHE_DIR": "/cache",  # export/ (ONNX + manifest) and plans/<gpu>/ (TensorRT plans + plans.json) persist here
    "RUN_DIR": "/tmp/triton-tts",  # the generated model repository (rebuilt at every start; cheap)
    "FLAVOR": "gpu",  # gpu: NGC tritonserver (+TensorRT); cpu: PyPI tritonserver, ONNX Runtime in Python models
    "PRECISION": "fp32",  # the GPT decoder variant served: fp32 | fp16 (gpu) | int8 | int4 (cpu, weight-only)
    "USE_TENSORRT": "1",  # gpu: 0 serves the ONNX graphs on Triton's onnxruntime backend (no plans to build)
    "TRT_FP16": "1",  # gpu: let TensorRT use fp16 kernels in the conditioning encoder and vocoder plans
    "HTTP_PORT": "8000",
    "GRPC_PORT": "8001",
    "METRICS_PORT": "8002",
    "MAX_SEQUENCES": "",  # live sequences the decoder batches (build-repo's default when empty)
    "INSTANCES": "",  # instances of the BLS and preprocessing models (build-repo's default when empty)
    "BUILD_REPO_ARGS": "",  # extra build-repo flags, shell-quoted (e.g. "--leaf-instances 2 --threads 4")
    "HF_HUB_OFFLINE": "1",  # forced for every step except an explicit download
    "LOCK_TIMEOUT_S": "3600",  # how long to wait for another pod building into the same cache
}

FLAVORS = ("gpu", "cpu")
# fp32 is the verified default everywhere; fp16 decoders need CUDA, int8/int4 weight-only decoders are for CPUs.
PRECISIONS = {"gpu": ("fp32", "fp16"), "cpu": ("fp32", "int8", "int4")}
# Components served from TensorRT plans in the gpu flavor (the decoder stays in a Python model: it owns the KV cache).
PLAN_COMPONENTS = ("cond_encoder", "vocoder")
PLANS_INDEX = "plans.json"
PLANS_INDEX_FORMAT = "triton-tts-plans/1"
MODEL_FILES = ("config.yaml", "gpt.pth", "bigvgan_generator.pth", "bpe.model")
# Entries a fresh volume may hold that do not make a model directory non-empty.
_IGNORED_ENTRIES = ("lost+found",)

PROVISION_FIX = (
    f"copy the model files ({', '.join(MODEL_FILES)}) into the model volume, or point MODEL_REPO_ID at a repo in the "
    "pre-filled HF cache (HF_HOME), or set ALLOW_DOWNLOAD=1 with MODEL_REPO_ID (see docs/deploy.md, provisioning)"
)


# ---------------------------------------------------------------------------------------------------------------
# Settings


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, ENV_DEFAULTS[name]).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean", f"set {name} to 1 or 0")


def _int(env: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    raw = env.get(name, ENV_DEFAULTS[name]).strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer", f"set {name} to an integer in {lo}..{hi}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} is outside {lo}..{hi}", f"set {name} to an integer in {lo}..{hi}")
    return value


def _path(env: Mapping[str, str], name: str) -> Path:
    raw = env.get(name, "").strip() or ENV_DEFAULTS[name]
    path = Path(raw)
    if not path.is_absolute():
        raise ConfigError(f"{name}={raw!r} is a relative path", f"set {name} to an absolute path such as "
                                                                f"{ENV_DEFAULTS[name]}")
    return path


@dataclass(frozen=True)
class Settings:
    """The entrypoint's configuration, parsed and validated once from the environment."""

    model_dir: Path
    model_repo_id: str
    allow_download: bool
    cache_dir: Path
    run_dir: Path
    flavor: Literal["gpu", "cpu"]
    precision: str
    use_tensorrt: bool
    trt_fp16: bool
    http_port: int
    grpc_port: int
    metrics_port: int
    max_sequences: int | None
    instances: int | None
    build_repo_args: tuple[str, ...]
    lock_timeout_s: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        flavor = env.get("FLAVOR", ENV_DEFAULTS["FLAVOR"]).strip().lower() or ENV_DEFAULTS["FLAVOR"]
        if flavor not in FLAVORS:
            raise ConfigError(f"FLAVOR={flavor!r} is not a flavor", f"set FLAVOR to one of: {', '.join(FLAVORS)}")
        precision = env.get("PRECISION", "").strip().lower() or ENV_DEFAULTS["PRECISION"]
        if precision not in PRECISIONS[flavor]:
            raise ConfigError(
                f"PRECISION={precision!r} is not available with FLAVOR={flavor}",
                f"set PRECISION to one of: {', '.join(PRECISIONS[flavor])}",
            )
        ports = {n: _int(env, n, 1, 65535) for n in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT")}
        if len(set(ports.values())) != 3:
            raise ConfigError(f"the ports must differ (got {ports})", "give HTTP, gRPC and metrics their own ports")
        try:
            extra = tuple(shlex.split(env.get("BUILD_REPO_ARGS", "")))
        except ValueError as exc:
            raise ConfigError(f"BUILD_REPO_ARGS cannot be parsed ({exc})", "quote it like a shell command line") from None
        repo_id = env.get("MODEL_REPO_ID", "").strip()
        return cls(
            model_dir=_path(env, "MODEL_DIR"), model_repo_id=repo_id, allow_download=_flag(env, "ALLOW_DOWNLOAD"),
            cache_dir=_path(env, "CACHE_DIR"), run_dir=_path(env, "RUN_DIR"), flavor=flavor,  # type: ignore[arg-type]
            precision=precision, use_tensorrt=flavor == "gpu" and _flag(env, "USE_TENSORRT"),
            trt_fp16=_flag(env, "TRT_FP16"),
            http_port=ports["HTTP_PORT"], grpc_port=ports["GRPC_PORT"], metrics_port=ports["METRICS_PORT"],
            max_sequences=_int(env, "MAX_SEQUENCES", 1, 4096), instances=_int(env, "INSTANCES", 1, 64),
            build_repo_args=extra, lock_timeout_s=_int(env, "LOCK_TIMEOUT_S", 0, 86400) or 0,
        )

    @property
    def export_dir(self) -> Path:
        return self.cache_dir / "export"

    def plans_dir(self, gpu_name: str) -> Path:
        """CACHE_DIR/plans/<gpu>: node pools with different GPU models can share one cache without thrashing."""
        return self.cache_dir / "plans" / gpu_slug(gpu_name)

    @property
    def repo_dir(self) -> Path:
        return self.run_dir / "repo"



def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA A10G' -> 'nvidia-a10g': a directory name for one GPU model."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return slug or "unknown-gpu"


def model_dir_is_empty(path: Path) -> bool:
    """True when the directory is missing or holds nothing but hidden entries and lost+found (a fresh volume)."""
    if not path.is_dir():
        return True
    return not any(not p.name.startswith(".") and p.name not in _IGNORED_ENTRIES for p in path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# The plan-cache decision (pure)


@dataclass(frozen=True)
class PlanDecision:
    state: Literal["absent", "stale", "fresh"]
    reason: str

    @property
    def build(self) -> bool:
        return self.state != "fresh"


def plan_cache_decision(
    plans_index: Mapping | None,
    gpu_name: str,
    trt_version: str,
    expected_keys: Mapping[str, str],
    present_files: Collection[str],
) -> PlanDecision:
    """Whether the cached TensorRT plans can be served as they are, and why not.

    plans_index: the parsed plans.json (None when there is none). expected_keys: component key -> the plan key
    `export.tensorrt.plan_key` gives for this GPU, TensorRT version, the component's manifest entry and the build
    options (`expected_plan_keys`). present_files: the plan file names that exist in the cache directory.
    Plans are GPU- and TensorRT-specific, so a pod rescheduled onto another GPU model rebuilds instead of crashing.
    """
    if not plans_index or not plans_index.get("components"):
        return PlanDecision("absent", "no TensorRT plans in the cache yet")
    if plans_index.get("format") != PLANS_INDEX_FORMAT:
        return PlanDecision("stale", f"plans.json has format {plans_index.get('format')!r}, "
                                     f"this version reads {PLANS_INDEX_FORMAT!r}")
    if plans_index.get("gpu_name") != gpu_name:
        return PlanDecision("stale", f"plans were built for GPU {plans_index.get('gpu_name')!r}, "
                                     f"this node has {gpu_name!r}")
    if plans_index.get("trt_version") != trt_version:
        return PlanDecision("stale", f"plans were built with TensorRT {plans_index.get('trt_version')!r}, "
                                     f"this image has {trt_version!r}")
    components = plans_index["components"]
    for comp, key in sorted(expected_keys.items()):
        entry = components.get(comp)
        if not isinstance(entry, Mapping):
            return PlanDecision("stale", f"no plan for component '{comp}'")
        if entry.get("key") != key:
            return PlanDecision("stale", f"the plan of '{comp}' was built from another export or other build options")
        if entry.get("plan") not in present_files:
            return PlanDecision("stale", f"plan file {entry.get('plan')!r} of '{comp}' is missing from the cache")
    return PlanDecision("fresh", f"{len(expected_keys)} plan(s) match GPU {gpu_name!r} and TensorRT {trt_version}")


def expected_plan_keys(export_dir: Path, gpu_name: str, trt_version: str, fp16: bool,
                       components: Sequence[str] = PLAN_COMPONENTS) -> dict[str, str]:
    """The keys `triton-tts build-plans --component ...` would give the plans of this export (its default options)."""
    from export import tensorrt as trt_plans  # noqa: PLC0415 - only the gpu flavor needs it
    from export.manifest import read_manifest  # noqa: PLC0415

    manifest = read_manifest(export_dir)
    opts = trt_plans.PlanOptions(fp16=fp16)
    return {
        key: trt_plans.plan_key(gpu_name, trt_version, trt_plans.component_entry_sha256(comp), key,
                                opts.for_component(comp))
        for key, comp in trt_plans.select_components(manifest, list(components)).items()
    }


def read_plans_index(plans_dir: Path) -> tuple[dict | None, set[str]]:
    """plans.json (None if missing or unreadable: a rebuild fixes it) and the plan files present beside it."""
    path = plans_dir / PLANS_INDEX
    present = {p.name for p in plans_dir.glob("*.plan") if p.is_file() and p.stat().st_size > 0}
    try:
        return json.loads(path.read_text(encoding="utf-8")), present
    except (OSError, ValueError):
        return None, present


@dataclass(frozen=True)
class TrtInfo:
    gpu_name: str
    trt_version: str


def probe_tensorrt() -> TrtInfo:
    """GPU model and TensorRT version of this node (TensorRTUnavailable, a TTSError, when there is neither)."""
    from export.tensorrt import environment  # noqa: PLC0415

    env = environment()
    return TrtInfo(env.gpu_name, env.trt_version)


# ---------------------------------------------------------------------------------------------------------------
# Steps and the runner


class Runner(Protocol):
    def run(self, argv: Sequence[str], env: Mapping[str, str]) -> int: ...

    def exec(self, argv: Sequence[str], env: Mapping[str, str]) -> int: ...


class SubprocessRunner:
    """Children inherit stdout/stderr (their tables and progress go to the container log); exec replaces us.

    As PID 1 this process would ignore SIGTERM (no default action for PID 1), and a pod stopped during a long
    export would wait out its whole grace period: SIGTERM/SIGINT are forwarded to the running step instead.
    """

    def run(self, argv: Sequence[str], env: Mapping[str, str]) -> int:
        proc = subprocess.Popen(list(argv), env=dict(env))

        def forward(signum: int, _frame: object) -> None:
            proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            rc = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, as a shell reports it

    def exec(self, argv: Sequence[str], env: Mapping[str, str]) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(argv[0], list(argv), dict(env))
        return 0  # pragma: no cover - execvpe does not return


class StepFailed(TTSError):
    """A pipeline step exited non-zero; its own output (above in the log) has the details."""

    def __init__(self, problem: str, fix: str, returncode: int):
        super().__init__(problem, fix)
        self.returncode = returncode


@dataclass(frozen=True)
class Step:
    name: str
    args: tuple[str, ...]  # the triton-tts subcommand and its arguments
    fix: str  # what an operator does when this step fails
    online: bool = False  # only an explicit download may use the network


@dataclass
class Entrypoint:
    settings: Settings
    env: Mapping[str, str]
    runner: Runner = field(default_factory=SubprocessRunner)
    trt_probe: Callable[[], TrtInfo] = probe_tensorrt
    cli: tuple[str, ...] = (sys.executable, "-m", "triton_tts")

    def child_env(self, online: bool = False) -> dict[str, str]:
        env = dict(self.env)
        env["HF_HUB_OFFLINE"] = "0" if online else "1"
        env["HF_HUB_DISABLE_TELEMETRY"] = "1"
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def argv(self, step: Step) -> list[str]:
        return [*self.cli, *step.args]

    def run_step(self, step: Step) -> None:
        log.info("step %s: %s", step.name, shlex.join(self.argv(step)))
        start = time.monotonic()
        rc = self.runner.run(self.argv(step), self.child_env(step.online))
        if rc != 0:
            raise StepFailed(f"step '{step.name}' failed with exit code {rc} (its output is above)", step.fix, rc)
        log.info("step %s done in %.1f s", step.name, time.monotonic() - start)

    # -- the pipeline -------------------------------------------------------------------------------------------

    def model_ref(self) -> str:
        """MODEL_DIR, or MODEL_REPO_ID (local HF cache) when MODEL_DIR is empty; fails fast when neither is there."""
        s = self.settings
        if not model_dir_is_empty(s.model_dir):
            return str(s.model_dir)
        if s.model_repo_id:
            if s.allow_download:
                self.run_step(Step("download", ("download", s.model_repo_id),
                                   "check the pod's egress/proxy to the Hugging Face Hub and the HF cache volume's "
                                   "free space, or provision the model offline (docs/deploy.md)", online=True))
            return s.model_repo_id
        raise ModelFilesError(f"the model directory {s.model_dir} is empty or not mounted", PROVISION_FIX)

    def verify(self) -> str:
        """Download (only if allowed and needed), then the offline integrity check; returns the model reference."""
        model = self.model_ref()
        self.run_step(Step("verify", ("verify", model),
                           f"the model at {model} is incomplete, corrupt or not found (see the table or error above); "
                           + PROVISION_FIX))
        return model

    def prepare(self) -> list[str]:
        """Everything before serving; returns the serve command line. Raises a TTSError on the first failure."""
        s = self.settings
        model = self.verify()
        with cache_lock(s.cache_dir, s.lock_timeout_s):
            # export always writes fp32 (TensorRT's input too); a decoder variant comes in addition.
            self.run_step(Step("export", ("export", "--model", model, "--out", str(s.export_dir),
                                          "--precision", s.precision),
                               f"check that CACHE_DIR={s.cache_dir} is writable and has free space; "
                               "a corrupt export is rebuilt after deleting CACHE_DIR/export"))
            plans = self.ensure_plans() if s.use_tensorrt else None
        self.run_step(Step("build-repo", self.build_repo_args(plans),
                           f"check that RUN_DIR={s.run_dir} is writable (an emptyDir in Kubernetes) "
                           "and that BUILD_REPO_ARGS are valid build-repo flags"))
        return self.argv(Step("serve", self.serve_args(), ""))

    def ensure_plans(self) -> Path:
        s = self.settings
        info = self.trt_probe()
        fp16 = s.trt_fp16
        plans_dir = s.plans_dir(info.gpu_name)
        index, present = read_plans_index(plans_dir)
        expected = expected_plan_keys(s.export_dir, info.gpu_name, info.trt_version, fp16)
        decision = plan_cache_decision(index, info.gpu_name, info.trt_version, expected, present)
        log.info("TensorRT plan cache: %s (%s)", decision.state, decision.reason)
        if decision.build:
            comps = [a for c in PLAN_COMPONENTS for a in ("--component", c)]
            self.run_step(Step("build-plans", ("build-plans", "--export", str(s.export_dir), "--cache",
                                               str(plans_dir), "--fp16" if fp16 else "--no-fp16", *comps),
                               "set USE_TENSORRT=0 to serve the ONNX graphs on the onnxruntime backend meanwhile, "
                               "and report the TensorRT error above"))
        return plans_dir / PLANS_INDEX

    def build_repo_args(self, plans: Path | None) -> tuple[str, ...]:
        s = self.settings
        args = ["build-repo", "--export", str(s.export_dir), "--out", str(s.repo_dir), "--flavor", s.flavor]
        if plans is not None:
            args += ["--plans", str(plans)]
        if s.precision != "fp32":
            args += ["--decoder-precision", s.precision]
        if s.max_sequences is not None:
            args += ["--max-sequences", str(s.max_sequences)]
        if s.instances is not None:
            args += ["--instances", str(s.instances)]
        return (*args, *s.build_repo_args)

    def serve_args(self) -> tuple[str, ...]:
        s = self.settings
        # Every interface: the pod's ports are reached through its Service. No --exec: `serve` stays as the
        # supervisor that stops the server (and so the container) when a model process dies.
        return ("serve", "--repo", str(s.repo_dir), "--http-port", str(s.http_port), "--grpc-port",
                str(s.grpc_port), "--metrics-port", str(s.metrics_port), "--bind", "0.0.0.0")

    def run(self) -> int:
        """prepare(), then replace this process by `triton-tts serve` (which supervises tritonserver)."""
        serve = self.prepare()
        log.info("starting: %s", shlex.join(serve))
        return self.runner.exec(serve, self.child_env())


@contextlib.contextmanager
def cache_lock(cache_dir: Path, timeout_s: int) -> Iterator[None]:
    """An exclusive flock on CACHE_DIR/.lock: one pod exports/builds into a shared cache, the others wait."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fh = open(cache_dir / ".lock", "a+")  # noqa: SIM115 - held for the whole block
    except OSError as exc:
        raise ConfigError(f"CACHE_DIR {cache_dir} is not writable ({exc.strerror})",
                          "mount a writable volume there (the Deployment's cache PVC) or set CACHE_DIR") from None
    with fh:
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"another process held the cache lock {cache_dir / '.lock'} for more than {timeout_s} s",
                        "check for a stuck pod building into the same CACHE_DIR, or raise LOCK_TIMEOUT_S",
                    ) from None
                if not waited:
                    log.info("waiting for another pod building into %s", cache_dir)
                    waited = True
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------
# Health check and main


def healthcheck(env: Mapping[str, str], timeout_s: float = 4.0) -> int:
    """0 when /v2/health/ready answers 200 on HTTP_PORT, else 1 (what Docker's HEALTHCHECK wants)."""
    port = _int(env, "HTTP_PORT", 1, 65535)
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - fixed local http URL
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
         runner: Runner | None = None, trt_probe: Callable[[], TrtInfo] | None = None) -> int:
    """`run` (default), `verify` (Kubernetes init container) or `healthcheck`; a failure prints one line and returns non-zero (a failed step: its code)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if env is None else env)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s entrypoint %(levelname)s: %(message)s",
                        stream=sys.stderr)
    command = argv[0] if argv else "run"
    if command in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        if command == "healthcheck":
            return healthcheck(env)
        if command not in ("run", "verify"):
            raise ConfigError(f"unknown command {command!r}", "use `run` (the default), `verify` or `healthcheck`")
        entry = Entrypoint(Settings.from_env(env), env, runner or SubprocessRunner(), trt_probe or probe_tensorrt)
        if command == "verify":
            entry.verify()
            return 0
        return entry.run()
    except StepFailed as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.returncode if exc.returncode > 0 else 1
    except TTSError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
