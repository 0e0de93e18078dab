"""`s2mel` (IndexTTS-2): the CFM diffusion of every live segment, batched one Euler step at a time (decoupled).

`execute` only enqueues: the DiffusionScheduler thread (model_repository/s2mel_core.py) runs each step of all live
requests in one cfm_estimator call (ONNX Runtime, in this process) and answers each request from that thread when
its last step is done (the generated mel). A request carrying CANCEL=true stops the named request before the next
step; a request whose own sender is cancelled stops the same way. One instance: it owns every request's state.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from engine_ref.errors import InputError
from export.manifest import read_manifest, verify_component
from model_repository import contract as c
from model_repository.models.base import Metrics
from model_repository.models.scheduled import ScheduledModel
from model_repository.s2mel_core import (DiffusionConfig, DiffusionRequest, DiffusionResult, DiffusionScheduler,
                                         DiffusionStats, QueueFull)


class OrtEstimatorCall:
    """The cfm_estimator graph as the torch callable engine_ref's `euler_step` expects."""

    def __init__(self, sess):
        self.sess = sess

    def __call__(self, x, prompt_x, x_lens, t, style, cond):
        import torch

        feeds = {"x": x, "prompt_x": prompt_x, "x_lens": x_lens, "t": t, "style": style, "cond": cond}
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feeds.items()}
        feeds["x_lens"] = feeds["x_lens"].astype(np.int64)
        feeds["t"] = feeds["t"].astype(np.float32)
        return torch.from_numpy(self.sess.run(["velocity"], feeds)[0])


class S2MelModel(ScheduledModel):
    queue_full = QueueFull

    def setup(self) -> None:
        import torch

        from export.common import session

        torch.set_num_threads(1)  # the Euler update is elementwise; the cores belong to the estimator graph
        providers = [p for p in self.param("providers", "CPUExecutionProvider").split(",") if p]
        manifest = read_manifest(self.export_dir)
        comp = manifest.component("cfm_estimator")
        verify_component(self.export_dir, comp)  # a tampered graph fails the load, by name
        sess = session(self.export_dir / comp.file, threads=self.param("threads", None, int), providers=providers,
                       spinning=self.param("spin_threads", True, bool))
        extra = comp.extra
        frames = comp.dims["frames"].max if "frames" in comp.dims else int(extra.get("position_table", 8192))
        self.config = DiffusionConfig(mels=int(extra["mels"]), content_dim=int(extra["content_dim"]),
                                      style_dim=int(extra["style_dim"]), max_frames=int(frames),
                                      steps=int(manifest.model.get("diffusion_steps", extra.get("steps", 25))),
                                      cfg_rate=float(manifest.model.get("cfg_rate", extra.get("cfg_rate", 0.7))))
        # One lock for every message to the server (responses from the scheduler thread, control replies from
        # execute, metrics): the Python backend's messaging is not safe from several threads at once.
        self._ipc_lock = threading.Lock()
        self.metrics = Metrics(self.pb, self.model_name, self._ipc_lock)
        self._reported: dict[str, int] = {}
        self.scheduler = DiffusionScheduler(
            OrtEstimatorCall(sess), self.config, max_rows=self.param("max_rows", 16, int),
            max_queue=self.param("max_queue", 64, int), on_step=self._on_step, on_fatal=self._on_fatal,
        ).start()

    def _on_fatal(self, exc: BaseException) -> None:
        """The scheduler thread died: nothing would answer again. Exit the stub so the supervisor (`triton-tts
        serve`) sees a dead model, stops the server and lets the orchestrator restart it (as gpt_decoder does)."""
        self.log_error(f"{self.model_name}: s2mel scheduler died ({type(exc).__name__}: {exc}); exiting the model process")
        os._exit(70)

    def _on_step(self, stats: DiffusionStats) -> None:
        m = self.metrics
        m.set("tts_s2mel_active_requests", stats.active, "segments diffusing now")
        m.set("tts_s2mel_queued_requests", stats.queued, "segments waiting for diffusion rows")
        m.set("tts_s2mel_batch_rows", stats.last_rows, "estimator rows in the last diffusion step")
        m.set("tts_s2mel_batch_rows_max", stats.peak_rows, "most estimator rows in one diffusion step since start")
        m.set("tts_s2mel_cancel_lag_steps_max", stats.cancel_lag_steps_max,
              "most steps a cancelled segment took part in after its cancel arrived")
        self._count("tts_s2mel_steps_total", stats.steps, "batched diffusion steps (one estimator call each)")
        self._count("tts_s2mel_shared_steps_total", stats.shared_steps, "diffusion steps that held several segments")
        self._count("tts_s2mel_joins_mid_diffusion_total", stats.joined_mid_diffusion,
                    "segments that joined the batch while another was past its first step")
        self._count("tts_s2mel_requests_done_total", stats.done, "segments diffused")
        self._count("tts_s2mel_requests_cancelled_total", stats.cancelled, "segments stopped by cancellation")
        self._count("tts_s2mel_requests_failed_total", stats.failed, "segments that failed in s2mel")

    def _respond(self, sender, result: DiffusionResult) -> None:
        if result.error:
            self._send(sender, self.error_response(RuntimeError(result.error)))
            return
        mel = result.mel if result.mel is not None else np.zeros((self.config.mels, 0), np.float32)
        self._send(sender, self.pb.InferenceResponse(output_tensors=[
            self.out(c.MEL.name, np.ascontiguousarray(mel, np.float32)),
            self.out(c.CANCELLED.name, np.array([result.cancelled])),
            self.out(c.STEPS.name, np.array([result.steps], np.int32)),
        ]))

    def _parse(self, request, sender) -> DiffusionRequest:
        seq_id = self.text_of(self.tensor(request, c.SEQUENCE_ID.name))
        values = {f.name: self.tensor(request, f.name) for f in (c.MU, c.PROMPT_MEL, c.STYLE, c.NOISE_SEED)}
        missing = [k for k, v in values.items() if v is None]
        if not seq_id or missing:
            raise InputError(f"s2mel needs SEQUENCE_ID, MU, PROMPT_MEL, STYLE and NOISE_SEED (missing "
                             f"{', '.join(missing) or 'SEQUENCE_ID'})", "send all of them (tts does)")
        return DiffusionRequest(
            seq_id=seq_id, mu=np.asarray(values[c.MU.name], np.float32),
            prompt_mel=np.asarray(values[c.PROMPT_MEL.name], np.float32),
            style=np.asarray(values[c.STYLE.name], np.float32).reshape(-1),
            noise_seed=int(self.scalar(values[c.NOISE_SEED.name])),
            on_done=lambda r, s=sender: self._respond(s, r), is_cancelled=lambda s=sender: self._cancelled(s))
