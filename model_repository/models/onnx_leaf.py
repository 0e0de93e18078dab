"""A stateless exported graph served through ONNX Runtime inside the Python backend (the `cpu` flavor's
cond_encoder and vocoder; the `gpu` flavor serves the same graphs on the native onnxruntime/tensorrt backends).
Tensor names are the graph's, read from the manifest."""

from __future__ import annotations

import numpy as np

from engine_ref.errors import InputError
from export.ort_session import session
from export.manifest import read_manifest, verify_component
from model_repository.models.base import PythonModel


class OnnxLeafModel(PythonModel):
    def setup(self) -> None:
        manifest = read_manifest(self.export_dir)
        self.component = manifest.component(self.param("component"))
        verify_component(self.export_dir, self.component)  # a tampered graph fails the load, by name
        threads = self.param("threads", None, int)
        self.session = session(self.export_dir / self.component.file, threads=threads,
                               spinning=self.param("spin_threads", True, bool))
        self.input_names = [t.name for t in self.component.inputs]
        self.output_names = [t.name for t in self.component.outputs]
        self.dtypes = {t.name: np.dtype(t.dtype) for t in self.component.inputs}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                self.check_internal(request)
                feeds = {}
                for name in self.input_names:
                    value = self.tensor(request, name)
                    if value is None:
                        raise InputError(f"input {name} is missing", f"send every input of {self.model_name}")
                    feeds[name] = value.astype(self.dtypes[name], copy=False)
                results = self.session.run(self.output_names, feeds)
                responses.append(self.pb.InferenceResponse(
                    output_tensors=[self.out(n, r) for n, r in zip(self.output_names, results)]
                ))
            except Exception as exc:  # shape/dtype errors of one request fail that request only
                responses.append(self.error_response(exc))
        return responses
