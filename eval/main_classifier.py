"""Action recognition and retrieval on a pretrained network, three jobs: training (--pretrain
CKPT|random or --resume, --train_what ft|last; eval/finetune.py), the crop test (--test CKPT
--center_crop|--five_crop|--ten_crop; eval/crop_test.py) and retrieval (--test CKPT|random
--retrieval; eval/retrieval.py). docs/METHOD.md, Evaluation.

    python eval/main_classifier.py --config configs/demo_finetune.toml --pretrain CKPT
"""
from eval import clips, crop_test, finetune, retrieval
from model.classifier import HEADS
from utils.config import (FRACTION, NON_NEGATIVE, NON_NEGATIVE_REAL, POSITIVE,
                          PROBABILITY, parse_args)
from utils.misc import run_main


def build_parser():
    p = clips.eval_parser(__doc__)
    g = p.add_argument_group('classifier training')
    g.add_argument('--train_what', choices=HEADS, default='last',
                   help='ft: finetune the whole network (dropout + linear head); last: linear '
                        'probe (frozen backbone, L2 norm + BatchNorm1d + linear head); a crop '
                        "test (--test) uses the checkpoint's head")
    g.add_argument('--pretrain', default=None, help='initial weights: a pretraining checkpoint, '
                   'a classifier (same head and classes) or "random"; needed unless --resume')
    g.add_argument('--dropout', type=PROBABILITY, default=0.9, help='dropout before the ft head')
    g.add_argument('--optim', choices=['adam', 'sgd'], default='adam', help='sgd: momentum 0.9')
    g.add_argument('--lr', type=NON_NEGATIVE_REAL, default=1e-3, help='learning rate of the head')
    g.add_argument('--backbone_lr_mult', type=NON_NEGATIVE_REAL, default=0.1,
                   help='ft: the backbone learns at lr x this (the reference: lr/10)')
    g.add_argument('--wd', type=NON_NEGATIVE_REAL, default=1e-3, help='weight decay')
    g.add_argument('--epochs', type=POSITIVE, default=10, help='training epochs')
    g.add_argument('--schedule', type=NON_NEGATIVE, nargs='*', default=[60, 80],
                   help='epochs at which the learning rate drops x0.1')
    g.add_argument('--color_jitter_prob', type=PROBABILITY, default=0.3,
                   help='share of training clips given colour jitter (as the reference)')
    g.add_argument('--flip', choices=['batch', 'clip'], default='batch',
                   help='horizontal flip of training clips, p 0.5: batch = one draw for all '
                        'clips of a batch (as the reference), clip = one draw per clip')
    g.add_argument('--eval_freq', type=POSITIVE, default=1, help='validate every N epochs')
    g.add_argument('--val_set', choices=['test', 'holdout', 'none'], default='test',
                   help='what picks best.pth.tar: test = the test split (as the reference), '
                        'holdout = --val_fraction of the train split (whole source groups), none. '
                        'One clip a video (see eval/finetune.py validation_clips)')
    g.add_argument('--val_fraction', type=FRACTION, default=0.1, help='--val_set holdout: share')
    g.add_argument('--iters_per_epoch', type=NON_NEGATIVE, default=0, help='0: whole epochs')
    g.add_argument('--print_freq', type=POSITIVE, default=10, help='log every N iterations')
    g = p.add_argument_group('output')
    g.add_argument('--name_prefix', default='', help='prefix of the experiment folder name')
    g.add_argument('--resume', default='', help='classifier checkpoint to continue from (exactly); '
                   "auto: the run folder's last.pth.tar if any, else start (README, Clusters)")
    g.add_argument('--keep_every', type=NON_NEGATIVE, default=50,
                   help='also keep epoch<N>.pth.tar of every N-th epoch (0: none)')
    g = p.add_argument_group('test (with --test)')
    g.add_argument('--test', default='', help='a classifier to test with a crop flag; with '
                   '--retrieval any checkpoint, or "random" (the random-init baseline)')
    crops = g.add_mutually_exclusive_group()
    crops.add_argument('--center_crop', action='store_true', help='test with the center crop')
    crops.add_argument('--five_crop', action='store_true', help='center + 4 corners')
    crops.add_argument('--ten_crop', action='store_true', help='five crops and their flips')
    g.add_argument('--retrieval', action='store_true', help='test videos query train videos')
    return p


def check_args(args, parser):
    """Which job the flags ask for: 'train', 'test' or 'retrieval' (or a parser error)."""
    crop = args.center_crop or args.five_crop or args.ten_crop
    if not args.test:
        if crop or args.retrieval:
            parser.error('--center_crop/--five_crop/--ten_crop/--retrieval need --test CKPT')
        if not args.pretrain and not args.resume:
            parser.error('training needs --pretrain CHECKPOINT|random or --resume CHECKPOINT')
        return 'train'
    if bool(crop) == args.retrieval:
        parser.error('--test needs one of --center_crop, --five_crop, --ten_crop and --retrieval')
    if args.retrieval:
        return 'retrieval'
    if args.test == 'random':
        parser.error('--test random is a baseline of --retrieval only')
    return 'test'


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    job = check_args(args, parser)
    jobs = {'train': finetune.train, 'test': crop_test.run, 'retrieval': retrieval.run}
    with clips.started(args) as rt:
        return jobs[job](args, rt)


if __name__ == '__main__':
    run_main(main)
