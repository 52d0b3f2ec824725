"""SLURM job scripts, without a scheduler: syntax, the dependency chain (fake sbatch), --wait's failure detection
(fake scontrol), the wrappers' CLI calls, and cluster-specific values kept in jobs/cluster.env only.

The real end-to-end run (a local SLURM, the whole smoke chain) is in .ci/run."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["00_setup_check", "01_demos", "10_location_formats", "11_attribute_binding", "20_ablations",
             "30_extension", "99_blogpost"]
AFTER_GENERATE = {"10_location_formats", "11_attribute_binding", "20_ablations"}
SCRIPTS = sorted([*ROOT.glob("jobs/*.sh"), *ROOT.glob("jobs/*.sbatch"), ROOT / "jobs/cluster.env",
                  *ROOT.glob("ci/slurm/*.sh"), ROOT / ".ci/run"])

# A recording sbatch: appends its argv as one JSON line to $FAKE_SLURM_DIR/sbatch.jsonl and prints the job id
# (101, 102, ...; "<id>;ci" as --parsable does with a cluster name if FAKE_CLUSTER is set). The call number
# FAKE_SBATCH_REJECT (0-based) is rejected like an invalid request.
FAKE_SBATCH = """#!{python} -S
import json, os, sys
log = os.path.join(os.environ["FAKE_SLURM_DIR"], "sbatch.jsonl")
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
if os.environ.get("FAKE_SBATCH_REJECT") == str(n):
    sys.exit("sbatch: error: Batch job submission failed: Invalid generic resource (gres) specification")
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
print(f"{{101 + n}}" + (";ci" if os.environ.get("FAKE_CLUSTER") else ""))
"""

# A scripted `scontrol -o show job ID`, driven by the fake sbatch's log. FAKE_MODE=finish: job ID is RUNNING for
# the first k = 1 + ID % 3 queries, then shows its final state ONCE (FAILED for the job whose name ends with
# FAKE_FAIL, with a log containing "boom"; else COMPLETED), then "Invalid job id" as after MinJobAge: jobs are
# purged while others still run. FAKE_MODE=hang: always RUNNING.
FAKE_SCONTROL = """#!{python} -S
import json, os, sys
d = os.environ["FAKE_SLURM_DIR"]
jid = sys.argv[-1]
jobs = {{str(101 + i): a for i, a in enumerate(json.loads(l) for l in open(os.path.join(d, "sbatch.jsonl")))}}
args = jobs.get(jid)
if args is None or sys.argv[1:4] != ["-o", "show", "job"]:
    sys.exit("slurm_load_jobs error: Invalid job id specified")
name = next(a.split("=", 1)[1] for a in args if a.startswith("--job-name="))
calls = os.path.join(d, "calls-" + jid)
n = int(open(calls).read()) if os.path.exists(calls) else 0
open(calls, "w").write(str(n + 1))
k = 1 + int(jid) % 3
if os.environ.get("FAKE_MODE") == "hang" or n < k:
    state, code, reason = "RUNNING", "0:0", "None"
elif n == k:
    bad = os.environ.get("FAKE_FAIL") and name.endswith(os.environ["FAKE_FAIL"])
    state, code, reason = ("FAILED", "3:0", "NonZeroExitCode") if bad else ("COMPLETED", "0:0", "None")
else:
    sys.exit("slurm_load_jobs error: Invalid job id specified")
log = os.path.join(d, name + ".out")
if state == "FAILED":
    open(log, "w").write("Traceback (most recent call last):\\nboom\\n")
array = next((a.split("=", 1)[1] for a in args if a.startswith("--array=")), None)
tasks = range(int(array.split("-")[1].split("%")[0]) + 1) if array else [None]
for t in tasks:
    extra = f" ArrayJobId={{jid}} ArrayTaskId={{t}}" if t is not None else ""
    print(f"JobId={{int(jid) + 50 * (t or 0)}}{{extra}} JobName={{name}} UserId=root(0) Priority=1 "
          f"JobState={{state}} Reason={{reason}} Dependency=(null) ExitCode={{code}} StdOut={{log}}")
"""


def clean_env(**extra):
    """os.environ without the caller's overrides of cluster.env / submit_all.sh settings, plus extra."""
    e = {k: v for k, v in os.environ.items() if not re.match(r"(SMOKE|FULL|CLUSTER)_|SUBMIT_|INSTDIFF_CMD$", k)}
    return {**e, **extra}


def bash(*args, cwd=ROOT, env=None, timeout=60):
    e = clean_env(**(env or {}))
    return subprocess.run(["bash", *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def fake_repo(tmp_path):
    """A copy of jobs/ in a scratch repo (submit_all.sh writes outputs/slurm/ there), plus fake SLURM clients."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "jobs", repo / "jobs")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, src in (("sbatch", FAKE_SBATCH), ("scontrol", FAKE_SCONTROL)):
        (bindir / name).write_text(src.format(python=sys.executable))
        (bindir / name).chmod(0o755)
    (bindir / "scancel").write_text("#!/bin/sh\necho \"scancel $*\" >> \"$FAKE_SLURM_DIR/scancel.log\"\n")
    (bindir / "scancel").chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path), "SMOKE_POLL_S": "0.05"}
    return repo, env, tmp_path


def run_submit(fake_repo, *args, env=None):
    repo, base, tmp = fake_repo
    e = clean_env(**base, **(env or {}))
    r = subprocess.run(["bash", str(repo / "jobs/submit_all.sh"), *args], cwd=tmp, env=e, capture_output=True,
                       text=True, timeout=60)
    log = tmp / "sbatch.jsonl"
    calls = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    return r, calls


def by_name(calls):
    """sbatch argv lists keyed by the job's short name (instdiff-<profile>-<name>)."""
    out = {}
    for argv in calls:
        jn = next(a.split("=", 1)[1] for a in argv if a.startswith("--job-name="))
        out[jn.split("-", 2)[2]] = argv
    return out


def flag(argv, name):
    vals = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return vals[-1] if vals else None


# ---- syntax and the notebook list ------------------------------------------------------------------------------


CI_ONLY = [p for p in SCRIPTS if p.parent.name in ("slurm", ".ci")]  # run for real by .ci/run (a local SLURM)


@pytest.mark.parametrize("script", CI_ONLY, ids=lambda p: str(p.relative_to(ROOT)))
def test_ci_scripts_parse(script):
    """A lint only: these start real SLURM daemons, so their behaviour is checked by CI's end-to-end run."""
    r = bash("-n", script)
    assert r.returncode == 0, r.stderr


def test_job_scripts_run_by_path_as_the_scheduler_does(fake_repo):
    """sbatch and users start the scripts by path (shebang, executable bit), not as `bash script`: each one does its
    job that way. cluster.env and job_prologue.sh are sourced, never run."""
    repo, env, tmp = fake_repo
    e = clean_env(**env)
    r = subprocess.run(["./jobs/submit_all.sh", "smoke", "--dry-run"], cwd=repo, env=e, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [l.split("=", 1)[0] for l in r.stdout.splitlines() if l.startswith("JOB_")][:3] == [
        "JOB_00_setup_check", "JOB_01_demos", "JOB_generate"]
    e = clean_env(**env, INSTDIFF_CMD="echo", SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="2")
    r = subprocess.run(["./jobs/generate.sbatch", "smoke"], cwd=repo, env=e, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "report generate --profile smoke --shard 1/2" in r.stdout.splitlines(), r.stderr
    r = subprocess.run(["./jobs/run_notebook.sbatch", "01_demos", "smoke"], cwd=repo, env=e, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "report notebook 01_demos --profile smoke --params jobs/params/smoke/01_demos.yaml" in r.stdout.splitlines()
    for name in ("cluster.env", "job_prologue.sh"):  # sourced: a stray executable bit would invite running them
        assert not os.access(ROOT / "jobs" / name, os.X_OK), name


def test_notebook_list_in_submit_all():
    text = (ROOT / "jobs/submit_all.sh").read_text()
    m = re.search(r"^NOTEBOOKS=\(([^)]*)\)", text, re.M)
    assert m and m.group(1).split() == NOTEBOOKS


def test_notebook_list_matches_the_runner():
    from instdiff_lib.report import runner

    assert list(runner.NOTEBOOKS) == NOTEBOOKS
    text = (ROOT / "jobs/submit_all.sh").read_text()
    m = re.search(r'^AFTER_GENERATE="([^"]*)"', text, re.M)
    assert m and m.group(1).split() == list(runner.GENERATION_NOTEBOOKS) == sorted(AFTER_GENERATE)


# a chain naming a missing notebook or params file must fail here, not after hours in the queue
@pytest.mark.parametrize("profile", ["smoke", "full"])
def test_every_params_file_the_chain_names_loads(fake_repo, profile):
    """The notebook jobs the dry run prints, each with the params file it names: the runner loads that file for
    that notebook (every key a parameter of the notebook, SMOKE matching the profile)."""
    from instdiff_lib.report.runner import load_params, notebook_path

    r, _ = run_submit(fake_repo, profile, "--dry-run")
    assert r.returncode == 0, r.stderr
    jobs = re.findall(r"jobs/run_notebook\.sbatch (\S+) (\S+) (\S+)\)", r.stdout)
    assert [nb for nb, *_ in jobs] == [n for n in NOTEBOOKS]
    for nb, prof, params in jobs:
        assert prof == profile and notebook_path(nb).is_file()
        assert load_params(nb, profile, ROOT / params)["SMOKE"] is (profile == "smoke")


# ---- the chain ----------------------------------------------------------------------------------------------------


def test_dry_run_prints_the_chain(fake_repo):
    r, calls = run_submit(fake_repo, "smoke", "--dry-run", env={"SMOKE_N_SHARDS": "3"})
    assert r.returncode == 0, r.stderr
    assert calls == []  # nothing submitted
    lines = [l for l in r.stdout.splitlines() if l.startswith("JOB_")]
    names = [l.split("=", 1)[0][4:] for l in lines]
    assert names == ["00_setup_check", "01_demos", "generate", *NOTEBOOKS[2:]]
    deps = {n: re.findall(r"--dependency=(\S+)", l) for n, l in zip(names, lines)}
    for n in names:
        assert "--kill-on-invalid-dep=yes" in lines[names.index(n)]
        if n in AFTER_GENERATE:
            assert deps[n] == ["afterok:$JOB_generate"]
        elif n == "99_blogpost":
            assert deps[n][0].startswith("afterok:")
            assert sorted(deps[n][0][8:].split(":")) == sorted(f"$JOB_{x}" for x in names if x != n)
        else:
            assert deps[n] == []
    gen = lines[names.index("generate")]
    assert "--array=0-2 " in gen and gen.endswith("jobs/generate.sbatch smoke 3)")
    nb = lines[names.index("20_ablations")]
    assert nb.endswith("jobs/run_notebook.sbatch 20_ablations smoke jobs/params/smoke/20_ablations.yaml)")


def fake_preflight(tmp, rc=0):
    """A stand-in CLI: records its arguments in preflight.log, exits rc (the real preflight: test_full_profile.py)."""
    cli = tmp / "fake-instdiff"
    cli.write_text(f'#!/bin/sh\necho "$*" >> "{tmp}/preflight.log"\n[ "$1 $2" = "report preflight" ] && '
                   f'echo "7 of 7 assets ... missing" >&2 && exit {rc}\nexit 0\n')
    cli.chmod(0o755)
    return {"INSTDIFF_CMD": str(cli)}


def test_dry_run_output_is_the_script_that_submits(fake_repo):
    """The printed commands, run by bash, submit the same chain as submit_all.sh itself (the preflight first)."""
    repo, env, tmp = fake_repo
    cli = fake_preflight(tmp)
    r, _ = run_submit(fake_repo, "full", "--dry-run", env=cli)
    assert r.stdout.splitlines()[1] == f"{cli['INSTDIFF_CMD']} report preflight --profile full"
    script = tmp / "chain.sh"
    script.write_text(r.stdout)
    assert subprocess.run(["bash", "-e", str(script)], cwd=repo, env=clean_env(**env), timeout=60).returncode == 0
    dry = (tmp / "sbatch.jsonl").read_text()
    (tmp / "sbatch.jsonl").unlink()
    r2, _ = run_submit(fake_repo, "full", env=cli)
    assert r2.returncode == 0, r2.stderr
    assert (tmp / "sbatch.jsonl").read_text() == dry
    assert (tmp / "preflight.log").read_text().splitlines() == ["report preflight --profile full"] * 2


def test_full_chain_is_not_submitted_while_an_asset_is_missing(fake_repo):
    tmp = fake_repo[2]
    r, calls = run_submit(fake_repo, "full", env=fake_preflight(tmp, rc=2))
    assert r.returncode == 1 and calls == []  # nothing submitted
    assert "7 of 7 assets" in r.stderr and "nothing submitted" in r.stderr


def test_submit_chain_with_fake_sbatch(fake_repo):
    r, calls = run_submit(fake_repo, "full", env={"FAKE_CLUSTER": "1", **fake_preflight(fake_repo[2])})
    assert r.returncode == 0, r.stderr
    jobs = by_name(calls)
    assert list(jobs) == ["00_setup_check", "01_demos", "generate", *NOTEBOOKS[2:]]  # submission order
    ids = {n: str(101 + i) for i, n in enumerate(jobs)}  # "<id>;ci" -> "<id>"
    assert r.stdout.split() == [w for n in ids for w in (n, ids[n])]
    for n, argv in jobs.items():
        assert argv[0] == "--parsable" and "--kill-on-invalid-dep=yes" in argv
        dep = flag(argv, "dependency")
        if n in AFTER_GENERATE:
            assert dep == f"afterok:{ids['generate']}"
        elif n == "99_blogpost":
            assert dep.startswith("afterok:") and sorted(dep[8:].split(":")) == sorted(
                v for k, v in ids.items() if k != n)
        else:
            assert dep is None
        if n == "generate":
            assert argv[-3:] == ["jobs/generate.sbatch", "full", "8"] and flag(argv, "array") == "0-7"
        else:
            assert argv[-4:] == ["jobs/run_notebook.sbatch", n, "full", f"jobs/params/full/{n}.yaml"]
        # the full profile's resources come from cluster.env
        assert flag(argv, "partition") == "gpu" and flag(argv, "gres") == "gpu:1"
    repo = fake_repo[0]
    assert (repo / "outputs/slurm").is_dir()  # the wrappers' log folder must exist before the jobs start
    assert (repo / "outputs/slurm/chain-full.tsv").read_text().split() == r.stdout.split()


def test_smoke_profile_and_overrides(fake_repo):
    r, calls = run_submit(fake_repo, "smoke", env={"CLUSTER_ACCOUNT": "proj42", "SMOKE_TIME__20_ablations": "7:00",
                                                   "SMOKE_EXTRA": "--exclude=n1 --nice=5"})
    assert r.returncode == 0, r.stderr
    jobs = by_name(calls)
    for n, argv in jobs.items():
        assert flag(argv, "partition") == "debug" and flag(argv, "gres") is None  # CPU only
        assert flag(argv, "account") == "proj42" and flag(argv, "qos") is None
        assert "--exclude=n1" in argv and "--nice=5" in argv
    assert flag(jobs["20_ablations"], "time") == "7:00" and flag(jobs["30_extension"], "time") == "01:00:00"
    assert flag(jobs["generate"], "array") == "0-1"


def test_rejected_submission_cancels_the_partial_chain(fake_repo):
    tmp = fake_repo[2]
    r, calls = run_submit(fake_repo, "smoke", env={"FAKE_SBATCH_REJECT": "2"})  # the array
    assert r.returncode == 1 and "sbatch failed for generate" in r.stderr and len(calls) == 2
    assert (tmp / "scancel.log").read_text().split() == ["scancel", "101", "scancel", "102"]


# ---- --wait ---------------------------------------------------------------------------------------------------------


def test_wait_all_completed_survives_purged_records(fake_repo):
    # each job is RUNNING, then COMPLETED in one query only, then purged: the recorded states count
    r, _ = run_submit(fake_repo, "smoke", "--wait", env={"FAKE_MODE": "finish"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 8 jobs COMPLETED" in r.stdout
    rows = re.findall(r"^(\S+)\s+(\S+)\s+(COMPLETED|FAILED)\s", r.stdout, re.M)
    assert sorted(k for n, k, s in rows if n == "generate") == ["103_0", "103_1"]
    assert len(rows) == 9 and {s for *_, s in rows} == {"COMPLETED"}


def test_wait_reports_a_failed_job_and_its_log(fake_repo):
    r, _ = run_submit(fake_repo, "smoke", "--wait", env={"FAKE_MODE": "finish", "FAKE_FAIL": "20_ablations"})
    assert r.returncode == 1
    assert re.search(r"^20_ablations\s+\d+\s+FAILED\s+3:0", r.stdout, re.M)
    assert "boom" in r.stdout  # the tail of the failed job's log
    assert "FAILED: not every job ended COMPLETED" in r.stderr


def test_wait_times_out(fake_repo):
    r, _ = run_submit(fake_repo, "smoke", "--wait", env={"FAKE_MODE": "hang", "SUBMIT_TIMEOUT_S": "1"})
    assert r.returncode == 124 and "TIMEOUT" in r.stderr and "scancel 101 102" in r.stderr


def test_local_mode_runs_the_chain_without_a_scheduler(fake_repo):
    repo, env, tmp = fake_repo
    fake = tmp / "fake-instdiff"
    fake.write_text('#!/bin/sh\necho "CLI $*"\ncase "$*" in *"$FAKE_FAIL"*) [ -n "$FAKE_FAIL" ] && exit 3;; esac\nexit 0\n')
    fake.chmod(0o755)
    e = {**env, "INSTDIFF_CMD": str(fake), "PATH": os.environ["PATH"]}  # no sbatch needed
    r = bash(repo / "jobs/submit_all.sh", "smoke", "--local", cwd=tmp, env=e)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = [l[4:] for l in r.stdout.splitlines() if l.startswith("CLI ")]
    assert calls[2:4] == ["report generate --profile smoke --shard 0/2", "report generate --profile smoke --shard 1/2"]
    assert [c.split()[2] for c in calls if "notebook" in c] == NOTEBOOKS
    r = bash(repo / "jobs/submit_all.sh", "smoke", "--local", cwd=tmp, env={**e, "FAKE_FAIL": "--shard 1/2"})
    assert r.returncode == 1
    assert "FAILED or skipped: generate 10_location_formats 11_attribute_binding 20_ablations 99_blogpost" in r.stderr
    assert "== 30_extension: COMPLETED" in r.stdout


# ---- the wrappers call the CLI contract (run as plain bash, INSTDIFF_CMD=echo) --------------------------------------


def test_run_notebook_wrapper_calls_the_cli(fake_repo):
    repo, env, _ = fake_repo
    r = bash("jobs/run_notebook.sbatch", "11_attribute_binding", "full", cwd=repo, env={**env, "INSTDIFF_CMD": "echo"})
    assert r.returncode == 0, r.stderr
    assert ("report notebook 11_attribute_binding --profile full --params jobs/params/full/11_attribute_binding.yaml"
            in r.stdout.splitlines())
    r = bash("jobs/run_notebook.sbatch", cwd=repo, env={**env, "INSTDIFF_CMD": "echo", "NB": "01_demos",
                                                       "PARAMS": "my.yaml"})
    assert "report notebook 01_demos --profile smoke --params my.yaml" in r.stdout.splitlines()
    r = bash("jobs/run_notebook.sbatch", cwd=repo, env={**env, "INSTDIFF_CMD": "false", "NB": "01_demos"})
    assert r.returncode != 0 and "rc=1" in r.stdout


def test_generate_wrapper_calls_the_cli(fake_repo):
    repo, env, _ = fake_repo
    e = {**env, "INSTDIFF_CMD": "echo", "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}
    r = bash("jobs/generate.sbatch", "full", cwd=repo, env=e)
    assert r.returncode == 0, r.stderr
    assert "report generate --profile full --shard 2/3" in r.stdout.splitlines()
    r = bash("jobs/generate.sbatch", "smoke", "2", cwd=repo, env=e)
    assert r.returncode == 2 and "out of range" in r.stderr


# ---- cluster-specific values only in jobs/cluster.env ------------------------------------------------------------


def test_cluster_values_only_in_cluster_env():
    keys = r"(?:SMOKE|FULL)_(?:PARTITION|GRES|EXTRA)|CLUSTER_(?:ACCOUNT|QOS|MODULES|MODULES_INIT)"
    r = subprocess.run(["env", "-i", "bash", "-c", "source jobs/cluster.env && set"], cwd=ROOT, capture_output=True,
                       text=True, check=True)
    values = {v.strip("'") for k, v in re.findall(rf"^({keys})=(.*)$", r.stdout, re.M) if v.strip("'")}
    assert {"debug", "gpu", "gpu:1"} <= values  # the partitions and GPU request of the two profiles
    files = [*ROOT.glob("jobs/*.sh"), *ROOT.glob("jobs/*.sbatch"), ROOT / ".ci/run"]
    for p in files:
        text = p.read_text()
        for v in values:
            hit = re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", text)
            assert not hit, f"{p.relative_to(ROOT)} contains the cluster value {v!r}: keep it in jobs/cluster.env"
        # resource flags with literal values (a $variable is fine): only cluster.env decides these
        lit = re.search(r"--(partition|account|qos|gres|gpus\S*|constraint|mem|reservation)[= ](?![\"$])\S+", text)
        assert not lit, f"{p.relative_to(ROOT)}: literal {lit.group(0)!r}; put it in jobs/cluster.env"
        assert not re.search(r"^#SBATCH\s+-[pAq]\b", text, re.M), p
