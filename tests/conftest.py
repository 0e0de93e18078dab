"""Shared fixtures: one tiny preset model directory and one demo voice per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_ref.audio import write_wav
from engine_ref.presets import demo_voice, write_preset


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_preset("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def voice_wav(tmp_path_factory) -> Path:
    return write_wav(tmp_path_factory.mktemp("audio") / "voice.wav", demo_voice(), 24000)


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """All components of the tiny preset exported (and verified) once per session."""
    from export.pipeline import ExportRequest, run_export

    out = tmp_path_factory.mktemp("tiny-export")
    run_export(ExportRequest(str(tiny_model_dir), out))
    return out
