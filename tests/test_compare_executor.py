"""`capsgan compare --executor local`: every arm x seed as a submitit job, then the report (submitit's local
executor runs the code path a SLURM cluster runs)."""

from __future__ import annotations

import copy
import json
import re

import pytest
from click.testing import CliRunner
from helpers import TINY_RECIPE, write_toml

from capsgan_toolkit.cli.compare import compare_command
from capsgan_toolkit.rundir.folder import RunDir

pytest.importorskip("submitit")  # the [cluster] extra; the test extra installs it

SPEC = """
title = "two tiny arms as jobs"
baseline = "a"
seeds = 1
[budget]
epochs = 2
[eval]
metrics = ["acc", "rec"]
num_images = 16
[executor]
minutes = 10
cpus = 1
[[arms]]
label = "a"
recipe = "tiny.toml"
[[arms]]
label = "b"
recipe = "tiny.toml"
set = ["encoder.channels=12"]
"""


def test_local_executor_runs_every_arm_as_a_job_and_writes_the_report(tmp_path):
    write_toml(tmp_path / "tiny.toml", copy.deepcopy(TINY_RECIPE))
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC, encoding="utf-8")
    out = tmp_path / "cmp"
    result = CliRunner().invoke(compare_command, [str(spec), "--out", str(out), "--executor", "local"],
                                env={"COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert result.exit_code == 0, result.output + "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert re.search(r"submitted 2 job\(s\) to local .*a/seed-0 \d+, b/seed-0 \d+", " ".join(result.output.split()))
    for arm in ("a", "b"):
        run = out / "runs" / arm / "seed-0"
        assert RunDir(run).is_finished() and (run / "eval.json").is_file()
        log = (out / "logs" / f"{arm}-seed-0.log").read_text()
        assert "training done in" in log and "evaluating done in" in log  # the worker's own log, under the folder
    assert list((out / "submitit").glob("*_log.out")), "submitit's logs are kept under the comparison folder"
    report = json.loads((out / "compare.json").read_text())
    assert [a["label"] for a in report["arms"]] == ["a", "b"]
    # A plain re-run trains nothing: both runs finished and were evaluated by their jobs.
    again = CliRunner().invoke(compare_command, [str(spec), "--out", str(out), "--quiet"])
    assert again.exit_code == 0, again.output


def test_executor_refuses_options_that_place_runs_itself(tmp_path):
    write_toml(tmp_path / "tiny.toml", copy.deepcopy(TINY_RECIPE))
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC, encoding="utf-8")
    out = tmp_path / "cmp"
    result = CliRunner().invoke(compare_command, [str(spec), "--out", str(out), "--executor", "slurm", "--jobs", "2"])
    assert result.exit_code == 2 and "--jobs does not go with --executor" in result.output, result.output
    assert not out.exists()  # refused before anything was made


def test_slurm_where_there_is_no_slurm_is_one_clear_message(tmp_path):
    import shutil

    if shutil.which("srun"):
        pytest.skip("this machine has SLURM")
    write_toml(tmp_path / "tiny.toml", copy.deepcopy(TINY_RECIPE))
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC, encoding="utf-8")
    result = CliRunner().invoke(compare_command, [str(spec), "--out", str(tmp_path / "cmp"), "--executor", "slurm"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    message = " ".join(result.output.split())
    assert "--executor slurm: submitit cannot use slurm here" in message and "--executor local" in message, message
