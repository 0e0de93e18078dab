"""The s2mel diffusion scheduler without Triton (model_repository/s2mel_core.py), on a tiny random DiT: batched steps
equal each request alone (engine_ref's CFM.sample with the request's own seeded noise), joining and leaving,
the queue bound, cancellation within one step, and faults that stay with the request that caused them."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from engine_ref.errors import InputError
from engine_ref.indextts2.presets import preset_config
from engine_ref.indextts2.s2mel.cfm import CFM
from model_repository.s2mel_core import (DiffusionConfig, DiffusionRequest, DiffusionScheduler, QueueFull,
                                         run_to_completion)

STEPS = 25


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.inference_mode():
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cfm() -> CFM:
    torch.manual_seed(0)
    model = CFM(preset_config("tiny-v2").s2mel).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial velocities (some layers start at zero)
            p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def config(cfm) -> DiffusionConfig:
    return DiffusionConfig(mels=cfm.n_mels, content_dim=cfm.content_dim, style_dim=cfm.style_dim, max_frames=512,
                           steps=STEPS, cfg_rate=0.7)


class Recorder:
    """The estimator, recording the rows of every call; raises for batches holding a poisoned style."""

    def __init__(self, estimator, poison: float | None = None, fatal_after: int | None = None):
        self.estimator, self.poison, self.fatal_after = estimator, poison, fatal_after
        self.rows: list[int] = []

    def __call__(self, x, prompt_x, x_lens, t, style, cond):
        self.rows.append(int(x.shape[0]))
        if self.fatal_after is not None and len(self.rows) > self.fatal_after:
            raise _Dying("the scheduler thread is going")
        if self.poison is not None and bool((style[:, 0] == self.poison).any()):
            raise RuntimeError("estimator exploded on this row")
        return self.estimator(x, prompt_x, x_lens, t, style, cond)


class _Dying(BaseException):
    pass


def make(i: int, frames: int, prompt: int, cfg: DiffusionConfig, results: dict, style0: float | None = None,
         seed: int | None = None) -> DiffusionRequest:
    rng = np.random.default_rng(100 + i)
    style = rng.standard_normal(cfg.style_dim).astype(np.float32)
    if style0 is not None:
        style[0] = style0
    return DiffusionRequest(f"r{i}", rng.standard_normal((frames, cfg.content_dim)).astype(np.float32),
                            rng.normal(-5.0, 2.0, (cfg.mels, prompt)).astype(np.float32), style,
                            noise_seed=seed if seed is not None else 7_000 + i,
                            on_done=lambda r: results.__setitem__(r.seq_id, r))


def alone(cfm: CFM, req: DiffusionRequest) -> np.ndarray:
    """engine_ref's CFM on the request alone, noise drawn as Synthesizer2.mel_frames draws it."""
    frames = req.mu.shape[0]
    noise = torch.randn((1, cfm.n_mels, frames), generator=torch.Generator().manual_seed(req.noise_seed))
    out = cfm.sample(torch.from_numpy(req.mu)[None], torch.from_numpy(req.prompt_mel)[None],
                     torch.from_numpy(req.style)[None], STEPS, 0.7, noise=noise)
    return out[0].numpy()


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= 1e-5 * max(1.0, float(np.abs(ref).max())), float(np.abs(got - ref).max())


def test_batched_steps_equal_each_request_alone_including_one_that_joins_mid_diffusion(cfm, config):
    results: dict = {}
    est = Recorder(cfm.estimator)
    sched = DiffusionScheduler(est, config, max_rows=8)
    first = [make(0, 60, 20, config, results), make(1, 45, 12, config, results)]
    late = make(2, 80, 30, config, results)  # longer than both, different prompt: joins at step 5 of the others

    run_to_completion(sched, first, between=lambda it: sched.submit(late) if it == 5 else None)
    while late.seq_id not in results:
        sched.iterate()
    for req in (*first, late):
        res = results[req.seq_id]
        assert res.error is None and not res.cancelled and res.steps == STEPS
        assert res.mel.shape == (config.mels, req.mu.shape[0] - req.prompt_mel.shape[1])
        _close(res.mel, alone(cfm, req))
    # one estimator call per step for every live request (CFG pairs inside): 2 requests, then 3, then the late one
    assert est.rows == [4] * 5 + [6] * 20 + [2] * 5
    assert sched.stats.peak_rows == 6 and sched.stats.shared_steps == 25 and sched.stats.steps == 30
    assert sched.stats.done == 3 and sched.stats.active == 0


def test_noise_comes_from_the_request_seed_alone(cfm, config):
    results: dict = {}
    a = make(0, 40, 10, config, results, seed=5)
    b = make(1, 40, 10, config, results, seed=5)  # other tensors, same seed: same noise, other mel
    c = make(0, 40, 10, config, results, seed=6)
    c.seq_id = "r0-other-seed"
    sched = DiffusionScheduler(cfm.estimator, config, max_rows=8)
    run_to_completion(sched, [a, b, c])
    assert not np.allclose(results["r0"].mel, results["r0-other-seed"].mel)
    _close(results["r0"].mel, alone(cfm, a))
    _close(results["r1"].mel, alone(cfm, b))


def test_rows_are_bounded_and_the_queue_refuses_beyond_its_bound(cfm, config):
    results: dict = {}
    est = Recorder(cfm.estimator)
    sched = DiffusionScheduler(est, config, max_rows=4, max_queue=1)  # 2 live requests, 1 waiting
    reqs = [make(i, 30, 8, config, results) for i in range(3)]
    for r in reqs:
        sched.submit(r)
    with pytest.raises(QueueFull, match="limit 1"):
        sched.submit(make(3, 30, 8, config, results))
    while len(results) < 3:
        sched.iterate()
    assert max(est.rows) == 4 and est.rows.count(4) == STEPS and est.rows.count(2) == STEPS
    for r in reqs:
        _close(results[r.seq_id].mel, alone(cfm, r))
    sched.submit(make(3, 30, 8, config, results))  # room again
    with pytest.raises(InputError, match="max_rows=1"):
        DiffusionScheduler(cfm.estimator, config, max_rows=1)


def test_cancellation_frees_rows_before_the_next_step(cfm, config):
    results: dict = {}
    est = Recorder(cfm.estimator)
    sched = DiffusionScheduler(est, config, max_rows=8)
    keep, victim, queued = (make(0, 50, 10, config, results), make(1, 70, 10, config, results),
                            make(2, 40, 10, config, results))
    flag = {"cancel": False}
    flagged = make(3, 40, 10, config, results)
    flagged.is_cancelled = lambda: flag["cancel"]

    def between(it):
        if it == 8:
            sched.cancel(victim.seq_id)
        if it == 10:
            flag["cancel"] = True

    sched.submit(flagged)
    run_to_completion(sched, [keep, victim], between=between)
    assert results["r1"].cancelled and results["r1"].mel is None and results["r1"].steps == 8
    assert results["r3"].cancelled and results["r3"].steps == 10
    assert est.rows[:8] == [6] * 8 and est.rows[8:10] == [4] * 2 and est.rows[10:] == [2] * (STEPS - 10)
    assert sched.stats.cancel_lag_steps_max == 0 and sched.stats.cancelled == 2 and sched.stats.active == 0
    _close(results["r0"].mel, alone(cfm, keep))
    # a queued request is cancelled without a step; an unknown id is forgotten
    small = DiffusionScheduler(cfm.estimator, config, max_rows=2)
    small.submit(make(4, 30, 5, config, results))
    small.submit(queued)
    small.cancel(queued.seq_id)
    small.cancel("nobody")
    small.iterate()
    assert results["r2"].cancelled and results["r2"].steps == 0 and not small._cancelled


def test_cancel_arriving_during_a_step_takes_effect_at_the_next(cfm, config):
    results: dict = {}
    sched = DiffusionScheduler(cfm.estimator, config, max_rows=8)
    victim = make(0, 40, 10, config, results)
    original = sched.estimator

    def slow(*args):  # the cancel arrives while the step is running
        if sched.stats.steps == 3:
            sched.cancel(victim.seq_id)
        return original(*args)

    sched.estimator = slow
    run_to_completion(sched, [victim])
    assert results["r0"].cancelled and sched.stats.cancel_lag_steps_max == 1 and results["r0"].steps == 4


def test_a_failing_request_fails_alone_and_the_others_equal_their_solo_result(cfm, config):
    results: dict = {}
    est = Recorder(cfm.estimator, poison=123.0)
    sched = DiffusionScheduler(est, config, max_rows=8)
    good = [make(0, 50, 10, config, results), make(1, 35, 9, config, results)]
    bad = make(2, 40, 10, config, results, style0=123.0)
    run_to_completion(sched, [good[0], bad, good[1]])
    assert results["r2"].error and "estimator exploded" in results["r2"].error and results["r2"].mel is None
    for r in good:
        assert results[r.seq_id].error is None
        _close(results[r.seq_id].mel, alone(cfm, r))
    assert sched.stats.failed == 1 and sched.stats.done == 2


def test_bad_tensors_are_refused_by_name_at_submit(cfm, config):
    sched = DiffusionScheduler(cfm.estimator, config)
    results: dict = {}
    cases = {
        "MU must be": dict(mu=np.zeros((20, 3), np.float32)),
        "PROMPT_MEL must be": dict(prompt_mel=np.zeros((7, 5), np.float32)),
        "shorter than MU": dict(prompt_mel=np.zeros((config.mels, 20), np.float32)),
        "exceed": dict(mu=np.zeros((config.max_frames + 1, config.content_dim), np.float32)),
        "STYLE must hold": dict(style=np.zeros(5, np.float32)),
        "NaN": dict(mu=np.full((20, config.content_dim), np.nan, np.float32)),
        "NOISE_SEED": dict(noise_seed=-1),
    }
    for needle, change in cases.items():
        req = make(0, 20, 5, config, results)
        for k, v in change.items():
            setattr(req, k, v)
        with pytest.raises(InputError, match=needle):
            sched.submit(req)
    assert sched.stats.queued == 0 and not sched._queue


def test_a_failure_nobody_owns_fails_the_batch_and_the_scheduler_keeps_serving(cfm, config, monkeypatch):
    results: dict = {}
    sched = DiffusionScheduler(cfm.estimator, config, max_rows=8).start()
    try:
        boom = {"left": 1}
        build = sched._build

        def flaky():
            if boom["left"]:
                boom["left"] -= 1
                raise RuntimeError("padding went wrong")
            return build()

        monkeypatch.setattr(sched, "_build", flaky)
        sched.submit(make(0, 30, 5, config, results))
        _wait(lambda: "r0" in results)
        assert "padding went wrong" in results["r0"].error
        after = make(1, 30, 5, config, results)
        sched.submit(after)
        _wait(lambda: "r1" in results)
        _close(results["r1"].mel, alone(cfm, after))
    finally:
        sched.stop()


def test_a_dying_scheduler_thread_calls_on_fatal_and_answers_everyone(cfm, config):
    results: dict = {}
    fatal = threading.Event()
    sched = DiffusionScheduler(Recorder(cfm.estimator, fatal_after=2), config, max_rows=2,
                               on_fatal=lambda exc: fatal.set()).start()
    sched.submit(make(0, 30, 5, config, results))
    sched.submit(make(1, 30, 5, config, results))  # queued behind it
    assert fatal.wait(30)
    _wait(lambda: len(results) == 2)
    assert all("stopped" in r.error for r in results.values()) and not sched.alive
    with pytest.raises(QueueFull, match="stopped"):
        sched.submit(make(2, 30, 5, config, results))


def _wait(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.01)
