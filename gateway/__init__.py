"""The triton-tts gateway: an OpenAI-compatible speech API, voices and long-form jobs in front of Triton.

An ASGI app (FastAPI, served by uvicorn) that talks to a triton-tts server over gRPC streaming and never loads a
model itself: `triton-tts gateway --triton HOST:PORT`. Modules: settings (configuration), app (`create_app`),
speech (POST /v1/audio/speech, GET /v1/models), voices (stored references), auth (API keys and limits), errors
(OpenAI error JSON), triton (the async Triton client), audio (PyAV streaming encoders), metrics (Prometheus),
jobs/ (durable long-form jobs), web/ (the page at /). Importing it never imports torch.
"""
