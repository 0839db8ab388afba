"""Triton kernels shared across features. Each module imports triton itself, only when used.

LLMOPT_KERNEL_PDL, "auto" (default), "1" or "0", checked here at import: launch llmopt's own
decode kernels (the one-row weight-only matmuls, ``quant/kernels/triton_wo.py``, and the split-K
decode attention, ``decode_attention.py``) as programmatic dependent launches (Hopper and later),
as inductor's own kernels are under LLMOPT_PDL (``engine.compile.use_pdl``). Each waits on the
device for the kernel before it (``gdc_wait``) before reading anything, and lets the next one
launch once its main loop is done. Under torch.compile they run as opaque ops launched by
Triton's own launcher, since inductor's launch of user-written kernels has no PDL option.
``KERNEL_PDL`` below is what the kernels read at each call, the setting's value for eager code
("auto": off). A compiled model's calls run with it set to that model's
``engine.compile.kernel_pdl`` (which gives the measurements behind ``auto``'s rule).
"""

from llmopt.errors import env_choice

KERNEL_PDL_CHOICES = ("auto", "1", "0")
KERNEL_PDL = env_choice("LLMOPT_KERNEL_PDL", "auto", KERNEL_PDL_CHOICES) == "1"
