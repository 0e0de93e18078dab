"""`triton-tts gateway` (serve the gateway with uvicorn) and `triton-tts gateway-key` (make an API key).

Flags override ``TTS_GATEWAY_*`` environment variables (gateway/settings.py); flags left out keep the
environment's value or the default.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["register", "cmd_gateway", "cmd_gateway_key"]

log = logging.getLogger("gateway")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="serve the OpenAI-compatible speech API, voices and jobs in front of Triton")
    p.add_argument("--triton", dest="triton_url", help="Triton gRPC host:port (default 127.0.0.1:8001)")
    p.add_argument("--bind", dest="host", help="address to listen on (default 127.0.0.1; without API keys "
                                               "only loopback is allowed)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080)")
    p.add_argument("--data-dir", help="where voices and jobs are kept (default ./gateway-data)")
    p.add_argument("--db-url", help="job store: postgresql://... to share jobs between replicas (default: SQLite "
                                    "in the data dir)")
    p.add_argument("--max-jobs", type=int, help="long-form jobs running at once (default 2)")
    p.add_argument("--api-keys-file", help="file of API keys (see `triton-tts gateway-key`)")
    p.add_argument("--max-concurrent-per-key", type=int, help="requests in progress per key (default 8)")
    p.add_argument("--max-requests-per-minute", type=int, help="requests per key per minute (default 120)")
    p.add_argument("--max-upload-bytes", type=int, help="largest request body (default 20 MiB)")
    p.add_argument("--max-text-chars", type=int, help="longest speech input (default 4096)")
    p.add_argument("--cors-origin", dest="cors_origins", action="append",
                   help="allow browser calls from this origin (repeatable; default: no CORS)")
    p.add_argument("--request-timeout", dest="request_timeout_s", type=float,
                   help="seconds to wait for Triton's next response (default 120)")
    p.add_argument("--model-id", help="the model name GET /v1/models lists (default indextts-1.5)")
    p.add_argument("--default-language", help="language sent when a request names none, for a served model that "
                                              "requires one (IndexTTS-2.5: zh, en, ja, es, ar, zhen)")
    p.set_defaults(func=cmd_gateway)

    k = sub.add_parser("gateway-key", help="print a new gateway API key and its line for the keys file")
    k.add_argument("--name", help="a name for the key (shown in logs and 429 messages)")
    k.add_argument("--concurrent", type=int, help="this key's limit of requests in progress")
    k.add_argument("--per-minute", type=int, help="this key's limit of requests per minute")
    k.set_defaults(func=cmd_gateway_key)


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    settings = GatewaySettings.from_env_and_args(args)
    host, warning = settings.effective_host()
    if warning:
        log.warning(warning)
    app = create_app(settings)
    access = "API keys required" if not app.state.access.open else "open (no API keys)"
    print(f"gateway on http://{host}:{settings.port} -> Triton {settings.triton_url}; {access}; "
          f"data in {settings.data_dir}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=settings.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=10, server_header=False)
    return 0


def cmd_gateway_key(args: argparse.Namespace) -> int:
    from gateway.auth import key_line, new_key

    key = new_key()
    print(f"key (give it to the client; it is not stored): {key}")
    print("line for the keys file:")
    print(key_line(key, args.name, args.concurrent, args.per_minute))
    return 0


def serve_demo_gateway(triton_url: str, data_dir, voice_path, port: int) -> None:
    """The gateway of `triton-tts demo --gateway`: loopback, no keys, the demo voice stored as 'demo'; runs until
    Ctrl-C (then returns, so the demo stops its tritonserver)."""
    from pathlib import Path

    import uvicorn

    from engine_ref.errors import InputError
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    settings = GatewaySettings(triton_url=triton_url, data_dir=Path(data_dir), port=port)
    app = create_app(settings)
    try:
        app.state.voices.get("demo")
    except InputError:
        app.state.voices.add("demo", Path(voice_path).read_bytes())
    base = f"http://127.0.0.1:{port}"
    print(f"    web page  {base}/\n"
          f"    speech    curl -s {base}/v1/audio/speech -H 'Content-Type: application/json' -d "
          f"'{{\"model\": \"{settings.model_id}\", \"voice\": \"demo\", \"input\": \"Hello from the gateway.\"}}' "
          f"-o hello.mp3\n"
          f"    openai    OpenAI(base_url=\"{base}/v1\", api_key=\"none\").audio.speech.create(model=\"tts-1\", "
          f"voice=\"demo\", input=\"Hi\")", flush=True)
    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=5)
    except KeyboardInterrupt:
        pass
