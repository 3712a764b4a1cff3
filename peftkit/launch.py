"""`peftkit train ... --nproc N`: the same training as N processes, started by `accelerate launch` and a shipped config.

The configs live in configs/accelerate/, one per way of spreading the work; LAUNCH_CONFIGS names which one
`--strategy` picks, on CPUs and on GPUs. This module only builds and runs the `accelerate launch` command line;
what each rank does is in peftkit.distributed.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from peftkit.errors import PeftkitError

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
# --strategy -> (config on CPUs, config on GPUs, config on GPUs for a 4-bit base).
LAUNCH_CONFIGS: dict[str, tuple[str, str, str]] = {
    "ddp": ("cpu-ddp.yaml", "ddp.yaml", "ddp.yaml"),
    "fsdp": ("fsdp-lora.yaml", "fsdp-lora.yaml", "fsdp-qlora.yaml"),
    "zero3": ("deepspeed-zero3.yaml", "deepspeed-zero3.yaml", "deepspeed-zero3.yaml"),
}
STRATEGIES = tuple(LAUNCH_CONFIGS)
# The options that only the launching process reads; the ranks get the rest of the command line unchanged.
LAUNCHER_OPTIONS = ("--nproc", "--strategy")


def pick_config(strategy: str, *, cuda: bool, quantized: bool) -> Path:
    """Return the shipped accelerate config for a strategy on this machine's devices and the method's base."""
    if strategy not in LAUNCH_CONFIGS:
        raise PeftkitError(f"--strategy {strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    on_cpu, on_gpu, on_gpu_4bit = LAUNCH_CONFIGS[strategy]
    if strategy == "zero3" and importlib.util.find_spec("deepspeed") is None:
        raise PeftkitError("--strategy zero3 needs DeepSpeed, which peftkit does not install: pip install deepspeed "
                           "(on a machine without GPUs: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)")
    return ACCELERATE_CONFIGS / ((on_gpu_4bit if quantized else on_gpu) if cuda else on_cpu)


def launch_command(nproc: int, config: Path, train_argv: list[str]) -> list[str]:
    """Return the `accelerate launch` command line that runs `peftkit <train_argv>` as nproc processes."""
    if nproc < 1:
        raise PeftkitError(f"--nproc {nproc}: give the number of processes to start (1 or more)")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(nproc), "-m", "peftkit", *train_argv]


def strip_launcher_options(argv: list[str]) -> list[str]:
    """Return argv without --nproc N and --strategy S (either as two words or KEY=VALUE), for the ranks to run."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in LAUNCHER_OPTIONS:
            skip = True
        elif not word.startswith(tuple(f"{o}=" for o in LAUNCHER_OPTIONS)):
            out.append(word)
    return out


def launch(nproc: int, strategy: str, argv: list[str], *, quantized: bool) -> None:
    """Replace this process with `accelerate launch` running the training as nproc processes (never returns).

    exec rather than a child process: Ctrl-C and kill reach accelerate's launcher directly, which passes them on
    to every rank, so the graceful stop and resume work as they do in one process.
    """
    import torch

    command = launch_command(nproc, pick_config(strategy, cuda=torch.cuda.is_available(), quantized=quantized),
                             strip_launcher_options(argv))
    print("launching:", " ".join(command[2:]), flush=True)
    os.execv(command[0], command)
