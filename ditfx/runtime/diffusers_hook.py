"""ditfx's stateful hook in a diffusers model's hook registry: how a pipeline tells ditfx what it is doing.

Diffusers pipelines reset the stateful hooks of their components at the end of every ``__call__``
(``maybe_free_model_hooks`` -> ``_reset_stateful_cache``), and name each denoiser call with
``transformer.cache_context(name)``, which hands a ``CacheContext`` to every ``StateManager`` of every stateful
hook. The hook changes nothing in the forward (its pre/post hooks are the identity, so Dynamo traces through
them); its ``StateManager`` relays the context name and its ``reset_state`` ends the generation.
"""
from __future__ import annotations

import weakref

import torch.nn as nn

HOOK_NAME = "ditfx_lifecycle"


def install(module: nn.Module, lifecycle) -> bool:
    """Register the hook on ``module`` (a diffusers ``CacheMixin`` model); False where there is no registry."""
    try:
        from diffusers.hooks import HookRegistry, ModelHook
        from diffusers.hooks.hooks import StateManager
    except ImportError:
        return False
    if not hasattr(module, "cache_context") or not hasattr(module, "_reset_stateful_cache"):
        return False
    ref = weakref.ref(lifecycle)  # the model must not keep ditfx's runtime alive

    class _ContextRelay(StateManager):
        def __init__(self):
            super().__init__(dict)

        def set_context(self, context) -> None:
            super().set_context(context)
            if (lc := ref()) is not None:
                lc.set_context(getattr(context, "name", None) if context is not None else None)

    class LifecycleHook(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.relay = _ContextRelay()

        def reset_state(self, module):
            if (lc := ref()) is not None:
                lc.end_generation()
            self.relay.reset()
            return module

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name, hook in list(registry.hooks.items()):  # hooks of optimized models that are gone
        if name.startswith(HOOK_NAME) and getattr(hook, "lifecycle", lambda: None)() is None:
            registry.remove_hook(name, recurse=False)
    hook = LifecycleHook()
    hook.lifecycle = ref
    # one hook per optimized model: several ditfx.optimize() of one module each keep their signals
    registry.register_hook(hook, f"{HOOK_NAME}_{id(lifecycle):x}")
    return True
