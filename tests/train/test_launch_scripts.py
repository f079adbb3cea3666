"""The pod launch scripts, run against stand-ins for gcloud / srun / scontrol and for the training program:
the command each worker gets, the PID file, SIGTERM on stop, and SLURM's requeue after a 143 exit."""

import os
import stat
import subprocess
import time

from train_helpers import ROOT

TPU = os.path.join(ROOT, "scripts", "launch_tpu_pod.sh")
SLURM = os.path.join(ROOT, "scripts", "launch_slurm.sbatch")


def _exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", HOME=str(tmp_path / "home"), **extra)
    return env


def test_tpu_script_runs_the_same_command_on_all_workers_and_stops_it(tmp_path):
    (tmp_path / "bin").mkdir()
    home = tmp_path / "home"
    work = home / "flax-narrow" / ".venv" / "bin"
    work.mkdir(parents=True)
    # gcloud stand-in: log the arguments, then run --command here as "the one worker".
    _exe(
        tmp_path / "bin" / "gcloud",
        '#!/usr/bin/env bash\necho "$@" >> "$HOME/gcloud.args"\n'
        'while [ $# -gt 0 ]; do if [ "$1" = --command ]; then cd "$HOME"; exec bash -c "$2"; fi; shift; done\n',
    )
    # The training program stand-in: record its arguments, then wait for SIGTERM and exit 143 like the real one.
    _exe(
        work / "flax-narrow",
        '#!/usr/bin/env bash\necho "$@" > "$HOME/program.args"\n'
        "trap 'echo terminated > \"$HOME/program.exit\"; exit 143' TERM\nwhile true; do sleep 0.05; done\n",
    )
    env = _env(tmp_path, TPU_NAME="pod1", ZONE="us-central2-b", PROJECT="proj")
    out = subprocess.run(
        ["bash", TPU, "run", "--preset", "tiny", "--set", "data.files=/d/*.txt"],
        env=env,
        text=True,
        capture_output=True,
    )
    assert out.returncode == 0, out.stderr
    assert "started pid" in out.stdout
    gargs = (home / "gcloud.args").read_text()
    assert "compute tpus tpu-vm ssh pod1 --zone us-central2-b --project proj --worker=all --command" in gargs
    deadline = time.monotonic() + 10
    while not (home / "program.args").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (home / "program.args").read_text().split() == [
        "pretrain", "--distributed", "on", "--resume", "--preset", "tiny", "--set", "data.files=/d/*.txt"
    ]  # fmt: skip
    status = subprocess.run(["bash", TPU, "status"], env=env, text=True, capture_output=True)
    assert "running (pid" in status.stdout
    stop = subprocess.run(["bash", TPU, "stop"], env=env, text=True, capture_output=True)
    assert "SIGTERM sent" in stop.stdout
    while not (home / "program.exit").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (home / "program.exit").read_text().strip() == "terminated"
    bad = subprocess.run(["bash", TPU, "run"], env=_env(tmp_path), text=True, capture_output=True)
    assert bad.returncode != 0 and "set TPU_NAME" in bad.stderr


def test_slurm_script_passes_arguments_and_requeues_after_sigterm_exit(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "home").mkdir()
    _exe(tmp_path / "bin" / "srun", '#!/usr/bin/env bash\necho "$@" > "$HOME/srun.args"\nexit "${FAKE_EXIT:-0}"\n')
    _exe(tmp_path / "bin" / "scontrol", '#!/usr/bin/env bash\necho "$@" > "$HOME/scontrol.args"\n')
    slurm = dict(SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_ID="42", SLURM_NTASKS="2", SLURM_JOB_NODELIST="n[1-2]")
    args = ["bash", SLURM, "--preset", "narrowbert-base", "--output-dir", "/shared/run"]
    ok = subprocess.run(args, env=_env(tmp_path, **slurm), text=True, capture_output=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "home" / "srun.args").read_text().split() == [
        "--kill-on-bad-exit=1", ".venv/bin/flax-narrow", "pretrain", "--distributed", "on", "--resume",
        "--preset", "narrowbert-base", "--output-dir", "/shared/run",
    ]  # fmt: skip
    assert not (tmp_path / "home" / "scontrol.args").exists()
    term = subprocess.run(args, env=_env(tmp_path, FAKE_EXIT="143", **slurm), text=True, capture_output=True)
    assert term.returncode == 143 and "requeueing" in term.stdout
    assert (tmp_path / "home" / "scontrol.args").read_text().split() == ["requeue", "42"]
    text = open(SLURM).read()
    assert "#SBATCH --signal=TERM@120" in text and "#SBATCH --requeue" in text and "--ntasks-per-node=1" in text
