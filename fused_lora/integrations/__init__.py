"""Working with other libraries' models and files.

* ``peft``: ``from_peft`` (PEFT models onto the fused op, PEFT's modules kept) and
  ``apply_lora`` (LoRA added to a plain model), and the target-name matching both share.
* ``adapters``: ``save_adapter`` / ``load_adapter`` in PEFT's on-disk format
  (``adapter_config.json`` + ``adapter_model.safetensors``).
"""
