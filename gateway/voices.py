"""Stored voices: an uploaded reference recording, validated and decoded once, kept under data_dir/voices.

The API (`router`): POST /v1/audio/voices (multipart: name + audio), GET /v1/audio/voices[/{voice}],
GET /v1/audio/voices/{voice}/audio, DELETE /v1/audio/voices/{voice}.

Layout: ``voices/<id>/audio.<ext>`` (the bytes sent to Triton as REFERENCE_AUDIO) and ``voices/<id>/voice.json``
(metadata). Directory names are ids the gateway generates (``voice_`` + 24 hex digits); a user's name is only
ever a value inside voice.json and never part of a path, and lookups check a strict pattern first, so no
name or id can reach outside the folder. Files are written to a temporary name and renamed, so a crash never
leaves half a voice; a voice folder without a readable voice.json is ignored (and reported in the log).

The server's speaker id (the cache key of the voice's conditioning, returned with every response) is remembered
per voice in memory: the next request sends that id instead of the audio; when the server answers that it no
longer knows the id (restart, bounded cache), the speech route resends the audio and remembers the new id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_ref.errors import InputError
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse

from gateway.audio import decode_audio
from gateway.auth import Principal, require_key
from gateway.errors import APIError

__all__ = ["Voice", "VoiceStore", "VoiceNotFound", "VoiceExists", "router", "VOICE_NAME_RULE", "valid_voice_name", "valid_voice_id"]

log = logging.getLogger("gateway.voices")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ID = re.compile(r"voice_[0-9a-f]{24}")
VOICE_NAME_RULE = "1-64 characters: letters, digits, '_', '-', '.', starting with a letter or digit"
_EXT = {"WAV": ".wav", "WAVEX": ".wav", "RF64": ".wav", "W64": ".w64", "FLAC": ".flac", "MP3": ".mp3",
        "OGG": ".ogg", "AIFF": ".aiff"}


def valid_voice_name(name: str) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None and ".." not in name


def valid_voice_id(voice_id: str) -> bool:
    return isinstance(voice_id, str) and _ID.fullmatch(voice_id) is not None


class VoiceNotFound(InputError):
    """No stored voice has that name or id (a 404)."""


class VoiceExists(InputError):
    """The name is taken (a 409)."""


@dataclass(frozen=True)
class Voice:
    id: str
    name: str
    created: int  #: unix seconds
    seconds: float
    sample_rate: int
    audio_path: Path
    channels: int = 1
    container: str = "WAV"
    transcoded: bool = False
    sha256: str = ""
    bytes: int = 0

    def audio_bytes(self) -> bytes:
        return self.audio_path.read_bytes()

    def public(self) -> dict[str, Any]:
        """The API's view (no filesystem paths)."""
        return {"id": self.id, "object": "audio.voice", "name": self.name, "created_at": self.created,
                "seconds": round(self.seconds, 3), "sample_rate": self.sample_rate, "channels": self.channels,
                "format": self.container.lower(), "transcoded": self.transcoded, "bytes": self.bytes,
                "sha256": self.sha256}


class VoiceStore:
    """Thread-safe voice storage in one folder; names are unique (case-sensitive)."""

    def __init__(self, directory: str | os.PathLike, max_seconds: float = 60.0):
        self.dir = Path(directory)
        self.max_seconds = float(max_seconds)
        self._lock = threading.RLock()
        self._speaker_ids: dict[str, str] = {}  # voice id -> the server's speaker id
        self.dir.mkdir(parents=True, exist_ok=True)

    # --- queries ----------------------------------------------------------------------------------------------------
    def list(self) -> list[Voice]:
        """Every stored voice, oldest first."""
        voices = []
        with self._lock:
            for entry in sorted(self.dir.iterdir()) if self.dir.is_dir() else []:
                if entry.is_dir() and valid_voice_id(entry.name):
                    voice = self._read(entry)
                    if voice is not None:
                        voices.append(voice)
        return sorted(voices, key=lambda v: (v.created, v.id))

    def get(self, name_or_id: str) -> Voice:
        """A voice by id (``voice_...``) or by name; VoiceNotFound (404) otherwise, InputError (400) for a
        string that cannot be either (path separators, '..', control characters)."""
        if not isinstance(name_or_id, str) or not name_or_id:
            raise InputError("the voice is empty", "pass a stored voice's name or id (GET /v1/audio/voices)")
        if valid_voice_id(name_or_id):
            with self._lock:
                voice = self._read(self.dir / name_or_id)
            if voice is not None:
                return voice
        elif not valid_voice_name(name_or_id):
            raise InputError(f"{name_or_id[:80]!r} is not a valid voice name or id",
                             f"voice names are {VOICE_NAME_RULE}")
        for voice in self.list():
            if voice.name == name_or_id:
                return voice
        raise VoiceNotFound(f"no voice named {name_or_id!r}",
                            "upload it first (POST /v1/audio/voices) or pick one from GET /v1/audio/voices")

    # --- changes ----------------------------------------------------------------------------------------------------
    def add(self, name: str, audio: bytes) -> Voice:
        """Validate, decode once and store a voice; InputError for a bad name, a taken name or bad audio."""
        if not valid_voice_name(name):
            raise InputError(f"{str(name)[:80]!r} is not a valid voice name", f"use {VOICE_NAME_RULE}")
        decoded = decode_audio(bytes(audio), self.max_seconds)
        voice_id = "voice_" + secrets.token_hex(12)
        ext = ".wav" if decoded.transcoded else _EXT.get(decoded.container, ".bin")
        with self._lock:
            if any(v.name == name for v in self.list()):
                raise VoiceExists(f"a voice named {name!r} already exists",
                                 "pick another name, or DELETE the old voice first")
            tmp = self.dir / f".{voice_id}.tmp"
            tmp.mkdir(parents=True)
            try:
                audio_path = tmp / f"audio{ext}"
                audio_path.write_bytes(decoded.stored)
                meta = {"id": voice_id, "name": name, "created": int(time.time()), "seconds": decoded.seconds,
                        "sample_rate": decoded.sample_rate, "channels": decoded.channels,
                        "container": decoded.container, "transcoded": decoded.transcoded,
                        "sha256": hashlib.sha256(decoded.stored).hexdigest(), "bytes": len(decoded.stored),
                        "audio_file": audio_path.name, "format_version": 1}
                (tmp / "voice.json").write_text(json.dumps(meta, indent=1))
                os.replace(tmp, self.dir / voice_id)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            voice = self._read(self.dir / voice_id)
        assert voice is not None
        return voice

    def delete(self, name_or_id: str) -> Voice:
        """Remove a voice (its folder); returns what was removed."""
        voice = self.get(name_or_id)
        with self._lock:
            trash = self.dir / f".{voice.id}.deleted"
            os.replace(self.dir / voice.id, trash)  # gone for readers at once, then removed
            shutil.rmtree(trash, ignore_errors=True)
            self._speaker_ids.pop(voice.id, None)
        return voice

    # --- the server's speaker ids -----------------------------------------------------------------------------------
    def speaker_id(self, voice: Voice) -> str | None:
        with self._lock:
            return self._speaker_ids.get(voice.id)

    def remember_speaker_id(self, voice: Voice, speaker_id: str | None) -> None:
        with self._lock:
            if speaker_id:
                self._speaker_ids[voice.id] = speaker_id
            else:
                self._speaker_ids.pop(voice.id, None)

    # --- internals --------------------------------------------------------------------------------------------------
    def _read(self, folder: Path) -> Voice | None:
        meta_path = folder / "voice.json"
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("id") != folder.name:
                raise ValueError(f"voice.json names id {meta.get('id')!r}, not its folder's")
            audio_file = str(meta["audio_file"])
            if "/" in audio_file or "\\" in audio_file or audio_file.startswith("."):
                raise ValueError(f"audio_file {audio_file!r} is not a plain file name")
            audio_path = folder / audio_file
            if not audio_path.is_file():
                raise ValueError(f"{audio_file} is missing")
            return Voice(id=str(meta["id"]), name=str(meta["name"]), created=int(meta["created"]),
                         seconds=float(meta["seconds"]), sample_rate=int(meta["sample_rate"]), audio_path=audio_path,
                         channels=int(meta.get("channels", 1)), container=str(meta.get("container", "WAV")),
                         transcoded=bool(meta.get("transcoded", False)), sha256=str(meta.get("sha256", "")),
                         bytes=int(meta.get("bytes", 0)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring voice folder %s: %s", folder.name, exc)
            return None


# ---------------------------------------------------------------------------------------------------- the API

router = APIRouter()


def _lookup(store: VoiceStore, name_or_id: str) -> Voice:
    try:
        return store.get(name_or_id)
    except VoiceNotFound as exc:
        raise APIError.not_found(exc.one_line(), param="voice", code="voice_not_found") from None
    except InputError as exc:
        raise APIError.bad_request(exc.one_line(), param="voice", code="invalid_voice") from None


@router.post("/v1/audio/voices", status_code=201)
async def create_voice(request: Request, principal: Principal = Depends(require_key)):
    """multipart/form-data: name + audio (or OpenAI's field name audio_sample)."""
    store: VoiceStore = request.app.state.voices
    limit = request.app.state.settings.max_upload_bytes
    form = await request.form(max_files=1, max_fields=8, max_part_size=limit)
    try:
        name = form.get("name")
        upload = form.get("audio") or form.get("audio_sample")
        if not isinstance(name, str) or not name:
            raise APIError.bad_request("name is required. Fix: send a form field name=<voice name>",
                                       param="name", code="missing_required_parameter")
        if upload is None or isinstance(upload, str):
            raise APIError.bad_request("audio is required. Fix: send the recording as a file field 'audio'",
                                       param="audio", code="missing_required_parameter")
        data = await upload.read()
    finally:
        await form.close()
    if not valid_voice_name(name):
        raise APIError.bad_request(f"{name[:80]!r} is not a valid voice name. Fix: use {VOICE_NAME_RULE}",
                                   param="name", code="invalid_voice_name")
    try:
        voice = await asyncio.to_thread(store.add, name, data)
    except VoiceExists as exc:
        raise APIError(409, exc.one_line(), param="name", code="voice_exists") from None
    except InputError as exc:
        raise APIError.bad_request(exc.one_line(), param="audio", code="invalid_audio") from None
    return JSONResponse(voice.public(), status_code=201)


@router.get("/v1/audio/voices")
async def list_voices(request: Request, principal: Principal = Depends(require_key)):
    voices = await asyncio.to_thread(request.app.state.voices.list)
    return {"object": "list", "data": [v.public() for v in voices]}


@router.get("/v1/audio/voices/{voice}")
async def get_voice(voice: str, request: Request, principal: Principal = Depends(require_key)):
    return _lookup(request.app.state.voices, voice).public()


@router.get("/v1/audio/voices/{voice}/audio")
async def get_voice_audio(voice: str, request: Request, principal: Principal = Depends(require_key)):
    found = _lookup(request.app.state.voices, voice)
    return FileResponse(found.audio_path, filename=f"{found.name}{found.audio_path.suffix}")


@router.delete("/v1/audio/voices/{voice}")
async def delete_voice(voice: str, request: Request, principal: Principal = Depends(require_key)):
    store: VoiceStore = request.app.state.voices
    found = _lookup(store, voice)
    try:
        await asyncio.to_thread(store.delete, found.id)
    except VoiceNotFound as exc:  # deleted by a concurrent request
        raise APIError.not_found(exc.one_line(), param="voice", code="voice_not_found") from None
    return {"id": found.id, "name": found.name, "object": "audio.voice.deleted", "deleted": True}
