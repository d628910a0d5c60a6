"""scripts/slurm on a real one-node Slurm: singleton detection and the checkpoint-requeue cycle.

The tests start a Slurm of their own, scripts/slurm/local-cluster.sh in a fresh directory of this
test run (its own slurm.conf, reached through SLURM_CONF, its own cluster name, ports and munged),
and stop it at the end: they never submit to, or stop, a cluster they did not start (a site's Slurm,
or another checkout's test cluster), and change nothing outside that directory but installing
Debian's slurm packages when they are missing. That needs root, so they run only when asked:
DPCNN_SLURM_TESTS=1 or CI=true; otherwise they are skipped with one line.
"""

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _idx import info_for, make_arrays, payloads
from helpers import records

from dpcnn.h5format import write_h5

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"

pytestmark = pytest.mark.slow


def run(cmd, timeout=60, **kw) -> subprocess.CompletedProcess:
    """Run cmd (a list) with a timeout; stdout and stderr together in .stdout."""
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, **kw)


def allowed() -> bool:
    return os.environ.get("DPCNN_SLURM_TESTS") == "1" or os.environ.get("CI") == "true"


def state_dir(what: str) -> Path:
    """A directory for a cluster of this test run, not made yet: under /tmp, where the munge user can
    reach its socket (pytest's temporary directories are open to their owner only)."""
    return Path(tempfile.gettempdir()) / f"dpcnn-slurm-test-{os.getpid()}-{what}"


def start_cluster(d: Path) -> Path:
    """local-cluster.sh start in directory d; its slurm.conf. Skips when it cannot start."""
    try:
        r = run([str(SLURM / "local-cluster.sh"), "start", str(d)], timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("local Slurm did not start within 300 s")
    if r.returncode != 0:
        pytest.skip(f"local Slurm could not be started: {r.stdout.strip().splitlines()[-1:]}")
    assert f"export SLURM_CONF={d}/slurm.conf" in r.stdout.splitlines(), r.stdout
    return d / "slurm.conf"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """This test run's own one-node Slurm: its slurm.conf (SLURM_CONF for every client command and job)."""
    if not allowed():
        pytest.skip("Slurm tests are off: set DPCNN_SLURM_TESTS=1 to run them on a one-node Slurm of their own "
                    "(root; installs Debian's slurm packages with apt-get when missing)")
    d = state_dir("run")
    conf = start_cluster(d)
    try:
        yield conf
    finally:
        run([str(SLURM / "local-cluster.sh"), "stop", str(d)], timeout=60)


@pytest.fixture
def env(cluster):
    """The environment for Slurm commands: this run's cluster (SLURM_CONF), this Python first on PATH
    (jobs inherit both)."""
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"
    for k in [k for k in e if k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_"))]:
        del e[k]                                # not an allocation of our own
    e["SLURM_CONF"] = str(cluster)
    return e


@pytest.fixture
def tiny_h5(tmp_path) -> Path:
    """A prepared data file of 4000 training and 64 test images, 28x28 (random, seeded)."""
    arrays = make_arrays(n_train=4000, n_test=64)
    files = payloads(arrays)
    out = tmp_path / "tiny.h5"
    write_h5(out, info_for(files), arrays, {k: hashlib.sha256(v).hexdigest() for k, v in files.items()})
    return out


def job_fields(job: str, env) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once it is gone."""
    r = run(["scontrol", "-o", "show", "job", job], timeout=30, env=env)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}


# ----------------------------------------------------------------------------- the cluster itself

@pytest.mark.timeout(300)
def test_a_cluster_of_its_own_and_stop_leaves_nothing(cluster, env):
    """A test run's cluster received another checkout's jobs through the shared /etc/slurm link, and
    stop left its directory behind. Each cluster is reached only through its own SLURM_CONF (its own
    name, ports and munged; /etc/slurm untouched), so two run side by side without seeing each other's
    jobs; stop ends its daemons and removes its directory, and the other cluster runs on."""
    etc = Path("/etc/slurm/slurm.conf")
    before = os.readlink(etc) if etc.is_symlink() else etc.exists()
    conf = cluster.read_text()
    assert f"AuthInfo=socket={cluster.parent}/munge/munge.sock" in conf
    assert "SlurmctldPort=6817" not in conf and re.search(r"^ClusterName=dpcnn-[0-9a-f]{8}$", conf, re.M)
    other = state_dir("other")
    other_conf = start_cluster(other)
    other_env = dict(env, SLURM_CONF=str(other_conf))
    assert other_conf.read_text().split("ClusterName=")[1][:14] != conf.split("ClusterName=")[1][:14]
    r = run(["sbatch", "--parsable", "--job-name=dpcnn-other", "--hold", "--wrap", "true"], env=other_env)
    assert r.returncode == 0, r.stdout
    job = r.stdout.strip().split(";")[0]
    assert job in run(["squeue", "-h", "-o", "%i"], env=other_env).stdout
    assert job not in run(["squeue", "-h", "-o", "%i"], env=env).stdout
    pids = [int((other / "pids" / f"{d}.pid").read_text()) for d in ("slurmctld", "slurmd", "munged")]
    r = run([str(SLURM / "local-cluster.sh"), "stop", str(other)])
    assert r.returncode == 0 and not other.exists(), r.stdout
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and
                Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"], pids
    assert run(["sinfo", "-h", "-o", "%t"], env=env).stdout.split() == ["idle"]        # ours runs on
    assert (os.readlink(etc) if etc.is_symlink() else etc.exists()) == before


def test_job_logs_in_the_submit_directory_are_not_committed():
    """train.sbatch writes dpcnn-<jobid>.out where the job is submitted (the repository root, as the
    README does it): git ignores them."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for log in ("dpcnn-1234.out", "scripts/dpcnn-99.out"):
        assert subprocess.run(["git", "check-ignore", "-q", log], cwd=ROOT).returncode == 0, log
    assert "#SBATCH --output=dpcnn-%j.out" in (SLURM / "train.sbatch").read_text()


# ----------------------------------------------------------------------------- singletons

PROBE = ("import os; from dpcnn.comm import get_comm; c = get_comm(); "
         "print(f'rank {c.rank} of {c.size} step_tasks {os.environ.get(\"SLURM_STEP_NUM_TASKS\")}')")


@pytest.mark.timeout(120)
def test_srun_with_pmi2_is_one_world(cluster, env, tmp_path):
    r = run(["srun", "--mpi=pmi2", "-n", "2", "-c", "1", sys.executable, "-c", PROBE],
            env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout
    assert sorted(re.findall(r"rank \d of \d step_tasks \d", r.stdout)) == \
        ["rank 0 of 2 step_tasks 2", "rank 1 of 2 step_tasks 2"], r.stdout


@pytest.mark.timeout(120)
def test_srun_without_pmi_singletons_are_refused(cluster, env, tmp_path, tiny_h5):
    """Plain srun without PMI starts N worlds of 1; the trainer must stop and name the fix."""
    out = tmp_path / "run"
    r = run(["srun", "--mpi=none", "-n", "2", "-c", "1", sys.executable, "-m", "dpcnn.train",
             "--data", str(tiny_h5), "--out", str(out), "--max-steps", "2"], env=env, cwd=tmp_path)
    assert r.returncode != 0, r.stdout
    assert "Slurm started 2 tasks but MPI sees a world of 1" in r.stdout, r.stdout
    assert "srun --mpi=pmi2" in r.stdout, r.stdout
    assert not list(out.glob("ckpt-*.h5")), "a singleton trained anyway"


# ----------------------------------------------------------------------------- requeue cycle

def wait_for(what: str, predicate, timeout: float, log: Path, interval=0.25):
    """Poll predicate() until it returns something truthy; fail with the job log on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    text = log.read_text() if log.exists() else "(no log)"
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; job log:\n{text}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_batch_script_checkpoints_on_signal_requeues_and_resumes(cluster, env, tmp_path, tiny_h5,
                                                                 launcher):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = dict(env, RUN_DIR=str(run_dir))
    if launcher == "mpiexec":                   # hydra starts its proxies through srun
        env["LAUNCHER"] = "mpiexec"
    else:
        env.pop("LAUNCHER", None)               # the default: srun --mpi=pmi2
    # 8 epochs of 250 steps, ~6 s on 2 idle cores. The signal, sent once the first evaluation
    # (step 25) is written, was seen to stop the ranks 80-250 steps later: a wide margin.
    steps = 8 * 4000 // 16
    r = run(["sbatch", "--parsable", "--job-name=dpcnn-test", "--nodes=1", "--ntasks-per-node=2",
             "--cpus-per-task=1", "--time=10", f"--output={log}",
             str(SLURM / "train.sbatch"),
             "--data", str(tiny_h5), "--epochs", "8", "--batch-size", "16", "--eval-every", "25",
             "--val-size", "0", "--no-progress"], env=env, cwd=tmp_path, timeout=30)
    assert r.returncode == 0, r.stdout
    job = r.stdout.strip().split(";")[0]
    try:
        # 1. It trains, as one world of 2 ranks.
        first = wait_for("a first evaluation", lambda: records(run_dir), 120, log)[0]
        assert first["world_size"] == 2 and first["step"] == 25, first
        assert first["global_batch_size"] == 16

        # 2. The pre-time-limit signal (what --signal=USR1@T sends): the ranks checkpoint, stop
        #    with status 75, and the batch script requeues the job.
        assert run(["scancel", "--signal=USR1", job], env=env, timeout=30).returncode == 0
        wait_for("the requeue", lambda: job_fields(job, env).get("Restarts") == "1", 120, log)
        text = log.read_text()
        assert "restart 0" in text and "requeueing job" in text, text
        stop = re.search(r"stop requested by signal: checkpoint at step (\d+)", text)
        assert stop, text
        stopped_at = int(stop.group(1))
        assert 25 <= stopped_at < steps, text
        assert (run_dir / f"ckpt-step{stopped_at:09d}.h5").exists(), sorted(os.listdir(run_dir))

        # 3. Slurm holds a requeued job ~2 minutes before it may start again; skip the wait, but
        #    only once the node is idle: the requeue's kill of the old step must be over, or the
        #    new step's ranks can catch its SIGTERM at start.
        wait_for("an idle node", lambda: set(run(["sinfo", "-h", "-N", "-o", "%t"], env=env, timeout=30)
                                             .stdout.split()) == {"idle"}, 60, log)
        time.sleep(1)
        run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, timeout=30)
        wait_for("the resumed job to finish",
                 lambda: job_fields(job, env).get("JobState") in
                 ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 180, log)
        fields, text = job_fields(job, env), log.read_text()
        assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, text)
        assert "restart 1" in text and "exit status 0" in text, text
        assert f"ckpt-step{stopped_at:09d}.h5 at step {stopped_at}" in text, text     # "resuming from ..."

        # 4. The second run continued from the checkpoint and finished the schedule.
        m = records(run_dir)
        assert m[-1]["final"] is True and m[-1]["step"] == steps, m[-1]
        assert m[-1]["world_size"] == 2
        # every evaluation exactly once, including one that fell on the stopped step
        assert [x["step"] for x in m] == list(range(25, steps + 1, 25)), [x["step"] for x in m]
        assert (run_dir / f"ckpt-step{steps:09d}.h5").exists()
    finally:
        run(["scancel", job], env=env, timeout=30)   # a no-op once the job is done


def submit(env, tmp_path, tiny_h5, run_dir, log, launcher, *train) -> str:
    """train.sbatch on 2 tasks of 1 CPU with the given launcher (srun: its default); the job ID."""
    env = dict(env, RUN_DIR=str(run_dir))
    if launcher == "mpiexec":
        env["LAUNCHER"] = "mpiexec"
    else:
        env.pop("LAUNCHER", None)
    r = run(["sbatch", "--parsable", "--job-name=dpcnn-test", "--nodes=1", "--ntasks-per-node=2",
             "--cpus-per-task=1", "--time=10", f"--output={log}", str(SLURM / "train.sbatch"),
             "--data", str(tiny_h5), "--batch-size", "16", "--eval-every", "25", "--no-progress", *train],
            env=env, cwd=tmp_path, timeout=30)
    assert r.returncode == 0, r.stdout
    return r.stdout.strip().split(";")[0]


def rank_pids(run_dir: Path) -> list[int]:
    """The PIDs of the Python processes training into run_dir (not srun or mpiexec, whose command
    lines hold the same words)."""
    r = run(["pgrep", "-f", f"dpcnn.train --out {run_dir} "], timeout=10)
    pids = []
    for pid in map(int, r.stdout.split()):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if Path(argv[0].decode()).name.startswith("python"):
                pids.append(pid)
    return sorted(pids)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_a_stalled_rank_is_requeued_under_either_launcher(cluster, env, tmp_path, tiny_h5, launcher):
    """A SIGSTOPped rank: the watchdog ends the job with 69, and the script requeues it, also when
    srun reports 137 for the rank the abort killed (dpcnn's own status is in RUN_DIR/exit-status)."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(env, tmp_path, tiny_h5, run_dir, log, launcher, "--epochs", "50", "--timeout", "3")
    pids: list[int] = []
    try:
        wait_for("a first evaluation", lambda: records(run_dir), 120, log)
        pids = rank_pids(run_dir)
        assert len(pids) == 2, pids
        os.kill(pids[-1], signal.SIGSTOP)
        wait_for("the requeue", lambda: job_fields(job, env).get("Restarts") == "1", 60, log)
        text = log.read_text()
        assert re.search(r"step \d+ made no progress for 3 s", text), text
        assert "exit status 69, newest checkpoint in" in text and "requeueing job" in text, text
        assert (run_dir / "exit-status").read_text() == "69\n"
    finally:
        run(["scancel", job], env=env, timeout=30)
        for pid in pids:                                    # none should be left; be sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(180)
def test_scancel_under_mpiexec_still_checkpoints(cluster, env, tmp_path, tiny_h5):
    """scancel reaches a rank twice under hydra's mpiexec (Slurm's SIGTERM and mpiexec forwarding
    it): one stop request, a checkpoint, not 'second signal: exiting now without a checkpoint'."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(env, tmp_path, tiny_h5, run_dir, log, "mpiexec", "--epochs", "50")
    try:
        wait_for("a first evaluation", lambda: records(run_dir), 120, log)
        assert run(["scancel", job], env=env, timeout=30).returncode == 0
        wait_for("the job to end", lambda: job_fields(job, env).get("JobState", "") in
                 ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", ""), 60, log)
        time.sleep(1)
        text = log.read_text()
        stop = re.search(r"stop requested by signal: checkpoint at step (\d+)", text)
        assert stop and "second signal" not in text and "no checkpoint is possible" not in text, text
        assert (run_dir / f"ckpt-step{int(stop.group(1)):09d}.h5").exists(), sorted(os.listdir(run_dir))
    finally:
        run(["scancel", job], env=env, timeout=30)
