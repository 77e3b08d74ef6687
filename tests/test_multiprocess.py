"""Two processes on this machine (jax.distributed with a localhost coordinator, gloo CPU collectives,
one CPU device each) train the tiny config together and agree with the single-process run."""

from __future__ import annotations

import socket
import subprocess

import numpy as np
import pytest
from train_fixtures import (
    REPO,
    cli_args,
    read_metrics,
    read_params,
    reference_data,
    reference_run,
    subprocess_env,
)

# Two devices vs one: the same global batches, only the reduction order differs (float32).
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    reference = reference_run(base)
    workdir = tmp_path_factory.mktemp("two_processes")
    args = cli_args(reference_data(base), workdir)
    port = _free_port()
    processes = [
        subprocess.Popen(
            [
                *args,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            env=subprocess_env(devices=1),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=400)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for i, (p, log) in enumerate(zip(processes, logs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"
    assert "Mesh {'data': 1, 'fsdp': 2}" in logs[0]
    assert "Mesh" not in logs[1]  # only process 0 logs

    one, two = read_metrics(reference), read_metrics(workdir)
    assert [r["step"] for r in two] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=RTOL)
    expected, got = read_params(reference), read_params(workdir)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "3",
        "6",
    ]
