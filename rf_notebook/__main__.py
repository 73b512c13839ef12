"""`python -m rf_notebook info`: the versions, device and kernel facts to paste into a bug report."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rf_notebook")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device and kernel facts, and what rf_notebook does about them")
    parser.parse_args(argv)
    from rf_notebook._info import info

    info()


if __name__ == "__main__":
    main()
