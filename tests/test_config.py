"""Config files (--config FILE.toml) are checked as strictly as the same flags on the command line."""
from pathlib import Path

import pytest

import local_coclr
import local_nce
from eval import feature_linear_probe, main_classifier
from utils.config import parse_args

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
NCE, COCLR = local_nce.get_parser, local_coclr.get_parser
CLASSIFIER, PROBE = main_classifier.build_parser, feature_linear_probe.build_parser


def parse(make_parser, tmp_path, text, *argv):
    cfg = tmp_path / 'c.toml'
    cfg.write_text(text + '\n')
    return parse_args(make_parser(), ['--config', str(cfg), *argv])


@pytest.mark.parametrize('make_parser,text,message', [
    # choices
    (NCE, 'device = "gpu"', "argument --device: invalid choice: 'gpu' (choose from 'auto', "
                            "'cpu', 'cuda') (from --config {})"),
    (CLASSIFIER, 'optim = "adamw"', "argument --optim: invalid choice: 'adamw'"),
    (CLASSIFIER, 'val_set = "holdut"', "argument --val_set: invalid choice: 'holdut'"),
    (NCE, 'amp = "bf17"', "argument --amp: invalid choice: 'bf17'"),
    (CLASSIFIER, 'train_what = "finetune"', "argument --train_what: invalid choice: 'finetune'"),
    (NCE, 'model = "coclr"', "argument --model: invalid choice: 'coclr' (choose from 'infonce') "
                             "(from --config {})"),
    # switches take a TOML boolean
    (NCE, 'legacy_flow_flip = "no"', "ignored explicit argument 'no' (from --config {})"),
    (NCE, 'channels_last = "false"', "ignored explicit argument 'false' (from --config {})"),
    (NCE, 'compile = 1', "argument --compile/--no-compile: ignored explicit argument '1' "
                         "(from --config {})"),
    # the number of values
    (NCE, 'crop_area = 0.5', 'argument --crop_area: expected 2 arguments (from --config {})'),
    (NCE, 'crop_area = [0.5]', 'argument --crop_area: expected 2 arguments (from --config {})'),
    (PROBE, 'test = "random"\nCs = []',
     'argument --Cs: expected at least one argument (from --config {})'),
    (COCLR, 'pretrain = "random"', 'argument --pretrain: expected 2 arguments (from --config {})'),
    (NCE, 'net = ["s3d", "r50"]', "--net: ['s3d', 'r50'] (from --config {}) is not accepted "
                                  "(r50 left over)"),
    # the type
    (NCE, 'seed = true', 'argument --seed: expected one argument (from --config {})'),
    (NCE, 'seed = 2.5', "argument --seed: invalid int value: '2.5' (from --config {})"),
    (NCE, 'lr = false', 'argument --lr: expected one argument (from --config {})'),
    (NCE, 'schedule = ["80", "x"]',
     "argument --schedule: invalid int value: 'x' (from --config {})"),
    (NCE, 'crop_area = [0.5, 1.5]',
     'argument --crop_area: 1.5 is not a number in (0, 1] (from --config {})'),
    (NCE, 'batch_size = "0"', 'argument --batch_size: 0 is not an integer >= 1 (from --config {})'),
    (NCE, 'warmup = [0.1, -1.0]', 'argument --warmup: -1.0 is not a number >= 0 (from --config'),
    (NCE, 'crop_area = {low = 0.5}', 'is not a value or a list of values'),
    # unknown keys, abbreviations too
    (NCE, 'no_such_flag = 1', "--config {}: unknown key 'no_such_flag'"),
    (NCE, 'batch = 8', "--config {}: unknown key 'batch'"),
    # one of a mutually exclusive group, as on the command line
    (CLASSIFIER, 'five_crop = true\nten_crop = true',
     'argument --ten_crop: not allowed with argument --five_crop (from --config {})'),
])
def test_bad_config_values_are_refused_by_flag_and_file(make_parser, text, message, tmp_path,
                                                        capsys):
    with pytest.raises(SystemExit):
        parse(make_parser, tmp_path, text)
    assert message.format(tmp_path / 'c.toml') in capsys.readouterr().err


def test_valid_config_values_are_taken_as_the_command_line_would(tmp_path):
    a = parse(NCE, tmp_path, '\n'.join([
        'device = "cpu"', 'amp = "bf16"', 'model = "infonce"', 'schedule = []',
        'warmup = [0.1, 1]', 'crop_area = [0.3, 0.9]', 'legacy_flow_flip = true',
        'channels_last = false', 'cuda_graph = false', 'lr = "0.1"', 'moco-k = 64',
        'pretrain = "random"', 'dataset = "demo-2clip"']))
    assert (a.device, a.amp, a.model, a.schedule) == ('cpu', 'bf16', 'infonce', [])
    assert (a.warmup, a.crop_area) == ([0.1, 1.0], [0.3, 0.9])
    assert (a.legacy_flow_flip, a.channels_last, a.cuda_graph) == (True, False, False)
    assert (a.lr, a.moco_k, a.pretrain, a.dataset) == (0.1, 64, 'random', 'demo-2clip')
    assert all(type(w) is float for w in a.warmup)   # as "--warmup 0.1 1" gives
    c = parse(COCLR, tmp_path, 'pretrain = ["random", "random"]\nreverse = true\nschedule = [80]')
    assert (c.pretrain, c.reverse, c.schedule) == (['random', 'random'], True, [80])
    m = parse(CLASSIFIER, tmp_path, 'optim = "sgd"\nval_set = "holdout"\ntrain_what = "last"\n'
              'ten_crop = true\ncenter_crop = false')
    assert (m.optim, m.val_set, m.train_what, m.ten_crop, m.center_crop) == \
        ('sgd', 'holdout', 'last', True, False)


def test_command_line_flags_win_over_the_file(tmp_path):
    a = parse(NCE, tmp_path, 'device = "cpu"\nschedule = []\nchannels_last = false\n'
              'legacy_flow_flip = true\ncrop_area = [0.3, 0.9]\npretrain = "x"',
              '--device', 'cuda', '--schedule', '5', '--channels_last', '--crop_area', '0.5', '1',
              '--pretrain', 'y')
    assert (a.device, a.schedule, a.channels_last, a.crop_area, a.pretrain) == \
        ('cuda', [5], True, [0.5, 1.0], 'y')
    assert a.legacy_flow_flip   # store_true cannot be switched off on the command line
    a = parse(NCE, tmp_path, 'channels_last = true', '--no-channels_last')
    assert not a.channels_last
    c = parse(COCLR, tmp_path, 'pretrain = ["a", "b"]', '--pretrain', 'random', 'random')
    assert c.pretrain == ['random', 'random']
    m = parse(CLASSIFIER, tmp_path, 'optim = "sgd"', '--optim', 'adam')
    assert m.optim == 'adam'
    with pytest.raises(SystemExit):   # and the command line is still checked
        parse(CLASSIFIER, tmp_path, 'optim = "sgd"', '--optim', 'adamw')


def test_a_missing_or_malformed_file_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(NCE(), ['--config', str(tmp_path / 'none.toml')])
    assert f'--config {tmp_path / "none.toml"}: No such file or directory' in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(NCE, tmp_path, 'lr = ')
    assert f'--config {tmp_path / "c.toml"}: Invalid value' in capsys.readouterr().err


def test_a_required_flag_may_come_from_the_file(tmp_path, capsys):
    assert parse(PROBE, tmp_path, 'test = "random"').test == 'random'
    with pytest.raises(SystemExit):
        parse(PROBE, tmp_path, 'max_iter = 10')
    assert 'the following arguments are required: --test' in capsys.readouterr().err


@pytest.mark.parametrize('path', sorted(CONFIGS.glob('*.toml')), ids=lambda p: p.name)
def test_every_shipped_config_parses_with_its_script(path):
    if 'coclr' in path.name:
        make_parser, extra = COCLR, ['--pretrain', 'random', 'random']
    elif path.stem in ('demo_finetune', 'demo_scratch'):
        make_parser, extra = CLASSIFIER, []
    else:
        make_parser, extra = NCE, []
    args = parse_args(make_parser(), ['--config', str(path), *extra])
    assert isinstance(args.schedule, list)


def test_command_line_crop_flag_replaces_the_files(tmp_path):
    from eval import main_classifier
    cfg = tmp_path / 'crop.toml'
    cfg.write_text('ten_crop = true\n')
    a = parse_args(main_classifier.build_parser(), ['--config', str(cfg), '--center_crop'])
    assert (a.center_crop, a.ten_crop) == (True, False)
    assert parse_args(main_classifier.build_parser(), ['--config', str(cfg)]).ten_crop
