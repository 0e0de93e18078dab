"""Triton serving: templates + builder, the Python models, server management.

Kept import-free so that the console script can read the option choices below without loading torch.
"""

#: RepoOptions.spin_threads: whose ONNX Runtime threads busy-wait between ops.
SPIN_CHOICES = ("all", "decoder", "none")
