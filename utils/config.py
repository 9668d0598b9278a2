"""Command-line flags with TOML config files as defaults (a flag given on the command line wins)."""
import argparse
import math
import sys
import tomllib
from pathlib import Path


class Ranged:
    """An argparse ``type``: an int or a float within bounds. ``parse_args`` checks the numbers
    of a config file with ``ok`` (argparse converts only strings)."""

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


def _flag(action):
    return next((s for s in action.option_strings if s.startswith('--')), action.dest)


def _config_value(parser, action, value, where):
    """What argparse would make of ``value`` (a TOML value for ``action``'s flag) given on the
    command line, or ``parser.error`` naming the flag, ``where`` and what the flag accepts.
    argparse itself neither converts nor checks defaults (bar a lone string), so without this a
    file's value would skip the flag's choices, type and number of values."""
    def refuse(item, accepted):
        parser.error(f'{_flag(action)}: {item!r} {where} is not {accepted}')

    if action.nargs == 0:   # every such flag here is a switch: store_true/false, --[no-]flag
        if not isinstance(value, bool):
            refuse(value, 'true or false')
        return value
    single = action.nargs in (None, '?')
    if single:
        if isinstance(value, (list, dict)):
            refuse(value, 'a single value')
    else:   # '*', '+' or N values: a TOML list, even of one value
        n = action.nargs
        if (not isinstance(value, list) or (isinstance(n, int) and len(value) != n)
                or (n == '+' and not value)):
            refuse(value, {'*': 'a list', '+': 'a non-empty list'}.get(n, f'a list of {n} values'))

    converted = []
    for item in [value] if single else value:
        number = isinstance(item, (int, float)) and not isinstance(item, bool)
        if isinstance(action.type, Ranged) and number:
            if not action.type.ok(item):   # its own message: "2.5 is not an integer >= 1"
                refuse(item, action.type.describe())
            item = action.type.kind(item)
        elif isinstance(item, str) or (number and action.type is not None):
            try:   # the command line's own conversion and message
                item = parser._get_value(action, str(item))
            except argparse.ArgumentError as e:
                parser.error(f'{e} {where}')
        else:   # a boolean, table or nested list for a value; a number for a string flag
            refuse(item, action.type.describe() if isinstance(action.type, Ranged)
                   else 'a string' if action.type is None
                   else {int: 'an integer', float: 'a number'}.get(action.type, 'a number'))
        if action.choices is not None and item not in action.choices:
            refuse(item, f'one of {", ".join(map(str, action.choices))}')
        converted.append(item)
    return converted[0] if single else converted


def parse_args(parser, argv=None):
    """Parse ``argv``; values of ``--config FILE`` become defaults, checked as strictly as the
    same flags on the command line (choices, type and range, number of values, switches take
    true or false). An unknown key is an error."""
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
        actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
        where = f'(from --config {known.config})'
        values = {}
        for key, value in config.items():
            dest = key.replace('-', '_')
            if dest not in actions:
                parser.error(f'--config {path}: unknown key {key!r}')
            values[dest] = _config_value(parser, actions[dest], value, where)
            actions[dest].required = False   # the file gives it
        given = set(argv if argv is not None else sys.argv[1:])
        for group in parser._mutually_exclusive_groups:   # as the command line refuses both
            both = [_flag(a) for a in group._group_actions
                    if a.dest in values and values[a.dest] != a.default]
            if len(both) > 1:
                parser.error(f'{both[0]} and {both[1]} {where} exclude each other')
            if any(opt in given for a in group._group_actions for opt in a.option_strings):
                for a in group._group_actions:   # the command line chooses for the whole group
                    values.pop(a.dest, None)
        parser.set_defaults(**values)
    return parser.parse_args(argv)
