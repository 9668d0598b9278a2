"""Command-line flags with TOML config files as defaults (a flag given on the command line wins)."""
import argparse
import tomllib
from pathlib import Path


def parse_args(parser, argv=None):
    """Parse ``argv``; values of ``--config FILE`` become defaults. An unknown key is an error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.error(f'--config: file not found: {path}')
        with open(path, 'rb') as f:
            try:
                config = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                parser.error(f'--config {path}: {e}')
        dests = {a.dest for a in parser._actions}
        values = {}
        for key, value in config.items():
            dest = key.replace('-', '_')
            if dest not in dests or dest in ('help', 'config'):
                parser.error(f'--config {path}: unknown key {key!r}')
            values[dest] = value
        parser.set_defaults(**values)
    return parser.parse_args(argv)
