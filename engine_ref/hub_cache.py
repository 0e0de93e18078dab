"""Find model files in a local directory or the local Hugging Face cache, never over the network.

Production runs on machines without internet access (Kubernetes pods, air-gapped hosts), where research code
that tries to download at start-up just hangs. This module only reads the hub cache layout
(``models--org--name/{refs,snapshots,blobs}``) with plain filesystem calls, at call time, and imports no HTTP
client. The one network path, the explicit `download` command, lives in `engine_ref.download`; keeping the two
apart also lets `engine_ref.integrity` use the cache helpers without importing the downloader (which verifies
its result with the integrity check).

Every failure is a `ModelFilesError` naming what was looked for, where, and the fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from engine_ref.errors import ModelFilesError

# Official IndexTTS 1.x releases on the Hugging Face Hub, by config.yaml `version`.
OFFICIAL_REPOS: dict[str, str] = {"1.5": "IndexTeam/IndexTTS-1.5", "1.0": "IndexTeam/Index-TTS"}
DEFAULT_REPO = OFFICIAL_REPOS["1.5"]
DEFAULT_REVISION = "main"

# Hub naming rules (a subset is enough to tell a repo id from a path): "org/name", no "--" or "..".
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._/-]*")
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
SHORT_COMMIT = re.compile(r"[0-9a-f]{7,39}")
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
    Completeness is not checked here: call `engine_ref.families.check_install` (any family) on the result.
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
            return find_snapshot(repo_id, None, HubCache(path.absolute().parent, "parent of the given folder"), text)
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
    return find_snapshot(repo_id, revision, hub_cache(cache_dir), text)


def find_snapshot(repo_id: str, revision: str | None, cache: HubCache, text: str) -> Path:
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
            problem = None if COMMIT_HASH.fullmatch(commit) else f"{ref_file} does not hold a commit hash"
        if problem:
            raise ModelFilesError(problem, f"delete {folder} and {download_hint}")
    elif COMMIT_HASH.fullmatch(rev):
        commit = rev
    elif SHORT_COMMIT.fullmatch(rev):
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


@dataclass(frozen=True)
class SnapshotLookup:
    """What an offline lookup of ``repo@revision`` found in one cache, step by step (for precise error rows).

    `problem` is None when `snapshot` exists; otherwise one of ``not-cached`` (no repo folder),
    ``no-ref`` (snapshots but no refs/<revision>: huggingface_hub's offline mode cannot pick one),
    ``bad-ref`` (the ref file holds no commit hash) or ``missing-snapshot`` (the ref names an absent snapshot).
    """

    repo_id: str
    cache: Path
    folder: Path
    revision: str
    commit: str | None = None
    snapshot: Path | None = None
    problem: str | None = None
    snapshots: tuple[str, ...] = ()

    @property
    def ref_file(self) -> Path:
        return self.folder / "refs" / self.revision


def lookup_snapshot(cache: Path, repo_id: str, revision: str = DEFAULT_REVISION) -> SnapshotLookup:
    """Read refs/<revision> and snapshots/ of one repo folder, strictly as huggingface_hub's offline mode does.

    Unlike `resolve_model`, a lone snapshot without a ref is NOT picked: the loaders of the original code (and
    transformers' ``from_pretrained`` offline) would not find it either, so the install must be fixed, and the
    caller reports it as a missing ref with the exact fix.
    """
    folder = repo_folder(cache, repo_id)
    base = SnapshotLookup(repo_id, cache, folder, revision)
    if not folder.is_dir():
        return replace(base, problem="not-cached")
    snaps_dir = folder / "snapshots"
    cached = tuple(sorted(p.name for p in snaps_dir.iterdir() if p.is_dir())) if snaps_dir.is_dir() else ()
    base = replace(base, snapshots=cached)
    ref = base.ref_file
    if not ref.is_file():
        return replace(base, problem="no-ref")
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return replace(base, problem="bad-ref")
    if not COMMIT_HASH.fullmatch(commit):
        return replace(base, problem="bad-ref")
    snapshot = snaps_dir / commit
    if not snapshot.is_dir():
        return replace(base, commit=commit, problem="missing-snapshot")
    return replace(base, commit=commit, snapshot=snapshot)
