"""Command-line flags with TOML config files as defaults (a flag given on the command line wins)."""
import argparse
import math
import tomllib
from pathlib import Path


class Ranged:
    """An argparse ``type``: an int or a float within bounds. ``parse_args`` also checks the
    values that come from a config file, which argparse does not convert."""

    def __init__(self, kind, low=None, high=None, low_open=False, high_open=False):
        self.kind, self.low, self.high = kind, low, high
        self.low_open, self.high_open = low_open, high_open
        self.__name__ = kind.__name__   # argparse's "invalid int value" messages

    def ok(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float
                                                    else int):
            return False
        if not math.isfinite(value):   # nan and inf pass every comparison or none
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self):
        what = 'an integer' if self.kind is int else 'a number'
        if self.low is not None and self.high is not None:
            return (f'{what} in {"(" if self.low_open else "["}{self.low:g}, '
                    f'{self.high:g}{")" if self.high_open else "]"}')
        if self.low is not None:
            return f'{what} {">" if self.low_open else ">="} {self.low:g}'
        return f'{what} {"<" if self.high_open else "<="} {self.high:g}'

    def __call__(self, text):
        value = self.kind(text)   # ValueError: argparse says "invalid int value"
        if not self.ok(value):
            raise argparse.ArgumentTypeError(f'{text} is not {self.describe()}')
        return value


POSITIVE = Ranged(int, 1)                       # counts, sizes, frequencies
NON_NEGATIVE = Ranged(int, 0)                   # 0 means "none" or "all" (see the flag's help)
PROBABILITY = Ranged(float, 0.0, 1.0)
FRACTION = Ranged(float, 0.0, 1.0, low_open=True, high_open=True)
AREA = Ranged(float, 0.0, 1.0, low_open=True)   # a share of the frame's area
POSITIVE_REAL = Ranged(float, 0.0, low_open=True)
NON_NEGATIVE_REAL = Ranged(float, 0.0)


def check_ranges(parser, args, source=None):
    """``parser.error`` for a value of ``args`` outside its flag's ``Ranged`` type (a config
    file's values reach ``args`` without argparse's conversion)."""
    for action in parser._actions:
        if not isinstance(action.type, Ranged) or getattr(args, action.dest, None) is None:
            continue
        value = getattr(args, action.dest)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not action.type.ok(v):
                where = f' (from {source})' if source else ''
                parser.error(f'{action.option_strings[-1]}: {v!r}{where} is not '
                             f'{action.type.describe()}')


def parse_args(parser, argv=None):
    """Parse ``argv``; values of ``--config FILE`` become defaults. An unknown key is an error,
    and so is a value outside its flag's range (``Ranged``), from the file or the command line."""
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
    args = parser.parse_args(argv)
    check_ranges(parser, args, f'--config {known.config}' if known.config else None)
    return args
