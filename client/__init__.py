"""The user's side of triton-tts: a typed client library and the `triton-tts client` CLI.

```python
from client import TTSClient, ClientConfig, GenerationOverrides
from client.encode import open_writer

with TTSClient(ClientConfig(grpc_url="localhost:8001")) as tts:
    stream = tts.synthesize_stream("Hello there.", "voice.wav", params=GenerationOverrides(seed=0))
    with stream, open_writer("hello.mp3", 24000) as out:
        for chunk in stream:          # one chunk per segment, as soon as it is ready
            out.write(chunk.pcm16)
    print(stream.timings.first_audio_s, stream.timings.rtf)
```

`synthesize()` does the same over HTTP (model `tts_offline`) and returns the whole utterance.
"""

from client.errors import (
                           EncodeError,
                           ModelUnavailable,
                           ProtocolError,
                           RequestRejected,
                           ServerError,
                           ServerInternalError,
                           ServerTimeout,
                           ServerUnavailable,
)
from client.request import GenerationOverrides, TTSRequest
from client.session import Chunk, ClientConfig, SynthesisResult, SynthesisStream, Timings, TTSClient

__all__ = [
    "TTSClient", "ClientConfig", "GenerationOverrides", "TTSRequest", "Chunk", "Timings", "SynthesisResult",
    "SynthesisStream", "ServerError", "RequestRejected", "ServerInternalError", "ServerUnavailable",
    "ModelUnavailable", "ServerTimeout", "ProtocolError", "EncodeError",
]
