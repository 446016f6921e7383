"""The Triton kernels (``@triton.jit`` code and their config helpers only), installed as
``fused_lora.kernels``; the launchers that call them are in ``fused_lora/ops/triton_ops/``.

* ``lora_shrink``: xa = D(x) A^T, with the dropout mask made in registers (step 1);
* ``lora_fwd``: y = x W0^T + b + s xa B^T, pointer and persistent TMA kernels (step 2);
* ``lora_bwd``: the dy pass (dxa, dB partials), dx = dy W0 + s D(dxa A), dA partials and
  the fixed-order partial sums (steps 3-5);
* ``dropout_mask``: the Philox keep mask and the packed keep bits;
* ``dequant_4bit``: a bitsandbytes 4-bit weight (NF4 / FP4, double-quantized or not) into a
  dense buffer, bit for bit as bitsandbytes' CUDA kernel;
* ``lora_fwd_4bit``: step 2 on a 4-bit base with W dequantized tile by tile inside the GEMM
  (optional, short inputs; not a default);
* ``common``: tile ordering, scalars, accumulators and the GEMM configs.
"""
