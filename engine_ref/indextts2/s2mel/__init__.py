"""IndexTTS2 s2mel: semantic tokens + GPT latents -> 80-band mel via a DiT flow-matching model (s2mel.pth)."""

from engine_ref.indextts2.s2mel.cfm import CFM, euler_schedule, euler_step, guided_velocity, prompt_inputs
from engine_ref.indextts2.s2mel.config import S2MelConfig, parse_s2mel_config
from engine_ref.indextts2.s2mel.dit import DiT
from engine_ref.indextts2.s2mel.layout import random_s2mel_net, s2mel_fixed_buffers, s2mel_layout
from engine_ref.indextts2.s2mel.length_regulator import LengthRegulator
from engine_ref.indextts2.s2mel.load import load_s2mel, load_s2mel_state
from engine_ref.indextts2.s2mel.model import S2Mel, target_mel_frames

__all__ = [
    "CFM", "DiT", "LengthRegulator", "S2Mel", "S2MelConfig", "euler_schedule", "euler_step", "guided_velocity",
    "load_s2mel", "load_s2mel_state", "parse_s2mel_config", "prompt_inputs", "random_s2mel_net",
    "s2mel_fixed_buffers", "s2mel_layout", "target_mel_frames",
]
