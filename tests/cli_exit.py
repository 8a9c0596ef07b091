"""Run ``qlora``'s ``main`` in this process as the command line does (test helper)."""

from __future__ import annotations

from qlora.cli.main import main


def cli_exit(argv: list[str], capsys) -> tuple[int, str]:
    """The exit status of ``qlora <argv>`` (argparse's own errors exit through SystemExit, as on the command line)
    and what it wrote to stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err
