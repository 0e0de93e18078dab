"""What an IndexTTS2 install consists of, and where its four Hugging Face dependencies are found offline.

An install is the main directory (config.yaml, gpt.pth, s2mel.pth, ...) plus four hub repos the original code
fetches at start-up: facebook/w2v-bert-2.0, amphion/MaskGCT (semantic codec; not used by IndexTTS-2.5),
funasr/campplus and nvidia/bigvgan_v2_22khz_80band_256x. Two layouts exist in the wild, and both are accepted:

- ``flat``: ``<model_dir>/hf_cache/{w2v-bert-2.0/, semantic_codec_model.safetensors, campplus_cn_common.bin,
  bigvgan/{config.json,bigvgan_generator.pt}}``, current upstream's `ensure_models_available` layout and what
  IndexTTS-2.5 bundles.
- ``hub``: the Hugging Face cache (``models--org--name/refs/main`` + ``snapshots/<commit>/`` links into
  ``blobs/``), as the first releases left it. Looked for in ``<model_dir>/hf_cache`` (the first releases set
  HF_HUB_CACHE=./checkpoints/hf_cache), then in the explicit cache_dir or else the cache HF_HUB_CACHE/HF_HOME
  name, then in the cache that holds the model directory itself when that is a snapshot.

`resolve_dependencies` only looks at the filesystem: it never opens a socket and it switches the process to
offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) before any loader of this package imports transformers, so
nothing later can fall back to a download that hangs on a blocked network.

Sizes are the official files' byte counts from the facts document (third-party installer scripts, consistent with
parameter counts); the pinned commits are 8-digit prefixes from the same scripts and are informational only
(unverified). Absent values are unknown, not zero.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine_ref.errors import ModelFilesError
from engine_ref.hub_cache import HubCache, SnapshotLookup, hub_cache, lookup_snapshot, repo_of_cache_path

Layout = Literal["flat", "hub"]
FileKind = Literal["yaml", "json", "torch", "safetensors", "sentencepiece", "tiktoken", "dir"]

FLAT_DIR = "hf_cache"  # <model_dir>/hf_cache: the flat layout (and, as a hub cache, the first releases' layout)
FLAT_STAGING = ".download"  # <model_dir>/hf_cache/.download/<org>--<name>: partial files of a flat download
MAIN_REPOS: dict[str, str] = {"indextts2": "IndexTeam/IndexTTS-2", "indextts2.5": "IndexTeam/IndexTTS-2.5"}
MAIN_PINNED_PREFIX: dict[str, str] = {"indextts2": "740dcaff"}  # third-party scripts; verify
V2_FAMILIES = frozenset(MAIN_REPOS)


@dataclass(frozen=True)
class DependencyFile:
    """One file of a dependency: its path in the hub repo, and under <model_dir>/hf_cache in the flat layout."""

    role: str  # config / preprocessor / weights
    repo_path: str
    flat_path: str
    kind: FileKind
    size: int | None = None  # official byte count, when known


@dataclass(frozen=True)
class Dependency:
    """A hub repo IndexTTS2 needs beside its own files."""

    key: str  # w2v_bert / semantic_codec / campplus / bigvgan
    repo_id: str
    purpose: str
    files: tuple[DependencyFile, ...]
    pinned_prefix: str | None = None  # commit prefix seen in third-party installers (unverified)
    families: frozenset[str] = V2_FAMILIES

    def file(self, role: str) -> DependencyFile:
        return next(f for f in self.files if f.role == role)

    @property
    def folder(self) -> str:
        """Cache folder name, also used for the flat download's staging directory."""
        org, name = self.repo_id.split("/")
        return f"models--{org}--{name}"


W2V_BERT = Dependency(
    "w2v_bert", "facebook/w2v-bert-2.0", "semantic features (w2v-BERT 2.0, layer 17)",
    (
        DependencyFile("config", "config.json", "w2v-bert-2.0/config.json", "json", 1_874),
        DependencyFile("preprocessor", "preprocessor_config.json", "w2v-bert-2.0/preprocessor_config.json", "json",
                       275),
        DependencyFile("weights", "model.safetensors", "w2v-bert-2.0/model.safetensors", "safetensors", 2_322_063_736),
    ),
    pinned_prefix="da985ba0",
)
SEMANTIC_CODEC = Dependency(
    "semantic_codec", "amphion/MaskGCT", "semantic codec (MaskGCT RepCodec)",
    (DependencyFile("weights", "semantic_codec/model.safetensors", "semantic_codec_model.safetensors",
                    "safetensors", 177_183_712),),
    pinned_prefix="265c6cef",
    families=frozenset({"indextts2"}),  # IndexTTS-2.5 ships its own codec.pth
)
CAMPPLUS = Dependency(
    "campplus", "funasr/campplus", "speaker style (CAMPPlus)",
    (DependencyFile("weights", "campplus_cn_common.bin", "campplus_cn_common.bin", "torch", 28_036_335),),
    pinned_prefix="e4b6ede7",
)
BIGVGAN = Dependency(
    "bigvgan", "nvidia/bigvgan_v2_22khz_80band_256x", "vocoder (BigVGAN v2, 22.05 kHz)",
    (
        DependencyFile("config", "config.json", "bigvgan/config.json", "json", 1_405),
        DependencyFile("weights", "bigvgan_generator.pt", "bigvgan/bigvgan_generator.pt", "torch", 449_228_171),
    ),
    pinned_prefix="633ff708",
)
DEPENDENCIES: tuple[Dependency, ...] = (W2V_BERT, SEMANTIC_CODEC, CAMPPLUS, BIGVGAN)


def dependencies_for(family: str) -> tuple[Dependency, ...]:
    """The dependencies one family needs, in load order."""
    return tuple(d for d in DEPENDENCIES if family in d.families)


# --- the main directory -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MainFile:
    """A file (or the Qwen emotion folder) of the main directory, named as config.yaml names it."""

    role: str
    name: str
    kind: FileKind
    size: int | None = None
    optional: bool = False
    note: str = ""  # how the name was chosen, when that needs saying


QWEN_FILES: tuple[tuple[str, FileKind, int | None], ...] = (
    ("config.json", "json", 727),
    ("model.safetensors", "safetensors", 1_192_135_096),
    ("tokenizer.json", "json", None),
    ("tokenizer_config.json", "json", None),
    ("generation_config.json", "json", None),
)  # checked when the folder is present; the other tokenizer files travel with these
TIKTOKEN_2_5 = "multilingual_zh_ja_yue_char_del.tiktoken"


def _configured(data: Mapping[str, Any], key: str, default: str) -> tuple[str, str]:
    """config.yaml's file name for `key`, or the release default; an absolute path is reduced to its name.

    Reportedly (third-party, unverified) the IndexTTS-2.5 hub config.yaml names absolute paths of the authors'
    machines (/cubefs/...): the file next to config.yaml is then the one used, and the row says so.
    """
    value = data.get(key)
    if key == "bpe_model" and isinstance(data.get("dataset"), Mapping):
        value = data["dataset"].get("bpe_model", value)
    if not isinstance(value, str) or not value.strip():
        return default, ""
    value = value.strip()
    if os.path.isabs(value):
        name = Path(value).name or default
        return name, f"config.yaml names {value}; using {name} in the model directory"
    return value.rstrip("/") if value.endswith("/") else value, ""


def main_files(data: Mapping[str, Any], family: str) -> tuple[MainFile, ...]:
    """The main directory's files for `family` ("indextts2" or "indextts2.5"), from a parsed config.yaml
    (an empty mapping gives the release defaults)."""
    two_five = family == "indextts2.5"
    gpt, gpt_note = _configured(data, "gpt_checkpoint", "gpt.pth")
    s2mel, s2mel_note = _configured(data, "s2mel_checkpoint", "s2mel.pth")
    stats, stats_note = _configured(data, "w2v_stat", "wav2vec2bert_stats.pt")
    spk, spk_note = _configured(data, "spk_matrix", "feat1.pt")
    emo, emo_note = _configured(data, "emo_matrix", "feat2.pt")
    qwen, qwen_note = _configured(data, "qwen_emo_path", "qwen0.6bemo4-merge")
    files = [
        MainFile("config", "config.yaml", "yaml", None if two_five else 2_882),
        MainFile("gpt", gpt, "torch", None if two_five else 3_484_663_079, note=gpt_note),
        MainFile("s2mel", s2mel, "torch", 414_908_601 if two_five else 1_202_198_223, note=s2mel_note),
    ]
    if two_five:
        files += [MainFile("codec", "codec.pth", "torch"), MainFile("tokenizer", TIKTOKEN_2_5, "tiktoken")]
    else:
        bpe, bpe_note = _configured(data, "bpe_model", "bpe.model")
        files.append(MainFile("bpe", bpe, "sentencepiece", 475_997, note=bpe_note))
    same = not two_five  # 2.5's copies are probably the same files, but their sizes are not documented
    files += [
        MainFile("w2v_stats", stats, "torch", 9_343 if same else None, note=stats_note),
        MainFile("spk_matrix", spk, "torch", 57_170 if same else None, note=spk_note),
        MainFile("emo_matrix", emo, "torch", 374_866 if same else None, note=emo_note),
        MainFile("qwen_emotion", qwen, "dir", optional=True, note=qwen_note),
    ]
    return tuple(files)


# --- offline lookup of the dependencies --------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One place a dependency may be kept, and what is there (filesystem facts only)."""

    dependency: Dependency
    layout: Layout
    where: str  # for people: which directory / cache, and which setting chose it
    paths: Mapping[str, Path] = field(default_factory=dict)  # role -> path; empty when no snapshot resolves
    lookup: SnapshotLookup | None = None  # hub layout only
    staging: Path | None = None  # flat layout: where an interrupted flat download keeps partial files

    @property
    def complete(self) -> bool:
        """Every file resolves to an existing regular file (dangling snapshot links do not)."""
        resolvable = self.lookup is None or self.lookup.snapshot is not None
        return resolvable and bool(self.paths) and all(p.is_file() for p in self.paths.values())

    @property
    def present(self) -> bool:
        """Something of this dependency is here (a repo folder, a file, a dangling link): worth reporting."""
        if self.lookup is not None:
            return self.lookup.problem != "not-cached"
        return any(os.path.lexists(p) for p in self.paths.values())


def dependency_caches(model_dir: Path, cache_dir: str | os.PathLike | None = None) -> tuple[HubCache, ...]:
    """Hub caches searched for dependencies, in order, without duplicates (see the module docstring)."""
    found: list[HubCache] = []
    local = model_dir / FLAT_DIR
    if local.is_dir() and any(p.name.startswith("models--") for p in local.iterdir()):
        found.append(HubCache(local, "hf_cache/ of the model directory as a hub cache"))
    found.append(hub_cache(cache_dir))
    if repo_of_cache_path(model_dir.absolute()) and model_dir.absolute().parent.name == "snapshots":
        found.append(HubCache(model_dir.absolute().parents[2], "the cache that holds the model snapshot"))
    unique: list[HubCache] = []
    seen: set[str] = set()
    for cache in found:
        key = os.path.realpath(cache.path)
        if key not in seen:
            seen.add(key)
            unique.append(cache)
    return tuple(unique)


def candidates(dep: Dependency, model_dir: Path, caches: tuple[HubCache, ...]) -> tuple[Candidate, ...]:
    """Flat layout first (the install's own copy), then each hub cache."""
    flat_root = model_dir / FLAT_DIR
    out = [Candidate(
        dep, "flat", f"{flat_root} (flat layout)",
        {f.role: flat_root / f.flat_path for f in dep.files}, staging=flat_root / FLAT_STAGING / dep.folder,
    )]
    for cache in caches:
        lookup = lookup_snapshot(cache.path, dep.repo_id)
        paths = {f.role: lookup.snapshot / f.repo_path for f in dep.files} if lookup.snapshot else {}
        out.append(Candidate(dep, "hub", f"Hugging Face cache {cache.describe()}", paths, lookup))
    return tuple(out)


def choose(found: tuple[Candidate, ...]) -> Candidate | None:
    """The first complete candidate; else the first with something present (to report what is wrong there)."""
    for c in found:
        if c.complete:
            return c
    return next((c for c in found if c.present), None)


@dataclass(frozen=True)
class ResolvedDependency:
    """Where one dependency's files are: every path exists (symlinks into blobs/ resolve)."""

    dependency: Dependency
    layout: Layout
    source: str
    paths: Mapping[str, Path]
    commit: str | None = None  # hub layout: the snapshot's commit

    def path(self, role: str = "weights") -> Path:
        return self.paths[role]

    @property
    def directory(self) -> Path:
        """The folder holding the files, for loaders that take a directory (w2v-BERT, BigVGAN)."""
        return self.paths[self.dependency.files[0].role].parent


@dataclass(frozen=True)
class ResolvedDeps:
    """Every dependency of one install (`deps` keyed like `Dependency.key`)."""

    model_dir: Path
    family: str
    deps: Mapping[str, ResolvedDependency]

    def __getitem__(self, key: str) -> ResolvedDependency:
        return self.deps[key]

    @property
    def w2v_bert_dir(self) -> Path:
        return self.deps["w2v_bert"].directory

    @property
    def semantic_codec_file(self) -> Path | None:
        """None for IndexTTS-2.5, which does not use MaskGCT."""
        dep = self.deps.get("semantic_codec")
        return dep.path() if dep else None

    @property
    def campplus_file(self) -> Path:
        return self.deps["campplus"].path()

    @property
    def bigvgan_dir(self) -> Path:
        return self.deps["bigvgan"].directory


def enforce_offline() -> None:
    """Make every later hub call in this process offline (local files only), even one inside transformers.

    huggingface_hub reads HF_HUB_OFFLINE into a module constant at import, so when it is already imported the
    constant is set as well (transformers asks huggingface_hub whether it is offline).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        constants.HF_HUB_OFFLINE = True


def download_hint(family: str, model_dir: Path) -> str:
    """The command that fetches what is missing (only the missing dependencies are downloaded)."""
    repo = repo_of_cache_path(model_dir.absolute()) or MAIN_REPOS.get(family, MAIN_REPOS["indextts2"])
    return f"`triton-tts download {repo}` where the network is reachable (it fetches only missing dependencies)"


def describe_miss(dep: Dependency, chosen: Candidate | None, found: tuple[Candidate, ...]) -> str:
    """One line saying why `dep` does not resolve, naming the place and the file."""
    if chosen is None:
        places = "; ".join(c.where for c in found)
        flat = ", ".join(f.flat_path for f in dep.files)
        return f"{dep.repo_id} ({dep.purpose}) is not installed: looked for {FLAT_DIR}/{{{flat}}} and in {places}"
    lookup = chosen.lookup
    if lookup is not None and lookup.snapshot is None:
        if lookup.problem == "no-ref":
            snaps = ", ".join(s[:12] for s in lookup.snapshots) or "none"
            return (f"{lookup.folder} has no refs/main (snapshots: {snaps}), so an offline lookup of "
                    f"{dep.repo_id} finds nothing")
        if lookup.problem == "bad-ref":
            return f"{lookup.ref_file} does not hold a 40-hex commit hash"
        return f"{lookup.ref_file} names snapshot {lookup.commit}, which is missing from {lookup.folder / 'snapshots'}"
    for role, path in chosen.paths.items():
        if path.is_symlink() and not path.exists():
            return f"{path} is a dangling snapshot link (its blob {os.readlink(path)} is missing)"
        if not path.is_file():
            return f"{dep.repo_id} is incomplete in {chosen.where}: {path} is missing"
    return f"{dep.repo_id} is incomplete in {chosen.where}"


def resolve_dependencies(
    model_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, family: str | None = None
) -> ResolvedDeps:
    """Paths of every dependency of an IndexTTS2 install, from the filesystem only; switches to offline mode.

    Raises `ModelFilesError` for the first dependency that does not resolve (counting the others), naming where
    it looked and the fix. Contents are not checked here: `engine_ref.indextts2.integrity.check_indextts2_dir`
    reads headers and shapes (seconds), and the loaders load strictly.
    """
    enforce_offline()
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise ModelFilesError(f"model directory {root} does not exist",
                              "pass the IndexTTS2 directory that holds config.yaml, gpt.pth and s2mel.pth")
    if family is None:
        from engine_ref.families import detect_family

        family = detect_family(root)
    if family not in V2_FAMILIES:
        raise ModelFilesError(f"{root} is an IndexTTS 1.x directory, which has no hub dependencies",
                              "pass an IndexTTS2 directory, or load it with the 1.x engine")
    caches = dependency_caches(root, cache_dir)
    resolved: dict[str, ResolvedDependency] = {}
    misses: list[str] = []
    for dep in dependencies_for(family):
        found = candidates(dep, root, caches)
        chosen = choose(found)
        if chosen is not None and chosen.complete:
            commit = chosen.lookup.commit if chosen.lookup else None
            resolved[dep.key] = ResolvedDependency(dep, chosen.layout, chosen.where, dict(chosen.paths), commit)
        else:
            misses.append(describe_miss(dep, chosen, found))
    if misses:
        more = (f"; {len(misses) - 1} more dependency problem(s): run `triton-tts verify {root}`"
                if len(misses) > 1 else "")
        raise ModelFilesError(
            misses[0],
            f"run {download_hint(family, root)}, or copy the files into {root / FLAT_DIR} (flat layout), "
            f"or pass --cache-dir pointing at a Hugging Face cache that holds them{more}",
        )
    return ResolvedDeps(root, family, resolved)
