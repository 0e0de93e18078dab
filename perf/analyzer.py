"""perf_analyzer, for real: a pinned binary, input data from our request set, streaming runs, parsed results.

Where the binary comes from (no system packages, nothing by hand):
- `PERF_ANALYZER` (a path) when set — e.g. the NGC SDK image's binary;
- otherwise the `tritonclient==2.49.0` manylinux wheel (the newest whose binary runs on glibc 2.36), fetched once
  with `pip download --no-deps` into a cache directory, checked against the sha256 pinned below, and unpacked.
  Its two shared libraries outside glibc (libb64.so.0d, libcudart.so.12) already ship, under hashed names, in
  the `nvidia-pytriton` wheel's `nvidia_pytriton.libs/`; they are symlinked under their sonames into a private
  lib directory used only through the subprocess's LD_LIBRARY_PATH, and `ldd` must resolve everything.

Facts about this perf_analyzer that shape the runs (checked against tritonserver 2.51):
- with `--streaming` on a decoupled model it measures latency to the FIRST response (time to first audio);
  its `--profile-export-file` has every response's timestamp, from which the full latency is taken too;
- the profile export embeds raw request/response tensors (WAV and PCM bytes), so it is not UTF-8: it is read as
  latin-1, reduced to timestamps, and the raw file is deleted;
- BYTES inputs given as {"b64": ...} must already be Triton-serialized (a 4-byte little-endian length prefix);
- `--bls-composing-models` needs explicit versions (`name:1`), else it fails with "failed to find the requested
  model version"; the composing models' statistics appear only on stdout, which is parsed here;
- `--stability-percentage` is set wide on purpose: the load of a shared CPU varies, and a run that never
  "stabilizes" produces no numbers at all; the windows and request counts are fixed instead (count_windows).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from engine_ref.errors import TTSError
from perf.stats import Distribution

__all__ = [
    "PerfAnalyzerError", "PinnedWheel", "PINNED_WHEEL", "PerfAnalyzer", "ensure_perf_analyzer", "verify_wheel", "input_data",
    "PaSettings", "PaLeaf", "PaResult", "run_perf_analyzer", "parse_csv", "parse_composing", "profile_latencies",
]


class PerfAnalyzerError(TTSError):
    """perf_analyzer could not be obtained, did not run, or produced no result."""


@dataclass(frozen=True)
class PinnedWheel:
    name: str
    version: str
    filename: str
    sha256: str
    member: str  #: the binary inside the wheel


PINNED_WHEEL = PinnedWheel(
    name="tritonclient", version="2.49.0", filename="tritonclient-2.49.0-py3-none-manylinux1_x86_64.whl",
    sha256="e7b40ba11056c93da434bc8a8b302c0a337489923a0a747c5d313314baa26db3",
    member="tritonclient-2.49.0.data/data/bin/perf_analyzer",
)
#: shared libraries the binary needs beyond glibc/openssl/zlib -> how they are named in nvidia_pytriton.libs
_BUNDLED_LIBS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}
_DOWNLOAD_TIMEOUT_S = 300


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    lib_dir: Path | None = None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([str(self.lib_dir), env.get("LD_LIBRARY_PATH", "")])
        return env


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pytriton_libs() -> Path:
    try:
        import pytriton
    except ImportError:
        raise PerfAnalyzerError("perf_analyzer's libb64/libcudart come from the nvidia-pytriton wheel, which is not "
                                "installed", "install the serve extra (`pip install 'triton-tts[serve]'`) or set "
                                "PERF_ANALYZER to a working binary") from None
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        raise PerfAnalyzerError(f"{libs} does not exist", "reinstall nvidia-pytriton==0.7.0 (manylinux wheel)")
    return libs


def _link_libs(lib_dir: Path) -> None:
    source = _pytriton_libs()
    lib_dir.mkdir(parents=True, exist_ok=True)
    for soname, pattern in _BUNDLED_LIBS.items():
        found = sorted(source.glob(pattern))
        if not found:
            raise PerfAnalyzerError(f"no {pattern} in {source} (perf_analyzer needs {soname})",
                                    "reinstall nvidia-pytriton==0.7.0, or set PERF_ANALYZER to a working binary")
        link = lib_dir / soname
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])


def _check_ldd(pa: PerfAnalyzer) -> None:
    try:
        out = subprocess.run(["ldd", str(pa.binary)], capture_output=True, text=True, env=pa.environment(),
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return  # no ldd: the first real run reports a loader error instead
    missing = [ln.split()[0] for ln in out.splitlines() if "not found" in ln]
    if missing:
        raise PerfAnalyzerError(f"perf_analyzer cannot load {', '.join(missing)}",
                                "set PERF_ANALYZER to a binary that runs here (e.g. from the NGC SDK image)")


def _download(wheel: PinnedWheel, cache: Path) -> Path:
    target = cache / wheel.filename
    if target.is_file() and _sha256(target) == wheel.sha256:
        return target
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise PerfAnalyzerError(f"the pinned perf_analyzer wheel is for Linux x86_64, this is "
                                f"{platform.system()} {platform.machine()}",
                                "set PERF_ANALYZER to a perf_analyzer binary for this machine, or pass --no-perf-analyzer")
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform",
           "manylinux1_x86_64", "--python-version", "3", "--implementation", "py", "--dest", str(cache),
           f"{wheel.name}=={wheel.version}"]
    print(f"fetching perf_analyzer once: {wheel.name}=={wheel.version} into {cache}", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PerfAnalyzerError(f"pip download of {wheel.name}=={wheel.version} took over {_DOWNLOAD_TIMEOUT_S} s",
                                "check the network/package index, or set PERF_ANALYZER, or pass "
                                "--no-perf-analyzer") from None
    if proc.returncode != 0 or not target.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PerfAnalyzerError(f"pip could not download {wheel.filename}: {tail[0][:200]}",
                                "check the network/package index, or set PERF_ANALYZER, or pass --no-perf-analyzer")
    verify_wheel(target, wheel)
    return target


def verify_wheel(path: Path, wheel: PinnedWheel) -> None:
    """The downloaded file must be the pinned one; a mismatch is deleted and refused."""
    digest = _sha256(path)
    if digest != wheel.sha256:
        path.unlink()
        raise PerfAnalyzerError(f"{wheel.filename} has sha256 {digest[:16]}..., pinned {wheel.sha256[:16]}...",
                                "the index served a different file: check the index/mirror, or set PERF_ANALYZER")


def ensure_perf_analyzer(cache_dir: str | os.PathLike = "build/tools", download: bool = True,
                         wheel: PinnedWheel = PINNED_WHEEL) -> PerfAnalyzer:
    """A runnable perf_analyzer: PERF_ANALYZER, or the pinned wheel's binary unpacked under `cache_dir`."""
    explicit = os.environ.get("PERF_ANALYZER")
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise PerfAnalyzerError(f"PERF_ANALYZER={explicit} is not an executable file",
                                    "point PERF_ANALYZER at a perf_analyzer binary, or unset it")
        return PerfAnalyzer(path)
    home = Path(cache_dir) / f"{wheel.name}-{wheel.version}"
    binary, lib_dir, stamp = home / "bin" / "perf_analyzer", home / "lib", home / "wheel.sha256"
    if not (binary.is_file() and stamp.is_file() and stamp.read_text().strip() == wheel.sha256):
        if not download and not (Path(cache_dir) / wheel.filename).is_file():
            raise PerfAnalyzerError(f"perf_analyzer is not in {home}", "run once without --no-download (it fetches "
                                    f"{wheel.name}=={wheel.version} with pip), or set PERF_ANALYZER")
        whl = _download(wheel, Path(cache_dir))
        binary.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(whl) as z:
            try:
                data = z.read(wheel.member)
            except KeyError:
                raise PerfAnalyzerError(f"{wheel.filename} has no {wheel.member}",
                                        "set PERF_ANALYZER to a perf_analyzer binary") from None
        tmp = binary.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o755)
        tmp.replace(binary)
        stamp.write_text(wheel.sha256)
    _link_libs(lib_dir)
    pa = PerfAnalyzer(binary, lib_dir)
    _check_ldd(pa)
    return pa


# ---------------------------------------------------------------------------------------------------- input data


def _serialized_bytes(value: bytes) -> str:
    """A BYTES element as perf_analyzer's b64 wants it: Triton's serialization (u32 length prefix), base64."""
    return base64.b64encode(struct.pack("<I", len(value)) + value).decode("ascii")


def _json_tensor(arr: np.ndarray) -> dict[str, Any]:
    shape = list(arr.shape)
    if arr.dtype == np.object_:
        (value,) = arr.reshape(-1).tolist()  # the contract's request inputs are all single elements
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        try:
            return {"content": [raw.decode("utf-8")], "shape": shape}
        except UnicodeDecodeError:
            return {"b64": _serialized_bytes(raw), "shape": shape}
    return {"content": arr.reshape(-1).tolist(), "shape": shape}


def input_data(requests: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """perf_analyzer's --input-data JSON for request tensors (`TTSRequest.arrays()`): one entry per request,
    which perf_analyzer sends round-robin."""
    if not requests:
        raise ValueError("perf_analyzer needs at least one request")
    return {"data": [{name: _json_tensor(np.asarray(arr)) for name, arr in req.items()} for req in requests]}


# ------------------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class PaSettings:
    """How one perf_analyzer level is measured (fixed request counts: the same work every run)."""

    request_count: int = 8  #: requests per measurement window (count_windows mode)
    max_trials: int = 3  #: windows measured
    stability_percentage: int = 999
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.request_count < 1:
            raise ValueError("request_count must be >= 1")
        if self.max_trials < 3:  # perf_analyzer needs 3 windows to call a measurement stable, however wide
            raise ValueError("perf_analyzer needs max_trials >= 3")


@dataclass(frozen=True)
class PaLeaf:
    """A composing model's statistics over the run, from perf_analyzer's stdout."""

    model: str
    requests: int
    avg_us: float
    queue_us: float
    compute_us: float  #: compute input + infer + output


@dataclass
class PaResult:
    concurrency: int
    csv_path: Path | None
    row: dict[str, float] = field(default_factory=dict)  #: the CSV row (latencies in us)
    leaves: list[PaLeaf] = field(default_factory=list)
    ttfa_s: Distribution | None = None  #: from the profile export: first response - send
    latency_s: Distribution | None = None  #: last response - send
    requests: int = 0
    error: str | None = None


def _run_dir_name(concurrency: int) -> str:
    return f"c{concurrency:02d}"


def parse_csv(path: Path) -> dict[str, float]:
    """The first data row of perf_analyzer's CSV (-f), as floats by column name."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise PerfAnalyzerError(f"{path} has no data row", "see the perf_analyzer log beside it")
    out = {}
    for key, value in rows[0].items():
        try:
            out[key.strip()] = float(value)
        except (TypeError, ValueError):
            continue
    return out


_LEAF_HEAD = re.compile(r"^\s+(\S+), version: (\S+)\s*$")
_LEAF_COUNT = re.compile(r"^\s+(?:Successful request count|Request count): (\d+)")
_LEAF_LAT = re.compile(r"^\s+Avg request latency: (\d+) usec \((.*)\)")
_PART = re.compile(r"(queue|compute input|compute infer|compute output|compute) (\d+) usec")


def parse_composing(stdout: str) -> list[PaLeaf]:
    """The "Composing models:" section of perf_analyzer's stdout."""
    lines = stdout.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Composing models:")
    except StopIteration:
        return []
    leaves: list[PaLeaf] = []
    name, count = None, 0
    for ln in lines[start + 1:]:
        if (m := _LEAF_HEAD.match(ln)) is not None:
            if name is not None and count == 0:
                leaves.append(PaLeaf(name, 0, 0.0, 0.0, 0.0))
            name, count = m.group(1), 0
            continue
        if name is None:
            continue
        if (m := _LEAF_COUNT.match(ln)) is not None:
            count = int(m.group(1))
        elif (m := _LEAF_LAT.match(ln)) is not None:
            parts = {k: float(v) for k, v in _PART.findall(m.group(2))}
            compute = parts.get("compute") or sum(parts.get(k, 0.0) for k in
                                                   ("compute input", "compute infer", "compute output"))
            leaves.append(PaLeaf(name, count, float(m.group(1)), parts.get("queue", 0.0), compute))
            name, count = None, 0
        elif not ln.strip() or ln.startswith("Inferences/Second"):
            if ln.startswith("Inferences/Second"):
                break
    if name is not None and not any(leaf.model == name for leaf in leaves):
        leaves.append(PaLeaf(name, count, 0.0, 0.0, 0.0))
    return leaves


def profile_latencies(path: Path) -> tuple[list[float], list[float]]:
    """(first-response, last-response) latencies in seconds of every request in a profile export."""
    doc = json.loads(path.read_bytes().decode("latin-1"), strict=False)
    firsts, lasts = [], []
    for exp in doc.get("experiments", []):
        for req in exp.get("requests", []):
            ts = req.get("response_timestamps") or []
            if ts:
                firsts.append((min(ts) - req["timestamp"]) / 1e9)
                lasts.append((max(ts) - req["timestamp"]) / 1e9)
    return firsts, lasts


def run_perf_analyzer(pa: PerfAnalyzer, *, url: str, model: str, input_json: Path, concurrency: int,
                      out_dir: Path, composing: Sequence[str] = (), settings: PaSettings = PaSettings()) -> PaResult:
    """One streaming perf_analyzer level against `model`; keeps its CSV and log under out_dir/cNN/."""
    run_dir = out_dir / _run_dir_name(concurrency)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    csv_path, profile = run_dir / "perf_analyzer.csv", run_dir / "profile.json"
    cmd = [str(pa.binary), "-m", model, "-u", url, "-i", "grpc", "--streaming", "--input-data", str(input_json),
           "--concurrency-range", f"{concurrency}:{concurrency}:1", "--measurement-mode", "count_windows",
           "--measurement-request-count", str(settings.request_count), "--max-trials", str(settings.max_trials),
           "--stability-percentage", str(settings.stability_percentage), "-f", str(csv_path), "--verbose-csv",
           "--profile-export-file", str(profile)]
    if composing:
        cmd.append("--bls-composing-models=" + ",".join(composing))
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    result = PaResult(concurrency, None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=pa.environment(), timeout=settings.timeout_s)
    except subprocess.TimeoutExpired as exc:
        (run_dir / "perf_analyzer.log").write_text(str(exc.stdout or ""))
        result.error = f"perf_analyzer ran over {settings.timeout_s:g} s"
        return result
    except OSError as exc:
        raise PerfAnalyzerError(f"cannot run {pa.binary} ({exc.strerror or exc})",
                                "delete the tools cache so it is unpacked again, or set PERF_ANALYZER") from None
    (run_dir / "perf_analyzer.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not csv_path.is_file():
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and not ln.startswith((" ", "\t"))]
        result.error = f"exit {proc.returncode}: {(lines[-1] if lines else 'no output')[:200]}"
        return result
    result.csv_path = csv_path
    result.row = parse_csv(csv_path)
    result.leaves = parse_composing(proc.stdout)
    if profile.is_file():
        firsts, lasts = profile_latencies(profile)
        result.ttfa_s, result.latency_s, result.requests = Distribution.of(firsts), Distribution.of(lasts), len(firsts)
        (run_dir / "latencies.json").write_text(json.dumps({"first_response_s": firsts, "last_response_s": lasts}))
        profile.unlink()  # raw tensors (audio) make it large; the timestamps are kept above
    return result
