"""Running one training job as several processes: the process group (`world`), and FSDP2 sharding with
sharded checkpoints (`fsdp`). The only package that imports torch.distributed for training."""

from clipforge.distributed.world import World, gather_with_grad, init_process_group

__all__ = ["World", "gather_with_grad", "init_process_group"]
