"""Triton kernels shared across features. Each module imports triton itself, only when used.

LLMOPT_KERNEL_PDL, "0" (default) or "1", read and checked here at import: launch llmopt's own
decode kernels (the one-row weight-only matmuls, ``quant/kernels/triton_wo.py``, and the split-K
decode attention, ``decode_attention.py``) as programmatic dependent launches (Hopper and later),
as inductor's own kernels are under LLMOPT_PDL (``engine.compile.use_pdl``). Each waits on the
device for the kernel before it (``gdc_wait``) before reading anything, and lets the next one
launch once its main loop is done. Under torch.compile they run as opaque ops launched by
Triton's own launcher, since inductor's launch of user-written kernels has no PDL option. Off by
default: measured once (7B int8 on an H200, 309.0 tok/s against 279.8 unfused,
bench/results/decode/h200_s11c), not yet next to fused projections, the default since.
"""

from llmopt.errors import env_choice

KERNEL_PDL = env_choice("LLMOPT_KERNEL_PDL", "0", ("0", "1")) == "1"
