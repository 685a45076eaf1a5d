"""Shared helpers in llavatune.utils."""

import torch.distributed as dist

from llavatune.utils import finish_distributed


def test_finish_distributed_tears_down_the_process_group(tmp_path):
    # A one-rank gloo group stands in for torchrun's: the helper must leave no live group behind
    # (a live gloo group at interpreter exit can SIGABRT a rank that already finished its work).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    finish_distributed()
    assert not dist.is_initialized()
    finish_distributed()  # and is a no-op when there is none
