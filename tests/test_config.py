"""Role configuration (tierfl/config.py): TOML file < TIERFL_* environment < flags over the defaults of
the real `tierfl aggregator` and `tierfl client` parsers, the errors that name file, key and reason,
and `tierfl config show`."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tierfl.cli import COMMANDS, main
from tierfl.config import ConfigError, EffectiveConfig, masked, parse_with_config, render_toml, resolve, toml_value

ROOT = Path(__file__).resolve().parent.parent


def role_parser(role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"tierfl {role}")
    importlib.import_module(COMMANDS[role][0]).configure_parser(parser)
    return parser


def effective(role: str, argv: list[str] = (), env: dict[str, str] | None = None) -> EffectiveConfig:
    return resolve(role_parser(role), role, list(argv), env or {})


def write(tmp_path: Path, text: str, name: str = "lab.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def no_tierfl_environment(monkeypatch):
    """The developer's own TIERFL_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith("TIERFL_"):
            monkeypatch.delenv(name)


# role, file key, TOML value, env text, flag words, expected value from file, env, flag
LAYERS = [
    ("aggregator", "rounds", "5", "6", ["--rounds", "7"], (5, 6, 7)),
    ("aggregator", "round-timeout", "30", "45.5", ["--round-timeout", "60.5"], (30.0, 45.5, 60.5)),
    ("aggregator", "fleet", '"file"', "env", ["--fleet", "flag"], ("file", "env", "flag")),
    ("aggregator", "downlink", '"float16"', "int8-delta", ["--downlink", "float32"], ("float16", "int8-delta", "float32")),
    ("aggregator", "image-size", "28", "8", ["--image-size", "28"], (28, 8, 28)),
    ("aggregator", "mask-classes", "true", "0", ["--mask-classes"], (True, False, True)),
    ("aggregator", "state-dir", '"runs/file"', "runs/env", ["--state-dir", "runs/flag"],
     (Path("runs/file"), Path("runs/env"), Path("runs/flag"))),
    ("client", "threads", "2", "3", ["--threads", "4"], (2, 3, 4)),
    ("client", "test-fraction", "0.1", "0.3", ["--test-fraction", "0.5"], (0.1, 0.3, 0.5)),
    ("client", "codec", '"int8"', "float16", ["--codec", "topk:0.1"], ("int8", "float16", "topk:0.1")),
    ("client", "backend", '"portable"', "ort-training", ["--backend", "auto"], ("portable", "ort-training", "auto")),
    ("client", "show-key", "true", "no", ["--show-key"], (True, False, True)),
    ("client", "cache-dir", '"/var/cache/f"', "/var/cache/e", ["--cache-dir", "/var/cache/x"],
     (Path("/var/cache/f"), Path("/var/cache/e"), Path("/var/cache/x"))),
    ("relay", "margin", "5", "4.5", ["--margin", "2"], (5.0, 4.5, 2.0)),
    ("relay", "id", '"site-f"', "site-e", ["--id", "site-x"], ("site-f", "site-e", "site-x")),
]


@pytest.mark.parametrize("role, key, toml, env_text, flag, expected", LAYERS, ids=[f"{r}-{k}" for r, k, *_ in LAYERS])
def test_flag_beats_env_beats_file_beats_default(tmp_path, role, key, toml, env_text, flag, expected):
    parser = role_parser(role)
    option = next(a for a in parser._actions if f"--{key}" in a.option_strings)
    variable = "TIERFL_" + option.dest.upper()
    file = write(tmp_path, f"{key} = {toml}\n")
    layers = [([], {}, option.default, "default"),
              (["--config", str(file)], {}, expected[0], "file"),
              (["--config", str(file)], {variable: env_text}, expected[1], "env"),
              (["--config", str(file), *flag], {variable: env_text}, expected[2], "flag")]
    for argv, env, value, source in layers:
        config = effective(role, argv, env)
        got = getattr(config.namespace, option.dest)
        assert got == value and type(got) is type(value), (source, got, value)
        [setting] = [s for s in config.settings if s.option.key == key]
        assert (setting.source, setting.value) == (source, value)
    assert config.namespace.config == file


def test_keys_take_dashes_or_underscores_and_the_role_table_wins(tmp_path):
    file = write(tmp_path, 'round_timeout = 5\nid = "top"\n[aggregator]\nround-timeout = 9\n'
                           '[client]\nnot-an-aggregator-option = 1\n[relay]\nwhatever = true\n'
                           '[edge-aggregator]\nwhatever = true\n')  # the relay's table under its old name: skipped too
    namespace = effective("aggregator", ["--config", str(file)]).namespace
    assert namespace.round_timeout == 9.0 and namespace.aggregator_id == "top"
    by_dest = write(tmp_path, 'aggregator-id = "by-dest"\n', "dest.toml")  # --id's dest is a key too
    assert effective("aggregator", ["--config", str(by_dest)]).namespace.aggregator_id == "by-dest"
    assert effective("aggregator", [], {"TIERFL_AGGREGATOR_ID": "env"}).namespace.aggregator_id == "env"


def test_config_file_from_TIERFL_CONFIG_and_the_flag_wins(tmp_path):
    env_file, flag_file = write(tmp_path, "rounds = 3\n", "env.toml"), write(tmp_path, "rounds = 4\n", "flag.toml")
    assert effective("aggregator", [], {"TIERFL_CONFIG": str(env_file)}).namespace.rounds == 3
    config = effective("aggregator", ["--config", str(flag_file)], {"TIERFL_CONFIG": str(env_file)})
    assert config.namespace.rounds == 4 and config.file == flag_file


BAD_VALUES = [
    ('round-timeout = "abc"', "key 'round-timeout': Input should be a valid number, unable to parse string as a number"),
    ("[aggregator]\nrounds = 2.5",
     "key 'aggregator.rounds': Input should be a valid integer, got a number with a fractional part"),
    ('downlink = "int4"', "key 'downlink': Input should be one of 'float32', 'float16', 'int8-delta'"),
    ("image-size = 12", "key 'image-size': Input should be one of 8, 28, 32"),
    ("fleet = 5", "key 'fleet': Input should be a valid string"),
    ('mask-classes = "maybe"', "key 'mask-classes': Input should be a valid boolean, unable to interpret input"),
    ("state-dir = 3", "key 'state-dir': Input is not a valid path for <class 'pathlib.Path'>"),
]


@pytest.mark.parametrize("text, reason", BAD_VALUES, ids=[r.split("'")[1] for _, r in BAD_VALUES])
def test_a_bad_value_names_the_file_the_key_and_the_reason(tmp_path, text, reason):
    file = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as error:
        effective("aggregator", ["--config", str(file)])
    assert str(error.value) == f"{file}: {reason}"


def test_every_bad_value_is_reported_at_once(tmp_path):
    file = write(tmp_path, 'rounds = "x"\nlr = "y"\n')
    with pytest.raises(ConfigError) as error:
        effective("aggregator", ["--config", str(file)])
    assert [line.split(":")[1] for line in str(error.value).splitlines()] == [" key 'rounds'", " key 'lr'"]


def test_an_unknown_key_is_refused_with_the_closest_and_the_valid_ones(tmp_path):
    file = write(tmp_path, "round-timout = 30\n[aggregatr]\nrounds = 1\n")
    with pytest.raises(ConfigError) as error:
        effective("aggregator", ["--config", str(file)])
    lines = str(error.value).splitlines()
    assert lines[0] == f"{file}: unknown key 'round-timout' (did you mean 'round-timeout'?)"
    assert lines[1] == f"{file}: unknown key 'aggregatr' (did you mean 'aggregator'?)"
    assert lines[2].startswith("valid keys of aggregator: broker, fleet, id, ") and "round-timeout" in lines[2]
    twice = write(tmp_path, "round-timeout = 1\nround_timeout = 2\n", "twice.toml")
    with pytest.raises(ConfigError, match="keys 'round-timeout' and 'round_timeout' set the same option"):
        effective("aggregator", ["--config", str(twice)])
    with pytest.raises(ConfigError, match="key 'client': should be a table"):
        effective("client", ["--config", str(write(tmp_path, "client = 3\n", "notable.toml"))])


def test_a_bad_environment_value_names_the_variable(tmp_path):
    with pytest.raises(ConfigError) as error:
        effective("aggregator", [], {"TIERFL_ROUND_TIMEOUT": "abc", "TIERFL_BACKEND": "nonsense"})
    assert str(error.value) == "environment TIERFL_ROUND_TIMEOUT: Input should be a valid number, unable to parse string as a number"
    with pytest.raises(ConfigError, match="^environment TIERFL_THREADS: Input should be a valid integer"):
        effective("client", [], {"TIERFL_THREADS": "four"})


def test_other_and_empty_variables_are_ignored():
    env = {"TIERFL_ARGS": "--fleet x", "TIERFL_DEBUG": "1", "TIERFL_DEVICE_ID": "pi-1", "TIERFL_ROUNDS": ""}
    config = effective("aggregator", [], env)
    assert config.from_sources("env") == [] and config.namespace.rounds == 20
    assert effective("client", [], env).namespace.device_id == "pi-1"


def test_unreadable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml: no such file"):
        effective("client", ["--config", str(tmp_path / "missing.toml")])
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML: .*line 1"):
        effective("client", ["--config", str(write(tmp_path, "fleet = \n", "bad.toml"))])
    with pytest.raises(ConfigError, match="not UTF-8"):
        (tmp_path / "latin.toml").write_bytes(b'fleet = "caf\xe9"\n')
        effective("client", ["--config", str(tmp_path / "latin.toml")])


def test_help_and_bad_flags_behave_as_before(capsys):
    parser = role_parser("aggregator")
    with pytest.raises(SystemExit) as done:
        parse_with_config(parser, "aggregator", ["--help"], {})
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "total rounds, counting rounds done before a restart (default: 20)" in out
    assert "SUPPRESS" not in out and "--config FILE" in out
    with pytest.raises(SystemExit) as done:
        parse_with_config(role_parser("client"), "client", ["--threads", "x"], {})
    assert done.value.code == 2 and "invalid int value: 'x'" in capsys.readouterr().err


def test_parse_with_config_reads_os_environ_and_exits_2_on_a_bad_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIERFL_FLEET", "from-env")
    monkeypatch.setenv("TIERFL_CONFIG", str(write(tmp_path, "threads = 3\n")))
    namespace = parse_with_config(role_parser("client"), "client", ["--codec", "int8"])
    assert (namespace.fleet, namespace.threads, namespace.codec) == ("from-env", 3, "int8")
    monkeypatch.setenv("TIERFL_CONFIG", str(write(tmp_path, "threads = -\n", "bad.toml")))
    with pytest.raises(SystemExit) as done:
        parse_with_config(role_parser("client"), "client", [])
    assert done.value.code == 2 and capsys.readouterr().err.startswith(f"tierfl client: error: {tmp_path / 'bad.toml'}: not valid TOML")


def test_required_options_may_come_from_any_source(tmp_path, capsys):
    file = write(tmp_path, '[relay]\nparent = "mqtt://root:1883"\nartifacts = "exports/lab"\n')
    env = {"TIERFL_RELAY_ID": "site1"}
    namespace = parse_with_config(role_parser("relay"), "relay", ["--config", str(file), "--fleet", "site1"], env)
    assert (namespace.parent, namespace.relay_id, namespace.fleet, namespace.artifacts) == (
        "mqtt://root:1883", "site1", "site1", Path("exports/lab"))
    with pytest.raises(SystemExit) as done:
        parse_with_config(role_parser("relay"), "relay", ["--config", str(file)], {})
    assert done.value.code == 2 and capsys.readouterr().err == (
        "tierfl relay: error: the following options are required: --id, --fleet "
        "(as flags, keys of the --config file or TIERFL_RELAY_ID, TIERFL_FLEET)\n")
    shown = render_toml(effective("relay", ["--config", str(file)]))
    assert "# id = (not set)  # default; required: set it here, with --id or TIERFL_RELAY_ID\n" in shown


def test_the_relay_reads_its_old_table_and_variable(tmp_path, capsys):
    """Configurations written for `tierfl edge-aggregator` still start `tierfl relay`: [edge-aggregator], TIERFL_EDGE_ID."""
    old = write(tmp_path, '[edge-aggregator]\nparent = "mqtt://root:1883"\nfleet = "site1"\n', "old.toml")
    namespace = effective("relay", ["--config", str(old)], {"TIERFL_EDGE_ID": "site1"}).namespace
    assert (namespace.parent, namespace.fleet, namespace.relay_id) == ("mqtt://root:1883", "site1", "site1")
    both = {"TIERFL_EDGE_ID": "old", "TIERFL_RELAY_ID": "new"}
    assert effective("relay", [], both).namespace.relay_id == "new", "the new variable wins"
    twice = write(tmp_path, '[relay]\nfleet = "a"\n[edge-aggregator]\nfleet = "b"\n', "twice.toml")
    with pytest.raises(ConfigError, match=r"tables \[relay\], \[edge-aggregator\] are the same role: keep \[relay\]"):
        effective("relay", ["--config", str(twice)])
    assert main(["config", "show", "edge-aggregator", "--config", str(old), "--id", "site1", "--artifacts", "art"]) == 0
    assert capsys.readouterr().out.startswith("# tierfl relay: effective configuration")


def test_the_parser_keeps_its_defaults_after_resolving():
    parser = role_parser("client")
    before = {a.dest: a.default for a in parser._actions}
    resolve(parser, "client", ["--threads", "2"], {"TIERFL_FLEET": "x"})
    assert {a.dest: a.default for a in parser._actions if a.dest in before} == before
    assert parser.parse_args([]).threads == 1
    relay = role_parser("relay")
    resolve(relay, "relay", [], {})
    assert {a.dest for a in relay._actions if a.required} == {"parent", "relay_id", "fleet", "artifacts"}


ROUND_TRIP = {
    "aggregator": ('fleet = "lab"\nrounds = 50\nmask-classes = true\n[aggregator]\ntier-mix = "a2-e8"\n',
                   {"TIERFL_BROKER": "mqtts://aggregator:s3cr%40t@broker.lan:8883?ca=/etc/tierfl/ca.crt", "TIERFL_LR": "0.2"},
                   ["--image-size", "28", "--state-dir", "runs/x y", "--downlink", "float16"]),
    "relay": ('[relay]\nparent = "mqtt://site1:pw@root.lan:1883"\nid = "site1"\nfleet = "site1"\n',
              {"TIERFL_ARTIFACTS": "/srv/artifacts", "TIERFL_MARGIN": "1.5"}, ["--tier-policy", "auto"]),
    "client": ('device-id = "pi-1"\ncodec = "topk:0.1+int8"\n',
               {"TIERFL_BROKER": "mqtt://pi-1:pw@10.0.0.2:1883", "TIERFL_SHOW_KEY": "true"},
               ["--cache-dir", "/var/lib/tierfl/cache", "--data", 'we"ird\\name.npz', "--threads", "3"]),
}


@pytest.mark.parametrize("role", ROUND_TRIP)
def test_config_show_output_is_the_same_configuration_as_a_file(tmp_path, role):
    text, env, flags = ROUND_TRIP[role]
    original = effective(role, ["--config", str(write(tmp_path, text)), *flags], env)
    shown = render_toml(original, show_secrets=True)
    assert tomllib.loads(shown)
    again = effective(role, ["--config", str(write(tmp_path, shown, "shown.toml"))])
    assert {**vars(again.namespace), "config": None} == {**vars(original.namespace), "config": None}
    assert all(s.source in ("file", "default") for s in again.settings)


def test_config_show_says_where_each_value_came_from_and_masks_passwords(tmp_path):
    file = write(tmp_path, "rounds = 5\n")
    env = {"TIERFL_BROKER": "mqtt://aggregator:hunter2@broker.lan:1883", "TIERFL_EPOCHS": "3"}
    shown = render_toml(effective("aggregator", ["--config", str(file), "--lr", "0.3"], env))
    lines = {line.split(" = ")[0]: line for line in shown.splitlines() if " = " in line}
    assert lines["rounds"] == f"rounds = 5  # from {file}"
    assert lines["epochs"] == "epochs = 3  # from TIERFL_EPOCHS"
    assert lines["lr"] == "lr = 0.3  # from --lr"
    assert lines["fleet"] == 'fleet = "default"  # default'
    assert lines["# artifacts"] == "# artifacts = (not set)  # default: STATE_DIR/artifacts, exported on first start"
    assert "hunter2" not in shown
    assert lines["broker"].startswith('broker = "mqtt://aggregator:***@broker.lan:1883"  # from TIERFL_BROKER; secret masked')
    assert shown.index("\n# rounds (FedAvg)\n") < shown.index("\nrounds = 5 ") < shown.index("\n# robust aggregation")


def test_tierfl_config_show_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIERFL_BROKER", "mqtt://pi-1:pw@h:1883")
    assert main(["config", "show", "client", "--config", str(write(tmp_path, "threads = 2\n")), "--fleet", "lab"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert (shown["threads"], shown["fleet"], shown["broker"]) == (2, "lab", "mqtt://pi-1:***@h:1883")
    assert main(["config", "show", "--show-secrets", "client"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["broker"] == "mqtt://pi-1:pw@h:1883"


def test_config_show_gives_the_values_a_start_would_use_for_unset_options(capsys):
    """Unset options that follow from others show the value a start uses; the rest say what unset means."""
    assert main(["config", "show", "aggregator", "--strategy", "fedprox"]) == 0
    out = capsys.readouterr().out
    assert "# mu = 0.01  # default: what this start uses" in out and "# trim-fraction = 0.2  #" in out
    assert '# artifacts = "runs/aggregator/artifacts"  #' in out
    assert "# broker = (not set)  # default: start an embedded broker" in out
    assert main(["config", "show", "aggregator"]) == 0
    assert "# mu = 0.0  #" in capsys.readouterr().out
    assert main(["config", "show", "client", "--device-id", "pi-1", "--fleet", "lab"]) == 0
    assert '# cache-dir = "' + str(Path.home() / ".cache/tierfl/lab/pi-1") + '"' in capsys.readouterr().out


@pytest.mark.parametrize("options,message", [
    (["--secure-aggregation", "--robust", "median"], "--secure-aggregation cannot be combined with --robust median"),
    (["--secure-aggregation", "--strategy", "fedbuff"], "--secure-aggregation cannot be combined with --strategy fedbuff"),
    (["--secure-aggregation", "--dp", "central", "--dp-clip", "1", "--dp-noise", "1"], "cannot be combined with --dp central"),
    (["--strategy", "fedbuff", "--max-share", "0.5"], "--max-share applies to synchronous rounds"),
    (["--strategy", "fedprox", "--mu", "0"], "--strategy fedprox needs --mu > 0"),
    (["--logit-adjust", "-1"], "--logit-adjust must be in [0, 10], got -1.0"),
    (["--logit-adjust", "nan"], "--logit-adjust must be in [0, 10], got nan"),
])
def test_options_that_do_not_combine_exit_2_before_anything_is_written(tmp_path, capsys, options, message):
    state = tmp_path / "state"
    assert main(["aggregator", "--state-dir", str(state), *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tierfl aggregator: error: ") and message in err[-1], err
    assert not state.exists(), "nothing exported, no key made"


def test_masking():
    option = effective("client").settings[0].option
    assert masked(option, "mqtts://u:p@h:8883?ca=/x") == "mqtts://u:***@h:8883?ca=/x"
    assert masked(option, "mqtt://h:1883") == "mqtt://h:1883" and masked(option, "digits") == "digits"
    assert masked(option, "mqtt://:p@h") == "mqtt://:***@h" and masked(option, "http://[bad") == "http://[bad"


@pytest.mark.parametrize("value", ["plain", 'qu"ote\\back', "tab\tnew\nline\x7f", "ünï", 3, -2.5, 1e-07,
                                   float("inf"), True, ["a", "b c"], Path("/x y/z")])
def test_toml_values_read_back(value):
    parsed = tomllib.loads(f"key = {toml_value(value)}\n")["key"]
    assert parsed == (str(value) if isinstance(value, Path) else value)


def test_any_parser_is_configurable_generically(tmp_path):
    """What the relay or any later role may use: lists, counts, inverted switches, type functions."""
    def port(text: str) -> int:
        if not 0 < int(text) < 65536:
            raise argparse.ArgumentTypeError(f"port {text} out of range")
        return int(text)

    parser = argparse.ArgumentParser(prog="tierfl relay")
    parser.add_argument("--upstream", action="append", default=[])
    parser.add_argument("--tiers", nargs="+", choices=["a", "b", "c"], default=["a"])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--no-cache", dest="cache", action="store_false")
    parser.add_argument("--port", type=port, default=1883)
    parser.add_argument("--sync", action=argparse.BooleanOptionalAction, default=True)
    file = write(tmp_path, 'upstream = ["mqtt://a", "mqtt://b"]\ntiers = ["b", "c"]\nverbose = 2\n'
                           'no-cache = true\nport = 8883\nsync = false\n')
    config = resolve(parser, "relay", ["--config", str(file), "--upstream", "mqtt://c"], {"TIERFL_TIERS": "a c"})
    assert vars(config.namespace) | {"config": None} == {
        "upstream": ["mqtt://c"], "tiers": ["a", "c"], "verbose": 2, "cache": False, "port": 8883, "sync": False, "config": None}
    assert tomllib.loads(render_toml(config))["no-cache"] is True
    with pytest.raises(ConfigError, match=r"key 'port': Value error, port 70000 out of range"):
        resolve(parser, "relay", ["--config", str(write(tmp_path, "port = 70000\n", "p.toml"))], {})
    with pytest.raises(ConfigError, match=r"environment TIERFL_TIERS item 0: Input should be one of 'a', 'b', 'c'"):
        resolve(parser, "relay", [], {"TIERFL_TIERS": "d"})
    with pytest.raises(ConfigError, match=r"unknown key 'no-sync' \(did you mean 'sync'\?\)"):  # not sync = true
        resolve(parser, "relay", ["--config", str(write(tmp_path, "no-sync = true\n", "n.toml"))], {})
    shown = render_toml(resolve(parser, "relay", ["--upstream", "mqtt://u:pw@a", "--upstream", "mqtt://b"], {}))
    assert 'upstream = ["mqtt://u:***@a", "mqtt://b"]' in shown


def test_the_aggregator_stops_at_start_on_a_bad_config_file(tmp_path):
    bad = write(tmp_path, "fleet = \"lab\"\nround-timeout = \"thirty\"\n", "bad.toml")
    result = subprocess.run([sys.executable, "-m", "tierfl.cli", "aggregator", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("TIERFL_")}, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"tierfl aggregator: error: {bad}: key 'round-timeout': Input should be a valid number, unable to parse string as a number")
    assert not (tmp_path / "runs").exists(), "it stopped before touching its state directory"


@pytest.mark.parametrize("command", ["relay", "edge-aggregator"])  # the old name runs the same command
def test_relay_show_key_prints_the_key_the_parent_enrols(tmp_path, capsys, command):
    argv = [command, "--parent", "mqtt://127.0.0.1:1", "--id", "site1", "--fleet", "site",
            "--artifacts", str(tmp_path / "art"), "--state-dir", str(tmp_path / "relay"), "--show-key"]
    assert main(argv) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown) == ["site1"] and re.fullmatch(r"[0-9a-f]{64}", shown["site1"])
    assert (tmp_path / "relay" / "device.key").exists()
    assert main(argv) == 0 and json.loads(capsys.readouterr().out) == shown, "the same key on every start"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Small exports the conflict checks read: plain tiers a and c, and a batch-norm model."""
    from models.export import export_all
    from models.spec import ModelSpec

    root = tmp_path_factory.mktemp("exports")
    export_all(ModelSpec(arch="mlp", hidden=(8,)), ["a", "c"], root / "plain")
    export_all(ModelSpec(arch="mlp", hidden=(8,), batch_norm=True), ["a"], root / "bn")
    return {"plain": root / "plain", "bn": root / "bn"}


@pytest.mark.parametrize("options,message", [
    (["--dp", "central", "--dp-clip", "1", "--dp-noise", "1", "--artifacts", "{bn}"],
     "--dp needs --bn-statistics averaged: the batch-norm statistics of mlp8-h8-bn measured on devices"),
    (["--dp", "local", "--dp-clip", "1", "--dp-noise", "1", "--artifacts", "{bn}", "--bn-statistics", "devices"],
     "--dp needs --bn-statistics averaged"),
    (["--tier-mix", "a-e", "--artifacts", "{plain}"], "--tier-mix names tiers e that the export lacks (have: a, c)"),
    (["--tier-mix", "a2-c8", "--tiers", "a,b"], "--tier-mix names tiers c that the export lacks (have: a, b, from --tiers)"),
    (["--tier-mix", "a-x"], "unknown tier 'x'"),
    (["--tiers", "a,z"], "unknown tier 'z'"),
    (["--mu", "0.1", "--artifacts", "{plain}"], "--mu 0.1 needs artifacts with the FedProx term"),
    (["--strategy", "fedprox", "--artifacts", "{plain}"], "--mu 0.01 needs artifacts with the FedProx term"),
], ids=["dp-central-bn", "dp-local-bn", "tier-mix-artifacts", "tier-mix-tiers", "tier-mix-syntax", "tiers", "mu",
        "fedprox"])
def test_options_that_do_not_fit_the_export_exit_2_before_anything_is_exported(tmp_path, capsys, exports, options,
                                                                                message):
    """Checked against the export's model and tiers (read, or as a start would write it), not after exporting."""
    state = tmp_path / "state"
    argv = [option.format(**exports) for option in options]
    assert main(["aggregator", "--state-dir", str(state), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tierfl aggregator: error: ") and message in err[0], err
    assert not state.exists(), "nothing exported, no key made, no options.json"


def test_mu_against_the_state_folders_own_export_is_refused_before_options_json(tmp_path, capsys, exports):
    """A state folder exported without the FedProx term by an earlier start: --mu is refused before anything is written."""
    import shutil

    state = tmp_path / "state"
    shutil.copytree(exports["plain"], state / "artifacts")
    before = sorted(p.relative_to(state) for p in state.rglob("*"))
    assert main(["aggregator", "--state-dir", str(state), "--strategy", "fedprox", "--mu", "0.05"]) == 2
    assert "--mu 0.05 needs artifacts with the FedProx term: re-export " + str(state / "artifacts") in capsys.readouterr().err
    assert sorted(p.relative_to(state) for p in state.rglob("*")) == before, "no options.json, no key, no ledger"


def test_options_that_fit_the_export_resolve(tmp_path, exports):
    """The same checks let through what combines: a proximal export planned for --mu, a mix of exported tiers."""
    from aggregator.options import resolve_options
    from models.export import zoo_card

    def settings(*argv: str):
        return resolve_options(role_parser("aggregator").parse_args(["--state-dir", str(tmp_path / "s"), *argv]))

    planned = settings("--mu", "0.1", "--tiers", "a,c", "--tier-mix", "a2-c8")
    assert planned.export is not None and not planned.export.exists and planned.export.proximal
    assert planned.export.recipe is not None and planned.export.card == zoo_card(planned.export.recipe)
    assert planned.export.tiers == ("a", "c") and planned.tier_mix == {"a": 0.2, "c": 0.8}
    read = settings("--artifacts", str(exports["bn"]), "--dp", "central", "--dp-clip", "1", "--dp-noise", "1",
                    "--bn-statistics", "averaged")
    assert read.export is not None and read.export.exists and read.export.card.batch_norm and read.tier_mix is None
    assert read.export.recipe is None and read.export.card.name == "mlp8-h8-bn"
    assert settings("--artifacts", str(tmp_path / "missing")).export is None  # the start names the missing index
    assert settings("--arch", "cnn", "--init", "kaiming").export.recipe.init == "kaiming"
    with pytest.raises(ValueError, match="kaiming' is for mlp and cnn"):
        settings("--arch", "preresnet", "--init", "kaiming")
