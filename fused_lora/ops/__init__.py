"""The backends: one module per implementation of the same operation interface.

* ``backends``: which backend runs a call (``backend=``, ``FUSED_LORA_BACKEND``) and the
  module that implements it (``backend_ops``).
* ``torch_ops``: the pure-PyTorch composite; runs everywhere (the fallback).
* ``cpu_ops``: the C++ extension ``fused_lora._C`` (csrc/), for CPU tensors.
* ``triton_ops``: the Triton launchers (kernels in ``fused_lora.kernels``), for CUDA tensors
  and, under ``TRITON_INTERPRET=1``, CPU tensors.
* ``custom_ops``: the operations registered with ``torch.library``, used only while
  ``torch.compile`` traces.

Each backend module offers ``lora_shrink``, ``lora_forward``, ``lora_backward`` and
``keep_mask`` with the signatures documented in ``torch_ops``.
"""
