"""Multi-process training: the same `peftkit train` as 2 CPU processes over gloo, under torchrun and accelerate launch.

DDP and FSDP each train, write one run dir, resume after a kill, and give the adapter a single process gives with
the same global batch and seed. The match holds to float rounding: one process sums the batch's gradients in one
order, two processes each sum half and all-reduce. Measured on a 2-core CPU (fp32, 6 steps, weights up to 0.13):
largest difference 1.1e-6 for DDP and FSDP, LoRA and QLoRA alike; the tests allow ATOL below. Dropout is off for
the match, because each process draws its own dropout masks (the resume tests keep it on: each rank's RNG is restored).
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import distributed
from peftkit.launch import launch_command, pick_config, strip_launcher_options
from peftkit.models import quant_storage
from peftkit.presets import generic_presets

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5
"""Largest difference allowed between the 2-process and the 1-process adapter (measured: 1.1e-6)."""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not a peftkit dependency; with `DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed` "
           "these run on CPUs too")


def _sets(tiny_overrides, run: Path, *extra: str) -> list[str]:
    sets = tiny_overrides + ["data.packing=false", f"train.output_dir={run}", "train.max_steps=6",
                             "train.save_steps=2", "train.report_to=[]", *extra]
    return ["train", "configs/demo/fernhill.yaml", *sum([["--set", s] for s in sets], [])]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env={**ENV, **kwargs.pop("env", {})}, capture_output=True, text=True,
                          timeout=300, **kwargs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _assert_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"largest difference between the adapters: {worst:.3g}")  # shown with pytest -s: the figure in the docs
    assert worst <= ATOL, f"adapters differ by up to {worst:.3g} (allowed {ATOL})"


def _assert_one_run_dir(run: Path, done: subprocess.CompletedProcess) -> None:
    assert done.stdout.count("adapter: ") == 1  # only rank 0 reports and writes
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
    assert not [p for p in run.rglob(".*") if p.name.startswith((".staging", ".adapter", ".deleting"))]


# ---------------------------------------------------------------- fast: what each rank and the launcher decide

def test_each_rank_loads_onto_its_own_gpu_and_shards_store_4bit_in_the_compute_dtype(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.rank_device(cuda=True) == "cuda" and distributed.rank_device(cuda=False) == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.rank_device(cuda=True) == "cuda:3"
    assert quant_storage(torch.bfloat16, None) == torch.uint8
    assert quant_storage(torch.bfloat16, "fsdp") == torch.bfloat16 == quant_storage(torch.bfloat16, "zero3")


def test_sharding_is_read_from_what_accelerate_launch_sets(monkeypatch, tmp_path):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                 "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.sharding() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.sharding() == "fsdp"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert distributed.sharding() is None  # ZeRO-2 keeps the whole model on every rank
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    assert distributed.sharding() == "zero3"


def test_nproc_launches_the_shipped_config_for_the_strategy():
    assert pick_config("ddp", cuda=False, quantized=False).name == "cpu-ddp.yaml"
    assert pick_config("ddp", cuda=True, quantized=True).name == "ddp.yaml"
    assert pick_config("fsdp", cuda=True, quantized=False).name == "fsdp-lora.yaml"
    assert pick_config("fsdp", cuda=True, quantized=True).name == "fsdp-qlora.yaml"
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(Exception, match="--strategy zero3 needs DeepSpeed, which peftkit does not install"):
            pick_config("zero3", cuda=True, quantized=True)
    else:
        assert pick_config("zero3", cuda=False, quantized=True).name == "deepspeed-zero3.yaml"
    for name in ("cpu-ddp", "ddp", "fsdp-lora", "fsdp-qlora", "deepspeed-zero3"):
        assert (REPO / "configs" / "accelerate" / f"{name}.yaml").is_file()
    assert "accelerate" not in generic_presets()  # launch configs are no model's presets
    argv = strip_launcher_options(["train", "c.yaml", "--nproc", "2", "--set", "a=1", "--strategy=fsdp", "--resume"])
    assert argv == ["train", "c.yaml", "--set", "a=1", "--resume"]
    cmd = launch_command(2, REPO / "configs/accelerate/cpu-ddp.yaml", argv)
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/cpu-ddp.yaml"),
                       "--num_processes", "2", "-m", "peftkit", "train", "c.yaml", "--set", "a=1", "--resume"]


# ---------------------------------------------------------------- slow: real 2-process runs

@pytest.mark.slow
def test_torchrun_two_processes_share_checkpoints_and_write_one_adapter(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    done = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "peftkit",
                 *_sets(tiny_overrides, run)])
    _assert_one_run_dir(run, done)
    ckpt = run / "checkpoints" / "checkpoint-6"
    # Each rank saved its own RNG state into the one (complete) checkpoint.
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    assert (ckpt / "peftkit-complete.json").is_file()


@pytest.mark.slow
def test_two_processes_search_the_learning_rate_and_train_at_one_rate(tiny_overrides, tmp_path):
    # Each rank runs the range test on the same rows; rank 0's choice is broadcast so no rank steps at another rate.
    run = tmp_path / "run"
    done = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "peftkit",
                 *_sets(tiny_overrides, run, "train.learning_rate=auto")])
    _assert_one_run_dir(run, done)
    assert done.stdout.count("learning rate: auto -> ") == 1  # printed and plotted by rank 0 alone
    metrics = json.loads((run / "metrics.json").read_text())
    low, high = metrics["learning_rate_search"]["low"], metrics["learning_rate_search"]["high"]
    assert low <= metrics["learning_rate"] <= high and (run / "lr_search.png").is_file()


@pytest.mark.slow
def test_accelerate_launch_cpu_flag_refuses_to_train_one_process_instead_of_two(tiny_overrides, tmp_path):
    # accelerate's --cpu always takes its one-process launcher (several only through mpirun): say so, do not train.
    done = subprocess.run([*LAUNCH, "--cpu", "--num_processes", "2", "-m", "peftkit",
                           *_sets(tiny_overrides, tmp_path / "run")], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "started one process, not the --num_processes asked for" in done.stderr and "--nproc N" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy,method", [("ddp", "lora"), ("fsdp", "lora"), ("fsdp", "qlora"),
                                             pytest.param("zero3", "lora", marks=needs_deepspeed),
                                             pytest.param("zero3", "qlora", marks=needs_deepspeed)])
def test_two_processes_write_one_run_and_match_one_process(strategy, method, tiny_overrides, tmp_path):
    """2 processes x batch 2 against 1 process x batch 4: same examples per step, same seed, one set of outputs."""
    same = ["method.dropout=0", f"method.name={method}"]
    single = tmp_path / "single"
    _run([sys.executable, "-m", "peftkit", *_sets(tiny_overrides, single, *same)])
    run, registry = tmp_path / "run", tmp_path / "registry"
    ranks = _sets(tiny_overrides, run, *same, "train.batch_size=2", "registry.register=true",
                  f"registry.path={registry}")
    if strategy == "ddp":  # accelerate launch with the shipped config, as a user would type it
        done = _run([*LAUNCH, "--config_file", "configs/accelerate/cpu-ddp.yaml", "--num_processes", "2", "-m",
                     "peftkit", *ranks])
    else:  # the --nproc shortcut, which picks configs/accelerate/fsdp-*.yaml
        done = _run([sys.executable, "-m", "peftkit", *ranks, "--nproc", "2", "--strategy", strategy])
    _assert_one_run_dir(run, done)
    assert done.stdout.count("registered: ") == 1
    from peftkit.registry import Registry

    assert len(Registry(registry).list()) == 1
    ckpt = run / "checkpoints" / "checkpoint-6"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    if strategy == "fsdp":  # a sharded checkpoint: one file per rank, each holding its half of the adapter
        assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    if strategy == "zero3":  # DeepSpeed's partitioned states, one per rank
        assert len(list((ckpt / "global_step6").glob("zero_pp_rank_*_model_states.pt"))) == 2
    _assert_close(_adapter(run), _adapter(single))


_STRAIGHT: dict[str, Path] = {}
"""The uninterrupted 2-process run of each strategy, trained once and shared by the resume tests."""


def _ranks_command(strategy: str, tiny_overrides, run: Path) -> list[str]:
    return [sys.executable, "-m", "peftkit", *_sets(tiny_overrides, run, "train.batch_size=2"),
            "--nproc", "2", "--strategy", strategy]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,how", [("ddp", "SIGKILL"), ("fsdp", "SIGKILL"), ("fsdp", "SIGTERM"),
                                          pytest.param("zero3", "SIGKILL", marks=needs_deepspeed)])
def test_two_processes_resume_after_a_kill_and_match_the_uninterrupted_run(strategy, how, tiny_overrides, tmp_path):
    """SIGKILL: the launcher and both ranks die while checkpoint-4 is written (a lost machine); resume from 2.
    SIGTERM to the launcher (a scheduler's stop): it passes the signal to the ranks, which save a checkpoint and stop."""
    import psutil

    if strategy not in _STRAIGHT:
        _run(_ranks_command(strategy, tiny_overrides, tmp_path / "straight"))
        _STRAIGHT[strategy] = tmp_path / "straight"

    run = tmp_path / "run"
    # The save pause holds the main process before it stamps a checkpoint complete: a window to kill in mid-save.
    env = {**ENV, "PEFTKIT_FAULT_SAVE_PAUSE": "1.5"} if how == "SIGKILL" else ENV
    launcher = subprocess.Popen(_ranks_command(strategy, tiny_overrides, run), cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for = run / "checkpoints" / (".staging-4" if how == "SIGKILL" else "checkpoint-2")
    deadline, ranks = time.time() + 120, []
    try:
        while time.time() < deadline and launcher.poll() is None and not wait_for.exists():
            time.sleep(0.05)
        assert launcher.poll() is None, "training ended before the kill"
        ranks = psutil.Process(launcher.pid).children(recursive=True)  # torchrun starts each rank in its own session
        assert len([p for p in ranks if "peftkit" in " ".join(p.cmdline())]) == 2
    finally:
        if how == "SIGKILL":
            for proc in [launcher, *ranks]:
                proc.send_signal(signal.SIGKILL)
        else:
            launcher.send_signal(signal.SIGTERM)
        output = launcher.communicate(timeout=120)[0]
    psutil.wait_procs(ranks, timeout=60)
    state = json.loads((run / "run.json").read_text())
    if how == "SIGKILL":
        assert not (run / "checkpoints" / "checkpoint-4").exists() and state["status"] == "running"
        stopped_at = 2
    else:  # every rank stopped at the same step and the main process recorded it
        assert output.count("SIGTERM received") == 2, output[-3000:]
        assert state["status"] == "interrupted"
        stopped_at = state["step"]
        assert (run / "checkpoints" / f"checkpoint-{stopped_at}" / "peftkit-complete.json").is_file()

    done = _run(_ranks_command(strategy, tiny_overrides, run) + ["--resume"])
    _assert_one_run_dir(run, done)
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == stopped_at
    _assert_close(_adapter(run), _adapter(_STRAIGHT[strategy]))


@pytest.mark.slow
def test_fsdp_shards_the_4bit_base_across_processes(tiny_model_dir, tmp_path):
    """With the quant storage in the compute dtype, FSDP cuts every 4-bit weight in half; uint8 would stay whole."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"""
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from peftkit.distributed import allow_fsdp_on_cpu
from peftkit.models import load_base
allow_fsdp_on_cpu()
model = get_peft_model(load_base({str(tiny_model_dir)!r}, dtype="fp32", quantize_4bit=True),
                       LoraConfig(r=4, target_modules=["q_proj"]))
accelerator = Accelerator(cpu=True)
model, _ = accelerator.prepare(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
weight = model.get_parameter("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
with open({str(tmp_path)!r} + f"/rank{{accelerator.process_index}}.txt", "w") as f:
    f.write(f"{{accelerator.distributed_type}} {{tuple(weight.shape)}} {{tuple(weight.to_local().shape)}}")
""")
    _run([*LAUNCH, "--config_file", "configs/accelerate/fsdp-qlora.yaml", "--num_processes", "2", str(probe)],
         env={"PYTHONPATH": str(REPO)})  # the script runs from tmp_path: import this checkout's peftkit
    # 64x64 4-bit values packed into fp32 words: 512 words, 256 on each rank.
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "DistributedType.FSDP (512, 1) (256, 1)"


@pytest.mark.slow
def test_the_gpu_fsdp_benchmark_runs_its_whole_path_on_two_cpu_processes(tmp_path):
    """`python -m peftkit.bench.gpu_fsdp --size tiny`: the GPU script's code, sharded over gloo; speed is not asserted."""
    out = tmp_path / "gpu_fsdp.json"
    _run([sys.executable, "-m", "peftkit.bench.gpu_fsdp", "--size", "tiny", "--steps", "2", "--warmup", "1",
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["lora", "qlora"]
    for r in report["results"]:
        assert r["status"] == "ok" and r["processes"] == 2 and r["distributed_type"] == "DistributedType.FSDP"
        assert r["tokens_per_second"] > 0 and r["trainable_parameters"] == 32768  # r=16 on every linear of 2 layers
        assert r["peak_allocated_gib_per_gpu"] == "n/a on CPU"
