"""Weight averaging: torch.optim.swa_utils's API, plus ``ShardedEMA`` over an optimizer's flat shards.

- ``AveragedModel``, ``SWALR``, ``update_bn`` and the ``get_*_avg_fn`` factories behave as
  ``torch.optim.swa_utils``'s (same arguments, numbers, errors and state dicts). ``SWALR`` is, like
  torch's, a ``torch.optim.lr_scheduler.LRScheduler``: it is built on ``shardoptim.sched``'s base.
- ``ShardedEMA`` averages the weights a shardoptim optimizer updates, one ``lerp_`` per flat bucket
  shard, at 1/world_size of the memory of a full copy.
"""

from .averaged_model import AveragedModel
from .averaging import get_ema_avg_fn, get_ema_multi_avg_fn, get_swa_avg_fn, get_swa_multi_avg_fn
from .batchnorm import update_bn
from .sharded import ShardedEMA
from .swalr import SWALR

__all__ = [
    "SWALR", "AveragedModel", "ShardedEMA", "get_ema_avg_fn", "get_ema_multi_avg_fn", "get_swa_avg_fn",
    "get_swa_multi_avg_fn", "update_bn",
]
