"""IndexTTS2 (2.0; 2.5 later): the family's modules, layouts and pipeline, over engine_ref's shared pieces."""
