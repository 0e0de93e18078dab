"""IndexTTS-2.5's export: 2.0's graphs where 2.5 keeps the modules, new graphs where it changes them (pipeline.py)."""
