"""The compute-requirements calculator: ``python -m fused_lora.memory`` (or ``fused-lora-memory``).

* ``calculator``: parameter counts and memory of full fine-tuning against LoRA, and the
  command line (``main``);
* ``parameters``: ``count_parameters`` and PEFT's ``print_trainable_parameters`` line;
* ``configs/``: offline transformers configs of a few well-known models.

Importing it does not import torch (``--params`` and ``--shape`` need neither torch nor
transformers).
"""

from .calculator import (ADAM_BYTES_PER_PARAMETER, ADAPTER_BYTES_PER_PARAMETER, BYTES_PER_PARAMETER,  # noqa: F401
                         CONFIG_DIR, GB, GIB, KNOWN_CONFIGS, NF4_BYTES_PER_PARAMETER, MemoryEstimate,
                         bnb_4bit_bytes, count_lora_parameters, quantized_4bit_bytes,
                         count_model_parameters, format_bytes, full_finetuning_memory, known_config,
                         linear_layer_names, load_config, lora_finetuning_memory, lora_parameter_count, main,
                         model_from_config, percent_fewer, report, weight_bytes)
