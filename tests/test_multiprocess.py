"""Two processes on this machine (jax.distributed with a localhost coordinator, gloo CPU collectives,
one CPU device each) train the tiny config together and agree with the single-process run; process 0
reconverts stale data while process 1 waits for it; a failure on process 0 stops both."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

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
    tiny_config,
)

# Two devices vs one: the same global batches, only the reduction order differs (float32).
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two(command: list[str], timeout: float = 400) -> list[tuple[int, str, str]]:
    """Runs `command` + the flags of process i of 2 (localhost coordinator); (rc, stdout, stderr)
    of each, both always reaped (a hang fails the test instead of blocking it)."""
    port = _free_port()
    processes = [
        subprocess.Popen(
            [
                *command,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            env=subprocess_env(devices=1),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            p.kill()
    return [(p.returncode, *out) for p, out in zip(processes, outputs, strict=True)]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    reference = reference_run(base)
    workdir = tmp_path_factory.mktemp("two_processes")
    args = cli_args(reference_data(base), workdir)
    results = _run_two(args)
    logs = [stderr for _, _, stderr in results]
    for i, (returncode, _, log) in enumerate(results):
        assert returncode == 0, f"process {i}:\n{log[-4000:]}"
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


@pytest.mark.slow
def test_two_processes_reconvert_stale_data_then_train_on_it(tmp_path_factory):
    """JSONL converted with another prefix: process 0 reconverts while process 1 waits at the same
    barrier; both train on the new JSONL (their losses are the single-process run's on it)."""
    from paligemma_seg.data import prepare, synthetic
    from paligemma_seg.train import loop as train_loop

    root = tmp_path_factory.mktemp("stale_data")
    synthetic.generate(root / "syn", num_images=20, size=32, seed=0)
    data = {
        "data.images": str(root / "syn" / "images"),
        "data.masks": str(root / "syn" / "masks"),
        "data.splits.train": str(root / "syn" / "train_images.txt"),
        "data.splits.test": str(root / "syn" / "test_images.txt"),
        "codec.vqvae": str(REPO / "checkpoints" / "vqvae_small.npz"),
    }
    jsonl = root / "jsonl"
    stale = tiny_config(jsonl, **data, **{"data.prefix": "segment lake"})
    prepare.prepare_data(stale, ("train",))
    old_rows = [json.loads(line) for line in (jsonl / "train.jsonl").read_text().splitlines()]
    assert {r["prefix"] for r in old_rows} == {"segment lake"}

    workdir = root / "two_processes"  # the default prefix, "segment water": stale data
    results = _run_two(cli_args(jsonl, workdir, **data))
    for i, (code, _, log) in enumerate(results):
        assert code == 0, f"process {i}:\n{log[-4000:]}"
    assert "Reconverting" in results[0][2] and "settings changed: prefix" in results[0][2]
    rows = [json.loads(line) for line in (jsonl / "train.jsonl").read_text().splitlines()]
    assert {r["prefix"] for r in rows} == {"segment water"} and len(rows) == len(old_rows)
    report = json.loads((jsonl / "report.json").read_text())
    assert report["settings"]["prefix"] == "segment water"

    one = root / "one_process"  # the same data, now current: no reconversion
    train_loop.run(tiny_config(jsonl, **data), str(one))
    assert (jsonl / "train.jsonl").read_text().splitlines() == [json.dumps(r) for r in rows]
    two = read_metrics(workdir)
    assert [r["step"] for r in two] == list(range(1, 7))
    reference = [r["loss"] for r in read_metrics(one)]
    np.testing.assert_allclose([r["loss"] for r in two], reference, rtol=RTOL)


FAILING_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
from paligemma_seg import cli
flag = dict(arg[2:].split("=", 1) for arg in sys.argv[2:])
cli.start_up(coordinator_address=flag["coordinator_address"],
             num_processes=int(flag["num_processes"]), process_id=int(flag["process_id"]))
import train_fixtures
from paligemma_seg.data import prepare
root, results = sys.argv[1], {}
for stage, extra in {"deciding": {"codec.vqvae": root + "/missing.npz"},
                     "writing": {"data.images": root + "/missing"}}.items():
    cfg = train_fixtures.tiny_config(root + "/jsonl_" + stage, **extra)
    try:
        prepare.prepare_data(cfg, ("train",))
        results[stage] = ["ok", ""]
    except Exception as error:
        results[stage] = [type(error).__name__, str(error)]
print(json.dumps(results))
"""


@pytest.mark.slow
def test_a_failure_on_process_0_stops_both_processes(tmp_path):
    """Process 0 fails while deciding (no VQ-VAE) and while writing (no images): it raises its own
    error, process 1 raises too (a broadcast failure code) instead of waiting forever."""
    results = _run_two([sys.executable, "-c", FAILING_SCRIPT, str(tmp_path)], timeout=180)
    for i, (code, out, log) in enumerate(results):
        assert code == 0 and out.strip(), f"process {i}:\n{log[-4000:]}"
    first, second = (json.loads(out.strip().splitlines()[-1]) for _, out, _ in results)
    assert first["deciding"][0] == "ValueError" and "missing.npz" in first["deciding"][1]
    assert first["writing"][0] == "ValueError" and "data.images folder" in first["writing"][1]
    for stage in ("deciding", "writing"):
        assert second[stage][0] == "RuntimeError", second
        assert "process 0 failed to prepare" in second[stage][1]
