"""IndexTTS-2's serving logic that is not Triton-specific: reference conditioning and emotion mixing over the
exported graphs (called through whatever runs them: Triton BLS calls in the server, ONNX Runtime in tests)."""
