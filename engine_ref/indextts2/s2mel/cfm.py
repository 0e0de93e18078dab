"""Conditional flow matching inference: Euler steps over the DiT estimator with classifier-free guidance.

Upstream (BASECFM.inference / solve_euler, index-tts 41577b8): z = randn([B, mels, T]) * temperature;
t_span = linspace(0, 1, n_steps + 1); prompt_x = prompt mel on the first T_p frames, 0 elsewhere; x = z with the
prompt frames zeroed. Each step: ONE estimator call on batch 2B, rows (x, prompt_x, style, mu) then
(x, 0, 0, 0), same t and lengths; v = (1 + cfg) * v_cond - cfg * v_uncond; x = x + dt * v; prompt frames re-zeroed.
The estimator sees t accumulated as t += dt (not t_span[k]), reproduced by `euler_schedule`. The result keeps
x[:, :, T_p:]. Defaults: 25 steps, cfg 0.7, temperature 1.

`euler_step` is one step for a padded batch of independent requests (per-row t, dt, lengths and prompt lengths):
serving batches steps of many requests into one estimator call.
"""

from __future__ import annotations

import torch
from torch import nn

from engine_ref.errors import InputError
from engine_ref.indextts2.s2mel.config import S2MelConfig
from engine_ref.indextts2.s2mel.dit import DiT, frame_mask

DEFAULT_STEPS = 25
DEFAULT_CFG_RATE = 0.7


def euler_schedule(n_steps: int = DEFAULT_STEPS, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(t [n_steps], dt [n_steps]) float32, exactly the values upstream's loop feeds the estimator and the update."""
    if n_steps < 1:
        raise InputError(f"n_steps must be at least 1, got {n_steps}", "use the default of 25 diffusion steps")
    t_span = torch.linspace(0, 1, n_steps + 1, device=device)
    t = t_span[0]
    ts, dts = [], []
    for step in range(1, n_steps + 1):
        dt = t_span[step] - t_span[step - 1]
        ts.append(t)
        dts.append(dt)
        t = t + dt
    return torch.stack(ts), torch.stack(dts)


def guided_velocity(
    estimator: nn.Module,
    x: torch.Tensor,
    prompt_x: torch.Tensor,
    x_lens: torch.Tensor,
    t: torch.Tensor,
    style: torch.Tensor,
    mu: torch.Tensor,
    cfg_rate: float = DEFAULT_CFG_RATE,
) -> torch.Tensor:
    """v for rows [B]: one estimator call on [conditioned rows ‖ unconditioned rows] (2B), combined by CFG."""
    if cfg_rate <= 0:
        return estimator(x, prompt_x, x_lens, t, style, mu)
    b = x.shape[0]
    out = estimator(
        torch.cat([x, x], dim=0),
        torch.cat([prompt_x, torch.zeros_like(prompt_x)], dim=0),
        torch.cat([x_lens, x_lens], dim=0),
        torch.cat([t, t], dim=0),
        torch.cat([style, torch.zeros_like(style)], dim=0),
        torch.cat([mu, torch.zeros_like(mu)], dim=0),
    )
    v_cond, v_uncond = out[:b], out[b:]
    return (1.0 + cfg_rate) * v_cond - cfg_rate * v_uncond


def _per_row(value: torch.Tensor | float, b: int, device: torch.device) -> torch.Tensor:
    v = torch.as_tensor(value, dtype=torch.float32, device=device)
    return v.expand(b) if v.dim() == 0 else v


def euler_step(
    estimator: nn.Module,
    x: torch.Tensor,
    prompt_x: torch.Tensor,
    x_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    t: torch.Tensor | float,
    dt: torch.Tensor | float,
    style: torch.Tensor,
    mu: torch.Tensor,
    cfg_rate: float = DEFAULT_CFG_RATE,
) -> torch.Tensor:
    """One guided Euler step for B independent rows; returns the next x [B, mels, T].

    x, prompt_x [B, mels, T]; x_lens, prompt_lens [B] int; t, dt [B] (or scalars); style [B, style_dim];
    mu [B, T, content]. Prompt frames (< prompt_lens) and padding (>= x_lens) of the result are zero.
    """
    b, _, frames = x.shape
    t = _per_row(t, b, x.device)
    dt = _per_row(dt, b, x.device)
    v = guided_velocity(estimator, x, prompt_x, x_lens, t, style, mu, cfg_rate)
    x = x + dt[:, None, None] * v
    pos = torch.arange(frames, device=x.device)
    keep = (pos[None, :] >= prompt_lens[:, None]) & frame_mask(x_lens, frames)
    return torch.where(keep[:, None, :], x, torch.zeros_like(x))


def prompt_inputs(
    z: torch.Tensor, prompt_mel: torch.Tensor, prompt_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, prompt_x): the noise with prompt frames zeroed, and the prompt mel on its frames (zeros elsewhere)."""
    b, mels, frames = z.shape
    pos = torch.arange(frames, device=z.device)
    in_prompt = (pos[None, :] < prompt_lens[:, None])[:, None, :]
    width = prompt_mel.shape[-1]
    prompt = prompt_mel if width >= frames else torch.cat([prompt_mel, prompt_mel.new_zeros(b, mels, frames - width)], dim=-1)
    prompt_x = torch.where(in_prompt, prompt[..., :frames], torch.zeros_like(z))
    return torch.where(in_prompt, torch.zeros_like(z), z), prompt_x


class CFM(nn.Module):
    """Holds the estimator (key prefix ``estimator.``) and runs the sampler."""

    def __init__(self, cfg: S2MelConfig):
        super().__init__()
        self.n_mels = cfg.DiT.in_channels
        self.content_dim = cfg.DiT.content_dim
        self.style_dim = cfg.style_encoder.dim
        self.estimator = DiT(cfg)

    def _check(self, mu: torch.Tensor, prompt_mel: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None) -> None:
        if mu.dim() != 3 or mu.shape[2] != self.content_dim:
            raise InputError(f"mu must be [B, T, {self.content_dim}], got {list(mu.shape)}", "pass prompt_condition ‖ cond along time")
        b, frames = mu.shape[0], mu.shape[1]
        if prompt_mel.dim() != 3 or prompt_mel.shape[0] != b or prompt_mel.shape[1] != self.n_mels:
            raise InputError(f"prompt mel must be [{b}, {self.n_mels}, T_p], got {list(prompt_mel.shape)}", "pass the reference mel")
        if prompt_mel.shape[2] >= frames:
            raise InputError(
                f"the prompt mel ({prompt_mel.shape[2]} frames) leaves no frame to generate in mu ({frames} frames)",
                "append the target condition after the prompt condition",
            )
        if style.shape != (b, self.style_dim):
            raise InputError(f"style must be [{b}, {self.style_dim}], got {list(style.shape)}", "pass the CAMPPlus embedding")
        if frames > self.estimator.max_frames:
            raise InputError(
                f"{frames} mel frames exceed the DiT's {self.estimator.max_frames} positions",
                "shorten the reference audio or the text segment",
            )
        if noise is not None and tuple(noise.shape) != (b, self.n_mels, frames):
            raise InputError(f"noise must be [{b}, {self.n_mels}, {frames}], got {list(noise.shape)}", "draw it with that shape")

    @torch.no_grad()
    def sample(
        self,
        mu: torch.Tensor,
        prompt_mel: torch.Tensor,
        style: torch.Tensor,
        n_steps: int = DEFAULT_STEPS,
        cfg_rate: float = DEFAULT_CFG_RATE,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """mu [B, T, content] (prompt part first), prompt_mel [B, mels, T_p], style [B, style] -> [B, mels, T - T_p].

        The noise is `noise` if given, else randn from `generator` (or torch's global RNG when None, as upstream),
        drawn on mu's device; either way it is scaled by `temperature`.
        """
        self._check(mu, prompt_mel, style, noise)
        b, frames = mu.shape[0], mu.shape[1]
        if noise is None:
            noise = torch.randn([b, self.n_mels, frames], generator=generator, device=mu.device)
        z = noise.to(device=mu.device, dtype=torch.float32) * temperature
        t_prompt = prompt_mel.shape[2]
        prompt_lens = torch.full((b,), t_prompt, dtype=torch.int64, device=mu.device)
        x_lens = torch.full((b,), frames, dtype=torch.int64, device=mu.device)
        x, prompt_x = prompt_inputs(z, prompt_mel.to(torch.float32), prompt_lens)
        ts, dts = euler_schedule(n_steps, mu.device)
        for k in range(n_steps):
            x = euler_step(self.estimator, x, prompt_x, x_lens, prompt_lens, ts[k], dts[k], style, mu, cfg_rate)
        return x[:, :, t_prompt:]
