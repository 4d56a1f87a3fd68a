"""tpu_scripts: every script's --dry-run prints the exact gcloud commands (the README's v4-32 example)."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tpu_scripts"
V4 = ["--name", "clsvd-t5", "--zone", "us-central2-b", "--project", "my-proj"]
LOC = "--zone=us-central2-b --project=my-proj"


def dry(*args, script=None):
  cmd = ["bash", str(SCRIPTS / f"{script}.sh")] if script else [sys.executable, str(SCRIPTS / "clsvd_tpu.py")]
  proc = subprocess.run([*cmd, *args, "--dry-run"], capture_output=True, text=True, timeout=60)
  return proc


def test_v4_32_worked_example_full_run():
  proc = dry("run", *V4, "--accelerator-type", "v4-32", "--bucket", "gs://my-bucket", "--config",
             "configs/t5_large/order1.yaml", "--run-name", "t5-order1")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  ssh = "gcloud compute tpus tpu-vm ssh clsvd-t5"
  install = ("rm -rf ~/clsvd_jax && mkdir -p ~/clsvd_jax && tar -xzf ~/clsvd_jax.tar.gz -C ~/clsvd_jax && "
             "python3 -m venv ~/clsvd-venv && ~/clsvd-venv/bin/pip install -q -U pip && "
             "~/clsvd-venv/bin/pip install -q -U '\"'\"'jax[tpu]'\"'\"' && ~/clsvd-venv/bin/pip install -q -e "
             # With a bucket: the gcs extra (gcsfs), through which the runner reads and writes the gs:// run_dir.
             "~/clsvd_jax'\"'\"'[gcs]'\"'\"' && ~/clsvd-venv/bin/python -c '\"'\"'import jax, clsvd_jax; "
             "print(jax.process_index(), jax.device_count())'\"'\"'")
  # With a bucket the whole run directory (results and Orbax checkpoints, written by every host) lives there.
  train = ("set -o pipefail; ( cd ~/clsvd_jax && CLSVD_DISTRIBUTED=1 ~/clsvd-venv/bin/clsvd train "
           "configs/t5_large/order1.yaml --set run_dir=gs://my-bucket/t5-order1 ) 2>&1 | tee ~/clsvd_run.log")
  assert lines == [
      f"gcloud compute tpus tpu-vm create clsvd-t5 --accelerator-type=v4-32 --version=tpu-ubuntu2204-base {LOC}",
      f"git -C {ROOT} archive --format=tar.gz -o /tmp/clsvd_jax-clsvd-t5.tar.gz HEAD",
      f"gcloud compute tpus tpu-vm scp /tmp/clsvd_jax-clsvd-t5.tar.gz clsvd-t5:clsvd_jax.tar.gz --worker=all {LOC}",
      f"{ssh} --worker=all '--command={install}' {LOC}",
      f"{ssh} --worker=all '--command={train}' {LOC}",
      "mkdir -p results",
      "gcloud storage cp -r gs://my-bucket/t5-order1 results",
      f"gcloud compute tpus tpu-vm delete clsvd-t5 --quiet {LOC}",
  ]


@pytest.mark.parametrize("script,args,want", [
    ("create", ["--accelerator-type", "v5p-64", "--spot"],
     f"gcloud compute tpus tpu-vm create clsvd-t5 --accelerator-type=v5p-64 --version=v2-alpha-tpuv5 {LOC} --spot"),
    ("create", ["--accelerator-type", "v5litepod-32", "--version", "my-runtime"],
     f"gcloud compute tpus tpu-vm create clsvd-t5 --accelerator-type=v5litepod-32 --version=my-runtime {LOC}"),
    ("logs", ["--worker", "all"],
     f"gcloud compute tpus tpu-vm ssh clsvd-t5 --worker=all '--command=tail -n +1 -f ~/clsvd_run.log' {LOC}"),
    ("selfcheck", [],
     "gcloud compute tpus tpu-vm ssh clsvd-t5 --worker=all '--command=cd ~/clsvd_jax && CLSVD_DISTRIBUTED=1 "
     f"~/clsvd-venv/bin/python -m clsvd_jax.parallel.selfcheck --mesh data=1,fsdp=-1,tensor=1' {LOC}"),
    ("delete", [], f"gcloud compute tpus tpu-vm delete clsvd-t5 --quiet {LOC}"),
    ("status", [], f"gcloud compute tpus tpu-vm describe clsvd-t5 {LOC}"),
])
def test_each_script_dry_run(script, args, want):
  proc = dry(*V4, *args, script=script)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1] == want


def test_launch_detached_quotes_user_values():
  proc = dry(*V4, "--config", "configs/a b.yaml", "--set", "train.lr=1e-4", "--env", "XLA_FLAGS=--x", "--resume",
             script="launch")
  assert proc.returncode == 0, proc.stderr
  argv = shlex.split(proc.stdout.strip())
  assert argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "clsvd-t5", "--worker=all"]
  assert argv[-2:] == ["--zone=us-central2-b", "--project=my-proj"]
  remote = argv[7].removeprefix("--command=")
  # Detached: nohup bash -c '<run>' with the log redirected, so the ssh session returns at once.
  words = shlex.split(remote)
  assert words[:3] == ["nohup", "bash", "-c"]
  assert words[4:] == [">", "~/clsvd_run.log", "2>&1", "<", "/dev/null", "&"]
  run = shlex.split(words[3])
  assert run[run.index("train") + 1] == "configs/a b.yaml"
  assert run[run.index("train") - 1] == "~/clsvd-venv/bin/clsvd"
  assert "CLSVD_DISTRIBUTED=1" in run and "XLA_FLAGS=--x" in run
  sets = [run[i + 1] for i, x in enumerate(run) if x == "--set"]
  # Without a bucket the run writes to each worker's home (a single-host VM).
  assert run[:3] == ["mkdir", "-p", "runs/run"]
  assert sets == ["run_dir=$HOME/runs/run", "train.lr=1e-4"]
  assert run[-1] == "--resume"


def test_install_without_bucket_has_no_gcs_extra():
  proc = dry(*V4, script="install")
  assert proc.returncode == 0, proc.stderr
  remote = shlex.split(proc.stdout.strip().splitlines()[-1])[7].removeprefix("--command=")
  assert "pip install -q -e ~/clsvd_jax &&" in remote and "[gcs]" not in remote


def test_fetch_without_bucket_copies_from_worker_0():
  proc = dry(*V4, "--run-name", "r1", "--dest", "out", script="fetch")
  assert proc.stdout.strip().splitlines() == [
      "mkdir -p out", f"gcloud compute tpus tpu-vm scp --recurse clsvd-t5:runs/r1 out --worker=0 {LOC}"]


def test_settings_from_environment_and_errors():
  env_run = subprocess.run([sys.executable, str(SCRIPTS / "clsvd_tpu.py"), "delete", "--dry-run"],
                           capture_output=True, text=True,
                           env={"CLSVD_TPU_NAME": "n1", "CLSVD_TPU_ZONE": "europe-west4-a", "PATH": "/usr/bin:/bin"})
  assert env_run.stdout.strip() == "gcloud compute tpus tpu-vm delete n1 --quiet --zone=europe-west4-a"
  missing = dry("create", "--zone", "z")
  assert missing.returncode != 0 and "missing --name, --accelerator-type" in missing.stderr
  bad = dry("fetch", *V4, "--bucket", "s3://x")
  assert bad.returncode != 0 and "must be a gs:// URL" in bad.stderr
  gen = dry("create", *V4, "--accelerator-type", "v9-8")
  assert gen.returncode != 0 and "unknown TPU generation" in gen.stderr


def test_readme_shows_the_real_dry_run():
  text = (SCRIPTS / "README.md").read_text()
  block = text.split("The dry run prints exactly:\n\n```\n", 1)[1].split("```", 1)[0]
  proc = dry("run", *V4, "--accelerator-type", "v4-32", "--bucket", "gs://my-bucket", "--config",
             "configs/t5_large/order1.yaml", "--run-name", "t5-order1")
  assert block.replace("/path/to/clsvd_jax", str(ROOT)) == proc.stdout
