"""Command-line entry point: ``mmmod <command>`` or ``python -m mmmod <command>``.

Commands:
  demo   train baseline, OGM-GE and MLB on built-in audio-visual data and compare
         (``mmmod demo --help`` for its flags)
  plot   draw each modality's score / coefficient curves from a CSV log, a TensorBoard
         folder or the demo's results.json (``mmmod plot --help``)
"""
from __future__ import annotations

import sys

COMMANDS = {"demo": "train baseline / OGM-GE / MLB on built-in audio-visual data and compare",
            "plot": "score / coefficient curves per modality from a CSV, TensorBoard or results.json"}


def _usage() -> str:
    lines = ["usage: mmmod <command> [options]", "", "commands:"]
    lines += [f"  {name:8s} {text}" for name, text in COMMANDS.items()]
    lines += ["", "'mmmod <command> --help' shows a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"mmmod {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo.cli import main as demo_main
        return demo_main(rest)
    if cmd == "plot":
        from .monitor.plot import main as plot_main
        return plot_main(rest)
    print(f"mmmod: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
