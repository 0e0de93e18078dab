"""IndexTTS 1.0 / 1.5: the family's config, loader, presets and pipeline, over engine_ref's shared blocks."""
