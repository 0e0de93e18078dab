"""IndexTTS-2 export: one module per component, each graph verified against engine_ref v2 (see pipeline.py)."""
