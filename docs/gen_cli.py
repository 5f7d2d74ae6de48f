"""Write docs/cli.md from the argparse definitions (`make docs` runs it)."""

from pathlib import Path

from pcmx.cli import _commands, build_parser

parser = build_parser()
lines = ["# CLI reference", "", "Generated from the code by `docs/gen_cli.py`.", "", "```", parser.format_help(), "```", ""]
sub = next(a for a in parser._actions if a.dest == "command")
for mod in _commands():
    lines += [f"## pcmx {mod.NAME}", "", mod.HELP, "", "```", sub.choices[mod.NAME].format_help(), "```", ""]
Path(__file__).with_name("cli.md").write_text("\n".join(lines))
