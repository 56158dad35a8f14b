"""The deployment kit in scripts/deploy/: systemd units, env files, Mosquitto config, Dockerfile,
install guides. Fast, no root, no network: every `tierfl` command line in the kit must parse with
the current CLI, so options that get renamed break this test instead of a device in the field."""

from __future__ import annotations

import argparse
import configparser
import importlib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from protocol.mqtt.broker_config import mosquitto_conf
from tierfl.cli import COMMANDS
from tierfl.config import parse_with_config, resolve

KIT = Path(__file__).resolve().parent.parent / "scripts" / "deploy"
UNITS = {"tierfl-client.service": "client.env", "tierfl-aggregator.service": "aggregator.env"}
GUIDES = ["INSTALL-raspberry-pi.md", "INSTALL-laptop.md", "README.md"]
TIERFL = "/opt/tierfl/venv/bin/tierfl"


def parse_tierfl(command: str, args: list[str], env: dict[str, str] | None = None) -> argparse.Namespace | None:
    """Parse `tierfl COMMAND ARGS` with the real parser, over `env` as TIERFL_* variables when given;
    fail the test with the error otherwise."""
    assert command in COMMANDS, f"unknown tierfl command {command!r}"
    parser = argparse.ArgumentParser(prog=f"tierfl {command}")
    importlib.import_module(COMMANDS[command][0]).configure_parser(parser)
    if "--help" in args or "-h" in args:
        return None
    errors: list[str] = []
    parser.error = lambda message: errors.append(message) or (_ for _ in ()).throw(SystemExit(2))
    try:
        if env is not None:
            return parse_with_config(parser, command, args, env)
        return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"`tierfl {command} {shlex.join(args)}` does not parse: {'; '.join(errors)}")


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((KIT / name).read_text())
    return unit


def read_env(name: str) -> dict[str, str]:
    """An EnvironmentFile= as systemd reads it: KEY=VALUE lines, # comments, optional quotes."""
    env = {}
    for line in (KIT / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{name}: bad line {line!r}"
        assert not key.startswith("export"), f"{name}: systemd does not run a shell"
        env[key] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value
    return env


def expand_exec(command_line: str, env: dict[str, str]) -> list[str]:
    """ExecStart= words after systemd's variable expansion: ${X} one argument, $X split at spaces."""
    words: list[str] = []
    for word in command_line.split():
        if m := re.fullmatch(r"\$\{(\w+)\}", word):
            assert m[1] in env, f"{m[1]} is not set in the environment file"
            words.append(env[m[1]])
        elif m := re.fullmatch(r"\$(\w+)", word):
            assert m[1] in env, f"{m[1]} is not set in the environment file"
            words.extend(env[m[1]].split())
        else:
            assert "$" not in word, f"unexpandable word {word!r}"
            words.append(word)
    return words


def fenced_commands(text: str) -> list[list[str]]:
    """The shell command lines of a Markdown text's fenced code blocks (continuations joined)."""
    lines: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def tierfl_invocations(tokens: list[str], docker_entrypoint: list[str]) -> list[tuple[str, list[str]]]:
    """Every `tierfl COMMAND ARGS` in one command line (ARGS up to a shell operator), including
    `docker run ... tierfl-aggregator ARGS` (the image's ENTRYPOINT before ARGS)."""
    found = []
    for i, token in enumerate(tokens):
        if token.rsplit("/", 1)[-1] == "tierfl" and i + 1 < len(tokens) and tokens[i + 1] in COMMANDS:
            command, start = tokens[i + 1], i + 2
            prefix: list[str] = []
        elif token == "tierfl-aggregator" and "docker" in tokens[:i] and "run" in tokens[:i] and tokens[i - 1] != "--name":
            command, start, prefix = docker_entrypoint[1], i + 1, docker_entrypoint[2:]
        else:
            continue
        rest = tokens[start:]
        for end, word in enumerate(rest):
            if word in ("|", "||", "&&", ";", ">", "2>&1"):
                rest = rest[:end]
                break
        found.append((command, prefix + rest))
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (KIT / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def docker_entrypoint() -> list[str]:
    entry = [args for kind, args in dockerfile_instructions() if kind == "ENTRYPOINT"]
    assert len(entry) == 1, "one ENTRYPOINT"
    return json.loads(entry[0])


@pytest.mark.parametrize("name", UNITS)
def test_unit_has_the_required_settings(name):
    unit = read_unit(name)
    service = unit["Service"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"] and "network-online.target" in unit["Unit"]["Wants"]
    assert service["User"] == "tierfl" and service["Group"] == "tierfl"
    assert service["StateDirectory"] == "tierfl"
    assert service["Restart"] == "on-failure" and service["RestartSec"]
    assert service["EnvironmentFile"] == f"/etc/tierfl/{UNITS[name]}"
    assert re.fullmatch(r"\d+s?", service["TimeoutStopSec"])
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "ReadWritePaths": "/var/lib/tierfl"}.items():
        assert service.get(key) == value, f"{name}: {key}={value}"
    assert service["CapabilityBoundingSet"] == ""
    assert service["ExecStart"].startswith(f"{TIERFL} ")
    assert "/var/lib/tierfl" in service["ExecStart"], "the unit's state lives in its StateDirectory"


@pytest.mark.parametrize("name", UNITS)
def test_unit_command_line_parses_with_the_current_cli(name):
    env = read_env(UNITS[name])
    words = expand_exec(read_unit(name)["Service"]["ExecStart"], env)
    assert words[0] == TIERFL
    options = parse_tierfl(words[1], words[2:], env)
    if words[1] == "client":
        assert options.broker.startswith("mqtts://") and options.data and options.device_id
        assert str(options.cache_dir).startswith("/var/lib/tierfl/")
    else:
        assert options.broker.startswith("mqtts://")
        assert str(options.state_dir) == "/var/lib/tierfl/aggregator"
        assert str(options.enrolled) == "/etc/tierfl/enrolled.json"


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (the configparser checks still ran)")
    executable = tmp_path / "tierfl"  # verify checks that ExecStart's program exists
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    paths = []
    for name in UNITS:
        path = tmp_path / name
        path.write_text((KIT / name).read_text().replace(TIERFL, str(executable)))
        paths.append(str(path))
    result = subprocess.run([analyze, "verify", "--man=no", *paths], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    if result.returncode != 0 and re.search(r"Failed to (initialize|connect|set up)|System has not been booted", output):
        pytest.skip(f"systemd-analyze verify does not run here: {output.strip()[:200]}")
    problems = [line for line in output.splitlines() if any(name in line for name in UNITS)]
    assert result.returncode == 0 and not problems, output


@pytest.mark.parametrize("name", [*GUIDES, "env files"])
def test_every_tierfl_command_in_the_kit_parses(name):
    if name == "env files":  # the env files' options are checked whole by the unit test; here each alone
        env = {**read_env("client.env"), **read_env("aggregator.env")}
        assert not any("tierfl " in value for value in env.values())
        return
    found = [inv for tokens in fenced_commands((KIT / name).read_text())
             for inv in tierfl_invocations(tokens, docker_entrypoint())]
    if name != "README.md":
        assert len(found) >= 3, f"{name}: expected the guide's tierfl command lines, found {found}"
    for command, args in found:
        parse_tierfl(command, args)


def test_guides_cover_install_enrolment_and_checks():
    for name, extra in [("INSTALL-raspberry-pi.md", "[edge,signing]"), ("INSTALL-laptop.md", "[full]")]:
        text = (KIT / name).read_text()
        for needle in (extra, "pip wheel . --no-deps", "--show-key", "journalctl -u tierfl-", "joined",
                       "committed", "systemctl enable --now tierfl-", "PyPI"):
            assert needle in text, f"{name} should mention {needle!r}"


def test_dockerfile_runs_the_aggregator_as_a_user_without_secrets():
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [args.strip() for kind, args in instructions if kind == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must end on a non-root USER"
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert any(kind == "RUN" and "pip install" in args and "[full]" in args for kind, args in instructions)
    assert any(kind == "VOLUME" and "/var/lib/tierfl" in args for kind, args in instructions)
    entry = docker_entrypoint()
    assert entry[:2] == ["tierfl", "aggregator"]
    parse_tierfl("aggregator", entry[2:])
    for kind, args in instructions:
        if kind in ("ENV", "ARG"):
            assert not re.search(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL|mqtts?://[^ ]*@", args, re.I), f"{kind} {args}"
        if kind in ("COPY", "ADD"):
            assert not re.search(r"\.key|credentials|passwd|\.env", args), f"{kind} {args}"
    ignore = (KIT / "Dockerfile.dockerignore").read_text().split()
    assert {".git", "runs", "**/*.key", "**/credentials.json"} <= set(ignore)


def test_mosquitto_conf_is_locked_down_and_consistent_with_broker_config():
    def options(text: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.strip().partition(" ")
                found.setdefault(key, []).append(value.strip())
        return found

    kit = options((KIT / "mosquitto.conf").read_text())
    assert kit.get("allow_anonymous", ["false"]) == ["false"]
    assert "listener" not in kit and "port" not in kit, "the only listener is the generated TLS one"
    assert kit["include_dir"] == ["/etc/tierfl/broker"]
    generated = options(mosquitto_conf("lab", Path("/etc/tierfl/broker")))
    assert generated["allow_anonymous"] == ["false"] and "listener" in generated
    assert not set(kit) & set(generated), f"set twice: {sorted(set(kit) & set(generated))}"
    assert int(kit["max_packet_size"][0]) > 1048576 + 512, "room for a --max-message-bytes chunk"


TOML_EXAMPLES = {"aggregator.toml": "tierfl-aggregator.service", "client.toml": "tierfl-client.service"}


@pytest.mark.parametrize("name", TOML_EXAMPLES)
def test_toml_example_sets_what_its_unit_sets_but_the_password(name):
    """Each config example loads with the role's validating loader and sets every option its unit's
    command line sets, to the same value, except the broker URL: its password stays in the env file."""
    env = read_env(UNITS[TOML_EXAMPLES[name]])
    words = expand_exec(read_unit(TOML_EXAMPLES[name])["Service"]["ExecStart"], env)
    role = words[1]

    def role_parser() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=f"tierfl {role}")
        importlib.import_module(COMMANDS[role][0]).configure_parser(parser)
        return parser

    unit = resolve(role_parser(), role, words[2:], env)
    unit_sets = {s.option.key: s.value for s in [*unit.from_sources("flag"), *unit.from_sources("env")]}
    file_sets = {s.option.key: s.value for s in
                 resolve(role_parser(), role, ["--config", str(KIT / name)], {}).from_sources("file")}
    assert unit_sets.pop("broker").startswith("mqtts://") and "broker" not in file_sets
    assert {key: file_sets.get(key) for key in unit_sets} == unit_sets
    assert not re.search(r"mqtts?://\S*@|PASSWORD", (KIT / name).read_text())


# A URL with a password after --broker, or one substituted there from credentials.json.
SECRET_URL = re.compile(r"--broker[= ]('?mqtts?://[^\s:@/]+:[^\s@/]+@|\"?\$\(.*credentials|\"?\$\(.*\burl\b)")
# A password as a client option's value: mosquitto_pub/sub/rr `-P VALUE` (also after `-u USER`), `--pw VALUE`,
# `--password VALUE`, a `-L mqtt(s)://user:password@` URL, or `mosquitto_passwd -b` (batch mode takes the password
# as an argument). Not `\n-P ...` inside a quoted string (a line of a client's config file, as README section 5 writes).
SECRET_OPTION = re.compile(r"(?<![\w-])(?:-P|--pw|--password)(?:=|[ \t]+)(?=[^\s`)\-])"
                           r"|(?<![\w-])-L[ \t]+['\"]?mqtts?://[^\s:@/]+:[^\s@/]+@"
                           r"|\bmosquitto_passwd\b[^\n]*[ \t]-[A-Za-z]*b\b")


@pytest.mark.parametrize("line, secret", [
    ('mosquitto_pub -h localhost -u pi-1 -P "$P1" -t up/pi-1 -m own', True),
    ("mosquitto_sub -u aggregator -P s3cret -t 'up/+'", True),
    ("mosquitto_sub --pw=\"$PA\" -t x", True),
    ("mosquitto_pub --password hunter2 -t x", True),
    ("mosquitto_pub -L mqtts://pi-1:hunter2@broker:8883/up/pi-1 -m x", True),
    ("sudo mosquitto_passwd -b /etc/tierfl/broker/passwd pi-3 hunter2", True),
    ("sudo mosquitto_passwd /etc/tierfl/broker/passwd pi-3", False),
    ("""sudo jq -r '"-u pi-1\\n-P \\(.devices."pi-1".password)"' $C > "$D/mosquitto_pub\"""", False),
    ("XDG_CONFIG_HOME=$D mosquitto_pub -h localhost -t up/pi-1 -m own", False),
    ("keeps the password off the command line (no `-P`)", False),
])
def test_the_secret_pattern_catches_passwords_given_as_options(line, secret):
    assert bool(SECRET_OPTION.search(line)) is secret, line


def test_no_password_is_put_on_a_command_line():
    """Every local user reads command lines (ps): units, the Dockerfile and the docs pass the URL in the environment,
    and the Mosquitto clients of the docs read their password from a config file, not from `-P`."""
    for name in UNITS:
        assert "--broker" not in read_unit(name)["Service"]["ExecStart"], name
    root = KIT.parents[1]
    for path in [*KIT.iterdir(), root / "README.md", *(root / "docs").glob("*.md")]:
        if path.is_file():
            text = path.read_text()
            found = [text[: match.start()].count("\n") + 1 for pattern in (SECRET_URL, SECRET_OPTION)
                     for match in pattern.finditer(text)]
            assert not found, f"{path}, line {found[0]}: {text.splitlines()[found[0] - 1]}"
