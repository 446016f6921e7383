"""fused_lora's benchmark harness: ``python -m bench --help`` (``make bench`` runs the default sweep)."""
