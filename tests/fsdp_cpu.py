"""Run a trainer under Accelerate's real FSDP2 code path on CPU processes (gloo): test-only.

Accelerate never selects FSDP on a CPU: launched with an FSDP config and `ACCELERATE_USE_CPU=1`, it
sets the FSDP environment (`ACCELERATE_USE_FSDP`, `FSDP_*`) but runs the processes as DDP
(`MULTI_CPU`), and the trainers say so in one line. torch's `fully_shard` itself runs on CPU with
gloo, so this wrapper switches the state to FSDP right after the `Accelerator` is built, with the
plugin the launcher's environment describes, then runs the trainer as its `__main__`:

    ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 \
        tests/fsdp_cpu.py examples/train_afm.py --output_dir ...

Nothing of it is in a trainer: the trainers run unchanged, as on GPUs.
"""

import runpy
import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__


def _init_with_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
    if self.state.mixed_precision != "no":
        plugin.set_mixed_precision(self.state.mixed_precision)
    self.state.fsdp_plugin = plugin
    # Both shared states: a later `AcceleratorState()` (each prepared optimizer makes one) copies
    # PartialState's fields over its own.
    self.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.Accelerator.__init__ = _init_with_fsdp

if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
