"""The CLI reference (docs/cli.md), generated from the argparse parser that `tlkit` runs.

    python -m tlkit.cli_reference > docs/cli.md

tests/test_docs.py fails when docs/cli.md differs from this output, so every command and flag
in the reference is the one the code accepts. (Walks argparse's `_actions`, which argparse
documents no public accessor for.)
"""

from __future__ import annotations

import argparse

from tlkit.cli import build_parser

HEADER = """# CLI reference

Every `tlkit` command and flag, generated from the parser itself by
`python -m tlkit.cli_reference > docs/cli.md` (a test keeps this page in sync with the code).
`tlkit COMMAND --help` prints the same. The `finetune`, `sanity` and `search` options are the
fields of `tlkit.FinetuneConfig`, so they are also the keys of a `--config` YAML file
(underscores for dashes). Problems with the input exit with status 2 and a one-line message.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _argument_name(action: argparse.Action) -> str:
    if action.option_strings:
        return " / ".join(f"`{flag}`" for flag in action.option_strings)
    name = f"`{action.metavar or action.dest}`"
    return f"[{name}]" if action.nargs == "?" else name + (" ..." if action.nargs == "+" else "")


def _values(action: argparse.Action) -> str:
    if action.choices:
        return " \\| ".join(f"`{choice}`" for choice in action.choices)
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on / off"
    if action.nargs == 0:
        return "flag"
    kind = getattr(action.type, "__name__", "text") if action.type else "text"
    names = {"str": "text", "int": "integer", "float": "number", "positive_integer": "integer >= 1"}
    return names.get(kind, kind)


def _command_section(name: str, parser: argparse.ArgumentParser, summary: str) -> list[str]:
    lines = [f"## tlkit {name}", "", summary[:1].upper() + summary[1:] + ".", ""]
    positionals = [
        _argument_name(a).replace("`", "") for a in parser._actions if not a.option_strings
    ]
    lines += ["```", " ".join(["tlkit", name, *positionals, "[options]"]), "```", ""]
    lines += ["| argument | values | description |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        required = " Required." if action.required and action.option_strings else ""
        description = (action.help % vars(action)) if action.help else ""
        lines.append(
            f"| {_argument_name(action)} | {_values(action)} | {_cell(description)}{required} |"
        )
    return lines + [""]


def markdown() -> str:
    """The whole reference page."""
    parser = build_parser()
    commands = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    summaries = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = [HEADER]
    top_level = [
        action
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    ]
    lines += [
        f"Before the command (`tlkit {action.option_strings[0]} COMMAND ...`): "
        f"{_argument_name(action)}, {action.help}."
        for action in top_level
    ]
    lines.append("")
    lines += [f"- [`tlkit {name}`](#tlkit-{name}): {summaries[name]}" for name in commands.choices]
    lines.append("")
    for name, subparser in commands.choices.items():
        lines += _command_section(name, subparser, summaries[name])
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
