"""Command-line flags with TOML config files (``--config FILE``): the file's values become flags
placed before the command line's, so argparse checks them all and the command line wins."""
import argparse
import copy
import math
import sys
import tomllib


class Ranged:
    """An argparse ``type``: an int or a float within bounds (an open bound is excluded)."""

    def __init__(self, kind, low, high=None, low_open=False, high_open=False):
        self.kind, self.low, self.high = kind, low, high
        self.low_open, self.high_open = low_open, high_open
        self.__name__ = kind.__name__   # argparse's "invalid int value" messages

    def __call__(self, text):
        value = self.kind(text)   # ValueError: argparse says "invalid int value"
        low, high = self.low, self.high
        if not (math.isfinite(value)   # nan and inf pass every comparison or none
                and (value > low if self.low_open else value >= low)
                and (high is None or (value < high if self.high_open else value <= high))):
            what = 'an integer' if self.kind is int else 'a number'
            bound = (f'{">" if self.low_open else ">="} {low:g}' if high is None else
                     f'in {"(" if self.low_open else "["}{low:g}, {high:g}'
                     f'{")" if self.high_open else "]"}')
            raise argparse.ArgumentTypeError(f'{text} is not {what} {bound}')
        return value


POSITIVE = Ranged(int, 1)                       # counts, sizes, frequencies
NON_NEGATIVE = Ranged(int, 0)                   # 0 means "none" or "all" (see the flag's help)
PROBABILITY = Ranged(float, 0.0, 1.0)
FRACTION = Ranged(float, 0.0, 1.0, low_open=True, high_open=True)
AREA = Ranged(float, 0.0, 1.0, low_open=True)   # a share of the frame's area
POSITIVE_REAL = Ranged(float, 0.0, low_open=True)
NON_NEGATIVE_REAL = Ranged(float, 0.0)


def _check(parser, tokens):
    """argparse's verdict on ``tokens`` without exiting: (its error about a flag or None, the
    unknown tokens). Abbreviations are refused; a required flag missing is no error here."""
    def refuse(message):   # argparse's own exits (a missing required flag)
        raise argparse.ArgumentError(None, message)
    checker = copy.copy(parser)
    checker.exit_on_error = checker.allow_abbrev = False
    checker.error = refuse
    try:
        return None, checker.parse_known_args(tokens)[1]
    except argparse.ArgumentError as e:
        return (str(e) if e.argument_name else None), []


def _tokens(key, value):
    """A TOML ``key = value`` as command-line tokens."""
    if isinstance(value, bool):
        return [f'--{key}' if value else f'--no-{key}']
    if isinstance(value, list):
        return [f'--{key}'] + [str(v).lower() if isinstance(v, bool) else str(v) for v in value]
    return [f'--{key}={value}']


def parse_args(parser, argv=None):
    """Parse ``argv``; the keys of ``--config FILE`` become flags before it (the command line
    wins). An unknown key, or a value the flag refuses, is an error naming the file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config')
    path = pre.parse_known_args(argv)[0].config
    if not path:
        return parser.parse_args(argv)
    try:
        with open(path, 'rb') as f:
            config = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:   # a missing file, or not TOML
        parser.error(f'--config {path}: {e.strerror if isinstance(e, OSError) else e}')
    where = f'(from --config {path})'
    tokens = []
    for key, value in config.items():
        if isinstance(value, dict) or (isinstance(value, list) and
                                       any(isinstance(v, (dict, list)) for v in value)):
            parser.error(f'--{key}: {value!r} {where} is not a value or a list of values')
        own = _tokens(key, value)
        error, unknown = _check(parser, own)
        if unknown == own and value is False:   # no --no-key: false for a store_true switch
            own, (error, unknown) = [], _check(parser, [f'--{key}'])
        if error:
            parser.error(f'{error} {where}')
        if unknown and unknown[0] in (own[:1] or [f'--{key}']):
            parser.error(f'--config {path}: unknown key {key!r}')
        if unknown:
            parser.error(f'--{key}: {value!r} {where} is not accepted ({" ".join(unknown)} left '
                         f'over)')
        if _check(parser, own + argv)[0]:   # e.g. the other crop of an exclusive group: it wins
            own = []
        tokens += own
    error = _check(parser, tokens)[0]   # the keys together, e.g. two of an exclusive group
    if error:
        parser.error(f'{error} {where}')
    return parser.parse_args(tokens + argv)
