"""Configuration of the role commands (`tierfl aggregator`, `client`, `relay`): a TOML file,
TIERFL_* environment variables and command-line flags over the command's defaults.

Precedence: flags > environment > file > defaults. The options are those of the command's argparse
parser, so a new flag is configurable with no change here:

- file (`--config FILE`, else $TIERFL_CONFIG): the option's long name without the dashes, with `-`
  or `_` (`round-timeout = 30`), at the top level or in a table named after the role
  (`[aggregator]`), which wins over the top level. Other roles' tables are skipped, so one file
  can serve several roles; a table under a role's old name (`[edge-aggregator]` for `[relay]`) is
  read as the role's. Relative paths are relative to the working directory, as on the
  command line. A switch such as `--mask-classes` is `mask-classes = true`.
- environment: TIERFL_ and the option's dest in capitals (TIERFL_ROUND_TIMEOUT=30,
  TIERFL_MASK_CLASSES=1), read like the flag's text; a list option is split like a shell line.
  Empty variables and TIERFL_* names that are no option of the role are ignored. A renamed variable
  is still read under its old name when the new one is not set (TIERFL_EDGE_ID for TIERFL_RELAY_ID).

Each source is validated by a pydantic model derived from the parser. An unknown key or an invalid
value stops the command before it starts, naming the file or variable, the key and the reason,
with exit status 2 like a bad flag (the systemd units do not restart on 2). `tierfl config show
ROLE [OPTIONS]` prints the effective configuration as TOML, each key with where it came from.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import logging
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model
from pydantic_core import PydanticCustomError

from protocol.mqtt.url import mask_password

log = logging.getLogger(__name__)

ROLES = ("aggregator", "client", "relay")
OLD_ROLE_NAMES = {"edge-aggregator": "relay"}  # old name -> role: the command and its file table still work
OLD_ENV_NAMES = {"TIERFL_RELAY_ID": ("TIERFL_EDGE_ID",)}  # variable -> its old names, read when it is unset
ENV_PREFIX = "TIERFL_"
CONFIG_ENV = "TIERFL_CONFIG"
Source = Literal["default", "file", "env", "flag"]
SECRET_KEY = re.compile(r"password|passwd|secret|token", re.I)
MASK = "***"
# argparse types whose text pydantic parses itself (with its own error messages)
BUILTIN_TYPES: dict[Any, Any] = {None: str, str: str, int: int, float: float, Path: Path}


class ConfigError(ValueError):
    """An invalid configuration; the message names the file or variable, the key and the reason."""


@dataclass(frozen=True)
class Option:
    """One configurable option of a command: its file key, environment variable and value type."""

    action: argparse.Action
    key: str  # file key and name in `config show`: the first long option without dashes
    env: str  # TIERFL_ + dest in capitals
    group: str  # the --help section it is listed in
    value_type: Any  # pydantic type of a value in a file or the environment
    switch: bool  # store_true & co.: the value says whether the flag is given

    @property
    def dest(self) -> str:
        return self.action.dest

    @property
    def flag(self) -> str:
        return "--" + self.key

    @property
    def spellings(self) -> set[str]:
        """Every accepted file key, normalised to dashes: long option names (not --no-X of a
        BooleanOptionalAction) and the dest."""
        negated = isinstance(self.action, argparse.BooleanOptionalAction)
        names = {s[2:] for s in self.action.option_strings
                 if s.startswith("--") and not (negated and s.startswith("--no-"))}
        return {n.replace("_", "-") for n in names | {self.dest}}

    def to_dest(self, value: Any) -> Any:
        """The namespace value of a validated file or environment value."""
        if self.switch:
            return self.action.const if value else self.action.default
        return value

    def from_dest(self, value: Any) -> Any:
        """The file value of a namespace value (inverse of `to_dest`)."""
        return value == self.action.const if self.switch else value


def _choice(choices: Sequence[Any]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value not in choices:
            raise PydanticCustomError("choice", "Input should be one of {choices}",
                                      {"choices": ", ".join(map(repr, choices))})
        return value
    return check


def _from_text(convert: Callable[[str], Any]) -> Callable[[Any], Any]:
    """A validator calling an argparse `type=` function, as argparse would, on the value's text."""
    def validate(value: Any) -> Any:
        try:
            return convert(value if isinstance(value, str) else str(value))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ValueError(str(exc) or f"not a valid {getattr(convert, '__name__', 'value')}") from None
    return validate


def _split_text(value: Any) -> Any:
    return shlex.split(value) if isinstance(value, str) else value


def _item_type(action: argparse.Action) -> Any:
    """The pydantic type of one value of `action` (its `type=` and `choices=`)."""
    if action.type in BUILTIN_TYPES:
        item = BUILTIN_TYPES[action.type]
    else:
        item = Annotated[Any, BeforeValidator(_from_text(action.type))]
    if action.choices is not None:
        item = Annotated[item, AfterValidator(_choice(list(action.choices)))]
    return item


def _value_type(action: argparse.Action) -> tuple[Any, bool] | None:
    """(pydantic type, is a switch) of a configurable option; None for help, version, positionals and
    actions whose meaning a value cannot carry (append_const, custom actions)."""
    if not any(s.startswith("--") for s in action.option_strings):
        return None
    if isinstance(action, argparse._StoreConstAction):  # store_true, store_false, store_const
        return bool, True
    if isinstance(action, argparse.BooleanOptionalAction):
        return bool, False
    if isinstance(action, argparse._CountAction):
        return Annotated[int, Field(ge=0)], False
    if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)) or (
            isinstance(action, argparse._StoreAction) and action.nargs not in (None, argparse.OPTIONAL)):
        return Annotated[list[_item_type(action)], BeforeValidator(_split_text)], False
    if isinstance(action, argparse._StoreAction):
        return _item_type(action), False
    return None


class Schema:
    """The configurable options of one role's parser and the pydantic model of their values."""

    def __init__(self, parser: argparse.ArgumentParser, role: str) -> None:
        groups = {id(a): g.title or "options" for g in parser._action_groups for a in g._group_actions}
        self.role = role
        self.options: list[Option] = []
        for action in parser._actions:
            typed = _value_type(action)
            if typed is None or action.dest == "config":
                continue
            key = next(s for s in action.option_strings if s.startswith("--"))[2:]
            env = ENV_PREFIX + action.dest.upper().replace("-", "_")
            self.options.append(Option(action, key, env, groups.get(id(action), "options"), *typed))
        by_alias = {name: option for option in self.options for name in option.spellings}
        self.by_spelling = by_alias | {o.key.replace("_", "-"): o for o in self.options}  # a key beats an alias
        fields = {f"option_{i}": (o.value_type, Field(default=o.from_dest(o.action.default), alias=o.dest))
                  for i, o in enumerate(self.options)}
        self.model: type[BaseModel] = create_model(
            f"{role.title().replace('-', '')}Options", __config__=ConfigDict(extra="forbid"), **fields)

    def lookup(self, key: str) -> Option | None:
        """The option a file key names (dashes or underscores), None if none."""
        return self.by_spelling.get(key.replace("_", "-"))

    def validate(self, values: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
        """dest -> namespace value of `values` (dest -> file or environment value); ConfigError naming
        `labels[dest]` and the reason of every invalid value."""
        try:
            model = self.model.model_validate(values)
        except ValidationError as exc:
            lines = []
            for error in exc.errors():
                dest, *inner = error["loc"]
                where = labels.get(str(dest), str(dest)) + "".join(f" item {i}" for i in inner)
                lines.append(f"{where}: {error['msg']}")
            raise ConfigError("\n".join(lines)) from None
        valid = model.model_dump(by_alias=True, exclude_unset=True)
        options = {o.dest: o for o in self.options}
        return {dest: options[dest].to_dest(value) for dest, value in valid.items()}


def read_file(path: Path, schema: Schema) -> dict[str, Any]:
    """dest -> namespace value of every option the TOML file sets for the schema's role."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    names = [schema.role, *(old for old, role in OLD_ROLE_NAMES.items() if role == schema.role)]
    if len(tables := [name for name in names if name in document]) > 1:
        raise ConfigError(f"{path}: tables {', '.join(f'[{t}]' for t in tables)} are the same role: keep [{schema.role}]")
    table_name = tables[0] if tables else schema.role
    own = document.get(table_name, {})
    if not isinstance(own, dict):
        raise ConfigError(f"{path}: key {table_name!r}: should be a table of {schema.role} options, [{schema.role}]")
    roles = {*ROLES, *OLD_ROLE_NAMES}
    sections = [("", {k: v for k, v in document.items() if k not in roles}), (f"{table_name}.", own)]
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    errors: list[str] = []
    for prefix, table in sections:  # the role's table last: it wins over the top level
        written: dict[str, str] = {}
        for key, value in table.items():
            option = schema.lookup(key)
            if option is None:
                hint = _suggestion(key, schema, table=isinstance(value, dict))
                errors.append(f"{path}: unknown key {prefix + key!r}{hint}")
            elif option.dest in written:
                errors.append(f"{path}: keys {prefix + written[option.dest]!r} and {prefix + key!r} set the same option")
            else:
                written[option.dest] = key
                values[option.dest] = value
                labels[option.dest] = f"{path}: key {prefix + key!r}"
    if errors:
        valid = ", ".join(o.key for o in schema.options)
        raise ConfigError("\n".join(errors) + f"\nvalid keys of {schema.role}: {valid}")
    return schema.validate(values, labels)


def _suggestion(key: str, schema: Schema, table: bool) -> str:
    """The hint " (did you mean 'x'?)" naming the closest option (a role for a table), if one is close."""
    candidates = list(ROLES) if table else [o.key for o in schema.options]
    close = difflib.get_close_matches(key.replace("_", "-"), candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_env(environ: Mapping[str, str], schema: Schema) -> dict[str, Any]:
    """dest -> namespace value of every option set by a non-empty TIERFL_* variable."""
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for option in schema.options:
        if name := next((n for n in (option.env, *OLD_ENV_NAMES.get(option.env, ())) if environ.get(n, "") != ""), None):
            values[option.dest], labels[option.dest] = environ[name], f"environment {name}"
    return schema.validate(values, labels)


@contextlib.contextmanager
def _required_relaxed(schema: Schema) -> Iterator[None]:
    """While open, no option is required on the command line: the file or environment may set it."""
    required = [o.action for o in schema.options if o.action.required]
    for action in required:
        action.required = False
    try:
        yield
    finally:
        for action in required:
            action.required = True


@contextlib.contextmanager
def _defaults_suppressed(parser: argparse.ArgumentParser) -> Iterator[None]:
    """While open, `parse_args` returns only what the command line sets (argparse has no public way)."""
    saved = [(action, action.default) for action in parser._actions]
    parser_defaults = dict(parser._defaults)
    for action, _ in saved:
        action.default = argparse.SUPPRESS
    parser._defaults.clear()
    try:
        yield
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(parser_defaults)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Add `--config FILE` to a role's parser (once)."""
    if any(action.dest == "config" for action in parser._actions):
        return
    example = next((a for a in parser._actions if a.option_strings and a.nargs != 0 and a.dest not in ("help", "config")
                    and a.option_strings[-1].startswith("--")), None)
    name, dest = (example.option_strings[-1][2:], example.dest) if example else ("option", "option")
    parser.add_argument_group("configuration").add_argument(
        "--config", type=Path, metavar="FILE",
        help=f"TOML file of these options: their long names without the dashes, e.g. {name} = VALUE "
             f"(default: ${CONFIG_ENV}). Every option is also read from TIERFL_ and its name in capitals, e.g. "
             f"{ENV_PREFIX}{dest.upper()}=VALUE. Flags win over the environment, which wins over the file. "
             f"`tierfl config show ROLE ...` prints the result")


@dataclass(frozen=True)
class Setting:
    """The effective value of one option and where it came from."""

    option: Option
    value: Any  # as in the namespace
    source: Source
    origin: str  # the file, the variable or the flag; "default"


@dataclass(frozen=True)
class EffectiveConfig:
    """A role's options after defaults, file, environment and flags: what its `run(args)` gets."""

    role: str
    file: Path | None
    namespace: argparse.Namespace
    settings: list[Setting]

    def from_sources(self, *sources: Source) -> list[Setting]:
        """The settings whose value came from one of `sources`."""
        return [s for s in self.settings if s.source in sources]

    def missing(self) -> ConfigError | None:
        """The error naming the required options that no flag, variable or file key sets, if any."""
        unset = [s.option for s in self.from_sources("default") if s.option.action.required]
        if not unset:
            return None
        return ConfigError(f"the following options are required: {', '.join(o.flag for o in unset)} (as flags, "
                           f"keys of the --config file or {', '.join(o.env for o in unset)})")


def resolve(parser: argparse.ArgumentParser, role: str, argv: Sequence[str],
            environ: Mapping[str, str]) -> EffectiveConfig:
    """Parse `argv` over the role's config file and TIERFL_* variables. ConfigError on an invalid file
    or variable; a bad flag exits 2 from argparse, as always. Required options may come from any source:
    see `EffectiveConfig.missing`."""
    add_config_option(parser)
    schema = Schema(parser, role)
    with _required_relaxed(schema):
        namespace = parser.parse_args(argv)  # --help and bad flags exit here, with the parser's own defaults shown
        with _defaults_suppressed(parser):
            flags = vars(parser.parse_args(argv))
    file = flags.get("config") or (Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None)
    from_file = read_file(file, schema) if file else {}
    from_env = read_env(environ, schema)
    for dest, value in {**from_file, **from_env}.items():
        if dest not in flags:
            setattr(namespace, dest, value)
    namespace.config = file
    settings = [Setting(o, getattr(namespace, o.dest), *_source(o, flags, from_env, from_file, file))
                for o in schema.options]
    return EffectiveConfig(role, file, namespace, settings)


def _source(option: Option, flags: Mapping[str, Any], from_env: Mapping[str, Any],
            from_file: Mapping[str, Any], file: Path | None) -> tuple[Source, str]:
    if option.dest in flags:
        return "flag", option.flag
    if option.dest in from_env:
        return "env", option.env
    if option.dest in from_file:
        return "file", str(file)
    return "default", "default"


def parse_with_config(parser: argparse.ArgumentParser, role: str, argv: Sequence[str],
                      environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)` over the role's config file and TIERFL_* variables; exits 2 with the
    file or variable, key and reason of an invalid configuration, like argparse on a bad flag."""
    try:
        effective = resolve(parser, role, argv, os.environ if environ is None else environ)
    except ConfigError as exc:
        _exit(parser, exc)
    if missing := effective.missing():
        _exit(parser, missing)
    for source, label in (("file", str(effective.file)), ("env", "the environment")):
        if settings := effective.from_sources(source):
            log.info("%s sets %s", label, ", ".join(s.option.key for s in settings))
    return effective.namespace


def _exit(parser: argparse.ArgumentParser, exc: ConfigError) -> NoReturn:
    parser.exit(2, f"{parser.prog}: error: {exc}\n")


def masked(option: Option, value: Any) -> Any:
    """`value` with any password replaced by ***: a URL's password, or the whole value of a key that names one."""
    if isinstance(value, list):
        return [masked(option, item) for item in value]
    if SECRET_KEY.search(option.key) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return mask_password(value, MASK)
    return value


def toml_value(value: Any) -> str:
    """`value` (bool, int, float, str, Path or a list of them) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")


def render_toml(effective: EffectiveConfig, show_secrets: bool = False, derived: Mapping[str, Any] | None = None) -> str:
    """The effective configuration as a TOML config file, by --help section, each key commented with its source.

    An option left unset whose value follows from others (`derived`: dest -> the value a start
    uses) shows that value, commented out; other unset options say what unset means (their help's
    "default: ...")."""
    lines = [f"# tierfl {effective.role}: effective configuration (flags > TIERFL_* environment > "
             f"{effective.file or 'config file'} > defaults).",
             f"# Usable as its config file: tierfl {effective.role} --config FILE"]
    sections: dict[str, list[Setting]] = {}
    for setting in effective.settings:
        sections.setdefault(setting.option.group, []).append(setting)
    for title, settings in sections.items():
        lines += ["", f"# {title}", *(_toml_line(setting, show_secrets, derived or {}) for setting in settings)]
    return "\n".join(lines) + "\n"


def _toml_line(setting: Setting, show_secrets: bool, derived: Mapping[str, Any]) -> str:
    option = setting.option
    comment = "default" if setting.source == "default" else f"from {setting.origin}"
    value = option.from_dest(setting.value)
    if value is None and derived.get(option.dest) is not None:
        return (f"# {option.key} = {toml_value(option.from_dest(derived[option.dest]))}  # default: what this start "
                "uses, from the other options")
    if value is None:
        required = f"; required: set it here, with {option.flag} or {option.env}" if option.action.required else ""
        meaning = re.search(r"default: ([^)]*)", option.action.help or "")
        return f"# {option.key} = (not set)  # {comment}{f': {meaning[1]}' if meaning and not required else ''}{required}"
    shown = value if show_secrets else masked(option, value)
    if shown != value:
        comment += "; secret masked (`tierfl config show --show-secrets` prints it)"
    return f"{option.key} = {toml_value(shown)}  # {comment}"


# `tierfl config`: the command

def _role_commands() -> dict[str, str]:
    from tierfl.cli import COMMANDS  # imported here: tierfl.cli imports this module
    return {role: COMMANDS[role][0] for role in ROLES if role in COMMANDS}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `tierfl config` options to `parser`."""
    parser.description = (
        "Print the effective configuration of a role as TOML, as it would start with these options: "
        "its defaults, then its --config file (or $TIERFL_CONFIG), then TIERFL_* variables, then flags. "
        "Each key says where its value came from; the output is valid as a config file.")
    parser.epilog = ("examples:\n  tierfl config show aggregator --config lab.toml --rounds 50\n"
                     "  TIERFL_THREADS=2 tierfl config show client --config /etc/tierfl/client.toml")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("action", choices=["show"], help="show: print the effective configuration")
    parser.add_argument("--show-secrets", action="store_true",
                        help="print passwords (in broker URLs and keys that name one) instead of *** (before ROLE)")
    parser.add_argument("role", choices=[*_role_commands(), *OLD_ROLE_NAMES], help="the role command")
    parser.add_argument("role_args", nargs=argparse.REMAINDER, metavar="OPTIONS",
                        help="the role's options, --config FILE among them")


def run(args: argparse.Namespace) -> int:
    """Print the role's effective configuration; 0, or exit 2 if the role would not start with it."""
    args.role = OLD_ROLE_NAMES.get(args.role, args.role)
    parser = argparse.ArgumentParser(prog=f"tierfl {args.role}")
    importlib.import_module(_role_commands()[args.role]).configure_parser(parser)
    try:
        effective = resolve(parser, args.role, args.role_args, os.environ)
    except ConfigError as exc:
        _exit(parser, exc)
    module = importlib.import_module(_role_commands()[args.role])
    derived: dict[str, Any] = {}
    if hasattr(module, "derived_defaults"):
        with contextlib.suppress(ValueError):  # options in conflict: the start will say so
            derived = module.derived_defaults(effective.namespace)
    sys.stdout.write(render_toml(effective, show_secrets=args.show_secrets, derived=derived))
    if missing := effective.missing():  # printed, but the role would not start
        sys.stdout.flush()
        _exit(parser, missing)
    return 0
