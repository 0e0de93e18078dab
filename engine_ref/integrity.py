"""Check a model directory before anything loads it, in seconds, and say exactly what is wrong.

A half-copied checkpoint otherwise surfaces minutes later as an unpickling traceback deep inside model loading.
`check_model_dir` looks at every file inference opens (config.yaml and the files it names) without reading
tensor data: the zip structure of each torch.save checkpoint is walked with `zipfile`, the pickle is opened with
``torch.load(weights_only=True, mmap=True)`` (tensors stay on disk), bpe.model is loaded by SentencePiece. Hugging
Face cache specifics are recognised: snapshot symlinks whose blob is missing, and ``.incomplete`` partial
downloads. ``deep=True`` additionally reads every byte (content hash against the cache blob name, or the zip
CRCs) for use right after a download.

Decision on the legacy (pre-zip, torch<1.6) torch.save format: reported as ``corrupt``. The official IndexTTS
checkpoints are zip archives, and a legacy file cannot be memory-mapped, so accepting it would mean fully loading
multi-GB files; the fix names the one-line re-save. (`check_torch_file(..., allow_legacy=True)` accepts it for
small third-party files whose format is not known.)

The building blocks (`presence_row`, `check_torch_file`, `check_safetensors`, `check_json`,
`check_sentencepiece`, `deep_row`) are shared with the IndexTTS2 check (`engine_ref.indextts2.integrity`), whose
report covers the main directory and each hub dependency in one table (`FileCheck.section`).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import zipfile
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

import yaml

from engine_ref.indextts.config import ModelConfig, load_config
from engine_ref.errors import ConfigError, ModelFilesError
from engine_ref.hub_cache import DEFAULT_REPO, OFFICIAL_REPOS, repo_of_cache_path

if TYPE_CHECKING:
    from rich.table import Table

Status = Literal[
    "ok", "optional-absent", "missing", "missing-ref", "broken-link", "empty", "truncated", "corrupt",
    "wrong-shape", "wrong-size", "incomplete-download", "unreadable",
]
# What a check found: (status, detail, fix or None for "fetch it again").
Verdict = tuple[Status, str, str | None]
OK_STATUSES = frozenset({"ok", "optional-absent"})

_PHRASE: dict[str, str] = {
    "missing": "missing",
    "missing-ref": "missing",
    "broken-link": "a broken link",
    "empty": "empty",
    "truncated": "truncated",
    "corrupt": "corrupt",
    "incomplete-download": "an interrupted download",
    "unreadable": "unreadable",
    "wrong-shape": "of the wrong shape",
    "wrong-size": "not the official file",
}
_DEFAULT_NAMES = {"gpt": "gpt.pth", "bigvgan": "bigvgan_generator.pth", "bpe": "bpe.model"}
_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"
_LEGACY_TORCH = b"\x80\x02\x8a\x0a"  # pickled magic number that opens a pre-1.6 torch.save file
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_CHUNK = 8 << 20


@dataclass(frozen=True)
class FileCheck:
    """One row of the report: a file inference needs and what was found."""

    role: str  # config / gpt / bigvgan / bpe (1.x); IndexTTS2 adds its own roles
    file: str  # name as config.yaml gives it
    path: str
    status: Status
    size: int | None = None
    detail: str = ""
    fix: str = ""
    section: str = ""  # which part of an install the file belongs to (IndexTTS2: main dir or a hub dependency)

    @property
    def ok(self) -> bool:
        """True for a usable file, and for an optional part that is absent (reported, not a problem)."""
        return self.status in OK_STATUSES


@dataclass(frozen=True)
class IntegrityReport:
    """Every required file of one model directory, in load order (config, gpt, bigvgan, bpe)."""

    model_dir: str
    rows: tuple[FileCheck, ...]
    version: str | None = None  # config.yaml `version` when it parsed
    family: str | None = None  # engine_ref.families name when known ("indextts", "indextts2", "indextts2.5")

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def problems(self) -> tuple[FileCheck, ...]:
        return tuple(r for r in self.rows if not r.ok)

    def raise_for_problems(self) -> None:
        """Raise `ModelFilesError` for the first problem (one line), counting the others."""
        problems = self.problems
        if not problems:
            return
        first = problems[0]
        more = len(problems) - 1
        fix = first.fix
        if more:
            fix += (
                f"; {more} more problem{'s' if more > 1 else ''} in this directory: "
                f"run `triton-tts verify {self.model_dir}` for the full table"
            )
        raise ModelFilesError(f"{first.path} is {_PHRASE[first.status]}: {first.detail}", fix)


class RefetchHint(Protocol):
    """Words the fix for a file that must be fetched again (depends on where the install came from)."""

    def refetch(self, name: str) -> str: ...


@dataclass(frozen=True)
class _Place:
    """Where the directory came from, to word the fix (re-run download vs. copy from the release)."""

    repo: str | None
    official: str

    def refetch(self, name: str) -> str:
        if self.repo:
            return f"run `triton-tts download {self.repo}` again (it resumes partial files)"
        return f"copy {name} again from the official release {self.official} (`triton-tts download {self.official}`)"


def human_size(n: int | None) -> str:
    """Bytes for people: 512 B, 1.5 KB, 2.3 GB (binary units)."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KB"
    for bigger in ("MB", "GB", "TB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def _one_line(exc: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def check_model_dir(path: str | os.PathLike, *, deep: bool = False) -> IntegrityReport:
    """Check config.yaml and every file it names; fast unless `deep` (which reads every byte).

    A directory that does not exist raises `ModelFilesError`; everything else is reported as rows.
    """
    model_dir = Path(path).expanduser()
    if not model_dir.is_dir():
        what = "is not a directory" if model_dir.exists() else "does not exist"
        raise ModelFilesError(
            f"model directory {model_dir} {what}", "pass --model DIR pointing at the directory with config.yaml"
        )
    place = _Place(repo_of_cache_path(model_dir.absolute()), DEFAULT_REPO)
    partials = partial_downloads(model_dir)

    config_path = model_dir / "config.yaml"
    cfg: ModelConfig | None = None
    row = presence_row("config", "config.yaml", config_path, place, partials)
    if row is None:
        try:
            cfg = load_config(config_path)
        except ConfigError as exc:
            row = row_for("config", "config.yaml", config_path, "corrupt", exc.problem, exc.fix or "")
        else:
            place = _Place(place.repo, OFFICIAL_REPOS.get(cfg.version, DEFAULT_REPO))
            row = row_for("config", "config.yaml", config_path, "ok", f"IndexTTS {cfg.version}", "")
            if deep:
                row = deep_row(row, config_path, place, zip_crc=False)
    rows = [row]

    names = cfg.required_files() if cfg else {"config": "config.yaml", **_names_from_raw_yaml(config_path)}
    for role, name in names.items():
        if role == "config":
            continue
        file_path = model_dir / name
        row = presence_row(role, name, file_path, place, partials)
        if row is None:
            row = _content_row(role, name, file_path, cfg, place)
            if deep and row.ok:
                row = deep_row(row, file_path, place, zip_crc=name.endswith((".pth", ".pt")))
        rows.append(row)
    return IntegrityReport(str(model_dir), tuple(rows), cfg.version if cfg else None)


def row_for(role: str, name: str, path: Path, status: Status, detail: str, fix: str, section: str = "") -> FileCheck:
    """A row for an existing file (its size read now); the fix is dropped for rows that are fine."""
    size: int | None
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    return FileCheck(role, name, str(path), status, size, detail, fix if status not in OK_STATUSES else "", section)


def _names_from_raw_yaml(config_path: Path) -> dict[str, str]:
    """File names from a config.yaml that failed validation, so the other rows can still be checked."""
    names = dict(_DEFAULT_NAMES)
    try:
        data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return names
    if not isinstance(data, dict):
        return names
    dataset = data.get("dataset") if isinstance(data.get("dataset"), dict) else {}
    for role, value in (
        ("gpt", data.get("gpt_checkpoint")),
        ("bigvgan", data.get("bigvgan_checkpoint")),
        ("bpe", dataset.get("bpe_model")),
    ):
        if isinstance(value, str) and value:
            names[role] = value
    return names


def partial_downloads(model_dir: Path) -> list[Path]:
    """``*.incomplete`` files that huggingface_hub leaves when a download is interrupted.

    Cache snapshots (``models--x/snapshots/<commit>/``) keep them in ``models--x/blobs/``; ``--local-dir``
    downloads keep them under ``<dir>/.cache/huggingface/download/``.
    """
    found: list[Path] = []
    candidates = [model_dir / ".cache" / "huggingface" / "download"]
    if model_dir.absolute().parent.name == "snapshots":
        candidates.append(model_dir.absolute().parent.parent / "blobs")
    for folder in candidates:
        if folder.is_dir():
            found += sorted(folder.rglob("*.incomplete"))
    return found


def presence_row(role: str, name: str, path: Path, place: RefetchHint, partials: list[Path]) -> FileCheck | None:
    """Presence checks shared by every file; None when the file exists, is readable and non-empty."""
    fix = place.refetch(name)
    if path.is_symlink() and not path.exists():
        target = Path(os.path.normpath(path.parent / os.readlink(path)))
        partial = target.with_name(target.name + ".incomplete")
        if partial.exists():
            done = human_size(partial.stat().st_size)
            return FileCheck(
                role, name, str(path), "incomplete-download", None,
                f"only the partial blob {partial} ({done} so far) exists; "
                f"the link's target {target.name} was never completed",
                fix,
            )
        return FileCheck(role, name, str(path), "broken-link", None, f"symlink to {target}, which does not exist", fix)
    if not path.exists():
        if partials:
            sizes = ", ".join(f"{p.name} ({human_size(p.stat().st_size)})" for p in partials[:2])
            more = f" and {len(partials) - 2} more" if len(partials) > 2 else ""
            return FileCheck(
                role, name, str(path), "incomplete-download", None,
                f"not present, and partial downloads remain in {partials[0].parent}: {sizes}{more}",
                fix,
            )
        return FileCheck(role, name, str(path), "missing", None, "no such file", fix)
    if path.is_dir():
        return FileCheck(role, name, str(path), "corrupt", None, "is a directory, expected a file", fix)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            f.read(1)
    except PermissionError:
        return FileCheck(
            role, name, str(path), "unreadable", None, "permission denied",
            "make it readable by this user (chmod/chown; on Kubernetes check the volume's fsGroup/runAsUser)",
        )
    except OSError as exc:
        return FileCheck(role, name, str(path), "unreadable", None, _one_line(exc), fix)
    if size == 0:
        return FileCheck(role, name, str(path), "empty", 0, "0 bytes", fix)
    return None


def _content_row(role: str, name: str, path: Path, cfg: ModelConfig | None, place: _Place) -> FileCheck:
    def check() -> Verdict:
        if role == "bpe":
            return check_sentencepiece(path, cfg.gpt.number_text_tokens if cfg else None)
        return check_torch_file(path, lambda obj: _state_dict_problem(role, obj, _tensor_type()))

    return content_row(role, name, path, check, place)


def content_row(
    role: str, name: str, path: Path, check: Callable[[], Verdict], place: RefetchHint, section: str = ""
) -> FileCheck:
    """Run one content check on an existing file; any exception becomes a row, never a traceback."""
    try:
        status, detail, fix = check()
    except OSError as exc:  # e.g. an I/O error on a flaky network volume halfway through
        status, detail, fix = "unreadable", f"read failed: {_one_line(exc)}", None
    except Exception as exc:  # any other parser failure still means the file is unusable: a row, not a traceback
        status, detail, fix = "corrupt", f"unreadable content ({type(exc).__name__}: {_one_line(exc)})", None
    return row_for(role, name, path, status, detail, fix or place.refetch(name), section)


def _tensor_type() -> type:
    import torch

    return torch.Tensor


# --- torch.save checkpoints -------------------------------------------------------------------------------------


def check_torch_file(path: Path, inspect: Callable[[Any], Verdict], *, allow_legacy: bool = False) -> Verdict:
    """A torch.save file: zip layout from headers, then a weights-only, memory-mapped load passed to `inspect`.

    `allow_legacy` accepts the pre-zip format (loaded fully, without mmap: only for small files).
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        if allow_legacy and f.read(len(_LEGACY_TORCH)) == _LEGACY_TORCH:
            return _check_pickle(path, inspect, mmap=False)
        f.seek(0)
        problem = _zip_problem(f, size)
    if problem:
        return problem
    return _check_pickle(path, inspect)


def _zip_problem(f: IO[bytes], size: int) -> Verdict | None:
    """Validate the archive layout from headers only: end record, central directory, every member in range."""
    head = f.read(8)
    if not head.startswith(_ZIP_LOCAL):
        if head.startswith(_LEGACY_TORCH):
            return (
                "corrupt",
                "legacy (pre-zip, torch<1.6) torch.save format; the official checkpoints are zip archives, "
                "which this engine memory-maps",
                "re-save it in the zip format: torch.save(torch.load(path, weights_only=True), path), "
                "or re-download it",
            )
        return "corrupt", f"not a torch.save zip archive (first bytes {head.hex(' ')})", None
    f.seek(0)
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        if _tail_cut_off(f, size):
            return (
                "truncated",
                f"only {human_size(size)} on disk and the zip end record is incomplete: "
                "the end of the file was cut off",
                None,
            )
        return "corrupt", f"zip directory unreadable: {_one_line(exc)}", None
    with archive:
        infos = archive.infolist()
        if not any(i.filename.rsplit("/", 1)[-1] == "data.pkl" for i in infos):
            return "corrupt", "zip archive without data.pkl: not a torch.save checkpoint", None
        for info in infos:
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) < 30:
                return "truncated", f"member {info.filename} starts past the end of the file ({human_size(size)})", None
            if not header.startswith(_ZIP_LOCAL):
                return "corrupt", f"damaged zip header of member {info.filename} at byte {info.header_offset}", None
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            end = info.header_offset + 30 + name_len + extra_len + info.compress_size
            if end > size:
                return (
                    "truncated",
                    f"member {info.filename} ends at byte {end}, past the end of the file ({size} bytes)",
                    None,
                )
    return None


def _tail_cut_off(f: IO[bytes], size: int) -> bool:
    """True when the zip end record is absent, incomplete, or points past the end of the file."""
    tail_start = max(0, size - (1 << 16) - 22)  # the end record (+ comment) lies in the last 64 KiB + 22 bytes
    f.seek(tail_start)
    tail = f.read()
    at = tail.rfind(_ZIP_END)
    if at < 0 or len(tail) - at < 22:
        return True
    cd_size, cd_offset, comment_len = struct.unpack("<IIH", tail[at + 12 : at + 22])
    if at + 22 + comment_len > len(tail):
        return True
    return cd_offset != 0xFFFFFFFF and cd_offset + cd_size > size


def _check_pickle(path: Path, inspect: Callable[[Any], Verdict], *, mmap: bool = True) -> Verdict:
    """Deserialize with tensors memory-mapped (no tensor data read) and let `inspect` judge the object."""
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # any failure here means the file cannot be used; say why in one line
        text = str(exc)
        # The weights-only unpickler reports both foreign objects and damaged pickle bytes; only the first
        # is a file that loads elsewhere, so it gets its own wording and fix.
        reason = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
        if "Unsupported global" in reason:
            return (
                "corrupt",
                "holds Python objects besides tensors, which a safe (weights-only) load refuses: "
                + _one_line(Exception(reason), 120),
                "save just the state dict from a trusted copy (torch.save(state_dict, path)), "
                "or re-download the official file",
            )
        return "corrupt", f"torch.load cannot read it: {_one_line(Exception(reason))}", None
    try:
        return inspect(obj)
    finally:
        del obj


def _state_dict_problem(role: str, obj: Any, tensor_type: type) -> Verdict:
    if role == "bigvgan":
        if not isinstance(obj, Mapping) or "generator" not in obj:
            keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
            return (
                "corrupt",
                f"no 'generator' entry (found: {keys}): not a BigVGAN generator checkpoint",
                "use bigvgan_generator.pth from the official release (not the discriminator)",
            )
        state = obj["generator"]
    else:
        state = obj["model"] if isinstance(obj, Mapping) and "model" in obj else obj
    if not isinstance(state, Mapping):
        return "corrupt", f"holds a {type(state).__name__}, not a state dict", None
    tensors = sum(isinstance(v, tensor_type) for v in state.values())
    if tensors == 0:
        return "corrupt", "the state dict holds no tensors", None
    return "ok", f"{tensors} tensors", None


# --- safetensors and JSON (hub dependencies) ---------------------------------------------------------------------

_SAFETENSORS_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
Shapes = Mapping[str, tuple[int, ...]]


def check_safetensors(path: Path, inspect: Callable[[Shapes], Verdict] | None = None) -> Verdict:
    """Header only: the length field against the file size first (a cut-off download is named as truncated
    without reading tensor data), then the `safetensors` library parses the header; `inspect` gets the shapes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "truncated", f"only {size} bytes: shorter than the 8-byte header length field", None
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > _SAFETENSORS_MAX_HEADER:
            return "corrupt", f"not a safetensors file (header length field {n}, first bytes {head.hex(' ')})", None
        if 8 + n > size:
            return (
                "truncated", f"the header needs {8 + n} bytes but the file has only {size}: the end was cut off", None
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return "corrupt", "the safetensors header is not valid JSON", None
    if not isinstance(header, dict):
        return "corrupt", "the safetensors header is not a JSON object", None
    data_end, declared = 0, 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            count = 1
            for d in entry["shape"]:
                count *= int(d)
            declared += count * _DTYPE_BYTES.get(str(entry["dtype"]), 0)
        except (KeyError, TypeError, ValueError):
            return "corrupt", f"malformed header entry for tensor '{key}'", None
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        return (
            "truncated",
            f"tensor data ends at byte {8 + n + data_end} but the file has only {size} bytes: the end was cut off",
            None,
        )
    if 8 + n + data_end < size:
        return "corrupt", f"{size - 8 - n - data_end} unexpected bytes after the last tensor", None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as st:
            shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    except Exception as exc:  # SafetensorError and friends: the library refuses the file
        return "corrupt", f"safetensors cannot read it: {_one_line(exc)}", None
    if not shapes:
        return "corrupt", "the file holds no tensors", None
    if inspect is not None:
        return inspect(shapes)
    return "ok", f"{len(shapes)} tensors", None


def check_json(path: Path, inspect: Callable[[Mapping[str, Any]], Verdict] | None = None) -> Verdict:
    """A JSON object (config.json and friends); `inspect` judges its content."""
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        return "corrupt", f"not valid JSON ({_one_line(exc, 100)})", None
    if not isinstance(data, dict):
        return "corrupt", f"holds a JSON {type(data).__name__}, expected an object", None
    if inspect is not None:
        return inspect(data)
    return "ok", f"{len(data)} keys", None


# --- bpe.model --------------------------------------------------------------------------------------------------


def check_sentencepiece(path: Path, max_pieces: int | None, limit_key: str = "gpt.number_text_tokens") -> Verdict:
    """Load with SentencePiece; more pieces than the GPT's text vocabulary means a tokenizer of another release."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError with a parser message
        return "corrupt", f"SentencePiece cannot load it: {_one_line(exc).replace(f' from {path}', '')}", None
    pieces = sp.get_piece_size()
    if pieces == 0:
        return "corrupt", "SentencePiece model with no pieces", None
    if max_pieces is not None and pieces > max_pieces:
        return (
            "corrupt",
            f"{pieces} pieces but {limit_key} is {max_pieces}: "
            "this tokenizer does not belong to these checkpoints",
            "use the bpe.model shipped with the same release as gpt.pth and config.yaml",
        )
    return "ok", f"{pieces} pieces", None


# --- deep checks (read every byte) ------------------------------------------------------------------------------


def deep_row(row: FileCheck, path: Path, place: RefetchHint, *, zip_crc: bool) -> FileCheck:
    """Content hash against the cache blob name when there is one, else zip CRCs for checkpoints."""
    problem = _blob_hash_problem(path)
    if problem is None and zip_crc and not _is_cache_blob(path):
        problem = _zip_crc_problem(path)
    if problem is None:
        return row
    return row_for(row.role, row.file, path, "corrupt", problem, place.refetch(row.file), row.section)


def _is_cache_blob(path: Path) -> bool:
    real = Path(os.path.realpath(path))
    return real.parent.name == "blobs" and bool(_SHA256.fullmatch(real.name) or _SHA1.fullmatch(real.name))


def _blob_hash_problem(path: Path) -> str | None:
    """Hub cache blobs are named by content: sha256 (LFS files) or the git blob sha1 (small files)."""
    if not _is_cache_blob(path):
        return None
    real = Path(os.path.realpath(path))
    size = real.stat().st_size
    if _SHA256.fullmatch(real.name):
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1()
        digest.update(b"blob %d\0" % size)
    with real.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    got = digest.hexdigest()
    if got != real.name:
        return (
            f"content hash {got[:12]}... differs from its cache blob name {real.name[:12]}...: "
            "the file changed after download"
        )
    return None


def _zip_crc_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        return f"zip archive unreadable: {_one_line(exc)}"
    return f"CRC mismatch in member {bad}: the data is damaged" if bad else None


# --- rendering --------------------------------------------------------------------------------------------------


def render_report(report: IntegrityReport) -> Table:
    """The `verify` table: one row per file, problems in red with their fix.

    Rows with a `section` (an IndexTTS2 install: main dir, then each hub dependency) get a first column naming
    it, and a rule between sections.
    """
    from rich.table import Table
    from rich.text import Text

    family = f" ({report.family})" if report.family else ""
    table = Table(title=f"Model files in {report.model_dir}{family}", title_justify="left")
    sectioned = any(r.section for r in report.rows)
    if sectioned:
        table.add_column("part", overflow="fold")
    table.add_column("role")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("status")
    table.add_column("detail / fix", overflow="fold")
    previous: str | None = None
    for row in report.rows:
        style = "green" if row.status == "ok" else "yellow" if row.ok else "bold red"
        status = Text(row.status, style=style)
        info = Text(row.detail)
        if row.fix:
            info.append(f"\nfix: {row.fix}", style="yellow")
        cells = [row.role, row.file, human_size(row.size), status, info]
        if sectioned:
            if previous is not None and row.section != previous:
                table.add_section()
            cells.insert(0, row.section if row.section != previous else "")
            previous = row.section
        table.add_row(*cells)
    return table
