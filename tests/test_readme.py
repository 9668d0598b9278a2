"""Every command the README shows for the project's scripts parses (flags exist, values fit)."""
import re
import shlex
from pathlib import Path

import pytest

import local_coclr
import local_nce
from dataset import prepare
from eval import main_classifier
from utils.config import parse_args

README = Path(__file__).resolve().parents[1] / 'README.md'
PARSERS = {'local_nce.py': local_nce.get_parser, 'local_coclr.py': local_coclr.get_parser,
           'main_classifier.py': main_classifier.build_parser}


def prepare_commands():
    """argv of each ``python -m dataset.prepare ...`` command in the README."""
    found = []
    for block in re.findall(r'```\n(.*?)```', README.read_text(), re.S):
        for command in block.replace('\\\n', ' ').splitlines():
            words = shlex.split(command.split('#')[0]) if command.strip() else []
            if 'dataset.prepare' in words and '...' not in words:
                found.append(words[words.index('dataset.prepare') + 1:])
    return found


def test_readme_prepare_commands_parse():
    commands = prepare_commands()
    assert {c[0] for c in commands} >= {'videos', 'flow', 'frames', 'preview'}
    for argv in commands:
        prepare.build_parser().parse_args(argv)


def readme_commands():
    """(script, argv) of each complete command in the README's code blocks."""
    found = []
    for block in re.findall(r'```\n(.*?)```', README.read_text(), re.S):
        for command in block.replace('\\\n', ' ').splitlines():
            words = shlex.split(command.split('#')[0]) if command.strip() else []
            scripts = [i for i, w in enumerate(words) if Path(w).name in PARSERS]
            if not scripts or '...' in words:
                continue
            i = scripts[0]
            found.append((Path(words[i]).name, words[i + 1:]))
    return found


COMMANDS = readme_commands()


def test_the_seed_commands_are_there():
    names = [s for s, _ in COMMANDS]
    # the seed's four pretraining commands and three evaluation commands, plus the demo ones
    assert names.count('local_nce.py') >= 3 and names.count('local_coclr.py') >= 4
    assert names.count('main_classifier.py') >= 3


@pytest.mark.parametrize('script,argv', COMMANDS, ids=[f'{s}:{i}' for i, (s, _) in enumerate(COMMANDS)])
def test_readme_command_parses(script, argv, tmp_path):
    args = parse_args(PARSERS[script](), argv + ['--data_root', str(tmp_path), '--epochs', '1'])
    assert args.epochs == 1
    if script == 'local_coclr.py':
        assert args.pretrain and len(args.pretrain) == 2
    if '--moco-k' in argv:
        assert args.moco_k == int(argv[argv.index('--moco-k') + 1])


def test_every_released_checkpoint_has_a_command_of_its_modality():
    text = README.read_text()
    section = text[text.index("## Starting from CoCLR's released weights"):]
    section = section[:section.index('\n## ', 1)]
    released = re.findall(r'\[([\w.-]+\.tar)\]\(http', section)
    assert len(released) == 6
    used = {}
    for script, argv in COMMANDS:
        for flag in ('--test', '--pretrain'):
            if flag in argv and argv[argv.index(flag) + 1].startswith('pretrained/'):
                used[Path(argv[argv.index(flag) + 1]).name] = argv[argv.index('--dataset') + 1]
    assert set(released) <= set(used)
    for name, dataset in used.items():
        is_flow = '-f-' in name or '-flow-' in name
        assert dataset.endswith('-f') == is_flow, (name, dataset)


def test_the_demo_momentum_line_is_the_rules():
    """The README shows the key-encoder momentum line its first command prints: the steps are
    the demo config's epochs times the batches of the demo's training split, m the rule's."""
    import engine_pretrain
    from dataset import demo
    line = re.search(r'=> key-encoder momentum (\S+), fit to (\d+) steps', README.read_text())
    config = README.parent / 'configs' / 'demo_rgb.toml'
    args = parse_args(local_nce.get_parser(), ['--config', str(config)])
    train_videos = len(demo.CLASSES) * (demo.GROUPS - demo.GROUPS_PER_SPLIT) * demo.CLIPS
    steps = args.epochs * (train_videos // args.batch_size)
    assert int(line[2]) == steps
    assert line[1] == f'{engine_pretrain.fit_momentum(steps):.4g}'
    assert engine_pretrain.fit_momentum(300 * (9537 // 16)) == 0.999   # UCF101 keeps MoCo's
