"""backupkit.config: environment variables and flags turned into validated values, in process."""

from __future__ import annotations

from datetime import timedelta

import pytest

from backupkit import config, pgurl, postgres
from backupkit.errors import UsageError

BAD_ENVIRONMENTS = ["prod/uction", "..", "../etc", "Production", "-prod", "prod_1", "a" * 64, " prod", "prod\n", ""]
BAD_BUCKETS = ["Bad_Bucket", "ab", "bucket..name", "-bucket", "192.168.1.1", "s3://bucket", "bucket/prefix", "bucket-name\n"]


@pytest.mark.parametrize("name", BAD_ENVIRONMENTS)
def test_bad_environment_names_are_refused(name):
    """The whole list against the validator; each script's wiring is in test_usage_errors.py."""
    # "" is not invalid but missing: "no environment given: set BACKUP_ENVIRONMENT …"
    with pytest.raises(UsageError, match="invalid environment" if name else "environment"):
        config.environment_name(name)


def test_good_names_pass():
    assert config.environment_name("production") == "production"
    assert config.environment_name("a" * 63) == "a" * 63
    assert config.bucket_name("acme-external.backups") == "acme-external.backups"


@pytest.mark.parametrize("name", BAD_BUCKETS)
def test_bad_bucket_names_are_refused(name):
    with pytest.raises(UsageError, match="invalid bucket"):
        config.bucket_name(name)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200), (" 1d ", 86400), ("1w", 604800)])
def test_durations(text, seconds):
    assert config.parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["0h", "-1h", "2 hours", "soon", "", "99999999999w", "3661d"])
def test_bad_durations_are_usage_errors(text):
    with pytest.raises(UsageError, match="invalid duration"):
        config.parse_duration(text)


def test_the_passphrase_rule(monkeypatch):
    assert config.passphrase("secret\n") == "secret"
    assert config.passphrase("secret\r\n") == "secret"
    assert config.passphrase(" spaced ") == " spaced "
    for bad in ("sec\nret", "sec\rret"):
        with pytest.raises(UsageError, match="line break"):
            config.passphrase(bad)
    monkeypatch.setenv(config.KEY_VAR, "current\n")
    monkeypatch.setenv(config.PREVIOUS_KEY_VAR, "old-one,,older\n")
    assert config.passphrases() == ["current", "old-one", "older"]
    monkeypatch.setenv(config.KEY_VAR, "\n")
    with pytest.raises(UsageError, match="no encryption passphrase"):
        config.passphrases()


@pytest.mark.parametrize(("url", "dbname", "password", "database"), [
    ("postgresql://app:s3cret@db:5432/app", "postgresql://app@db:5432/app", "s3cret", "app"),
    ("postgresql://app:p%23a%2Fs%3Fs%40w@db/app", "postgresql://app@db/app", "p#a/s?s@w", "app"),
    ("postgresql://app:p@ss@db/app", "postgresql://app@db/app", "p@ss", "app"),  # '@' parses (the last one ends the userinfo)
    ("postgres://app@db/app?password=pw&sslmode=require", "postgres://app@db/app?sslmode=require", "pw", "app"),
    ("postgresql://u@[::1]:5432/x", "postgresql://u@[::1]:5432/x", None, "x"),
    ("postgresql:///app?host=/var/run/postgresql", "postgresql:///app?host=/var/run/postgresql", None, "app"),
    # Several hosts: libpq tries them in turn (issue 21, item 14).
    ("postgresql://u:pw@h1:5432,h2:5433/db", "postgresql://u@h1:5432,h2:5433/db", "pw", "db"),
    ("postgresql://u@[::1]:5432,db2,10.0.0.3:6432/x?target_session_attrs=read-write",
     "postgresql://u@[::1]:5432,db2,10.0.0.3:6432/x?target_session_attrs=read-write", None, "x"),
    # libpq decodes %XX in the query and leaves '+' alone; the rest of the query is kept as written.
    ("postgresql://app@db/app?sslmode=require&password=a+b%26c", "postgresql://app@db/app?sslmode=require", "a+b&c", "app"),
    ("postgresql://app:Zq%3A%2F%3F%23%5B%5D%40%21%24%26%27%28%29%2A%2B%2C%3B%3D%25%20Xv@db/app", "postgresql://app@db/app",
     "Zq:/?#[]@!$&'()*+,;=% Xv", "app"),
])
def test_database_urls_are_split_into_a_password_free_url_and_the_password(url, dbname, password, database):
    target = postgres.database_target(url)
    assert (target.dbname, target.password, target.database) == (dbname, password, database)
    assert password is None or password not in " ".join(target.args())


@pytest.mark.parametrize("url", [
    "postgresql://app:pa#ss@db/app", "postgresql://app:pa/ss@db:5432/app", "postgresql://app:pa?ss@db/app",
    "postgresql://[::1", "postgresql://u:pw@db:notaport/app", "mysql://u:pw@db/app", "not a url",
    # The issue's: '#' encoded, the rest not; read naively, the password is 'p' and the host 'ss%23w'.
    "postgresql://app:p@ss%23w/rd?@127.0.0.1/app", "postgresql://app:pa@ss/x@db/app",
    "postgresql://app:pa[ss]@db/app", "postgresql://app:pa%zzss@db/app", "postgresql://app:pa\tss@db/app",
    "postgresql://app@db/app?password=pa&zq9x=1", "postgresql://u:pw@h1:5432,h2:x/db",
])
def test_urls_libpq_would_misread_are_refused_without_showing_them(url):
    with pytest.raises(UsageError) as raised:
        postgres.database_target(url, "DATABASE_URL")
    message = str(raised.value)
    assert message.startswith("DATABASE_URL") and url not in message
    assert not [secret for secret in ("pa#ss", "pa/ss", "pa?ss", ":pw@", "ss%23w", "ss/x", "zq9x", "zzss") if secret in message]


def test_the_refusal_says_which_characters_to_encode():
    with pytest.raises(UsageError) as raised:
        postgres.database_target("postgresql://app:p@ss%23w/rd?@127.0.0.1/app", "DATABASE_URL")
    assert "an '@' after the host" in str(raised.value)
    assert ": / ? # [ ] @ ! $ & ' ( ) * + , ; = % and space" in str(raised.value) and "PGPASSWORD" in str(raised.value)


def test_everything_that_could_be_the_password_of_a_refused_url_is_a_secret():
    secrets = pgurl.url_secrets("postgresql://app:p@ss%23w/rd?@127.0.0.1/app")
    assert "p@ss%23w/rd?" in secrets and "p@ss#w/rd?" in secrets
    assert pgurl.url_secrets("postgresql://postgres@db/app") == []  # a user name is no secret


def test_an_sslpassword_is_refused_without_showing_it():
    """libpq takes it only in the connection string, which pg_dump and psql would get on argv."""
    with pytest.raises(UsageError) as raised:
        postgres.database_target("postgresql://app@db/app?sslmode=verify-full&sslpassword=k3y-secret", "DATABASE_URL")
    assert str(raised.value).startswith("DATABASE_URL has sslpassword") and "k3y-secret" not in str(raised.value)


def test_the_password_of_any_url_is_known_as_a_secret():
    for url in ("postgresql://app:pa#ss@db/app", "postgresql://app:s3cret@db/app", "postgresql://app@db/app?password=qpw"):
        secrets = pgurl.url_secrets(url)
        assert any(s in url for s in secrets) and not any(s == url for s in secrets)
    assert "pa#ss" in pgurl.url_secrets("postgresql://app:pa#ss@db/app")


def test_children_get_no_secret_and_no_actions_variable(monkeypatch):
    for name in (*config.SECRET_VARS, "ACTIONS_ID_TOKEN_REQUEST_TOKEN", "ACTIONS_RUNTIME_TOKEN", "GITHUB_TOKEN"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("HARMLESS", "kept")
    env = config.child_env(PGPASSWORD="for-psql")
    assert env["HARMLESS"] == "kept" and env["PGPASSWORD"] == "for-psql"
    assert not [k for k in env if k in config.SECRET_VARS and k != "PGPASSWORD"]
    assert not [k for k in env if k.startswith("ACTIONS_") or k == "GITHUB_TOKEN"]


def test_now_can_be_set_for_drills(monkeypatch):
    monkeypatch.setenv(config.NOW_VAR, "2026-11-29T10:00:00Z")
    assert config.utcnow().isoformat() == "2026-11-29T10:00:00+00:00"
    monkeypatch.setenv(config.NOW_VAR, "yesterday")
    with pytest.raises(UsageError, match=config.NOW_VAR):
        config.utcnow()


def test_ages_read_well():
    assert config.format_age(timedelta(days=2, hours=3, minutes=4)) == "2d 3h"
    assert config.format_age(timedelta(hours=3, minutes=5)) == "3h 5m"
    assert config.format_age(timedelta(seconds=75)) == "1m 15s"
    assert config.format_age(timedelta(seconds=-5)) == "0m 0s"
