"""Imports the megatron-core modules that the ranks of ``tasd demo --backend megatron`` use, without
megatron-core's warnings about optional accelerations (Transformer Engine, Apex) that a CPU run
lacks. ``tasd.megatron_demo`` has the fork server that starts its ranks preload this module
(``tasd.launch.run_ranks(preload=...)``), so that each rank does not import megatron-core again."""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import megatron.core.dist_checkpointing.strategies.async_utils  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.transformer  # noqa: F401

    import tasd.adapters.megatron  # noqa: F401
    import tasd.mcore  # noqa: F401
