"""Writing synthesized 16-bit PCM as WAV, MP3, Opus or FLAC, whole or chunk by chunk as it arrives.

The format follows the output path's extension. Compressed formats pipe raw PCM into the ffmpeg binary that
the `imageio-ffmpeg` wheel ships (no system ffmpeg needed); ffmpeg's stderr goes to a temporary file rather
than a pipe so a chatty encoder can never block us. Every writer fills a hidden temporary file next to the
target and renames it into place only on success: readers never see half a file, and an interrupted job
leaves nothing behind.

One-shot WAV output is `engine_ref.audio.write_wav`. The streaming WAV writer uses the same stdlib `wave`
module with the same 16-bit mono layout (tests check that both produce identical bytes); it exists because
`write_wav` needs the whole utterance in memory and a long text should not.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from client.errors import EncodeError
from engine_ref.audio import to_pcm16, write_wav
from engine_ref.errors import InputError

__all__ = ["OutputFormat", "FORMATS", "output_format", "ffmpeg_exe", "AudioWriter", "open_writer", "write_audio"]

#: How long `close()` waits for ffmpeg to flush and exit before giving up.
FFMPEG_CLOSE_TIMEOUT_S = 120.0
_STDERR_TAIL_CHARS = 600


@dataclass(frozen=True)
class OutputFormat:
    name: str
    muxer: str | None  #: ffmpeg muxer (-f); None: written by Python (WAV)
    codec: tuple[str, ...] = ()  #: ffmpeg codec arguments
    default_bitrate: str | None = None


FORMATS: dict[str, OutputFormat] = {
    ".wav": OutputFormat("WAV", None),
    ".mp3": OutputFormat("MP3", "mp3", ("-c:a", "libmp3lame"), "64k"),
    ".opus": OutputFormat("Opus", "opus", ("-c:a", "libopus"), "32k"),
    ".ogg": OutputFormat("Opus", "ogg", ("-c:a", "libopus"), "32k"),
    ".flac": OutputFormat("FLAC", "flac", ("-c:a", "flac")),
}


def output_format(path: str | os.PathLike) -> OutputFormat:
    """The format for an output path, from its extension; anything else -> InputError listing the supported."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise InputError(f"cannot write {ext or 'files without an extension'} (output {str(path)!r})",
                         f"name the output with one of: {', '.join(FORMATS)}")
    return FORMATS[ext]


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary from the imageio-ffmpeg wheel (or IMAGEIO_FFMPEG_EXE when set)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise EncodeError("writing MP3/Opus/FLAC needs ffmpeg from the imageio-ffmpeg package, which is not installed",
                          "pip install 'imageio-ffmpeg>=0.5,<1', or write a .wav") from None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as exc:
        raise EncodeError(f"imageio-ffmpeg found no ffmpeg binary ({exc})",
                          "reinstall imageio-ffmpeg for this platform, or set IMAGEIO_FFMPEG_EXE") from None


def _mono_pcm16(pcm: np.ndarray) -> np.ndarray:
    """1-D int16 samples (float input goes through engine_ref's upstream-exact conversion)."""
    out = to_pcm16(pcm)
    if out.ndim != 1:
        raise ValueError(f"expected mono audio shaped [T], got {out.shape}")
    return out


class AudioWriter:
    """Append-only writer of mono 16-bit PCM into one output file; use as a context manager.

    Leaving the ``with`` block normally finalizes the file; an exception (or Ctrl-C) aborts and removes it.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int):
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
        self.path = Path(path)
        self.sample_rate = int(sample_rate)
        self.samples_written = 0
        self._done = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EncodeError(f"cannot create the folder of {str(self.path)!r} ({exc.strerror or exc})",
                              "pass an output path in a writable folder") from None
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")

    @property
    def seconds(self) -> float:
        return self.samples_written / self.sample_rate

    def write(self, pcm: np.ndarray) -> None:
        if self._done:
            raise ValueError(f"writer for {self.path} is already closed")
        samples = _mono_pcm16(pcm)
        if samples.size:
            self._write(samples.astype("<i2", copy=False).tobytes())
            self.samples_written += int(samples.size)

    def close(self) -> Path:
        """Finalize and move the file into place; returns its path."""
        if self._done:
            return self.path
        self._done = True
        try:
            self._finish()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._cleanup()
            raise
        return self.path

    def abort(self) -> None:
        """Stop and delete the partial output."""
        if not self._done:
            self._done = True
            self._cleanup()

    def __enter__(self) -> "AudioWriter":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # subclass hooks
    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _cleanup(self) -> None:
        self._tmp.unlink(missing_ok=True)

    def _io_error(self, exc: OSError) -> EncodeError:
        return EncodeError(f"cannot write {str(self.path)!r} ({exc.strerror or exc})",
                           "check free disk space and that the folder is writable")


class _WavWriter(AudioWriter):
    """Streaming 16-bit mono WAV; `wave` patches the RIFF sizes on close."""

    def __init__(self, path: str | os.PathLike, sample_rate: int):
        super().__init__(path, sample_rate)
        try:
            self._file = open(self._tmp, "xb")
        except OSError as exc:
            raise self._io_error(exc) from None
        self._wav = wave.open(self._file, "wb")
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(self.sample_rate)

    def _write(self, data: bytes) -> None:
        try:
            self._wav.writeframesraw(data)
        except OSError as exc:
            raise self._io_error(exc) from None

    def _finish(self) -> None:
        try:
            self._wav.close()
            self._file.close()
        except OSError as exc:
            raise self._io_error(exc) from None

    def _cleanup(self) -> None:
        try:
            self._wav.close()
        except (OSError, wave.Error):
            pass
        self._file.close()
        super()._cleanup()


class _FfmpegWriter(AudioWriter):
    """Pipes raw PCM into ffmpeg's stdin; ffmpeg encodes into the temporary file."""

    def __init__(self, path: str | os.PathLike, sample_rate: int, fmt: OutputFormat, bitrate: str | None):
        exe = ffmpeg_exe()
        super().__init__(path, sample_rate)
        self.format = fmt
        rate = bitrate or fmt.default_bitrate
        self.command = [
            exe, "-hide_banner", "-nostats", "-loglevel", "error",
            # Raw input needs no probing: without these ffmpeg buffers seconds of audio before encoding anything.
            "-probesize", "32", "-analyzeduration", "0",
            "-f", "s16le", "-ar", str(self.sample_rate), "-ac", "1", "-i", "pipe:0",
            *fmt.codec, *(("-b:a", rate) if rate else ()), "-flush_packets", "1",
            "-f", str(fmt.muxer), "-y", str(self._tmp),
        ]
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=self._stderr)
        except OSError as exc:
            self._stderr.close()
            raise EncodeError(f"cannot start ffmpeg ({exc.strerror or exc})",
                              "reinstall imageio-ffmpeg, or write a .wav") from None

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", errors="replace").strip()
        tail = " | ".join(line.strip() for line in text.splitlines()[-4:] if line.strip())
        return tail[-_STDERR_TAIL_CHARS:] or "no message"

    def _failed(self, what: str) -> EncodeError:
        return EncodeError(f"ffmpeg failed to encode {self.format.name} into {str(self.path)!r} ({what}): "
                           f"{self._stderr_tail()}", "check the output folder and bitrate, or write a .wav")

    def _write(self, data: bytes) -> None:
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(data)
        except (BrokenPipeError, ValueError):
            self._proc.wait(timeout=FFMPEG_CLOSE_TIMEOUT_S)
            raise self._failed(f"it exited with status {self._proc.returncode}") from None

    def _finish(self) -> None:
        try:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                rc = self._proc.wait(timeout=FFMPEG_CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
                raise self._failed(f"it did not finish within {FFMPEG_CLOSE_TIMEOUT_S:g} s") from None
            if rc != 0:
                raise self._failed(f"exit status {rc}")
        finally:
            self._stderr.close()

    def _cleanup(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        self._stderr.close()
        super()._cleanup()


def open_writer(path: str | os.PathLike, sample_rate: int, bitrate: str | None = None) -> AudioWriter:
    """A streaming writer for `path`, its format chosen by the extension (`bitrate` e.g. "48k": MP3/Opus)."""
    fmt = output_format(path)
    if fmt.muxer is None:
        return _WavWriter(path, sample_rate)
    return _FfmpegWriter(path, sample_rate, fmt, bitrate)


def write_audio(path: str | os.PathLike, pcm: np.ndarray, sample_rate: int, bitrate: str | None = None) -> Path:
    """Write a whole utterance (WAV via engine_ref.audio.write_wav, the rest through ffmpeg)."""
    fmt = output_format(path)
    if fmt.muxer is None:
        try:
            return write_wav(path, _mono_pcm16(pcm), sample_rate)
        except OSError as exc:
            raise EncodeError(f"cannot write {str(path)!r} ({exc.strerror or exc})",
                              "check free disk space and that the folder is writable") from None
    with open_writer(path, sample_rate, bitrate) as writer:
        writer.write(pcm)
    return writer.path
