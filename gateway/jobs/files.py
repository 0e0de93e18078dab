"""One job's folder under data_dir/jobs: what was submitted, the plan, finished parts and the result.

    jobs/<id>/book.json       title, author, language and chapters (text) — written at submission
    jobs/<id>/cover.jpg|png   the EPUB's cover, if any
    jobs/<id>/voice.audio     the voice's reference audio, copied at submission (deleting the voice later does not
                              break a queued job)
    jobs/<id>/plan.json       the parts (chapter, text), fixed by the first worker: a resumed job keeps its numbering
    jobs/<id>/parts/NNNN.pcm  a finished part: 16-bit mono PCM, little-endian
    jobs/<id>/parts/NNNN.json its metadata (sample rate, samples, segments, characters, text digest, which attempt
                              made it); written after the .pcm, so a part is finished exactly when its .json exists and
                              agrees with the .pcm's size
    jobs/<id>/result.<ext>    the encoded file

The folder name is a job id checked against its strict pattern (`store.is_job_id`) before any path is built, so
no request can reach outside data_dir/jobs. Every file is written under a temporary name and renamed into place.
With several gateway replicas, data_dir must be a shared volume (the parts of a job resumed elsewhere are here).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine_ref.errors import InputError
from gateway.jobs.epub import Cover
from gateway.jobs.store import is_job_id
from gateway.jobs.text import Chapter, Part

__all__ = ["JobFiles", "PartMeta", "text_digest"]

_COVER_EXT = {"image/jpeg": "jpg", "image/png": "png"}


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class PartMeta:
    index: int
    sample_rate: int
    samples: int
    segments: int
    characters: int
    digest: str  #: of the part's text: a part file never stands in for different text
    attempt: int  #: the job attempt that synthesized it (tests: finished parts are not redone on resume)
    synth_s: float


class JobFiles:
    def __init__(self, jobs_dir: str | os.PathLike, job_id: str):
        if not is_job_id(job_id):
            raise InputError(f"{job_id[:80]!r} is not a job id", "use the id POST /v1/audio/jobs returned")
        self.id = job_id
        self.dir = Path(jobs_dir) / job_id
        self.parts_dir = self.dir / "parts"

    # --- submission ---------------------------------------------------------------------------------------------------
    def create(self, chapters: list[Chapter], title: str | None, author: str | None, language: str | None,
               voice_audio: bytes, cover: Cover | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        book = {"title": title, "author": author, "language": language,
                "chapters": [{"title": c.title, "text": c.text} for c in chapters]}
        _write_atomic(self.dir / "book.json", json.dumps(book, ensure_ascii=False).encode())
        _write_atomic(self.dir / "voice.audio", voice_audio)
        if cover is not None:
            _write_atomic(self.dir / f"cover.{_COVER_EXT[cover.media_type]}", cover.data)

    def book(self) -> dict[str, Any]:
        return json.loads((self.dir / "book.json").read_text(encoding="utf-8"))

    def chapters(self) -> list[Chapter]:
        return [Chapter(c["title"], c["text"]) for c in self.book()["chapters"]]

    def voice_audio(self) -> bytes:
        return (self.dir / "voice.audio").read_bytes()

    def cover(self) -> Cover | None:
        for media, ext in _COVER_EXT.items():
            path = self.dir / f"cover.{ext}"
            if path.is_file():
                return Cover(path.read_bytes(), media)
        return None

    # --- the plan -----------------------------------------------------------------------------------------------------
    def plan(self) -> list[Part] | None:
        try:
            raw = json.loads((self.dir / "plan.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return [Part(i, int(p["chapter"]), str(p["text"])) for i, p in enumerate(raw["parts"])]

    def write_plan(self, parts: list[Part], part_chars: int) -> list[Part]:
        raw = {"part_chars": part_chars, "parts": [{"chapter": p.chapter, "text": p.text} for p in parts]}
        _write_atomic(self.dir / "plan.json", json.dumps(raw, ensure_ascii=False).encode())
        return parts

    # --- parts --------------------------------------------------------------------------------------------------------
    def _part_paths(self, index: int) -> tuple[Path, Path]:
        return self.parts_dir / f"{index:04d}.pcm", self.parts_dir / f"{index:04d}.json"

    def write_part(self, part: Part, pcm: np.ndarray, meta: PartMeta) -> None:
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        pcm_path, meta_path = self._part_paths(part.index)
        _write_atomic(pcm_path, np.ascontiguousarray(pcm, dtype="<i2").tobytes())
        _write_atomic(meta_path, json.dumps(meta.__dict__).encode())

    def finished_part(self, part: Part) -> PartMeta | None:
        """The part's metadata when its files are complete and made from this part's text, else None."""
        pcm_path, meta_path = self._part_paths(part.index)
        try:
            meta = PartMeta(**json.loads(meta_path.read_text()))
            size = pcm_path.stat().st_size
        except (OSError, ValueError, TypeError):
            return None
        if meta.index != part.index or meta.digest != text_digest(part.text) or size != 2 * meta.samples:
            return None
        return meta

    def part_pcm(self, index: int) -> np.ndarray:
        return np.fromfile(self._part_paths(index)[0], dtype="<i2").astype(np.int16, copy=False)

    def part_files(self, index: int) -> tuple[Path, Path]:
        return self._part_paths(index)

    # --- the result ---------------------------------------------------------------------------------------------------
    def result_path(self, extension: str) -> Path:
        return self.dir / f"result.{extension}"

    def remove_parts(self) -> None:
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def remove_all(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
