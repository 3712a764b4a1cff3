"""Multi-process runs: which rank this is, where its model lives, whether the model is sharded, and gathering it back.

Under `accelerate launch` or torchrun every rank runs the whole of `peftkit train`; only the main rank writes the
run dir. The launcher says what it started through the environment (RANK, LOCAL_RANK, WORLD_SIZE, and
ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED for sharding), so everything here reads the environment and
works before torch.distributed is initialised, which happens later, when the Trainer is built.
"""
from __future__ import annotations

import os

from peftkit.errors import PeftkitError


class LaunchError(PeftkitError):
    """The processes were started in a way that would silently train something other than what was asked."""


def is_main_process() -> bool:
    """Return False on the non-zero ranks of a torchrun / accelerate launch job (only rank 0 writes the run dir)."""
    return int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int:
    """Return this process's rank on its machine, which is also the index of its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """Return the number of processes in the job (1 outside a multi-process launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sharding() -> str | None:
    """Return "fsdp" or "zero3" when the launcher asked for a sharded model, else None (plain DDP or one process).

    ZeRO-1/2 shard only optimizer state and gradients: the model itself stays whole on every rank.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and _zero_stage() == 3:
        return "zero3"
    return None


def _zero_stage() -> int | None:
    """Return the DeepSpeed ZeRO stage from the accelerate config, or from the DeepSpeed JSON file it names."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and os.path.isfile(path):
        import json

        with open(path, encoding="utf-8") as f:
            return json.load(f).get("zero_optimization", {}).get("stage")
    return None


def trainer_device_arguments(cuda: bool) -> dict:
    """Return TrainingArguments' device settings: the GPUs, gloo over CPU processes, or DeepSpeed's own group.

    use_cpu is what makes the Trainer join CPU processes over gloo, but it also switches DeepSpeed off (accelerate
    runs DeepSpeed only when not told to use the CPU), so a DeepSpeed launch on CPUs names gloo instead.
    """
    if cuda:
        return {"use_cpu": False}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"use_cpu": False, "ddp_backend": "gloo"}
    return {"use_cpu": True}


def rank_device(cuda: bool) -> str:
    """Return the device this rank's model belongs on: its own GPU under a launcher, else the first GPU or the CPU."""
    if not cuda:
        return "cpu"
    return f"cuda:{local_rank()}" if "LOCAL_RANK" in os.environ else "cuda"


def check_launch() -> None:
    """Raise when `accelerate launch --cpu --num_processes N` started one process instead of N.

    With --cpu, accelerate always uses its single-process launcher and starts several processes only through
    mpirun (--mpirun_hostfile): it sets MASTER_ADDR for the N it was asked for but no rank or world size, so the
    one process would train alone on all the data while the user believes N share it.
    """
    launched_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"true", "1"}
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if launched_cpu and "MASTER_ADDR" in os.environ and not any(name in os.environ for name in sizes):
        raise LaunchError(
            "`accelerate launch --cpu` started one process, not the --num_processes asked for: with --cpu, accelerate "
            "starts several processes only through mpirun (--mpirun_hostfile). Start N CPU processes with "
            "`peftkit train CONFIG --nproc N`, or `accelerate launch --config_file configs/accelerate/cpu-ddp.yaml "
            "--num_processes N -m peftkit train CONFIG` (drop --cpu)")


def allow_fsdp_on_cpu() -> None:
    """Let accelerate shard with FSDP over CPU processes (gloo), as it does over GPUs.

    accelerate picks FSDP only for accelerator process groups: on CPU it silently trains plain DDP instead, although
    torch's FSDP2 runs over gloo. Relabelling the CPU process group as a multi-device one, before accelerate decides,
    makes `accelerate launch` with an FSDP config shard on CPU too, so the sharded code paths (fully_shard,
    distributed checkpoints, gathering the adapter) are tested on machines without a GPU. Does nothing on GPUs.
    """
    import torch

    if sharding() != "fsdp" or world_size() < 2 or torch.cuda.is_available():
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if getattr(PartialState.__init__, "_peftkit_cpu_fsdp", False):
        return
    original = PartialState.__init__

    def init(self, cpu: bool = False, **kwargs):
        original(self, cpu, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.MULTI_GPU  # AcceleratorState then turns it into FSDP

    init._peftkit_cpu_fsdp = True
    PartialState.__init__ = init


def gather_adapter_state(trainer) -> dict | None:
    """Return the trained weights as whole tensors when the model is sharded (FSDP, ZeRO-3), else None.

    Every rank must call it (the gather is a collective). Only the trainable tensors are gathered under FSDP2: for
    an adapter that is megabytes, where gathering the whole state dict would copy the base model onto the CPU.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "fsdp_version", 1) == 2:
        from torch.distributed.tensor import DTensor

        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
                for name, p in trainer.model.named_parameters() if p.requires_grad}
    if plugin is not None or (trainer.is_deepspeed_enabled and sharding() == "zero3"):
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)  # FSDP1 and ZeRO-3 gather it their way
    return None
