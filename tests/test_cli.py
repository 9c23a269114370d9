"""The ``fusedres`` command: check, bench, train and its user errors.

Most runs call ``main()`` in this process (the interpreter is already on without a GPU, see
conftest.py); the self-check and the user errors run ``python -m fusedres`` in a subprocess, as
a user or CI would, the self-check without ``TRITON_INTERPRET`` so that it re-runs itself
under the interpreter.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEVICE

from fusedres.cli import main

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^train: (\d+) steps, ([\d.]+|nan) images/s \((.*)\), final loss ([\d.]+)$", re.M)
# Sizes the interpreter runs in seconds: 3 basic blocks on 8x8 images, batches of 4.
TINY = ["--depth", "8", "--block", "basic", "--image-size", "8", "--batch-size", "4", "--synthetic-size", "16",
        "--device", DEVICE.type]


def _cli(*args: str, interpret: bool | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "fusedres", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _summary(out: str) -> tuple[int, float, float]:
    m = SUMMARY.search(out)
    assert m, f"no summary line in:\n{out}"
    return int(m.group(1)), float(m.group(2)), float(m.group(4))


def test_check_prints_op_and_block_tables():
    """``check --quick`` (one op case, the identity block of each kind, every dtype), re-run under the
    interpreter as a user's would be; the whole ``check`` is README command 1's main job (and CI's)."""
    r = _cli("check", "--quick")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "bn_relu_conv2d case" in out and "all checks passed" in out
    for block in ("PreActBasicBlock", "PreActBottleneck"):
        for dtype in ("float32", "bfloat16", "float16"):
            rows = [line for line in out.splitlines() if line.startswith(block) and f" {dtype} " in line]
            assert rows and all(line.rstrip().endswith("ok") for line in rows), out
    assert "FAIL" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures on a GPU instead")
def test_bench_without_gpu_says_so(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out and "nothing measured" in out


@pytest.mark.parametrize("impl", ["--fused", "--eager"])
def test_train_two_synthetic_steps(capsys, impl):
    assert main(["train", impl, "--steps", "2", *TINY]) == 0
    out, err = capsys.readouterr()
    steps, images_per_s, loss = _summary(out)
    assert steps == 2 and images_per_s > 0 and np.isfinite(loss)
    assert ("fused" if impl == "--fused" else "eager") in out.splitlines()[0]
    assert "step 2/2" in err  # the progress bar


def test_train_eager_amp_channels_last(capsys):
    assert main(["train", "--eager", "--amp", "--channels-last", "--steps", "2", *TINY]) == 0
    out = capsys.readouterr().out
    assert "bf16 autocast, channels_last" in out
    assert _summary(out)[0] == 2


def test_train_fused_amp_channels_last(capsys):
    assert main(["train", "--fused", "--amp", "--channels-last", "--steps", "2", *TINY]) == 0
    out = capsys.readouterr().out
    assert "fused" in out and "bf16 autocast, channels_last" in out
    assert _summary(out)[0] == 2


def test_checkpoint_resume_continues_the_same_run(capsys, tmp_path):
    """2 steps, then a resume for the other 2, end where 4 steps in one go end (eager: bitwise on CPU)."""
    common = ["train", "--eager", "--epochs", "2", "--synthetic-size", "8", *TINY[:-4], "--device", DEVICE.type]
    straight, part = tmp_path / "straight.pt", tmp_path / "part.pt"
    assert main([*common, "--checkpoint", str(straight)]) == 0
    assert main([*common, "--steps", "2", "--checkpoint", str(part)]) == 0
    assert torch.load(part, weights_only=True)["step"] == 2
    capsys.readouterr()
    assert main([*common, "--resume", str(part), "--checkpoint", str(part)]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {part} at step 2" in out
    assert _summary(out)[0] == 2
    a, b = torch.load(straight, weights_only=True), torch.load(part, weights_only=True)
    assert a["step"] == b["step"] == 4 and a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        exact = {"rtol": 0, "atol": 0} if DEVICE.type == "cpu" else {}  # cuDNN gradients may use atomics
        torch.testing.assert_close(b["model"][k], v, **exact, msg=k)


def _write_batch(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"fake", b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
    with open(path, "wb") as f:
        pickle.dump(batch, f)


@pytest.mark.parametrize("nested", [True, False], ids=["PATH/cifar-10-batches-py", "PATH"])
def test_train_on_a_cifar_directory(capsys, tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    folder.mkdir(exist_ok=True)
    _write_batch(folder / "data_batch_1", 6, 1)
    _write_batch(folder / "data_batch_2", 6, 2)
    _write_batch(folder / "test_batch", 5, 3)
    assert main(["train", "--eager", "--data", str(tmp_path), "--depth", "8", "--batch-size", "4", "--steps", "1",
                 "--device", DEVICE.type]) == 0
    out = capsys.readouterr().out
    assert "CIFAR-10" in out and "(2 training batches)" in out
    assert "test accuracy" in out
    assert _summary(out)[0] == 1


ERRORS = [
    (["--data", "/nonexistent/cifar"], "--data /nonexistent/cifar: no such directory"),
    (["--depth", "7"], "basic-block depth must be 6n+2"),
    (["--depth", "12", "--block", "bottleneck"], "bottleneck depth must be 9n+2"),
    (["--resume", "/nonexistent/run.pt"], "--resume /nonexistent/run.pt: no such file"),
    pytest.param(["--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
]


@pytest.mark.parametrize("args,message", ERRORS, ids=["data", "depth", "bottleneck-depth", "resume", "cuda"])
def test_bad_arguments_end_in_one_line(args, message):
    r = _cli("train", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusedres: error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_data_directory_in_process(capsys, tmp_path):
    (tmp_path / "readme.txt").write_text("not CIFAR")
    assert main(["train", "--eager", "--data", str(tmp_path)]) == 2
    assert "no CIFAR-10 batches" in capsys.readouterr().err


def test_inspect_fusable_model(capsys):
    assert main(["inspect", "torchvision:resnet18"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9 and all(" BasicBlock  fused -> fusedres.BasicBlock" in line for line in lines[:8])
    assert lines[-1] == "torchvision:resnet18: 8 of 8 residual blocks fused"


def test_inspect_partly_fusable_model(capsys):
    assert main(["inspect", "timm:resnetaa50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    left = [line.split()[0] for line in lines if "not fused: aa is AvgPool2d" in line]
    assert left == ["layer2.0", "layer3.0", "layer4.0"]
    assert lines[-1] == "timm:resnetaa50: 13 of 16 residual blocks fused, 3 left as they are"


def test_inspect_markdown_row(capsys):
    assert main(["inspect", "--markdown", "torchvision:resnext50_32x4d"]) == 0
    assert capsys.readouterr().out == ("| torchvision:resnext50_32x4d | 0 / 16 | conv2 has groups=32 "
                                       "(the fused kernels take groups=1) |\n")


def test_inspect_bad_name_ends_in_one_line():
    r = _cli("inspect", "timm:no_such_net")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr == "fusedres: error: timm:no_such_net: not a timm model\n" and not r.stdout


@pytest.mark.parametrize("name,message", [("torchvision:fasterrcnn_resnet50_fpn", "not a torchvision classification"),
                                          ("resnet50", "expected SOURCE:NAME")])
def test_inspect_bad_names_in_process(capsys, name, message):
    # every name is built before anything is printed: no partial report before the error
    assert main(["inspect", "torchvision:resnet18", name]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith("fusedres: error: ") and message in err and len(err.splitlines()) == 1
