"""The code the Triton Python models run; each generated `model.py` only binds one of these classes to pb_utils."""
