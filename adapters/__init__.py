"""Framework adapters (Megatron, FSDP) built on tasd.managers."""
