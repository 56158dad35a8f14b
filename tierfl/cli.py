"""The `tierfl` command: one entry point, one subcommand per job.

Each subcommand's module is imported only when it runs, so `tierfl client` on a device never
imports aggregator code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from tierfl import config

COMMANDS = {
    "export": ("models.cli", "export per-tier ONNX Runtime training artifacts of a model"),
    "aggregator": ("aggregator.cli", "run the aggregator service (FedAvg rounds over MQTT)"),
    "relay": ("aggregator.relay_cli", "hierarchical FL: aggregate a local group of devices, forward one update to the parent"),
    "client": ("edge_client.cli", "run a device: train tasks on local data, publish updates"),
    "fleet": ("edge_client.fleet", "many virtual devices in one process against a real broker (testing at scale)"),
    "broker": ("protocol.mqtt.embedded_broker", "run the embedded pure-Python MQTT broker (for laptops and demos)"),
    "broker-config": ("protocol.mqtt.broker_config", "write a Mosquitto config for a fleet: TLS, passwords, per-device ACL"),
    "bench": ("edge_client.bench", "benchmark each device tier here: step latency, memory, artifact and update bytes"),
    "demo": ("tierfl.demo", "a whole federation on this machine: broker, aggregator, 8 devices"),
    "analytics": ("aggregator.analytics_cli", "ask a running aggregator's fleet a question (label mix, feature statistics, "
                  "model metrics); get one aggregate as JSON"),
    "report": ("aggregator.report", "write a self-contained HTML report of a run from its state directory"),
    "config": ("tierfl.config", "print a role's effective configuration: defaults, --config file, TIERFL_* variables, flags"),
}
# Old command names that still run their command: `tierfl edge-aggregator` is `tierfl relay`
ALIASES = config.OLD_ROLE_NAMES
# Errors a user can cause and fix (exit 1; argparse.ArgumentError, options that do not combine, exits 2);
# anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, RuntimeError, ImportError)  # ImportError: an optional package not installed
# Optional packages by import name -> the extra that installs them (pyproject.toml); a device
# install is `tierfl[edge,signing]`, everything else comes with `tierfl[full]` or `tierfl[demo]`.
EXTRAS = {
    "onnx": "full", "onnxruntime": "full", "amqtt": "full", "cryptography": "full",
    "prometheus_client": "full", "dp_accounting": "full", "sklearn": "demo", "matplotlib": "demo", "tqdm": "demo",
}
DEVICE_COMMANDS = ("client", "bench")  # they run on the device install: onnxruntime from tierfl[edge], keys from [signing]
DEVICE_EXTRAS = {"onnxruntime": "edge", "cryptography": "signing"}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return (
        "usage: tierfl [--log-level LEVEL] [--log-format auto|text|json] COMMAND [options]\n\n"
        "TierFL: federated training on edge devices with ONNX Runtime and MQTT.\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\nold names, still accepted: " + ", ".join(f"{old} (now {new})" for old, new in ALIASES.items())
        + "\n\nRun `tierfl COMMAND --help` for the options of one command."
    )


def setup_logging(level: str, log_format: str = "auto") -> None:
    """Logs on stderr: text on a terminal, JSON lines otherwise (`log_format` auto | text | json); ValueError if unknown."""
    from protocol.logs import log_handler

    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format, sys.stderr)])


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run one subcommand, turn user errors into one clear line."""
    args = list(sys.argv[1:] if argv is None else argv)
    level, log_format = "info", os.environ.get("TIERFL_LOG_FORMAT", "auto")
    while len(args) >= 2 and args[0] in ("--log-level", "--log-format"):
        if args[0] == "--log-level":
            level = args[1]
        else:
            log_format = args[1]
        args = args[2:]
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = ALIASES.get(args[0], args[0]), args[1:]
    if command not in COMMANDS:
        print(f"tierfl: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        setup_logging(level, log_format)
    except ValueError as exc:
        print(f"tierfl: {exc}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
        parser = argparse.ArgumentParser(prog=f"tierfl {command}")
        module.configure_parser(parser)
        options = config.parse_with_config(parser, command, rest) if command in config.ROLES else parser.parse_args(rest)
        return module.run(options)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        if (hint := missing_extra(command, exc)) is None:
            raise
        print(f"tierfl {command}: error: {hint}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as exc:  # options that cannot run as given, found after parsing: as argparse would
        print(f"tierfl {command}: error: {exc}", file=sys.stderr)
        return 2
    except USER_ERRORS as exc:
        if os.environ.get("TIERFL_DEBUG"):
            raise
        print(f"tierfl {command}: error: {exc}", file=sys.stderr)
        return 1


def missing_extra(command: str, exc: ModuleNotFoundError) -> str | None:
    """One line naming the optional package `command` lacks and the pip command that installs it; None if not ours."""
    package = (exc.name or "").split(".")[0]
    if package not in EXTRAS:
        return None
    extra = DEVICE_EXTRAS.get(package, EXTRAS[package]) if command in DEVICE_COMMANDS else EXTRAS[package]
    return (f"this command needs the {package} package, which is not installed here: "
            f"pip install 'tierfl[{extra}]'")


if __name__ == "__main__":
    sys.exit(main())
