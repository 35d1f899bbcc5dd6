"""Team workflow against a real S3-compatible server (moto's server mode) on loopback.

One moto server runs for the module, with IAM authentication on: every S3 request is signed
with the access key of an IAM user the fixture creates, so wrong credentials are really refused.

Team flow (a tiny pipeline: the e2e test's tiny raw data, the full test's tiny random Llama,
stages validate -> pii-scrub -> minhash-dedup -> split -> base-model -> qlora-train):
1. clone A: dvc repro, dvc push to S3, git push to a bare git remote;
2. clone B: git clone, dvc pull, dvc repro runs nothing, dvc status is clean;
3. A: dvc exp run -S lora.r=32 + dvc exp push; B: dvc exp pull, exp show, metrics diff, report;
4. A: GTO promotion tags pushed; B reads the promoted version from the registry and finds that
   its pulled model file is the one the version's lineage names (the deploy's matching rule).

Faults (a plain `dvc add`ed directory of 300 files, so that a push takes long enough to kill):
a push killed midway then re-run; unreachable endpoints (closed port, a server that never
answers) and wrong credentials fail fast with a clear error and leave no half-written
workspace; a corrupted object in the bucket is detected on pull (remote `verify = true`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3  # installed with dvc-s3 (requirements.txt)
import pytest
import yaml

from test_pipeline_e2e import tiny_raw
from test_pipeline_full import build_tiny_model, ran

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "llmpipe-dvc"
PIPELINE = ["validate", "pii-scrub", "minhash-dedup", "split", "base-model", "qlora-train"]
# The team remote settings of docs/team.md: fail fast, verify downloads.
REMOTE_SETTINGS = {"connect_timeout": "3", "read_timeout": "5", "verify": "true"}
NO_FILE = "/nonexistent/llmpipe-test/aws-config"  # botocore refuses /dev/null as a config file
FAIL_FAST_S = 45   # an unreachable endpoint or bad credentials fail within this (dvc's start included)

pytestmark = pytest.mark.slow


# -- helpers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = run(cmd, cwd, env, timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


DVC = [sys.executable, "-m", "dvc"]


def md5_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class S3Server:
    """moto_server on 127.0.0.1:<free port>, IAM auth on, one IAM user with s3:* rights."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The first 3 requests (the IAM set-up below) are unauthenticated; every later one is checked.
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"moto server exited: {log.read_text()[-2000:]}"
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not come up in 60 s"
                time.sleep(0.2)
        boot = {"endpoint_url": self.url, "region_name": "us-east-1",
                "aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", **boot)
        iam.create_user(UserName="ci")
        key = iam.create_access_key(UserName="ci")["AccessKey"]
        iam.put_user_policy(UserName="ci", PolicyName="dvc-remote", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.s3 = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                               aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)
        self.s3.create_bucket(Bucket=BUCKET)

    def keys(self, prefix: str) -> list[str]:
        out, token = [], None
        while True:
            kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self.s3.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


def team_env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # No ~/.aws files of whoever runs the tests; s3fs already retries timeouts 5 times, so
        # botocore makes one attempt per try (docs/team.md: worst case ~5 x read_timeout).
        "AWS_CONFIG_FILE": NO_FILE, "AWS_SHARED_CREDENTIALS_FILE": NO_FILE,
        "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard",
    })
    if extra_path:
        env["PYTHONPATH"] = str(extra_path)
    return env


def add_s3_remote(repo: Path, env: dict[str, str], server: S3Server, prefix: str) -> None:
    """The commands of docs/team.md: shared settings in .dvc/config, secrets in config.local."""
    sh(DVC + ["remote", "add", "-d", "-f", "storage", f"s3://{BUCKET}/{prefix}"], repo, env)
    sh(DVC + ["remote", "modify", "storage", "endpointurl", server.url], repo, env)
    for key, value in REMOTE_SETTINGS.items():
        sh(DVC + ["remote", "modify", "storage", key, value], repo, env)
    set_credentials(repo, env, server.key_id, server.secret)


def write_s3_remote(repo: Path, server: S3Server, prefix: str) -> None:
    """Same result as add_s3_remote, written directly (each dvc command costs seconds)."""
    settings = "".join(f"    {k} = {v}\n" for k, v in REMOTE_SETTINGS.items())
    with open(repo / ".dvc" / "config", "a") as fh:
        fh.write(f"[core]\n    remote = storage\n['remote \"storage\"']\n    url = s3://{BUCKET}/{prefix}\n"
                 f"    endpointurl = {server.url}\n{settings}")
    (repo / ".dvc" / "config.local").write_text(
        f"['remote \"storage\"']\n    access_key_id = {server.key_id}\n    secret_access_key = {server.secret}\n")


def set_credentials(repo: Path, env: dict[str, str], key_id: str, secret: str) -> None:
    sh(DVC + ["remote", "modify", "--local", "storage", "access_key_id", key_id], repo, env)
    sh(DVC + ["remote", "modify", "--local", "storage", "secret_access_key", secret], repo, env)


def clone(bare: Path, dest: Path, env: dict[str, str], server: S3Server) -> Path:
    sh(["git", "clone", "-q", str(bare), str(dest)], dest.parent, env)
    set_credentials(dest, env, server.key_id, server.secret)
    return dest


# -- the team flow ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def team(tmp_path_factory, s3):
    """Clone A has run the tiny pipeline and pushed git + data; B is a fresh clone of the remote."""
    base = tmp_path_factory.mktemp("team")
    bare = base / "origin.git"
    env = team_env()
    sh(["git", "init", "-q", "--bare", "-b", "main", str(bare)], base, env)

    a = base / "a"
    a.mkdir()
    for item in (".gitignore", ".dvcignore"):    # .dvcignore: __pycache__ must not change dir deps
        shutil.copy(ROOT / item, a / item)
    for item in ("stages", "src"):
        shutil.copytree(ROOT / item, a / item, ignore=shutil.ignore_patterns("__pycache__"))
    tiny_raw(a / "data" / "raw")
    build_tiny_model(a / "tiny-model")
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline = {"stages": {name: pipeline["stages"][name] for name in PIPELINE}}
    (a / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["model"]["name_or_path"] = "tiny-model"
    p["pii"]["workers"] = 1
    p["train"].update(max_steps=4, eval_steps=2, save_steps=2, logging_steps=1, per_device_batch_size=2,
                      cpu_threads=1)
    (a / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))

    a_env = team_env(a / "src")
    sh(["git", "init", "-q", "-b", "main"], a, a_env)
    sh(DVC + ["init", "-q"], a, a_env)
    add_s3_remote(a, a_env, s3, "team")
    sh(["git", "add", "-A"], a, a_env)
    sh(["git", "commit", "-qm", "tiny pipeline, S3 remote"], a, a_env)  # dvclive needs a commit
    t0 = time.monotonic()
    first = sh(DVC + ["repro"], a, a_env)
    repro_s = time.monotonic() - t0
    assert ran(first.stdout) == sorted(PIPELINE)
    sh(["git", "add", "-A"], a, a_env)
    sh(["git", "commit", "-qm", "tiny pipeline run"], a, a_env)
    pushed = sh(DVC + ["push"], a, a_env)
    sh(["git", "remote", "add", "origin", str(bare)], a, a_env)
    sh(["git", "push", "-q", "origin", "main"], a, a_env)

    b = clone(bare, base / "b", team_env(base / "b" / "src"), s3)
    return {"a": a, "b": b, "bare": bare, "a_env": a_env, "b_env": team_env(b / "src"),
            "repro_s": repro_s, "push_out": pushed.stdout}


def test_clone_b_pulls_and_reproduces_nothing(team, s3):
    a, b, env = team["a"], team["b"], team["b_env"]
    assert s3.keys("team/files/md5/"), "dvc push wrote nothing to the bucket"
    # the shared remote settings came with git; the credentials did not
    cfg = (b / ".dvc" / "config").read_text()
    assert s3.url in cfg and "verify = true" in cfg and s3.secret not in cfg
    assert not (b / "models").exists()

    sh(DVC + ["pull"], b, env)
    for out in ("data/split", "models/base", "models/adapter", "models/checkpoints"):
        assert md5_tree(b / out) == md5_tree(a / out), out
    repro = sh(DVC + ["repro"], b, env)
    assert ran(repro.stdout) == [], repro.stdout  # nothing re-runs, nothing retrains
    status = sh(DVC + ["status", "--json"], b, env)
    assert json.loads(status.stdout) == {}
    cloud = sh(DVC + ["status", "--cloud", "--json"], b, env)
    assert json.loads(cloud.stdout) == {}
    assert sh(["git", "status", "--porcelain"], b, env).stdout == ""


def test_experiment_pushed_from_a_is_reviewed_in_b(team, s3):
    a, b = team["a"], team["b"]
    exp = sh(DVC + ["exp", "run", "-n", "r32", "-S", "lora.r=32"], a, team["a_env"])
    assert ran(exp.stdout) == ["qlora-train"]  # curation and base-model are reused
    sh(DVC + ["exp", "push", "origin", "r32"], a, team["a_env"])

    env = team["b_env"]
    sh(DVC + ["pull"], b, env)  # idempotent when the previous test ran first
    sh(DVC + ["exp", "pull", "origin", "r32"], b, env)
    show = json.loads(sh(DVC + ["exp", "show", "--json"], b, env).stdout)
    text = json.dumps(show)
    assert '"r32"' in text and '"r": 32' in text
    diff = json.loads(sh(DVC + ["metrics", "diff", "main", "r32", "--json"], b, env).stdout)
    train = diff["metrics/train.json"]
    assert train["lora.r"]["old"] == 16 and train["lora.r"]["new"] == 32
    assert "train_loss" in train and train["train_loss"]["old"] != train["train_loss"]["new"]
    params = json.loads(sh(DVC + ["params", "diff", "main", "r32", "--json"], b, env).stdout)
    assert (params["params.yaml"]["lora.r"]["old"], params["params.yaml"]["lora.r"]["new"]) == (16, 32)
    # the experiment's adapter came from the remote: B can check it out without training
    sh(DVC + ["exp", "apply", "r32"], b, env)
    assert ran(sh(DVC + ["repro"], b, env).stdout) == []
    # the PR report of the experiment against main
    report = sh([sys.executable, "-m", "llmpipe.cli", "report", "--base", "main", "--head", "r32"], b, env).stdout
    assert "| `lora.r` | 16 | 32 |" in report
    assert "train loss" in report and "```mermaid" in report
    sh(["git", "checkout", "-q", "--", "."], b, env)
    sh(DVC + ["checkout", "-f"], b, env)


def test_promotion_tags_pushed_from_a_are_read_in_b(team):
    from llmpipe.registry import Registry, build_lineage

    a, b = team["a"], team["b"]
    model = "models/adapter/adapter_model.safetensors"
    sh(["git", "checkout", "-q", "main"], a, team["a_env"])
    sh(["git", "checkout", "-q", "--", "."], a, team["a_env"])
    sh(DVC + ["checkout", "-f"], a, team["a_env"])
    reg_a = Registry(a)
    # what `llmpipe promote` does after its gate check (the tiny random model cannot pass the gate)
    lineage = build_lineage(a, artifact="model", version="v1.0.0", model_path=model)
    reg_a.register("model", "v1.0.0", json.dumps(lineage, sort_keys=True))
    reg_a.assign("model", "v1.0.0", "canary", "promote model@v1.0.0 to canary")
    sh(["git", "push", "-q", "origin", "--tags"], a, team["a_env"])

    env = team["b_env"]
    sh(["git", "fetch", "-q", "origin", "--tags"], b, env)
    sh(DVC + ["pull"], b, env)
    reg_b = Registry(b)
    assert reg_b.stage_version("model", "canary") == "v1.0.0"
    versions = reg_b.versions("model")
    assert [v.version for v in versions] == ["v1.0.0"] and "canary" in versions[0].stages
    assert versions[0].commit == sh(["git", "rev-parse", "origin/main"], b, env).stdout.strip()
    lin = reg_b.lineage("model", "v1.0.0")
    assert lin["model"]["sha256"] == hashlib.sha256((b / model).read_bytes()).hexdigest()
    assert lin["model"]["dvc_lock"]["inside"] == "models/adapter"
    # The deploy stage's own identification step (its registry read path; engines and canary
    # traffic are not started here): B's pulled model file is recognised as model@v1.0.0 ...
    from llmpipe.serve.rollout import identify_version

    version, registered, note = identify_version(b, b / model, "model", "canary")
    assert (version, registered) == ("v1.0.0", True), note
    # ... and a model whose bytes differ (one flipped byte) is not passed off as registered.
    other = b.parent / "tampered.safetensors"
    data = bytearray((b / model).read_bytes())
    data[-1] ^= 0xFF
    other.write_bytes(bytes(data))
    version, registered, _ = identify_version(b, other, "model", "canary")
    assert not registered and version.startswith("unregistered-")


# -- faults ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faulty(tmp_path_factory, s3):
    """A repo with 300 x 64 KiB files `dvc add`ed under big/ and a bare git remote."""
    base = tmp_path_factory.mktemp("faults")
    env = team_env()
    bare = base / "origin.git"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(bare)], base, env)
    repo = base / "a"
    repo.mkdir()
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(DVC + ["init", "-q"], repo, env)
    write_s3_remote(repo, s3, "faults")
    assert "storage" in sh(DVC + ["remote", "list"], repo, env).stdout
    big = repo / "big"
    big.mkdir()
    rng = hashlib.sha256(b"seed")
    for i in range(300):
        rng.update(str(i).encode())
        (big / f"part-{i:03d}.bin").write_bytes(rng.digest() * 2048)  # 64 KiB, distinct per file
    sh(DVC + ["add", "big"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "data"], repo, env)
    sh(["git", "remote", "add", "origin", str(bare)], repo, env)
    sh(["git", "push", "-q", "origin", "main"], repo, env)
    return {"base": base, "repo": repo, "bare": bare, "env": env, "md5": md5_tree(big)}


def _fresh(faulty, s3, name: str) -> Path:
    return clone(faulty["bare"], faulty["base"] / name, faulty["env"], s3)


def test_killed_push_resumes_and_pull_verifies_every_hash(faulty, s3):
    repo, env = faulty["repo"], faulty["env"]
    total = len(faulty["md5"]) + 1  # the files and the directory listing (.dir)
    log = faulty["base"] / "killed-push.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(DVC + ["push", "-j", "1"], cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 300
    while len(s3.keys("faults/")) < 10:
        assert proc.poll() is None, f"dvc push ended before it could be killed:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # let the server finish a request the client had fully sent
    partial = len(s3.keys("faults/"))
    assert 10 <= partial < total, partial

    again = sh(DVC + ["push"], repo, env)
    assert f"{total - partial} files pushed" in again.stdout, again.stdout
    assert len(s3.keys("faults/")) == total
    assert json.loads(sh(DVC + ["status", "--cloud", "--json"], repo, env).stdout) == {}

    fresh = _fresh(faulty, s3, "verify")
    sh(DVC + ["pull"], fresh, env)  # verify = true: DVC re-hashes every downloaded object
    assert md5_tree(fresh / "big") == faulty["md5"]  # and so do we


def _assert_untouched(clone_dir: Path, env: dict[str, str]) -> None:
    """A failed pull leaves no workspace output and no object in the cache."""
    assert not (clone_dir / "big").exists()
    cache = clone_dir / ".dvc" / "cache" / "files"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]
    assert sh(["git", "status", "--porcelain"], clone_dir, env).stdout == ""


def _timed_pull(clone_dir: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = run(DVC + ["pull"], clone_dir, env, timeout=300)
    return proc, time.monotonic() - t0


class Unreachable:
    """An endpoint on loopback that fails one way: refuses, drops connections, or never answers."""

    def __init__(self, kind: str) -> None:
        self.kind, self.socks = kind, []
        if kind == "refuses":  # nothing listens: connection refused at once
            self.port = free_port()
            return
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        self.port = srv.getsockname()[1]
        self.socks.append(srv)
        if kind == "drops":  # accept queue full and never drained: new SYNs are dropped, connect hangs
            srv.listen(0)
            for _ in range(3):
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", self.port))
                self.socks.append(c)
        else:  # "never_answers": connections are accepted by the kernel, no byte ever comes back
            srv.listen(64)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        for s in self.socks:
            s.close()


# kind -> (what the error says, time limit in s). A server that accepts and never answers costs
# DVC 4 lookups x s3fs's 5 tries x read_timeout (docs/team.md): bounded, but not "fast".
UNREACHABLE = {"refuses": ("Could not connect to the endpoint URL", FAIL_FAST_S),
               "drops": ("Connect timeout on endpoint URL", FAIL_FAST_S),
               "never_answers": ("Read timeout on endpoint URL", 150)}


@pytest.mark.parametrize("kind", list(UNREACHABLE))
def test_unreachable_endpoint_fails_with_a_clear_error(faulty, s3, kind):
    env = faulty["env"]
    fresh = _fresh(faulty, s3, f"unreachable-{kind}")
    expected, limit = UNREACHABLE[kind]
    endpoint = Unreachable(kind)
    try:
        sh(DVC + ["remote", "modify", "--local", "storage", "endpointurl", endpoint.url], fresh, env)
        proc, took = _timed_pull(fresh, env)
    finally:
        endpoint.close()
    print(f"{kind}: dvc pull failed in {took:.1f} s")
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert took < limit, f"{kind}: dvc pull took {took:.1f} s"
    _assert_untouched(fresh, env)


# `llmpipe remote check`: one request, botocore retries off, the remote's timeouts (3 s / 5 s here)
CHECK = [sys.executable, "-m", "llmpipe.cli", "remote", "check"]
CHECK_LIMIT_S = 15    # Python + botocore start-up (~2 s on the busy box) + one read_timeout
CHECK_ERRORS = {"refuses": "could not connect to", "drops": "connect timeout after 3 s",
                "never_answers": "read timeout after 5 s"}


def _timed_check(clone_dir: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = run(CHECK, clone_dir, {**env, "PYTHONPATH": str(ROOT / "src")}, timeout=120)
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("kind", list(UNREACHABLE))
def test_remote_check_fails_fast_on_an_unreachable_endpoint(faulty, s3, kind):
    """The slow `dvc pull` case (never answers: ~2 min) is caught in seconds before the pull."""
    fresh = _fresh(faulty, s3, f"check-{kind}")
    good, took_good = _timed_check(fresh, faulty["env"])
    assert good.returncode == 0 and "reachable, credentials accepted" in good.stdout, good.stderr
    endpoint = Unreachable(kind)
    try:
        sh(DVC + ["remote", "modify", "--local", "storage", "endpointurl", endpoint.url], fresh, faulty["env"])
        proc, took = _timed_check(fresh, faulty["env"])
    finally:
        endpoint.close()
    print(f"remote check: ok in {took_good:.1f} s; {kind}: failed in {took:.1f} s")
    assert proc.returncode == 2
    assert CHECK_ERRORS[kind] in proc.stderr and endpoint.url in proc.stderr, proc.stderr
    assert took < CHECK_LIMIT_S, f"{kind}: remote check took {took:.1f} s"


def test_remote_check_names_refused_credentials_and_a_missing_bucket(faulty, s3):
    fresh = _fresh(faulty, s3, "check-credentials")
    env = faulty["env"]
    set_credentials(fresh, env, s3.key_id, "not-the-secret")
    proc, took = _timed_check(fresh, env)
    assert proc.returncode == 2 and "refused the credentials" in proc.stderr and "403" in proc.stderr, proc.stderr
    assert took < CHECK_LIMIT_S
    set_credentials(fresh, env, s3.key_id, s3.secret)
    sh(DVC + ["remote", "modify", "--local", "storage", "url", "s3://no-such-bucket/x"], fresh, env)
    proc, _ = _timed_check(fresh, env)
    assert proc.returncode == 2 and "bucket 'no-such-bucket' does not exist" in proc.stderr, proc.stderr


def test_wrong_credentials_fail_fast_with_a_clear_error(faulty, s3):
    env = faulty["env"]
    fresh = _fresh(faulty, s3, "wrong-credentials")
    for key_id, secret, what in ((s3.key_id, "not-the-secret", "wrong secret"),
                                 ("AKIAUNKNOWNKEY000000", s3.secret, "unknown key id")):
        set_credentials(fresh, env, key_id, secret)
        proc, took = _timed_pull(fresh, env)
        assert proc.returncode != 0, what
        assert "403" in proc.stderr and "Forbidden" in proc.stderr, proc.stderr[-2000:]
        assert took < FAIL_FAST_S, f"{what}: dvc pull took {took:.1f} s"
        print(f"{what}: dvc pull failed in {took:.1f} s")
        _assert_untouched(fresh, env)
    # push with a wrong secret is refused too and changes nothing in the bucket
    before = sorted(s3.keys("faults/"))
    set_credentials(faulty["repo"], env, s3.key_id, "not-the-secret")
    try:
        proc = run(DVC + ["push"], faulty["repo"], env, timeout=300)
        assert proc.returncode != 0 and "403" in proc.stderr
    finally:
        set_credentials(faulty["repo"], env, s3.key_id, s3.secret)
    assert sorted(s3.keys("faults/")) == before


def test_corrupted_object_is_detected_on_pull(faulty, s3):
    env = faulty["env"]
    repo = faulty["repo"]
    sh(DVC + ["push"], repo, env)  # complete, whatever ran before
    victim_md5 = faulty["md5"]["part-007.bin"]
    key = f"faults/files/md5/{victim_md5[:2]}/{victim_md5[2:]}"
    original = s3.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.s3.put_object(Bucket=BUCKET, Key=key, Body=b"bit rot" + original[7:])
    try:
        fresh = _fresh(faulty, s3, "corrupted")
        proc = run(DVC + ["pull", "-v"], fresh, env, timeout=300)
        assert proc.returncode != 0
        out = proc.stdout + proc.stderr
        assert "corrupted" in out and victim_md5[2:] in out, out[-3000:]
        assert "Checkout failed" in out
        _assert_untouched_but_fetched(fresh, victim_md5)
    finally:
        s3.s3.put_object(Bucket=BUCKET, Key=key, Body=original)


def _assert_untouched_but_fetched(clone_dir: Path, victim_md5: str) -> None:
    """The good objects were fetched into the cache; the corrupted one was not kept, and the
    directory output was not checked out half-way."""
    assert not (clone_dir / "big").exists()
    cache = clone_dir / ".dvc" / "cache" / "files" / "md5"
    assert not (cache / victim_md5[:2] / victim_md5[2:]).exists()
