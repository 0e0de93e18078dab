"""In-process audio for the gateway and the client (PyAV / libav): streaming encoders, time stretch, voice decoding.

`StreamEncoder` turns 16-bit mono PCM into bytes of a *streamable* container as it arrives — MP3 (raw frames
after an ID3 tag), Ogg/Opus, ADTS AAC, FLAC, WAV with a streaming header, raw PCM — so a response can be sent
chunk by chunk without a temporary file or a subprocess. Seekable formats that need their index written at
the end (MP4/M4B) are not here: gateway/jobs/m4b.py writes those to disk.

Notes on what the containers do at the edges (tests check durations with these in mind):
- MP3: libmp3lame adds its encoder delay and pads the last frame; without a seekable output there is no
  LAME/Xing header, so decoders play those ~50 ms of padding too.
- Opus always decodes at 48 kHz (the original rate is in the header); libopus takes 8/12/16/24/48 kHz, other
  rates are resampled by libswresample first. Ogg pages are cut every 100 ms so bytes leave promptly.
- FLAC: without a seekable output the STREAMINFO block keeps total samples 0 ("unknown"), which decoders accept.
- WAV: sizes in the RIFF and data headers are 0xFFFFFFFF ("until the end"), as OpenAI's streaming WAV does.

`TimeStretch` is libavfilter's ``atempo`` (pitch-preserving WSOLA), chained when a factor lies outside
[0.5, 2.0]; it is the `speed` of models without duration control.
"""

from __future__ import annotations

import fractions
import io
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from client.errors import EncodeError
from engine_ref.errors import InputError

__all__ = ["FORMATS", "AudioFormat", "StreamEncoder", "output_rate", "TimeStretch", "DecodedAudio", "decode_audio",
           "streaming_wav_header", "atempo_factors"]


@dataclass(frozen=True)
class AudioFormat:
    name: str
    content_type: str
    muxer: str | None = None  #: libavformat muxer; None: written here (wav, pcm)
    codec: str | None = None
    sample_format: str | None = None  #: what the encoder takes
    rates: tuple[int, ...] = ()  #: rates the encoder takes (empty: any)
    default_bitrate: int | None = None
    extension: str = ""


FORMATS: dict[str, AudioFormat] = {
    "mp3": AudioFormat("mp3", "audio/mpeg", "mp3", "libmp3lame", "s16p",
                       (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000), 64_000, ".mp3"),
    "opus": AudioFormat("opus", "audio/ogg", "ogg", "libopus", "s16", (8000, 12000, 16000, 24000, 48000),
                        32_000, ".opus"),
    "aac": AudioFormat("aac", "audio/aac", "adts", "aac", "fltp",
                       (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000),
                       64_000, ".aac"),
    "flac": AudioFormat("flac", "audio/flac", "flac", "flac", "s16", (), None, ".flac"),
    "wav": AudioFormat("wav", "audio/wav", extension=".wav"),
    "pcm": AudioFormat("pcm", "audio/pcm", extension=".pcm"),
}
#: Samples per frame pushed into encoders and filters: small enough that output follows input closely.
_FRAME = 1024
#: Ogg page length in microseconds (the muxer's default, 1 s, would hold audio back that long).
_OGG_PAGE_US = "100000"


def streaming_wav_header(sample_rate: int, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV header whose sizes say "unknown" (0xFFFFFFFF), for a WAV sent while it is produced."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16) +
            b"data" + struct.pack("<I", unknown))


def _as_pcm16(pcm: np.ndarray) -> np.ndarray:
    arr = np.asarray(pcm)
    if arr.dtype != np.int16:
        raise TypeError(f"expected int16 PCM, got {arr.dtype} (convert floats with engine_ref.pcm.to_pcm16)")
    if arr.ndim != 1:
        raise ValueError(f"expected mono PCM shaped [T], got {arr.shape}")
    return np.ascontiguousarray(arr)


class _Sink:
    """A write-only, non-seekable file for libavformat: what the muxer writes is collected for `take()`."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


def output_rate(format: str, sample_rate: int) -> int:
    """The rate a `StreamEncoder` for `format` writes: the input's, or the nearest higher one its codec takes."""
    rates = FORMATS[format].rates
    if not rates or sample_rate in rates:
        return int(sample_rate)
    return min((r for r in rates if r >= sample_rate), default=max(rates))


class StreamEncoder:
    """Mono int16 PCM in, container bytes out, chunk by chunk: ``encode(pcm) -> bytes`` then ``finish() -> bytes``.

    Not thread-safe; one encoder per response. `output_rate` is the rate in the stream (the input's, unless
    the codec cannot take it).
    """

    def __init__(self, format: str, sample_rate: int, bitrate: int | None = None, file: Any = None):
        """`file`: a seekable binary file to write into instead of returning bytes (client output files: the
        muxer then finalizes its headers — FLAC's sample count, MP3's LAME/Xing tag); not for wav/pcm."""
        if format not in FORMATS:
            raise InputError(f"response_format {format!r} is not supported", f"use one of: {', '.join(FORMATS)}")
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
        self.format = FORMATS[format]
        self.sample_rate = int(sample_rate)
        self.samples_in = 0
        self._finished = False
        self._header_pending = format == "wav"
        self._container = None
        self._file = file
        if self.format.muxer is None:
            if file is not None:
                raise ValueError(f"{format} is written without an encoder (engine_ref.pcm.write_wav for files)")
            self.output_rate = self.sample_rate
            return
        import av

        self.output_rate = output_rate(format, self.sample_rate)
        self._sink = _Sink()
        options = {"page_duration": _OGG_PAGE_US} if self.format.muxer == "ogg" else {}
        if file is not None:
            options["flush_packets"] = "1"  # each packet reaches the file as it is made
        try:
            self._container = av.open(file if file is not None else self._sink, mode="w", format=self.format.muxer,
                                      options=options)
            self._stream = self._container.add_stream(self.format.codec, rate=self.output_rate, layout="mono")
            ctx = self._stream.codec_context
            ctx.format = self.format.sample_format
            rate = bitrate or self.format.default_bitrate
            if rate:
                ctx.bit_rate = int(rate)
            self._container.start_encoding()
        except (av.FFmpegError, ValueError, OverflowError) as exc:
            self._abandon()
            raise EncodeError(f"ffmpeg failed to start the {format} encoder (libav via PyAV: {exc})",
                              "check the bitrate, use another format, or reinstall PyAV (pip install 'av>=12')") \
                from None
        self._frame_size = ctx.frame_size or _FRAME
        self._resampler = av.AudioResampler(format=self.format.sample_format, layout="mono", rate=self.output_rate)
        self._fifo = av.AudioFifo()
        self._pts = 0

    @property
    def content_type(self) -> str:
        return self.format.content_type

    def encode(self, pcm: np.ndarray) -> bytes:
        """Bytes that are ready after adding `pcm` (may be empty while an encoder fills its first frame)."""
        if self._finished:
            raise ValueError("the encoder is finished")
        samples = _as_pcm16(pcm)
        self.samples_in += int(samples.size)
        if self.format.muxer is None:
            head = streaming_wav_header(self.sample_rate) if self._header_pending else b""
            self._header_pending = False
            return head + samples.astype("<i2", copy=False).tobytes()
        if samples.size:
            for frame in self._resample(samples):
                self._fifo.write(frame)
            while self._fifo.samples >= self._frame_size:
                self._mux(self._fifo.read(self._frame_size))
        return self._drain()

    def finish(self) -> bytes:
        """The rest: the last partial frame, the encoder's delay, the container's trailer."""
        if self._finished:
            return b""
        self._finished = True
        if self.format.muxer is None:
            return streaming_wav_header(self.sample_rate) if self._header_pending else b""
        import av

        try:
            for frame in self._resampler.resample(None):
                self._fifo.write(frame)
            rest = self._fifo.read()
            if rest is not None and rest.samples:
                self._mux(rest)
            self._mux(None)
            container, self._container = self._container, None
            container.close()
        except av.FFmpegError as exc:
            self._abandon()
            raise EncodeError(f"ffmpeg failed to finish the {self.format.name} stream (libav via PyAV: {exc})",
                              "use another format") from None
        return self._drain()

    def close(self) -> None:
        """Release the encoder; after `finish()` a no-op, before it the output is abandoned (a cancelled response).
        Always call it (or `finish()`): libav containers left open crash the interpreter when collected."""
        self._finished = True
        self._abandon()

    def __enter__(self) -> "StreamEncoder":
        return self

    def __del__(self) -> None:
        # A safety net only (owners close explicitly): an open libav container must not reach the collector.
        try:
            self._abandon()
        except Exception:  # noqa: BLE001 - nothing sensible to do during collection
            pass

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _abandon(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - closing a half-written stream nobody reads
                pass

    def _drain(self) -> bytes:
        if self._file is not None:
            self._file.flush()
            return b""
        return self._sink.take()

    def _resample(self, samples: np.ndarray) -> list:
        import av

        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        return self._resampler.resample(frame)

    def _mux(self, frame) -> None:
        import av

        if frame is not None:
            frame.pts = self._pts
            frame.time_base = fractions.Fraction(1, self.output_rate)
            self._pts += frame.samples
        try:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        except av.FFmpegError as exc:
            raise EncodeError(f"ffmpeg failed to encode {self.format.name} (libav via PyAV: {exc})",
                              "use another format") from None


def atempo_factors(speed: float) -> list[float]:
    """`speed` as a product of atempo stages each within [0.5, 2.0] (the filter's classic range)."""
    if not 0.25 <= speed <= 4.0:
        raise InputError(f"speed={speed!r} is out of range", "pass a speed between 0.25 and 4.0")
    factors = []
    while speed > 2.0:
        factors.append(2.0)
        speed /= 2.0
    while speed < 0.5:
        factors.append(0.5)
        speed /= 0.5
    factors.append(speed)
    return factors


class TimeStretch:
    """Pitch-preserving tempo change of int16 mono PCM, streamed: ``process(pcm) -> pcm``, then ``flush()``.

    Output follows input with a lag of a few frames (the WSOLA window); `flush()` returns the rest.
    """

    def __init__(self, sample_rate: int, speed: float):
        import av.filter

        self.sample_rate = int(sample_rate)
        self.speed = float(speed)
        self._graph = av.filter.Graph()
        chain = [self._graph.add_abuffer(format="s16", sample_rate=self.sample_rate, layout="mono",
                                         time_base=f"1/{self.sample_rate}")]
        chain += [self._graph.add("atempo", f"{f:.6f}") for f in atempo_factors(self.speed)]
        chain.append(self._graph.add("abuffersink"))
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        self._graph.configure()
        self._pts = 0
        self._flushed = False

    def process(self, pcm: np.ndarray) -> np.ndarray:
        import av

        samples = _as_pcm16(pcm)
        out = []
        for start in range(0, samples.size, _FRAME):
            piece = samples[start:start + _FRAME]
            frame = av.AudioFrame.from_ndarray(piece[None, :], format="s16", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._pts
            frame.time_base = fractions.Fraction(1, self.sample_rate)
            self._pts += piece.size
            self._graph.push(frame)
            out.extend(self._pull())
        return np.concatenate(out) if out else np.zeros(0, np.int16)

    def flush(self) -> np.ndarray:
        if self._flushed:
            return np.zeros(0, np.int16)
        self._flushed = True
        self._graph.push(None)
        out = list(self._pull())
        return np.concatenate(out) if out else np.zeros(0, np.int16)

    def _pull(self) -> Iterator[np.ndarray]:
        import av

        while True:
            try:
                frame = self._graph.pull()
            except (av.BlockingIOError, av.EOFError):
                return
            yield frame.to_ndarray().reshape(-1).astype(np.int16, copy=False)


# ------------------------------------------------------------------------------------------------ voice decoding

#: Containers the server's own decoder (libsndfile, engine_ref/audio.py) reads: such uploads are kept as they are.
SERVER_READABLE = frozenset({"WAV", "WAVEX", "RF64", "W64", "FLAC", "MP3", "OGG", "AIFF"})
_MIN_RATE, _MAX_RATE = 4000, 768000
SILENCE_PEAK = 1e-4  # as engine_ref.audio.SILENCE_PEAK: about -80 dBFS


@dataclass(frozen=True)
class DecodedAudio:
    """A validated voice reference: what to store and what it holds."""

    stored: bytes  #: the bytes to keep and send to the server (the upload itself when the server reads it)
    container: str  #: e.g. WAV, FLAC, MP3, OGG; or the PyAV format name of a transcoded upload
    transcoded: bool  #: True when the upload was decoded with PyAV and stored as a float WAV
    sample_rate: int
    channels: int
    seconds: float
    peak: float


def decode_audio(data: bytes, max_seconds: float, min_seconds: float = 0.5) -> DecodedAudio:
    """Decode and check an uploaded voice once; InputError (a 400) names what is wrong and the fix.

    Uploads in a container the server reads are stored byte for byte (the server then sees exactly what the user
    sent, as with a direct client); anything else PyAV decodes (M4A/AAC, WebM/Opus, ...) is stored as a 32-bit
    float WAV of the decoded samples, so the server reads the same samples PyAV produced, without requantizing.
    """
    if not data:
        raise InputError("the voice audio is empty (0 bytes)", "upload a recording of a few seconds of speech")
    samples, rate, container = _decode_soundfile(data, max_seconds)
    transcoded = samples is None
    if transcoded:
        samples, rate, container = _decode_pyav(data, max_seconds)
    if not _MIN_RATE <= rate <= _MAX_RATE:
        raise InputError(f"the voice audio declares an implausible sample rate of {rate} Hz",
                         "re-encode it at a standard rate such as 24000 or 44100 Hz")
    seconds = samples.shape[0] / rate
    if samples.shape[0] == 0:
        raise InputError("the voice audio contains no samples", "upload a clip of a few seconds of clear speech")
    if not np.isfinite(samples).all():
        raise InputError("the voice audio contains NaN or infinite samples", "re-export it as 16-bit PCM WAV")
    if seconds > max_seconds:
        raise InputError(f"the voice audio is longer than {max_seconds:g} s",
                         f"upload at most {max_seconds:g} s (a 5-15 s clip of clear speech works best)")
    if seconds < min_seconds:
        raise InputError(f"the voice audio is only {seconds:.2f} s long", f"upload at least {min_seconds:g} s")
    peak = float(np.abs(samples).max())
    if peak < SILENCE_PEAK:
        raise InputError("the voice audio is silent", "upload a recording of someone speaking")
    stored = data
    if transcoded:
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, samples, rate, format="WAV", subtype="FLOAT")
        stored = buf.getvalue()
    return DecodedAudio(stored=stored, container=container, transcoded=transcoded, sample_rate=int(rate),
                        channels=int(samples.shape[1]), seconds=seconds, peak=peak)


def _decode_soundfile(data: bytes, max_seconds: float) -> tuple[np.ndarray | None, int, str]:
    """float32 [frames, channels] via libsndfile (the server's decoder), or (None, 0, "") when it cannot read it."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            fmt, rate = str(f.format), int(f.samplerate)
            if fmt not in SERVER_READABLE:
                return None, 0, ""
            if not _MIN_RATE <= rate <= _MAX_RATE:
                return np.zeros((0, 1), np.float32), rate, fmt
            limit = int((max_seconds + 1) * rate)  # one second more than allowed: enough to say "too long"
            frames = f.read(frames=limit, dtype="float32", always_2d=True)
            return frames, rate, fmt
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError, OSError, MemoryError):
        return None, 0, ""


def _decode_pyav(data: bytes, max_seconds: float) -> tuple[np.ndarray, int, str]:
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InputError("the voice upload has no audio stream", "upload an audio file (wav, flac, mp3, m4a)")
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or 0)
            channels = int(stream.codec_context.channels or 1)
            if not _MIN_RATE <= rate <= _MAX_RATE:
                return np.zeros((0, 1), np.float32), rate, container.format.name
            resampler = av.AudioResampler(format="flt", layout=stream.codec_context.layout, rate=rate)
            limit = int((max_seconds + 1) * rate)
            pieces, total = [], 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    arr = out.to_ndarray().reshape(-1, channels)  # packed float: [frames, channels]
                    pieces.append(arr)
                    total += arr.shape[0]
                if total >= limit:
                    break
            name = container.format.name
    except InputError:
        raise
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise InputError(f"the voice upload could not be decoded as audio ({str(exc)[:120]})",
                         "upload a valid audio file (wav, flac, mp3, ogg, m4a)") from None
    samples = np.concatenate(pieces).astype(np.float32, copy=False) if pieces else np.zeros((0, channels), np.float32)
    return samples, rate, name
