"""Find model files offline; download them only when explicitly asked.

Production runs on machines without internet access (Kubernetes pods, air-gapped hosts), where research code
that tries to download at start-up just hangs. So there are two functions with a hard line between them:

- `resolve_model` maps a user reference (a directory, or ``org/name[@revision]``) to a local directory. It only
  reads the local Hugging Face cache layout (``models--org--name/{refs,snapshots,blobs}``) itself, at call time,
  and never imports an HTTP client: it cannot touch the network.
- `download_model` is the only code in engine_ref that uses the network. It is explicit (the `download`
  subcommand), bounded (per-request timeout and an overall deadline), shows progress, and verifies the result
  with `engine_ref.integrity.check_model_dir` before returning.

Every failure is a `ModelFilesError` naming what was looked for, where, and the fix.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_ref.errors import ModelFilesError, TTSError

# Official IndexTTS 1.x releases on the Hugging Face Hub, by config.yaml `version`.
OFFICIAL_REPOS: dict[str, str] = {"1.5": "IndexTeam/IndexTTS-1.5", "1.0": "IndexTeam/Index-TTS"}
DEFAULT_REPO = OFFICIAL_REPOS["1.5"]
DEFAULT_REVISION = "main"

# Hub naming rules (a subset is enough to tell a repo id from a path): "org/name", no "--" or "..".
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._/-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHORT_COMMIT = re.compile(r"[0-9a-f]{7,39}")
_CACHE_FOLDER = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)")


@dataclass(frozen=True)
class HubCache:
    """The Hugging Face hub cache directory and which setting chose it (for error messages)."""

    path: Path
    source: str

    def describe(self) -> str:
        return f"{self.path} ({self.source})"


def hub_cache(cache_dir: str | os.PathLike | None = None) -> HubCache:
    """The effective hub cache, read from the environment at call time.

    huggingface_hub reads these variables once at import; reading them here instead means a process (or a test)
    that sets HF_HOME/HF_HUB_CACHE after importing it still gets what it asked for. Order as in huggingface_hub:
    explicit argument, HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE (legacy), HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub,
    ~/.cache/huggingface/hub.
    """

    def expand(p: str | os.PathLike) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(os.fspath(p))))

    if cache_dir is not None and os.fspath(cache_dir):
        return HubCache(expand(cache_dir), "cache_dir argument")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return HubCache(expand(os.environ[var]), f"from {var}")
    if os.environ.get("HF_HOME"):
        return HubCache(expand(os.environ["HF_HOME"]) / "hub", "from HF_HOME")
    if os.environ.get("XDG_CACHE_HOME"):
        return HubCache(expand(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub", "from XDG_CACHE_HOME")
    return HubCache(expand("~/.cache/huggingface/hub"), "default location")


def repo_folder(cache: Path, repo_id: str) -> Path:
    """``<cache>/models--org--name``: the per-repo folder of the hub cache layout."""
    org, name = repo_id.split("/")
    return cache / f"models--{org}--{name}"


def repo_of_cache_path(path: str | os.PathLike) -> str | None:
    """The repo id if `path` lies inside a hub cache repo folder (``.../models--org--name/...``), else None."""
    for part in reversed(Path(path).parts):
        m = _CACHE_FOLDER.fullmatch(part)
        if m:
            return f"{m['org']}/{m['name']}"
    return None


def parse_repo_ref(ref: str) -> tuple[str, str | None]:
    """Split ``org/name[@revision]``; a malformed reference raises `ModelFilesError`."""
    repo_id, at, revision = ref.strip().partition("@")
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ModelFilesError(
            f"'{ref}' is not a Hugging Face repo id of the form org/name[@revision]",
            f"write it like {DEFAULT_REPO} or {DEFAULT_REPO}@main, or pass --model DIR with the model files",
        )
    if at and (not _REVISION.fullmatch(revision) or ".." in revision.split("/")):
        raise ModelFilesError(
            f"'{revision}' in '{ref}' is not a valid revision (branch, tag or commit hash)",
            f"write it like {repo_id}@main or {repo_id}@<40-hex commit>",
        )
    return repo_id, (revision if at else None)


def _looks_like_repo_ref(text: str) -> bool:
    repo_id, _, _ = text.partition("@")
    return bool(_REPO_ID.fullmatch(repo_id)) and not text.startswith((".", "~"))


def resolve_model(ref: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A model reference -> a local directory, without any network access.

    `ref` is an existing directory (returned as an absolute path), or a repo id ``org/name`` or
    ``org/name@revision`` looked up in the local hub cache (see `hub_cache`); revision is a branch/tag name with a
    ref file in the cache, a full commit hash, or an unambiguous commit prefix (7+ hex digits). A repo id with no
    revision means ``main``; if no ``refs/main`` exists but exactly one snapshot does, that snapshot is used. A
    cache repo folder (``.../models--org--name``) passed as a directory resolves like its repo id.
    Completeness is not checked here: call `engine_ref.integrity.check_model_dir` on the result.
    """
    text = os.fspath(ref)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if not text.strip():
        raise ModelFilesError(
            "the model reference is empty",
            f"pass --model DIR (a directory with config.yaml) or a repo id like {DEFAULT_REPO}",
        )
    path = Path(text).expanduser()
    if path.is_dir():
        folder = _CACHE_FOLDER.fullmatch(path.absolute().name)
        if folder and (path / "snapshots").is_dir() and not (path / "config.yaml").exists():
            # A cache repo folder (models--org--name) given as a path: pick its `main` snapshot like the repo id.
            repo_id = f"{folder['org']}/{folder['name']}"
            return _find_snapshot(repo_id, None, HubCache(path.absolute().parent, "parent of the given folder"), text)
        return path.absolute()
    if path.exists():
        raise ModelFilesError(
            f"{path} is a file, not a model directory",
            f"pass the directory that holds config.yaml and the checkpoints (e.g. {path.parent})",
        )
    if not isinstance(ref, str) or not _looks_like_repo_ref(text):
        raise ModelFilesError(
            f"model directory {path} does not exist (and '{text}' is not a repo id of the form org/name)",
            "check the path and that the volume is mounted, or pass a Hugging Face repo id such as " + DEFAULT_REPO,
        )
    repo_id, revision = parse_repo_ref(text)
    return _find_snapshot(repo_id, revision, hub_cache(cache_dir), text)


def _find_snapshot(repo_id: str, revision: str | None, cache: HubCache, text: str) -> Path:
    """Read refs/ and snapshots/ of the cache layout; every miss says where it looked."""
    folder = repo_folder(cache.path, repo_id)
    rev = revision or DEFAULT_REVISION
    wanted = f"{repo_id}@{revision}" if revision else repo_id
    download_hint = f"run `triton-tts download {wanted}` where the network is reachable"
    fix = (
        f"{download_hint} (set HF_HOME/HF_HUB_CACHE to the cache it fills), "
        "or copy the model files to this machine and pass --model DIR"
    )
    not_dir = f"'{text}' is not a directory, and " if "/" in text else ""
    if not folder.is_dir():
        raise ModelFilesError(f"{not_dir}{repo_id} is not in the local Hugging Face cache {cache.describe()}", fix)

    snapshots = folder / "snapshots"
    cached = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    commit: str | None = None
    ref_file = folder / "refs" / rev
    if ref_file.is_file():
        try:
            commit = ref_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            commit, problem = None, f"cannot read {ref_file}: {exc}"
        else:
            problem = None if _COMMIT.fullmatch(commit) else f"{ref_file} does not hold a commit hash"
        if problem:
            raise ModelFilesError(problem, f"delete {folder} and {download_hint}")
    elif _COMMIT.fullmatch(rev):
        commit = rev
    elif _SHORT_COMMIT.fullmatch(rev):
        matches = [c for c in cached if c.startswith(rev)]
        if len(matches) > 1:
            raise ModelFilesError(
                f"commit prefix '{rev}' matches {len(matches)} cached snapshots of {repo_id}",
                "give more digits of the commit hash",
            )
        commit = matches[0] if matches else None
    elif revision is None and len(cached) == 1:
        commit = cached[0]  # downloaded by commit hash only: unambiguous

    if commit is None:
        refs_dir = folder / "refs"
        refs = refs_dir.rglob("*") if refs_dir.is_dir() else ()
        names = sorted(str(p.relative_to(refs_dir)) for p in refs if p.is_file())
        have = f"; cached revisions: {', '.join(names)}" if names else ""
        have += f"; snapshots: {', '.join(c[:10] for c in cached)}" if cached else ""
        raise ModelFilesError(
            f"revision '{rev}' of {repo_id} is not in the local Hugging Face cache {folder} ({cache.source}){have}", fix
        )
    snapshot = snapshots / commit
    if not snapshot.is_dir():
        raise ModelFilesError(
            f"the cache entry for {repo_id}@{rev} points at snapshot {commit[:12]}, which is missing from {snapshots}",
            f"{download_hint} to complete it",
        )
    return snapshot


# ---------------------------------------------------------------------------------------------------------------
# Explicit download: the only network code in engine_ref.


class _Cancelled(Exception):
    """Raised inside the download worker (from a progress update) once the caller has given up."""


@contextmanager
def _hub_settings(timeout_s: float) -> Iterator[None]:
    """Per-request timeouts and plain HTTP for the duration of one download.

    huggingface_hub reads HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT into module constants at import time, so
    setting the environment now would be ignored; the constants are set here and restored afterwards. Xet
    transfers are turned off because their native client retries on its own schedule, outside our timeouts and
    progress hooks; plain HTTPS from the hub's CDN serves the same files.
    """
    from huggingface_hub import constants

    wanted = {
        "HF_HUB_DOWNLOAD_TIMEOUT": max(1, int(round(timeout_s))),
        "HF_HUB_ETAG_TIMEOUT": max(1, int(round(timeout_s))),
        "HF_HUB_DISABLE_XET": True,
    }
    saved = {k: getattr(constants, k) for k in wanted if hasattr(constants, k)}
    try:
        for k in saved:
            setattr(constants, k, wanted[k])
        yield
    finally:
        for k, v in saved.items():
            setattr(constants, k, v)


def _progress_class(stop: threading.Event, enabled: bool) -> type:
    """huggingface_hub's tqdm bar, made to abort the transfer once `stop` is set (deadline passed)."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class _Bar(hub_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if not enabled:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if stop.is_set():
                raise _Cancelled()
            return super().update(n)

    return _Bar


def _one_line(exc: BaseException, limit: int = 200) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _as_files_error(exc: BaseException, repo_id: str, revision: str, endpoint: str, timeout_s: float) -> TTSError:
    """Translate huggingface_hub / HTTP-client errors into one actionable line.

    Classes are matched by name along the MRO so this works across huggingface_hub versions (requests-, httpx-
    and httpx2-based) without importing their HTTP stacks.
    """
    if isinstance(exc, TTSError):
        return exc
    names = {c.__name__ for c in type(exc).__mro__}
    where = f"{repo_id}@{revision}"
    net_fix = (
        "check network connectivity, HF_ENDPOINT and HTTPS_PROXY/HTTP_PROXY, "
        "or copy the model files to this machine and pass --model DIR"
    )
    if "OfflineModeIsEnabled" in names:
        return ModelFilesError(
            f"cannot download {where}: offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)",
            "unset HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE for the download command",
        )
    if "GatedRepoError" in names:
        return ModelFilesError(
            f"{repo_id} on {endpoint} is gated: your account has not been granted access",
            "accept the terms on the repo page, then set HF_TOKEN to a token of that account",
        )
    if "RepositoryNotFoundError" in names:
        official = ", ".join(OFFICIAL_REPOS.values())
        return ModelFilesError(
            f"repo {repo_id} does not exist on {endpoint} (or is private)",
            f"check the repo id (official: {official}); for a private repo set HF_TOKEN",
        )
    if "RevisionNotFoundError" in names:
        return ModelFilesError(
            f"revision '{revision}' does not exist in {repo_id} on {endpoint}",
            f"use an existing branch, tag or commit, e.g. {repo_id}@main",
        )
    if "EntryNotFoundError" in names:
        return ModelFilesError(
            f"a file is missing from {where} on {endpoint}: {_one_line(exc)}",
            "check that the repo is an IndexTTS 1.x model repo and that its config.yaml names existing files",
        )
    try:  # some HTTP clients raise from `.response` when there is none
        status = getattr(getattr(exc, "response", None), "status_code", None)
    except Exception:
        status = None
    if status is not None:
        return ModelFilesError(
            f"{endpoint} answered HTTP {status} while downloading {where}", f"retry later; {net_fix}"
        )
    if any("Timeout" in n for n in names) or isinstance(exc, TimeoutError):
        return ModelFilesError(
            f"cannot download {where}: {endpoint} did not answer within {timeout_s:g} s ({_one_line(exc)})", net_fix
        )
    return ModelFilesError(f"cannot download {where} from {endpoint}: {_one_line(exc)}", net_fix)


def _offline_env() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return var
    return None


def _write_ref(folder: Path, revision: str, commit: str) -> None:
    """Record ``refs/<revision>`` so a later offline `resolve_model('org/name@revision')` finds the snapshot."""
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.is_file() and ref.read_text(encoding="utf-8").strip() == commit:
        return
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit, encoding="utf-8")
    os.replace(tmp, ref)


def download_model(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    timeout_s: float = 60.0,
    deadline_s: float | None = 7200.0,
    allow_patterns: Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """Download an IndexTTS 1.x model into the hub cache, verify it, and return its snapshot directory.

    By default only config.yaml and the files it names (gpt/bigvgan checkpoints, bpe.model) are fetched: the
    official repos also hold a 1.6 GB discriminator and dvae.pth that inference never opens. `allow_patterns`
    (fnmatch, e.g. ``("*.pth", "*.vocab")``) adds repo files on top of those. `repo_id` may carry ``@revision``.

    Bounds: `timeout_s` applies to every HTTP request (connect/read); `deadline_s` caps the whole download
    (finished files stay in the cache and partial ones resume on the next call). The endpoint is HF_ENDPOINT as
    set now. Afterwards the snapshot goes through `check_model_dir(deep=True)`; any failure is a
    `ModelFilesError`. Not meant for concurrent calls in one process: it sets huggingface_hub's module-level
    timeout constants for its duration.
    """
    if revision is None and "@" in repo_id:
        repo_id, revision = parse_repo_ref(repo_id)
    else:
        parse_repo_ref(repo_id if revision is None else f"{repo_id}@{revision}")
    rev = revision or DEFAULT_REVISION
    if timeout_s <= 0 or (deadline_s is not None and deadline_s <= 0):
        raise ModelFilesError(
            f"download timeouts must be positive (timeout_s={timeout_s}, deadline_s={deadline_s})",
            "pass a positive number of seconds",
        )
    offline = _offline_env()
    if offline:
        raise ModelFilesError(
            f"cannot download {repo_id}@{rev}: {offline} is set, which forbids network access",
            f"unset {offline} for the download command (keep it set for serving)",
        )
    cache = hub_cache(cache_dir)
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    shown_endpoint = endpoint or "https://huggingface.co"

    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["path"] = _fetch(repo_id, rev, cache.path, endpoint, timeout_s, allow_patterns, stop, progress)
        except BaseException as exc:  # handed to the calling thread, which raises it
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"download-{repo_id}", daemon=True)
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    with _hub_settings(timeout_s):
        worker.start()
        try:
            while worker.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                worker.join(timeout=0.2 if left is None else min(0.2, left))  # short waits keep Ctrl-C responsive
        finally:
            if worker.is_alive():
                stop.set()  # the worker aborts at its next progress update; it is a daemon, so exit is not blocked

    if worker.is_alive():
        raise ModelFilesError(
            f"downloading {repo_id}@{rev} did not finish within the {deadline_s:g} s deadline",
            "run the command again (finished files are kept, partial ones resume), raise the deadline, "
            "or check the bandwidth to " + shown_endpoint,
        )
    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        err = _as_files_error(exc, repo_id, rev, shown_endpoint, timeout_s)
        if err is not exc:  # a hub/network failure: point at a usable cached copy if there is one
            try:
                cached = _find_snapshot(repo_id, revision, cache, repo_id)
            except ModelFilesError:
                cached = None
            if cached is not None:
                fix = f"{err.fix}; a cached copy already exists at {cached} (use --model {cached})"
                err = ModelFilesError(err.problem, fix)
        raise err from exc

    snapshot: Path = outcome["path"]
    from engine_ref.integrity import check_model_dir  # lazy: integrity imports this module

    check_model_dir(snapshot, deep=True).raise_for_problems()
    return snapshot


def _fetch(
    repo_id: str,
    revision: str,
    cache: Path,
    endpoint: str | None,
    timeout_s: float,
    allow_patterns: Sequence[str] | None,
    stop: threading.Event,
    progress: bool,
) -> Path:
    """Resolve the commit, fetch config.yaml, then the files it names; returns the snapshot directory."""
    from huggingface_hub import HfApi, hf_hub_download

    from engine_ref.config import load_config

    api = HfApi(endpoint=endpoint)
    info = api.model_info(repo_id, revision=revision, timeout=timeout_s)  # one request: fails fast when unreachable
    commit = info.sha
    if not commit:
        raise ModelFilesError(f"{repo_id}@{revision}: the hub returned no commit hash", "retry later")
    listed = [s.rfilename for s in (info.siblings or [])]
    if listed and "config.yaml" not in listed:
        raise ModelFilesError(
            f"{repo_id}@{revision} has no config.yaml, so it is not an IndexTTS 1.x model repo",
            f"check the repo id (official: {', '.join(OFFICIAL_REPOS.values())})",
        )

    bar = _progress_class(stop, progress)
    kwargs: dict[str, Any] = {
        "revision": commit, "cache_dir": str(cache), "endpoint": endpoint, "etag_timeout": timeout_s
    }
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = bar

    def get(filename: str) -> Path:
        if stop.is_set():
            raise _Cancelled()
        return Path(hf_hub_download(repo_id, filename, **kwargs))

    config_path = get("config.yaml")
    snapshot = config_path.parent
    names = [n for role, n in load_config(config_path).required_files().items() if role != "config"]
    if listed:
        absent = [n for n in names if n not in listed]
        if absent:
            raise ModelFilesError(
                f"{repo_id}@{revision} lacks {', '.join(absent)}, which its config.yaml names",
                "use a complete IndexTTS 1.x model repo, or fix config.yaml there",
            )
        for pattern in allow_patterns or ():
            names += [n for n in fnmatch.filter(listed, pattern) if n not in names and n != "config.yaml"]
    for name in names:
        get(name)
    if revision != commit and not _SHORT_COMMIT.fullmatch(revision):
        _write_ref(repo_folder(cache, repo_id), revision, commit)
    return snapshot
