"""`python -m backend import-command "<vllm serve command>"`: the gateway model config for it.

Users already run `vllm serve MODEL --flag value …`. This prints the YAML model
config (LocalAI's `ModelConfig` keys) that makes the gateway start this worker
with the same engine:

- `name` (`--served-model-name`, else the model's last path component),
  `backend: vllm`, `parameters.model`, `template.use_tokenizer_template`
  (the chat template comes from the tokenizer, as with `vllm serve`);
- LocalAI's typed vLLM keys (`context_size`, `gpu_memory_utilization`, `dtype`,
  …) where a flag has one and its value fits the gateway's field;
- `options:` for this worker's keys (`tool_parser:` from `--tool-call-parser`,
  `reasoning_parser:`, `chat_template:`, `tool_parser_plugin:`);
- `engine_args:` for every other engine flag, holding the value vLLM's own
  parser gives it. A value vLLM expands into a config object (or a dict other
  than the one written) stays a pasted `--flag=value` entry in `options:`, so the
  worker's parser builds the same object.

Every engine flag goes through vLLM's engine-argument parser
(`backend.vllm_flags.flag_parser()`, imported lazily: this module imports no vLLM).
`vllm serve` flags that are not engine arguments are listed in `backend/import_flags.py`:
those with a meaning here are mapped, the others dropped with a YAML comment
saying why. Any other flag is an error naming the closest valid one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backend import peer_json
from backend.errors import InvalidArgument
from backend.import_flags import (
    BACKEND_OPTIONS,
    LEGACY_FLAGS,
    OPTIONAL,
    SERVER_FLAGS,
    SWITCH,
    TYPED,
    VALUE,
    VALUES,
    arity_of,
)
from backend.load_options import closest

if TYPE_CHECKING:
    import argparse

    from backend.vllm_flags import VllmFlagParser

USAGE = """\
usage: python -m backend import-command "vllm serve MODEL [flags]"
       python -m backend import-command -- vllm serve MODEL [flags]
       python -m backend import-command - < command.sh

Prints the gateway model config (YAML) for a `vllm serve` command. The command
may start with `vllm`, a path to it, `python -m vllm.entrypoints.openai.api_server`
or nothing; `serve` is optional; backslash continuations are fine.
Exit status 2 when a flag is not a vLLM flag or its value is invalid.
"""

_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)
_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][-+]?\d+)?")
_CONTINUATION = re.compile(r"\\[ \t]*\r?\n")


class CommandError(ValueError):
    """The command cannot be imported; the message names the flag."""


@dataclass
class GatewayConfig:
    """The model config, in the order it is printed."""

    name: str
    parameters: dict[str, str]  # model, tokenizer
    typed: dict[str, Any] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] | None = None
    options: list[str] = field(default_factory=list)
    engine_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "backend": "vllm",
            "parameters": self.parameters,
            **self.typed,
            "template": {"use_tokenizer_template": True},
        }
        for key in ("chat_template_kwargs", "options", "engine_args", "env"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        return doc

    def to_yaml(self) -> str:
        import yaml

        head = ["# Gateway model config imported from a `vllm serve` command."]
        head += ["# " + note.replace("\n", " ") for note in self.notes]
        body = yaml.safe_dump(self.as_dict(), sort_keys=False, allow_unicode=True, width=1 << 16)
        return "\n".join(head) + "\n" + body


def split_command(text: str) -> list[str]:
    """Shell words of a pasted command (backslash-newline continuations joined)."""
    try:
        return shlex.split(_CONTINUATION.sub(" ", text), comments=True)
    except ValueError as e:
        raise CommandError(f"cannot split the command into words: {e} (check its quotes)") from None


def _strip_launcher(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """(`NAME=value` environment prefix, arguments after `vllm serve` or its equivalent)."""
    i = 1 if tokens[:1] == ["$"] else 0  # a pasted shell prompt
    i += tokens[i : i + 1] == ["env"]
    env: dict[str, str] = {}
    while i < len(tokens) and _ENV.fullmatch(tokens[i]):
        key, _, value = tokens[i].partition("=")
        env[key] = value
        i += 1
    head = os.path.basename(tokens[i]) if i < len(tokens) else ""
    if head in ("vllm", "run.sh"):
        i += 1
    elif re.fullmatch(r"python[\d.]*", head) and tokens[i + 1 : i + 2] == ["-m"]:
        module = tokens[i + 2] if i + 2 < len(tokens) else ""
        if not module.startswith("vllm."):
            raise CommandError(f"`python -m {module}` is not a vLLM server command")
        i += 3
    i += tokens[i : i + 1] == ["serve"]
    return env, tokens[i:]


def _is_option(token: str) -> bool:
    return token.startswith("-") and token != "-" and not _NUMBER.fullmatch(token)


def _long(action: argparse.Action) -> str:
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def _plain(value: Any) -> bool:
    """JSON data (what the gateway can carry in engine_args), not a vLLM object."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


@dataclass
class _EngineFlag:
    flag: str  # the option to hand vLLM's parser
    raw: str | list[str] | None  # as written; None for a bare switch
    value: Any = None  # as vLLM's parser coerced it


class _Importer:
    def __init__(self, parser: VllmFlagParser | None) -> None:
        self._parser = parser
        self.model: str | None = None
        self.engine: dict[str, _EngineFlag] = {}  # by engine field; the last flag wins
        self.dotted: dict[str, dict[str, Any]] = {}  # `--flag.key value` → {flag: {key: value}}
        self.options: dict[str, str] = {}
        self.typed: dict[str, Any] = {}
        self.chat_template_kwargs: dict[str, Any] | None = None
        self.dropped: dict[str, list[str]] = {}  # reason → flags
        self.notes: list[str] = []

    @property
    def parser(self) -> VllmFlagParser:
        if self._parser is None:
            from backend.vllm_flags import flag_parser

            self._parser = flag_parser()
        return self._parser

    def set_model(self, model: str, source: str) -> None:
        if self.model is not None:
            raise CommandError(
                f"unexpected {source} {model!r}: the model is already {self.model!r}"
            )
        self.model = model

    def walk(self, args: list[str]) -> None:
        i = 0
        while i < len(args):
            token = args[i]
            i += 1
            if not _is_option(token):
                self.set_model(token, "argument")
                continue
            if token.startswith("-O") and not token.startswith("--"):  # -O3, -O 3, -O=3
                name, inline = "--optimization-level", token[2:].removeprefix("=") or None
            else:
                name, eq, text = token.partition("=")
                inline = text if eq else None
            if name.startswith("--"):  # vLLM reads `--max_num_seqs` as `--max-num-seqs`
                head, dot, rest = name[2:].partition(".")
                name = "--" + head.replace("_", "-") + dot + rest
            if "." in name:  # `--compilation-config.mode 3`: vLLM merges these into JSON
                values, i = _take(args, i, VALUE, inline, name)
                base, _, path = name.partition(".")
                self._engine_action(base)
                node = self.dotted.setdefault(base, {})
                *parents, leaf = path.split(".")
                for key in parents:
                    node = node.setdefault(key, {})
                node[leaf] = peer_json.loads_or_text(values[0])
                continue
            i = self._flag(name, inline, args, i)

    def _flag(self, name: str, inline: str | None, args: list[str], i: int) -> int:
        server = SERVER_FLAGS.get(name) or LEGACY_FLAGS.get(name)
        if server is None and name.startswith("--no-"):  # --no-X of a server switch
            server = SERVER_FLAGS.get("--" + name[5:])
            server = server if server and server[0] == SWITCH else None
        if server is not None:
            arity, reason = server
            values, i = _take(args, i, arity, inline, name)
            if reason is None:
                self._server_flag(name, values)
            else:
                self.dropped.setdefault(reason, []).append(name)
            return i
        action = self._engine_action(name)
        values, i = _take(args, i, arity_of(action), inline, name)
        if action.dest == "model":
            self.set_model(values[0], name)
            return i
        raw = values if arity_of(action) == VALUES else (values[0] if values else None)
        # A switch keeps its spelling: `--no-X` and `-ep` mean something.
        self.engine[action.dest] = _EngineFlag(name if action.nargs == 0 else _long(action), raw)
        return i

    def _engine_action(self, name: str) -> argparse.Action:
        action = self.parser._actions.get(name)
        if action is None:
            known = [*self.parser._actions, *SERVER_FLAGS, *LEGACY_FLAGS]
            raise CommandError(
                f"unknown flag {name}: not a vLLM engine argument nor a `vllm serve` "
                f"option{closest(name, known)}"
            )
        return action

    def _server_flag(self, name: str, values: list[str]) -> None:
        value = values[0]
        if name == "--config":
            raise CommandError(
                "--config: options in a YAML file are not read; put its flags in the command"
            )
        if name == "--default-chat-template-kwargs":
            kwargs = peer_json.loads_or_text(value)
            if not isinstance(kwargs, dict):
                raise CommandError(f"{name} must be a JSON object, got {value!r}")
            self.chat_template_kwargs = kwargs
        elif name == "--swap-space":
            if not value.isdigit():
                raise CommandError(f"{name} takes a whole number of GiB, got {value!r}")
            self.typed["swap_space"] = int(value)
            self.notes.append("swap_space is ignored by the worker: this vLLM has no CPU swap")
        else:
            key = {"--tool-call-parser": "tool_parser", "--chat-template": "chat_template"}
            self.options[key.get(name, "tool_parser_plugin")] = value

    def coerce(self) -> None:
        """Every engine value through vLLM's own parser, as `vllm serve` would coerce it."""
        for base, tree in self.dotted.items():
            action = self._engine_action(base)
            self.engine[action.dest] = _EngineFlag(_long(action), json.dumps(tree))
        for dest, flag in self.engine.items():
            try:
                if isinstance(flag.raw, list):  # nargs="+": one list of every value
                    flag.value = [
                        x for v in flag.raw for x in self.parser.parse([(flag.flag, v)])[dest]
                    ]
                else:
                    flag.value = self.parser.parse([(flag.flag, flag.raw)])[dest]
            except InvalidArgument as e:
                raise CommandError(e.message) from None


def _take(
    args: list[str], i: int, arity: str, inline: str | None, name: str
) -> tuple[list[str], int]:
    """The values of flag `name` (argparse's rules: values never look like options)."""
    if arity == SWITCH or inline is not None:
        return ([] if inline is None else [inline]), i
    values: list[str] = []
    while i < len(args) and not _is_option(args[i]) and (arity == VALUES or not values):
        values.append(args[i])
        i += 1
    if not values and arity != OPTIONAL:
        raise CommandError(f"{name} needs a value")
    return values, i


def convert(command: str | Sequence[str], parser: VllmFlagParser | None = None) -> GatewayConfig:
    """A `vllm serve` command (text, or words already split) → the gateway model config."""
    tokens = split_command(command) if isinstance(command, str) else list(command)
    env, args = _strip_launcher(tokens)
    imp = _Importer(parser)
    imp.walk(args)
    if imp.model is None:
        raise CommandError("no model: write `vllm serve MODEL …` or --model MODEL")
    imp.coerce()
    name = os.path.basename(imp.model.rstrip("/")) or imp.model
    cfg = GatewayConfig(name=name, parameters={"model": imp.model})
    cfg.typed, cfg.env, cfg.chat_template_kwargs = imp.typed, env, imp.chat_template_kwargs
    cli_options: list[str] = []
    for dest, flag in imp.engine.items():
        value = flag.value
        if dest == "served_model_name" and value:
            cfg.name = value[0]
            if value[1:]:
                cfg.notes.append(f"served names {', '.join(value[1:])} dropped: one name a config")
        elif dest == "reasoning_parser" and value:
            imp.options["reasoning_parser"] = value  # the worker also gives it to the engine
        elif dest == "tokenizer" and isinstance(value, str) and value.strip():
            cfg.parameters["tokenizer"] = value
        elif dest in TYPED and TYPED[dest][1](value):
            cfg.typed[TYPED[dest][0]] = value
        elif _plain(value) and not (
            isinstance(flag.raw, str)
            and flag.raw[:1] in "{["
            and peer_json.loads_or_text(flag.raw) != value
        ):
            cfg.engine_args[dest] = value
        else:
            cli_options.append(f"{flag.flag}={flag.raw}")
    cfg.options = [f"{k}:{imp.options[k]}" for k in BACKEND_OPTIONS if k in imp.options]
    cfg.options += cli_options
    _notes(cfg, imp)
    return cfg


def _notes(cfg: GatewayConfig, imp: _Importer) -> None:
    for reason, flags in imp.dropped.items():
        cfg.notes.append(f"dropped {', '.join(dict.fromkeys(flags))}: {reason}")
    if "context_size" not in cfg.typed and "max_model_len" not in cfg.engine_args:
        cfg.engine_args["max_model_len"] = None
        cfg.notes.append(
            "engine_args max_model_len: null keeps the model's own context length, as "
            "vllm serve does; without it the gateway's default context_size (4096) applies"
        )
    cfg.notes += imp.notes
    for key, flag in (
        ("tool_parser", "--tool-call-parser"),
        ("reasoning_parser", "--reasoning-parser"),
    ):
        if key not in imp.options:
            cfg.notes.append(
                f"no {flag}: the worker picks one from the model family ({key}:none turns that off)"
            )
    if os.path.isabs(cfg.parameters["model"]):
        cfg.notes.append(
            "the gateway refuses absolute model paths: put the model under its models "
            "directory and write parameters.model relative to it"
        )


def main(argv: Sequence[str]) -> int:
    """The `import-command` subcommand: YAML on stdout, exit 2 on a bad command."""
    args = list(argv)
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE, end="")
        return 0
    if args[:1] == ["--"]:
        args = args[1:]
    command: str | list[str] = args
    if args in ([], ["-"]):
        command = sys.stdin.read()
    elif len(args) == 1:  # the whole command in one quoted argument
        command = args[0]
    out = sys.stdout
    try:
        # vLLM logs to stdout: keep it off the YAML.
        with contextlib.redirect_stdout(sys.stderr):
            text = convert(command).to_yaml()
    except CommandError as e:
        print(f"import-command: {e}", file=sys.stderr)
        return 2
    out.write(text)
    return 0
