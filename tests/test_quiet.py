"""Nothing a user did not ask for warns: importing what a LoRA run imports prints nothing."""
import subprocess
import sys


def test_importing_a_lora_runs_modules_prints_no_library_warning():
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "import peftkit.train, peftkit.methods.lora, bitsandbytes, peft\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "kernels-community" not in run.stderr and "Failed to load" not in run.stderr, run.stderr
