"""modkd_jax: modular, distillation-based continual learning in JAX/Flax.

The masked-optimizer utilities most users import::

    from modkd_jax import gated, masks
"""

from modkd_jax import losses, masks, optim
from modkd_jax.optim import apply_gated, frozen, gate_updates, gated, per_group, per_group_lr

__all__ = ["apply_gated", "frozen", "gate_updates", "gated", "losses", "masks", "optim", "per_group",
           "per_group_lr"]
__version__ = "0.1.0"
