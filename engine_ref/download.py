"""Explicit download from the Hugging Face Hub: the only code in engine_ref that uses the network.

It runs only when asked (the `download` subcommand), is bounded (a per-request timeout and an overall deadline),
shows progress, and verifies the result with the integrity check before returning. Everything else resolves
offline (`engine_ref.hub_cache`, `engine_ref.indextts2.hub`).

- `download_model`: an IndexTTS 1.x repo into the hub cache (config.yaml and the files it names).
- `download_release`: any family. For IndexTTS-2 / 2.5 it fetches the main repo's files and then every dependency
  that is not already installed, into the chosen layout: ``hub`` (the Hugging Face cache) or ``flat``
  (``<local_dir>/hf_cache/...``, upstream's current layout; the main files go to `local_dir`).

Every failure is a `ModelFilesError` naming the repo, the endpoint and the fix.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from engine_ref.indextts.config import load_config
from engine_ref.errors import InputError, ModelFilesError, TTSError
from engine_ref.families import INDEXTTS, INDEXTTS2, INDEXTTS2_5, family_from_config
from engine_ref.hub_cache import (
    DEFAULT_REVISION,
    OFFICIAL_REPOS,
    SHORT_COMMIT,
    find_snapshot,
    hub_cache,
    lookup_snapshot,
    parse_repo_ref,
    repo_folder,
)
from engine_ref.indextts2.hub import FLAT_DIR, FLAT_STAGING, MAIN_REPOS, Dependency, dependencies_for, main_files
from engine_ref.indextts2.integrity import check_indextts2_dir
from engine_ref.integrity import check_model_dir

T = TypeVar("T")
DownloadLayout = Literal["hub", "flat"]


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
        official = ", ".join([*OFFICIAL_REPOS.values(), *MAIN_REPOS.values()])
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
            "check that the repo is an IndexTTS model repo (or one of IndexTTS2's dependencies) and that its "
            "config.yaml names existing files",
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


class _RepoFailure(Exception):
    """A failure while fetching one repo of a multi-repo download, so the error names that repo."""

    def __init__(self, repo_id: str, revision: str, cause: BaseException):
        super().__init__(str(cause))
        self.repo_id, self.revision, self.cause = repo_id, revision, cause


@dataclass(frozen=True)
class _Hub:
    """One download's connection settings; every call checks the cancel flag first."""

    endpoint: str | None
    timeout_s: float
    stop: threading.Event
    progress: bool

    def info(self, repo_id: str, revision: str) -> Any:
        from huggingface_hub import HfApi

        if self.stop.is_set():
            raise _Cancelled()
        info = HfApi(endpoint=self.endpoint).model_info(repo_id, revision=revision, timeout=self.timeout_s)
        if not info.sha:
            raise ModelFilesError(f"{repo_id}@{revision}: the hub returned no commit hash", "retry later")
        return info

    def get(self, repo_id: str, filename: str, commit: str, *, cache_dir: Path | None = None,
            local_dir: Path | None = None) -> Path:
        from huggingface_hub import hf_hub_download

        if self.stop.is_set():
            raise _Cancelled()
        kwargs: dict[str, Any] = {"revision": commit, "endpoint": self.endpoint, "etag_timeout": self.timeout_s}
        if local_dir is not None:
            kwargs["local_dir"] = str(local_dir)
        else:
            kwargs["cache_dir"] = str(cache_dir)
        if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
            kwargs["tqdm_class"] = _progress_class(self.stop, self.progress)
        return Path(hf_hub_download(repo_id, filename, **kwargs))


def _check_args(
    repo_id: str, revision: str | None, timeout_s: float, deadline_s: float | None
) -> tuple[str, str | None]:
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
    return repo_id, revision


def _run_bounded(
    repo_id: str, rev: str, timeout_s: float, deadline_s: float | None, progress: bool,
    work: Callable[[_Hub], T], cached_copy: Callable[[], Path | None],
) -> T:
    """Run `work` in a daemon thread under the timeouts and the deadline; translate its failure into one line."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    shown_endpoint = endpoint or "https://huggingface.co"
    stop = threading.Event()
    hub = _Hub(endpoint, timeout_s, stop, progress)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work(hub)
        except BaseException as exc:  # handed to the calling thread, which raises it
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"download-{repo_id}", daemon=True)
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
        failed_repo, failed_rev = repo_id, rev
        if isinstance(exc, _RepoFailure):
            failed_repo, failed_rev, exc = exc.repo_id, exc.revision, exc.cause
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        err = _as_files_error(exc, failed_repo, failed_rev, shown_endpoint, timeout_s)
        if err is not exc:  # a hub/network failure: point at a usable cached copy if there is one
            cached = cached_copy()
            if cached is not None:
                err = ModelFilesError(err.problem, f"{err.fix}; a cached copy already exists at {cached} "
                                                   f"(use --model {cached})")
        raise err from exc
    return outcome["value"]


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
    repo_id, revision = _check_args(repo_id, revision, timeout_s, deadline_s)
    rev = revision or DEFAULT_REVISION
    cache = hub_cache(cache_dir)

    def work(hub: _Hub) -> Path:
        info = hub.info(repo_id, rev)  # one request: fails fast when unreachable
        return _fetch_v1(hub, repo_id, rev, info, cache.path, allow_patterns)

    snapshot = _run_bounded(repo_id, rev, timeout_s, deadline_s, progress, work,
                            lambda: _cached_copy(repo_id, revision, cache))
    check_model_dir(snapshot, deep=True).raise_for_problems()
    return snapshot


def _cached_copy(repo_id: str, revision: str | None, cache: Any) -> Path | None:
    try:
        return find_snapshot(repo_id, revision, cache, repo_id)
    except ModelFilesError:
        return None


def _listing(info: Any) -> list[str]:
    return [s.rfilename for s in (info.siblings or [])]


def _fetch_v1(hub: _Hub, repo_id: str, revision: str, info: Any, cache: Path,
              allow_patterns: Sequence[str] | None) -> Path:
    """config.yaml, then the files it names (+ `allow_patterns`); returns the snapshot directory."""
    commit, listed = info.sha, _listing(info)
    if listed and "config.yaml" not in listed:
        raise ModelFilesError(
            f"{repo_id}@{revision} has no config.yaml, so it is not an IndexTTS model repo",
            f"check the repo id (official: {', '.join([*OFFICIAL_REPOS.values(), *MAIN_REPOS.values()])})",
        )
    config_path = hub.get(repo_id, "config.yaml", commit, cache_dir=cache)
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
        hub.get(repo_id, name, commit, cache_dir=cache)
    if revision != commit and not SHORT_COMMIT.fullmatch(revision):
        _write_ref(repo_folder(cache, repo_id), revision, commit)
    return snapshot


# --- any family, IndexTTS2 with its dependencies ------------------------------------------------------------------


@dataclass(frozen=True)
class Downloaded:
    """What `download_release` produced: the model directory to pass as --model, its family and layout."""

    model_dir: Path
    family: str
    layout: DownloadLayout
    fetched_dependencies: tuple[str, ...]  # repo ids downloaded now (the others were already installed)


def _family_from_listing(listed: Sequence[str]) -> str | None:
    names = set(listed)
    if "codec.pth" in names and any(n.endswith(".tiktoken") and "/" not in n for n in names):
        return INDEXTTS2_5
    if "s2mel.pth" in names or "wav2vec2bert_stats.pt" in names:
        return INDEXTTS2
    if "bigvgan_generator.pth" in names:
        return INDEXTTS
    return None


def _family_from_remote_config(hub: _Hub, repo_id: str, revision: str, commit: str) -> str:
    """When the file list does not tell, config.yaml does (fetched into a scratch cache, a few KB)."""
    with tempfile.TemporaryDirectory(prefix="triton-tts-config-") as scratch:
        try:
            path = hub.get(repo_id, "config.yaml", commit, cache_dir=Path(scratch))
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            data = None
        except Exception as exc:
            raise _RepoFailure(repo_id, revision, exc) from exc
    family = family_from_config(data) if isinstance(data, dict) else None
    if family is None:
        raise ModelFilesError(
            f"cannot tell which IndexTTS release {repo_id}@{revision} is (neither its files nor config.yaml say)",
            "download an official release repo, or fetch the files by hand and pass --model DIR",
        )
    return family


def download_release(
    repo: str,
    *,
    layout: DownloadLayout = "hub",
    cache_dir: str | os.PathLike | None = None,
    local_dir: str | os.PathLike | None = None,
    timeout_s: float = 60.0,
    deadline_s: float | None = 7200.0,
    progress: bool = True,
    text_emotion: bool = True,
) -> Downloaded:
    """Download a release of any family, verify it (deep), and say where it is.

    IndexTTS 1.x goes to the hub cache exactly like `download_model` (``layout="hub"`` only). IndexTTS-2 / 2.5:
    the main repo's config.yaml and the files it names (plus qwen0.6bemo4-merge/ unless ``text_emotion=False``,
    plus the dependency files a release bundles under hf_cache/), then each dependency not yet installed in the
    chosen layout: ``hub`` into `cache_dir` (default HF_HUB_CACHE / HF_HOME), ``flat`` under
    ``<local_dir>/hf_cache/`` with the main files in `local_dir`. Same timeouts, deadline and progress as
    `download_model`; finished files are kept and partial ones resume when the command is run again.
    """
    if layout not in ("hub", "flat"):
        raise InputError(f"unknown layout '{layout}'", "choose --layout hub or --layout flat")
    if layout == "flat" and local_dir is None:
        raise InputError("--layout flat needs --local-dir DIR (the model directory to create)",
                         "pass --local-dir, or use --layout hub to fill the Hugging Face cache")
    if layout == "hub" and local_dir is not None:
        raise InputError("--local-dir applies to --layout flat only", "add --layout flat, or drop --local-dir")
    repo_id, revision = _check_args(repo, None, timeout_s, deadline_s)
    rev = revision or DEFAULT_REVISION
    cache = hub_cache(cache_dir)
    target = Path(local_dir).expanduser().absolute() if local_dir is not None else None

    def work(hub: _Hub) -> Downloaded:
        try:
            info = hub.info(repo_id, rev)
        except Exception as exc:
            raise _RepoFailure(repo_id, rev, exc) from exc
        listed = _listing(info)
        if listed and "config.yaml" not in listed:
            raise ModelFilesError(
                f"{repo_id}@{rev} has no config.yaml, so it is not an IndexTTS model repo",
                f"check the repo id (official: {', '.join([*OFFICIAL_REPOS.values(), *MAIN_REPOS.values()])})",
            )
        family = _family_from_listing(listed) or _family_from_remote_config(hub, repo_id, rev, info.sha)
        if family == INDEXTTS and layout == "flat":
            raise InputError(f"{repo_id} is an IndexTTS 1.x repo; --layout flat is for IndexTTS2 releases",
                             "drop --layout flat (1.x models live in the Hugging Face cache)")
        if family == INDEXTTS:
            return Downloaded(_fetch_v1(hub, repo_id, rev, info, cache.path, None), INDEXTTS, "hub", ())
        return _fetch_v2(hub, repo_id, rev, info, family, layout, cache.path, target, text_emotion)

    result = _run_bounded(repo_id, rev, timeout_s, deadline_s, progress, work,
                          lambda: _cached_copy(repo_id, revision, cache) if layout == "hub" else None)
    if result.family == INDEXTTS:
        check_model_dir(result.model_dir, deep=True).raise_for_problems()
    else:
        check_indextts2_dir(result.model_dir, cache_dir=cache.path if layout == "hub" else cache_dir, deep=True,
                            family=result.family).raise_for_problems()
    return result


def _fetch_v2(hub: _Hub, repo_id: str, revision: str, info: Any, family: str | None, layout: DownloadLayout,
              cache: Path, local_dir: Path | None, text_emotion: bool) -> Downloaded:
    commit, listed = info.sha, _listing(info)
    if listed and "config.yaml" not in listed:
        raise ModelFilesError(
            f"{repo_id}@{revision} has no config.yaml, so it is not an IndexTTS model repo",
            f"check the repo id (official: {', '.join([*OFFICIAL_REPOS.values(), *MAIN_REPOS.values()])})",
        )
    where: dict[str, Path] = {"local_dir": local_dir} if local_dir is not None else {"cache_dir": cache}

    def get_main(name: str) -> Path:
        try:
            return hub.get(repo_id, name, commit, **where)
        except Exception as exc:
            raise _RepoFailure(repo_id, revision, exc) from exc

    config_path = get_main("config.yaml")
    model_dir = config_path.parent
    data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ModelFilesError(f"{repo_id}@{revision}: config.yaml is not a mapping", "use an official release")
    by_config = family_from_config(data)
    if by_config == INDEXTTS:
        raise ModelFilesError(f"{repo_id}@{revision}: its config.yaml is IndexTTS 1.x but the files are not",
                              "use an official release repo")
    fam = INDEXTTS2_5 if INDEXTTS2_5 in (family, by_config) else INDEXTTS2
    wanted = [mf for mf in main_files(data, fam)[1:] if mf.kind != "dir"]
    names = [mf.name for mf in wanted]
    if listed:
        absent = [n for n in names if n not in listed]
        if absent:
            raise ModelFilesError(f"{repo_id}@{revision} lacks {', '.join(absent)}, which its config.yaml names",
                                  "use a complete IndexTTS2 release repo, or fix config.yaml there")
        if text_emotion:
            qwen = next(mf for mf in main_files(data, fam) if mf.kind == "dir").name
            names += [n for n in listed if n.startswith(qwen + "/")]
        deps = dependencies_for(fam)
        bundled = {f"{FLAT_DIR}/{f.flat_path}" for d in deps for f in d.files}
        names += [n for n in listed if n in bundled]  # IndexTTS-2.5 ships its dependencies in hf_cache/
    for name in names:
        get_main(name)
    if layout == "hub" and revision != commit and not SHORT_COMMIT.fullmatch(revision):
        _write_ref(repo_folder(cache, repo_id), revision, commit)

    fetched = []
    for dep in dependencies_for(fam):
        if _installed(dep, model_dir, layout, cache):
            continue
        try:
            dep_info = hub.info(dep.repo_id, DEFAULT_REVISION)
            if layout == "hub":
                for f in dep.files:
                    hub.get(dep.repo_id, f.repo_path, dep_info.sha, cache_dir=cache)
                _write_ref(repo_folder(cache, dep.repo_id), DEFAULT_REVISION, dep_info.sha)
            else:
                _fetch_flat(hub, dep, dep_info.sha, model_dir)
        except Exception as exc:
            raise _RepoFailure(dep.repo_id, DEFAULT_REVISION, exc) from exc
        fetched.append(dep.repo_id)
    return Downloaded(model_dir, fam, layout, tuple(fetched))


def _installed(dep: Dependency, model_dir: Path, layout: DownloadLayout, cache: Path) -> bool:
    """Already complete where this layout's install will look (the flat folder; for hub also the cache)."""
    flat = model_dir / FLAT_DIR
    if all((flat / f.flat_path).is_file() for f in dep.files):
        return True
    if layout == "flat":
        return False
    found = lookup_snapshot(cache, dep.repo_id)
    return found.snapshot is not None and all((found.snapshot / f.repo_path).is_file() for f in dep.files)


def _fetch_flat(hub: _Hub, dep: Dependency, commit: str, model_dir: Path) -> None:
    """Each missing file into a staging folder (where partial files resume), then moved to its flat name."""
    flat = model_dir / FLAT_DIR
    staging = flat / FLAT_STAGING / dep.folder
    for f in dep.files:
        final = flat / f.flat_path
        if final.is_file():
            continue
        got = hub.get(dep.repo_id, f.repo_path, commit, local_dir=staging)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, final)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (flat / FLAT_STAGING).rmdir()  # only when no other dependency is still staged there
    except OSError:
        pass
