"""A finished job's audio file, written in process with PyAV: M4B (AAC in MP4) with chapters, tags and cover art,
and the other job formats (MP3, Opus, FLAC, WAV) with as much of that as each container holds.

Chapters: FFmpeg's MP4 muxer writes both chapter forms players read — a QuickTime chapter text track (referenced
by the audio track's `tref/chap`) and Nero's `udta/chpl` atom — from the container's chapter list
(`OutputContainer.set_chapters`); the MP3 muxer writes ID3v2 CHAP/CTOC frames and the Ogg muxer Vorbis-comment
chapters. FLAC's muxer drops the chapter list, so FLAC gets the Vorbis-comment chapter tags (CHAPTER001=HH:MM:SS.mmm,
CHAPTER001NAME=title) written as ordinary tags. WAV has no chapters.

Cover art (JPEG/PNG bytes, e.g. the EPUB's cover) is muxed unchanged as an attached-picture stream: MP4 `covr`,
ID3 APIC, FLAC PICTURE. The M4B is written with the `M4B ` brand (players file it as an audiobook) and moov-first
(`faststart`), so a browser or player can start playing before the download ends.

Files are written under a temporary name beside the target and renamed on success: a half-written file is never
served, and a gateway killed while encoding simply encodes again on resume.
"""

from __future__ import annotations

import io
import os
import secrets
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

from engine_ref.errors import InputError
from gateway.jobs.epub import Cover

__all__ = ["FileFormat", "JOB_FORMATS", "ChapterMark", "Tags", "AudiobookWriter", "write_audiobook",
           "job_format"]


@dataclass(frozen=True)
class FileFormat:
    name: str
    extension: str
    media_type: str
    muxer: str
    codec: str
    bitrate: int | None  #: bits/s for lossy codecs
    chapters: str  #: "container" (the muxer writes them), "vorbis-tags" or "none"
    cover: bool
    options: tuple[tuple[str, str], ...] = ()


JOB_FORMATS: dict[str, FileFormat] = {
    "m4b": FileFormat("m4b", "m4b", "audio/mp4", "mp4", "aac", 64_000, "container", True,
                      (("brand", "M4B "), ("movflags", "+faststart"))),
    "mp3": FileFormat("mp3", "mp3", "audio/mpeg", "mp3", "libmp3lame", 64_000, "container", True,
                      (("id3v2_version", "4"),)),
    "opus": FileFormat("opus", "opus", "audio/ogg", "ogg", "libopus", 32_000, "container", False),
    "flac": FileFormat("flac", "flac", "audio/flac", "flac", "flac", None, "vorbis-tags", True),
    "wav": FileFormat("wav", "wav", "audio/wav", "wav", "pcm_s16le", None, "none", False),
}


def job_format(name: str) -> FileFormat:
    fmt = JOB_FORMATS.get(str(name).lower())
    if fmt is None:
        raise InputError(f"unknown job format {name!r}", f"use one of: {', '.join(JOB_FORMATS)}")
    return fmt


@dataclass(frozen=True)
class ChapterMark:
    title: str
    start: int  #: first sample
    end: int  #: one past the last sample


@dataclass(frozen=True)
class Tags:
    title: str | None = None
    author: str | None = None
    language: str | None = None
    cover: Cover | None = None


def _clock(samples: int, sample_rate: int) -> str:
    ms = int(round(samples * 1000 / sample_rate))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


class AudiobookWriter:
    """Encode int16 mono PCM chunk by chunk into one file of a job format (chapters and tags known up front)."""

    FRAME = 4096  # samples per frame handed to the encoder (it re-frames to the codec's size)

    def __init__(self, path: str | os.PathLike, fmt: str | FileFormat, sample_rate: int,
                 chapters: Iterable[ChapterMark] = (), tags: Tags = Tags(), bitrate: int | None = None):
        import av

        self._av = av
        self.format = fmt if isinstance(fmt, FileFormat) else job_format(fmt)
        self.path = Path(path)
        self.sample_rate = int(sample_rate)
        self._tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        self._samples = 0
        self._out = av.open(str(self._tmp), "w", format=self.format.muxer, options=dict(self.format.options))
        try:
            rate = 48_000 if self.format.codec == "libopus" else self.sample_rate  # Opus runs at 48 kHz
            self._audio = self._out.add_stream(self.format.codec, rate=rate, layout="mono")
            if self.format.bitrate or bitrate:
                self._audio.bit_rate = int(bitrate or self.format.bitrate)
            self._set_tags(tags, list(chapters))
            self._cover_packet = self._add_cover(tags.cover) if self.format.cover and tags.cover else None
        except BaseException:
            self.abort()
            raise

    def _set_tags(self, tags: Tags, chapters: list[ChapterMark]) -> None:
        meta = self._out.metadata
        if tags.title:
            meta["title"] = tags.title
            meta["album"] = tags.title
        if tags.author:
            meta["artist"] = tags.author
            meta["album_artist"] = tags.author
        if tags.language and self.format.name in ("mp3", "flac", "opus"):
            meta["language"] = tags.language
        if self.format.name in ("m4b", "mp3"):
            meta["genre"] = "Audiobook"
        if not chapters:
            return
        if self.format.chapters == "container":
            tb = Fraction(1, self.sample_rate)
            self._out.set_chapters([{"id": i + 1, "start": c.start, "end": c.end, "time_base": tb,
                                     "metadata": {"title": c.title}} for i, c in enumerate(chapters)])
        elif self.format.chapters == "vorbis-tags":
            for i, c in enumerate(chapters, 1):
                meta[f"CHAPTER{i:03d}"] = _clock(c.start, self.sample_rate)
                meta[f"CHAPTER{i:03d}NAME"] = c.title

    def _add_cover(self, cover: Cover):
        """The cover as an attached-picture stream, its bytes muxed as they are (no re-encoding)."""
        av = self._av
        try:
            image = av.open(io.BytesIO(cover.data))
            template = image.streams.video[0]
            packet = next(image.demux(template))
        except (av.FFmpegError, IndexError, StopIteration, ValueError):
            return None  # an unreadable cover is left out rather than failing the job
        stream = self._out.add_stream_from_template(template)
        stream.disposition = av.stream.Disposition.attached_pic.value
        packet.stream = stream
        packet.pts = packet.dts = 0
        return packet

    def write(self, pcm: np.ndarray) -> None:
        pcm = np.ascontiguousarray(np.asarray(pcm, dtype=np.int16).reshape(-1))
        av = self._av
        if self._cover_packet is not None:
            self._out.mux(self._cover_packet)
            self._cover_packet = None
        for start in range(0, pcm.shape[0], self.FRAME):
            block = pcm[start:start + self.FRAME]
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.time_base = Fraction(1, self.sample_rate)
            frame.pts = self._samples
            self._samples += block.shape[0]
            for packet in self._audio.encode(frame):
                self._out.mux(packet)

    @property
    def seconds(self) -> float:
        return self._samples / self.sample_rate

    def close(self) -> Path:
        """Flush, finish the container and move it into place."""
        try:
            if self._cover_packet is not None:
                self._out.mux(self._cover_packet)
                self._cover_packet = None
            for packet in self._audio.encode(None):
                self._out.mux(packet)
            self._out.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        try:
            self._out.close()
        except Exception:  # noqa: BLE001 - already failing; the temp file goes either way
            pass
        self._tmp.unlink(missing_ok=True)


def write_audiobook(path: str | os.PathLike, fmt: str | FileFormat, sample_rate: int, pcm: Iterable[np.ndarray],
                    chapters: Iterable[ChapterMark] = (), tags: Tags = Tags(), bitrate: int | None = None) -> Path:
    """Encode every chunk of `pcm` into `path` (see AudiobookWriter)."""
    writer = AudiobookWriter(path, fmt, sample_rate, chapters, tags, bitrate)
    try:
        for chunk in pcm:
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
