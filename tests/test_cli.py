"""cli.py: device choice and argument types shared by the scripts."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli

ROOT = Path(__file__).resolve().parents[1]


def test_auto_device_is_one_this_machine_has():
    assert str(cli.resolve_device("auto")) in cli.available_devices()
    assert cli.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:99"])
def test_unknown_or_absent_device_is_a_device_error_naming_what_exists(name):
    with pytest.raises(cli.DeviceError, match="cpu"):
        cli.resolve_device(name)


@pytest.mark.parametrize("size", ["27", "0", "abc"])
def test_an_odd_or_missing_size_is_refused_by_model_py_with_a_reason(size):
    result = subprocess.run([sys.executable, "model.py", "--size", size], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "even number" in result.stderr
