"""Writing synthesized 16-bit PCM as WAV, MP3, Opus or FLAC, whole or chunk by chunk as it arrives.

The format follows the output path's extension. Compressed formats are encoded in process by PyAV (FFmpeg's
libraries in the `av` wheel; no ffmpeg binary, no subprocess) through the gateway's `StreamEncoder`, writing
into a seekable file so each muxer finalizes its headers (FLAC's sample count, MP3's LAME tag). Every writer
fills a hidden temporary file next to the target and renames it into place only on success: readers never see
half a file, and an interrupted job leaves nothing behind.

One-shot WAV output is `engine_ref.pcm.write_wav`. The streaming WAV writer uses the same stdlib `wave` module
with the same 16-bit mono layout (tests check that both produce identical bytes); it exists because `write_wav`
needs the whole utterance in memory and a long text should not. Nothing here imports torch.
"""

from __future__ import annotations

import os
import secrets
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.errors import EncodeError
from engine_ref.errors import InputError
from engine_ref.pcm import to_pcm16, write_wav

__all__ = ["OutputFormat", "FORMATS", "output_format", "AudioWriter", "open_writer", "write_audio"]


@dataclass(frozen=True)
class OutputFormat:
    name: str
    codec: str | None  #: gateway.audio.FORMATS key of the encoder (Ogg/Opus, MP3, FLAC); None: WAV via `wave`
    default_bitrate: str | None = None


FORMATS: dict[str, OutputFormat] = {
    ".wav": OutputFormat("WAV", None),
    ".mp3": OutputFormat("MP3", "mp3", "64k"),
    ".opus": OutputFormat("Opus", "opus", "32k"),
    ".ogg": OutputFormat("Opus", "opus", "32k"),
    ".flac": OutputFormat("FLAC", "flac"),
}


def output_format(path: str | os.PathLike) -> OutputFormat:
    """The format for an output path, from its extension; anything else -> InputError listing the supported."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise InputError(f"cannot write {ext or 'files without an extension'} (output {str(path)!r})",
                         f"name the output with one of: {', '.join(FORMATS)}")
    return FORMATS[ext]


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


class _LibavWriter(AudioWriter):
    """Encodes in process with PyAV (FFmpeg's libraries) into the temporary file, packet by packet."""

    def __init__(self, path: str | os.PathLike, sample_rate: int, fmt: OutputFormat, bitrate: str | None):
        from gateway.audio import StreamEncoder

        super().__init__(path, sample_rate)
        self.format = fmt
        bits = _bitrate(bitrate or fmt.default_bitrate, fmt, self.path)
        try:
            self._file = open(self._tmp, "xb")
        except OSError as exc:
            raise self._io_error(exc) from None
        try:
            self._encoder = StreamEncoder(fmt.codec, self.sample_rate, bits, file=self._file)
        except EncodeError as exc:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            raise EncodeError(f"{exc.problem} (writing {fmt.name} into {str(self.path)!r})", exc.fix) from None

    def _write(self, data: bytes) -> None:
        try:
            self._encoder.encode(np.frombuffer(data, "<i2").astype(np.int16, copy=False))
        except OSError as exc:
            raise self._io_error(exc) from None

    def _finish(self) -> None:
        try:
            self._encoder.finish()
            self._file.close()
        except OSError as exc:
            raise self._io_error(exc) from None

    def _cleanup(self) -> None:
        self._encoder.close()
        self._file.close()
        super()._cleanup()


def _bitrate(text: str | None, fmt: OutputFormat, path: Path) -> int | None:
    """"48k" / "64000" -> bits per second; anything else is the encoder's error, said before it starts."""
    if text is None:
        return None
    raw = str(text).strip().lower()
    scale = 1000 if raw.endswith("k") else 1
    try:
        value = int(float(raw[:-1] if scale > 1 else raw) * scale)
    except ValueError:
        value = 0
    if value <= 0:
        raise EncodeError(f"ffmpeg failed to encode {fmt.name} into {str(path)!r} (bitrate {text!r} is not a "
                          "positive number of bits per second)", "pass a bitrate such as 48k, or write a .wav")
    return value


def open_writer(path: str | os.PathLike, sample_rate: int, bitrate: str | None = None) -> AudioWriter:
    """A streaming writer for `path`, its format chosen by the extension (`bitrate` e.g. "48k": MP3/Opus)."""
    fmt = output_format(path)
    if fmt.codec is None:
        return _WavWriter(path, sample_rate)
    return _LibavWriter(path, sample_rate, fmt, bitrate)


def write_audio(path: str | os.PathLike, pcm: np.ndarray, sample_rate: int, bitrate: str | None = None) -> Path:
    """Write a whole utterance (WAV via engine_ref.pcm.write_wav, the rest through PyAV)."""
    fmt = output_format(path)
    if fmt.codec is None:
        try:
            return write_wav(path, _mono_pcm16(pcm), sample_rate)
        except OSError as exc:
            raise EncodeError(f"cannot write {str(path)!r} ({exc.strerror or exc})",
                              "check free disk space and that the folder is writable") from None
    with open_writer(path, sample_rate, bitrate) as writer:
        writer.write(pcm)
    return writer.path
