"""Every command the README shows for the project's scripts parses (flags exist, values fit), and
each one that can run on the demo runs."""
import glob
import re
import shutil
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


# ----------------------------------------------------------------------------------------------
# Every README command that can run on the demo runs (not only parses)

NOT_RUN = {   # prepare subcommands whose input is raw video or frame folders: tests/test_prepare.py
    'videos': 'raw videos', 'flow': 'an RGB LMDB of real motion', 'frames': 'frame folders'}
PLACEHOLDER = re.compile(r'\{([\w.]+)\}')


def demo_root(root):
    """The demo dataset under ``root``, and the demo standing in for ``ucf101`` (the names the
    README's UCF101 commands give), as links to its files."""
    from dataset.demo import ensure_demo
    demo = Path(ensure_demo(root))
    (root / 'ucf101').mkdir()
    for f in demo.iterdir():
        (root / 'ucf101' / f.name.replace('demo', 'ucf101')).symlink_to(f)
    return root


def test_readme_commands_run_on_the_demo(tmp_path, monkeypatch):
    """Each command of local_nce.py, local_coclr.py and main_classifier.py, and `dataset.prepare
    preview`, runs in this process in README order from a folder holding `configs/` (a link),
    `experiments/` and `pretrained/`: the demo stands in for UCF101 and for the released
    checkpoints (our runs' copies), launchers are dropped (one process), globs are expanded and
    placeholders filled with the runs before. Appended overrides make each run small: a
    one-convolution backbone, 32-pixel crops, one iteration, a few videos. Not run here: the
    two-stream fusion (tests/test_eval.py fuses two streams' results) and
    bench/demo_pipeline.py (all of these commands at length, ~15 minutes)."""
    from backbone import BACKBONES
    from tests.test_pretrain import Tiny
    monkeypatch.setitem(BACKBONES, 'tiny', Tiny)
    root = demo_root(tmp_path / 'data')
    (tmp_path / 'configs').symlink_to(README.parent / 'configs')   # as in the project folder
    monkeypatch.chdir(tmp_path)
    small = ['--data_root', str(root), '--img_dim', '32', '-j', '0', '--device', 'cpu',
             '--net', 'tiny', '--batch_size', '2']
    train = small + ['--epochs', '1', '--iters_per_epoch', '1', '--output_dir', 'experiments']
    pretrain = train + ['--moco-k', '8', '--print_freq', '1']
    made, ran = {}, []
    for script, argv in COMMANDS:
        if (script, argv) in ran:        # the install line repeats the first demo stage
            continue
        ran.append((script, argv))
        argv = [PLACEHOLDER.sub(lambda m: made[m.group(1)], w) for w in argv]
        argv = [sorted(glob.glob(w))[-1] if '*' in w else w for w in argv]
        for released in [w for w in argv if w.startswith('pretrained/')]:   # a stand-in of ours
            flow = '-f-' in released or '-flow-' in released
            Path('pretrained').mkdir(exist_ok=True)
            shutil.copy(made['flow_infoNCE_checkpoint.pth.tar' if flow
                             else 'rgb_infoNCE_checkpoint.pth.tar'], released)
        if script == 'main_classifier.py':
            test = '--test' in argv
            # Two finetuning commands would share a run folder: each gets a prefix of its own.
            out = main_classifier.main(argv + (small + ['--max_videos', '2'] if test else train + [
                '--max_videos', '6', '--name_prefix', f'run{len(ran)}_']))
            if test:
                assert ('recall' if '--retrieval' in argv else 'results') in out
            else:
                made['selected_rgb_finetuned_checkpoint.pth.tar'] = str(out / 'best.pth.tar')
                made['finetune_run'] = out.name
        else:
            main = local_nce.main if script == 'local_nce.py' else local_coclr.main
            out = str(main(argv + pretrain) / 'last.pth.tar')
            args = parse_args(PARSERS[script](), argv + pretrain)
            if script == 'local_coclr.py':
                made['rgb_cycle1_checkpoint.pth.tar'] = out
            elif '-f-' in args.dataset:
                made['flow_infoNCE_checkpoint.pth.tar'] = out
            else:
                made['rgb_infoNCE_checkpoint.pth.tar'] = out
                made['selected_rgb_pretrained_checkpoint.pth.tar'] = out
    assert len(ran) == len({(s, tuple(a)) for s, a in COMMANDS}) and 'finetune_run' in made
    for argv in prepare_commands():
        if argv[0] in NOT_RUN:
            continue
        if argv[0] == 'verify':   # the demo's LMDBs stand in for the published ones
            assert prepare.main(argv) == 0
            continue
        out = argv[argv.index('--out') + 1]
        assert prepare.main(argv + ['--data_root', str(root)]) == 0 and Path(out).is_file()
    assert {c[0] for c in prepare_commands()} - set(NOT_RUN) == {'preview', 'verify'}


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


def test_the_readme_monitor_lines_are_the_first_commands():
    """The monitor lines the README shows have the monitor's format (tests/test_monitor.py checks
    the code prints it), count the demo's test and train videos, run to the config's last epoch,
    and their summary is the shown start and end: a stale or hand-edited block fails."""
    from dataset import demo
    text = README.read_text()
    lines = re.findall(r'^=> monitor (start|epoch (\d+)): R@1=(\d+\.\d) R@5=(\d+\.\d) \((\d+) test '
                       r'videos query (\d+) train, \d+\.\d s\)$', text, re.M)
    summary = re.search(r'^=> monitor R@1 (\S+) \(start\) -> (\S+) \(epoch (\d+)\), best (\S+) '
                        r'\(epoch (\d+)\)$', text, re.M)
    assert lines and summary and lines[0][0] == 'start'
    test_videos = len(demo.CLASSES) * demo.GROUPS_PER_SPLIT * demo.CLIPS
    assert {(int(n_test), int(n_train)) for *_, n_test, n_train in lines} == {
        (test_videos, len(demo.CLASSES) * demo.GROUPS * demo.CLIPS - test_videos)}
    epochs = [int(e) for _, e, *_ in lines[1:]]
    config = parse_args(local_nce.get_parser(), ['--config', str(README.parent / 'configs' /
                                                                 'demo_rgb.toml')])
    assert epochs == sorted(epochs) and epochs[-1] == int(summary[3]) == config.epochs - 1
    assert (summary[1], summary[2]) == (lines[0][2], lines[-1][2])
    assert float(summary[4]) >= max(float(r1) for _, _, r1, *_ in lines)
    assert config.monitor_freq == 1   # the README says: after every epoch
