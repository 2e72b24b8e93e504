"""`clipa-ds` command line: demo | train | plan | eval | export | index.

Each subcommand lives in its own module with a `main(argv) -> int`; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("clipa_ds.demo", "generate data, train the tiny model in two stages, evaluate zero-shot"),
    "train": ("clipa_ds.train", "train a recipe: clipa-ds train RECIPE [key=value ...]"),
    "plan": ("clipa_ds.plan", "tokens, FLOPs, GPU-hours, cost and memory of a recipe, per stage"),
    "eval": ("clipa_ds.evaluate.cli", "zero-shot or retrieval evaluation of a run, checkpoint or export"),
    "export": ("clipa_ds.export", "consolidated weights as safetensors or open_clip format"),
    "index": ("clipa_ds.data.index", "count samples per shard into a sizes.json index"),
}


def _usage() -> str:
    lines = ["usage: clipa-ds COMMAND [args ...]", "", "commands:"]
    lines += [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"clipa-ds: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
