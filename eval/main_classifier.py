"""Action recognition on top of a pretrained network (SPEC §4), three modes:

- train: finetune the whole network (``--train_what ft``) or a linear probe of the frozen
  backbone (``--train_what last``) from ``--pretrain``;
- ``--test CKPT --center_crop|--five_crop|--ten_crop``: video-level top-1/top-5 of a classifier,
  softmax averaged over every test window and crop;
- ``--test CKPT|random --retrieval``: nearest-neighbour retrieval R@1/5/10/20/50 with the
  backbone's features, straight from a pretraining (or classifier) checkpoint.

    cd eval; python main_classifier.py --net s3d --dataset ucf101 --seq_len 32 --ds 1 \\
        --batch_size 32 --train_what ft --epochs 500 --schedule 400 450 --pretrain CKPT
    python eval/main_classifier.py --config configs/demo_finetune.toml --pretrain CKPT
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm import tqdm

from dataset import DatasetName, build_dataset
from dataset.augment import DeviceAugment, Photometric
from eval import retrieval
from eval import video_eval as ve
from model.classifier import HEADS, LinearClassifier, checkpoint_kind, load_pretrained
from utils import distributed as du
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import (FRACTION, NON_NEGATIVE, NON_NEGATIVE_REAL, POSITIVE, PROBABILITY,
                          parse_args)
from backbone import MIN_SEGMENT_FRAMES
from dataset.loader import make_loader
from dataset.video_dataset import data_location, modality_of
from model.classifier import check_modality
from utils.engine import Prefetcher
from utils.run import (EpochMeter, begin_epoch, broadcast_state, check_fresh_run, check_resume,
                       open_run, restore)
from utils.misc import (PROJECT_ROOT, format_args, git_revision, interrupted_message,
                        learning_rate, log_epoch, plain_args, seed_everything,
                        run_main, topk_accuracy)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ve.add_common_flags(p, batch_size=32)
    g = p.add_argument_group('classifier training')
    g.add_argument('--train_what', choices=HEADS, default='last',
                   help='ft: finetune the whole network (dropout + linear head); last: linear '
                        'probe (frozen backbone in eval mode, L2 norm + BatchNorm1d + linear head)')
    g.add_argument('--pretrain', default=None,
                   help='initial weights: a pretraining checkpoint (its query encoder, '
                        'encoder_q.0.*), a classifier checkpoint (same head and classes), or '
                        '"random" to train from scratch. Required unless --resume')
    g.add_argument('--dropout', type=PROBABILITY, default=0.9, help='dropout before the ft head')
    g.add_argument('--optim', choices=['adam', 'sgd'], default='adam',
                   help='adam, or sgd with momentum 0.9')
    g.add_argument('--lr', type=NON_NEGATIVE_REAL, default=1e-3, help='learning rate of the head')
    g.add_argument('--backbone_lr_mult', type=NON_NEGATIVE_REAL, default=0.1,
                   help='ft: the backbone learns at lr x this (the reference: lr/10)')
    g.add_argument('--wd', type=NON_NEGATIVE_REAL, default=1e-3,
                   help='weight decay (all parameters)')
    g.add_argument('--epochs', type=POSITIVE, default=10, help='training epochs')
    g.add_argument('--schedule', type=NON_NEGATIVE, nargs='*', default=[60, 80],
                   help='epochs at which the learning rate drops x0.1')
    g.add_argument('--color_jitter_prob', type=PROBABILITY, default=0.3,
                   help='share of training clips given colour jitter (brightness, contrast, '
                        'saturation 0.4, hue 0.1, random order) on the device, as the reference')
    g.add_argument('--photometric_on_flow', action=argparse.BooleanOptionalAction, default=True,
                   help='colour-jitter flow frames too (the reference treats them as images)')
    g.add_argument('--eval_freq', type=POSITIVE, default=1,
                   help='validate every N epochs (and after the last)')
    g.add_argument('--val_set', choices=['test', 'holdout', 'none'], default='test',
                   help='what validation (and so the best checkpoint) uses: test = the test split '
                        '(as the reference; then it is no independent validation), holdout = '
                        '--val_fraction of the train split by source group (removed from '
                        'training), none. Validation: middle window, center crop, one clip a video')
    g.add_argument('--val_fraction', type=FRACTION, default=0.1,
                   help='--val_set holdout: share of the train videos held out')
    g.add_argument('--iters_per_epoch', type=NON_NEGATIVE, default=0,
                   help='stop each epoch after this many iterations (0: whole epoch); for '
                        'smoke tests')
    g.add_argument('--print_freq', type=POSITIVE, default=10, help='log every N iterations')
    g = p.add_argument_group('output')
    g.add_argument('--output_dir', default=None,
                   help='training: experiments go to <output_dir>/<name_prefix><run name>/ '
                        '(default experiments/ in the project folder); --test: results go here '
                        '(default: the checkpoint\'s folder)')
    g.add_argument('--name_prefix', default='', help='prefix of the experiment folder name')
    g.add_argument('--resume', default='', help='classifier checkpoint to continue from (exactly)')
    g = p.add_argument_group('test (with --test)')
    g.add_argument('--test', default='',
                   help='checkpoint to test: a classifier with a crop flag; with --retrieval any '
                        'pretraining or classifier checkpoint, or "random" (random init baseline)')
    crops = g.add_mutually_exclusive_group()
    crops.add_argument('--center_crop', action='store_true', help='test with the center crop')
    crops.add_argument('--five_crop', action='store_true',
                       help='test with 4 corners + center (also reports center)')
    crops.add_argument('--ten_crop', action='store_true',
                       help='test with five crops and their flips (also reports center, five)')
    g.add_argument('--retrieval', action='store_true',
                   help='nearest-neighbour retrieval: test videos query train videos')
    g.add_argument('--visualize', type=NON_NEGATIVE, default=0, metavar='N',
                   help='--retrieval: write a PNG of N queries and their top-5 neighbours')
    retrieval.add_feature_flags(p)
    return p


def check_args(args, parser):
    def bad(msg):
        parser.error(msg)
    spec = DatasetName.parse(args.dataset)
    ve.check_single_view(spec, args.dataset)
    need = MIN_SEGMENT_FRAMES.get(args.net, 1)
    if args.seq_len < need:
        bad(f'--seq_len {args.seq_len}: --net {args.net} needs clips of at least {need} frames')
    crop = args.center_crop or args.five_crop or args.ten_crop
    if args.test:
        if args.retrieval and crop:
            bad('--retrieval uses the center crop of every window; drop the crop flag')
        if not args.retrieval and not crop:
            bad('--test needs --center_crop, --five_crop or --ten_crop (or --retrieval)')
        if args.test == 'random' and not args.retrieval:
            bad('--test random is a baseline of --retrieval only')
    else:
        if crop or args.retrieval:
            bad('--center_crop/--five_crop/--ten_crop/--retrieval need --test CHECKPOINT')
        if not args.pretrain and not args.resume:
            bad('training needs --pretrain CHECKPOINT (or --pretrain random to train from '
                'scratch, or --resume)')
    if args.visualize and not args.retrieval:
        bad('--visualize belongs to --retrieval')


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    check_args(args, parser)
    rt = ve.start(args)
    try:
        if args.test and args.retrieval:
            return run_retrieval(args, rt)
        if args.test:
            return run_test(args, rt)
        return train(args, rt)
    finally:
        du.cleanup()


# ----------------------------------------------------------------------------------------------
# Training

def run_name(args):
    return (f'{args.name_prefix}lincls-{args.train_what}_{args.dataset}_split{args.which_split}'
            f'_{args.net}_bs{args.batch_size}_lr{args.lr:g}_len{args.seq_len}_ds{args.ds}'
            f'_dim{args.img_dim}')


def param_groups(model, backbone_lr_mult):
    """Parameter groups with their learning-rate multiplier (applied each epoch)."""
    groups = [{'params': model.head_parameters(), 'lr_mult': 1.0, 'name': 'head'}]
    if not model.linear_probe:
        groups.insert(0, {'params': list(model.backbone.parameters()),
                          'lr_mult': backbone_lr_mult, 'name': 'backbone'})
    return groups


def make_optimizer(args, model):
    groups = param_groups(model, args.backbone_lr_mult)
    if args.optim == 'adam':
        return torch.optim.Adam(groups, lr=args.lr, weight_decay=args.wd)
    return torch.optim.SGD(groups, lr=args.lr, weight_decay=args.wd, momentum=0.9)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def check_unchanged(module, reference, epoch):
    """The linear probe's contract: the frozen backbone (weights and BatchNorm statistics) is
    bit-identical after an epoch."""
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, reference[k])]
    if changed:
        raise RuntimeError(f'linear probe: the frozen backbone changed in epoch {epoch} '
                           f'({len(changed)} tensors, e.g. {changed[0]})')


def validation_videos(args, train_set, positions):
    """(videos used for training, validation Videos or None, description of the validation)."""
    k = args.which_split
    if args.val_set == 'none':
        return positions, None, 'none'
    if args.val_set == 'test':
        test_set = build_dataset(args.dataset, 'test', **data_location(args),
                                 seq_len=args.seq_len, ds=args.ds, img_dim=args.img_dim)
        videos = ve.Videos(test_set, ve.spread_indices(len(test_set), args.max_videos))
        return positions, videos, (f'TEST split {k} ({len(videos)} videos; the reference '
                                   f'validates on the test split, so the best checkpoint is '
                                   f'selected on test data)')
    kept, held = ve.holdout_split([train_set.sources[i] for i in positions], args.val_fraction,
                                  args.seed)
    windows = ve.with_test_windows(train_set, f'dataset {args.dataset!r} (held-out train videos)')
    videos = ve.Videos(windows, [positions[i] for i in held])
    return ([positions[i] for i in kept], videos,
            f'held-out part of train split {k} ({len(held)} videos in '
            f'{len(set(videos.sources))} source groups, not trained on)')


def train(args, rt):
    info, device = rt.info, rt.device
    say = rt.say
    global_batch = args.batch_size * info.world_size
    modality = modality_of(args.dataset)
    # Checkpoints are read first: a wrong path fails before any data is touched.
    resume = load_checkpoint(args.resume, '--resume') if args.resume else None
    pretrained = None
    if resume is not None:
        if checkpoint_kind(resume['state_dict'], f'--resume {args.resume}') == 'pretrain':
            raise SystemExit(f'error: --resume {args.resume} is a pretraining checkpoint; start a '
                             f'classifier from it with --pretrain {args.resume}')
        check_resume(resume, args, info.world_size)
    elif args.pretrain != 'random':
        pretrained = load_checkpoint(args.pretrain, '--pretrain')
        check_modality(pretrained, modality, f'--pretrain {args.pretrain}')
    seed_everything(args.seed + info.rank)
    train_set = build_dataset(args.dataset, 'train', **data_location(args),
                              seq_len=args.seq_len, ds=args.ds, img_dim=args.img_dim,
                              strong_prob=args.color_jitter_prob,
                              negate_flow_flip=not args.legacy_flow_flip)
    positions = ve.spread_indices(len(train_set), args.max_videos)
    positions, val_videos, val_desc = validation_videos(args, train_set, positions)
    train_data = Subset(train_set, positions)
    if len(train_data) < global_batch:
        raise SystemExit(f'error: {len(train_data)} training videos, fewer than the global '
                         f'batch {global_batch} (--batch_size x processes)')
    loader = make_loader(train_data, args, info)   # the engine's loader

    torch.manual_seed(args.seed)   # the same initial head on every process
    model = LinearClassifier(args.net, train_set.num_classes, args.train_what, args.dropout)
    exp_dir = Path(args.output_dir or PROJECT_ROOT / 'experiments') / run_name(args)
    start_epoch, iteration, best_acc, best_epoch = 0, 0, 0.0, -1
    if resume is None:
        if pretrained is None:
            say('=> --pretrain random: the network starts from a random initialisation')
        else:
            kind = load_pretrained(model, pretrained['state_dict'], f'--pretrain {args.pretrain}')
            new = ', '.join(model.head_keys()) if kind == 'pretrain' else 'nothing'
            say(f'=> initialised from {args.pretrain} ({kind} checkpoint, epoch '
                f'{pretrained.get("epoch")}); newly initialised: {new}')
        check_fresh_run(exp_dir)
    model.to(device, memory_format=rt.memory_format)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    optimizer = make_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type, enabled=rt.amp_dtype == torch.float16)
    if resume is not None:
        exp_dir, start_epoch, iteration = restore(resume, model, optimizer, scaler, args, info,
                                                  say)
        best_acc, best_epoch = resume.get('best_acc', 0.0), resume.get('best_epoch', -1)
    broadcast_state(model)
    frozen = snapshot(model.backbone) if model.linear_probe else None

    # Finetuning's photometric augmentation is colour jitter alone (the flagged share of clips
    # gets it with certainty), not pretraining's jitter/grayscale/blur mix.
    augment = DeviceAugment(args.photometric_on_flow, rt.memory_format,
                            Photometric(jitter_prob=1.0, gray_prob=0.0, blur_prob=0.0))

    writer = open_run(exp_dir, args, info,
                      f'{info.world_size} process(es) on {device}, global batch {global_batch}, '
                      f'amp {rt.amp_dtype}, gradients averaged with all_reduce_mean\n=> train: '
                      f'{len(train_data)} videos of train split {args.which_split} '
                      f'({len(train_set.dropped)} too short, dropped)\n=> validation: {val_desc}')

    try:
        for epoch in range(start_epoch, args.epochs):
            begin_epoch(args.seed, epoch, info.rank, augment)
            lr = learning_rate(args.lr, epoch, args.schedule)
            for group in optimizer.param_groups:
                group['lr'] = lr * group['lr_mult']
            stats, iteration = train_one_epoch(model, loader, augment, modality, optimizer, scaler,
                                               args, rt, epoch, iteration, writer)
            if frozen is not None:
                check_unchanged(model.backbone, frozen, epoch)
            record = {'epoch': epoch, 'iteration': iteration, 'lr': lr,
                      **{f'train_{k}': v for k, v in stats.items()}}
            is_best = False
            if val_videos is not None and ((epoch + 1) % args.eval_freq == 0
                                           or epoch + 1 == args.epochs):
                val = validate(model, val_videos, modality, args, rt, epoch)
                record.update({f'val_{k}': v for k, v in val.items()}, val_set=args.val_set)
                is_best = val['top1'] > best_acc or best_epoch < 0
                if is_best:
                    best_acc, best_epoch = val['top1'], epoch
                if writer is not None:
                    for k, v in val.items():
                        writer.add_scalar(f'val_{args.val_set}/{k}', v, epoch)
            if info.is_main:
                log_epoch(exp_dir / 'log.jsonl', record)
                say(f'=> epoch {epoch}: ' + ' '.join(f'{k}={v:.4g}' for k, v in record.items()
                                                     if isinstance(v, float)))
                state = {'state_dict': model.state_dict(), 'epoch': epoch,
                         'optimizer': optimizer.state_dict(), 'iteration': iteration,
                         'best_acc': best_acc, 'best_epoch': best_epoch, 'val_set': val_desc,
                         'scaler': scaler.state_dict(), 'classes': list(train_set.classes),
                         'args': plain_args(args), 'world_size': info.world_size}
                save_checkpoint(state, exp_dir / 'last.pth.tar',
                                *([exp_dir / 'best.pth.tar'] if is_best else []))
                if is_best:
                    say(f'=> best so far ({args.val_set} top1 {best_acc:.2f}): '
                        f'{exp_dir / "best.pth.tar"}')
    except KeyboardInterrupt:
        say(interrupted_message(exp_dir))
        raise
    finally:
        if writer is not None:
            writer.close()
    say(f'=> finished; checkpoints in {exp_dir}')
    return exp_dir


def train_one_epoch(model, loader, augment, modality, optimizer, scaler, args, rt, epoch,
                    iteration, writer):
    device, amp_dtype = rt.device, rt.amp_dtype
    model.train()              # a linear probe's backbone stays in eval mode (LinearClassifier)
    params = [p for g in optimizer.param_groups for p in g['params']]
    meter = EpochMeter(epoch, loader.steps, device, rt.is_main, writer, args.print_freq)
    batches = Prefetcher(loader.epoch(epoch),
                         lambda b: (augment(b, device)[modality][:, 0],   # B x 3 x T x H x W
                                    b['label'].to(device, non_blocking=True)), device)
    try:
        for x, target in batches:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                logits = model(x).float()                                # B x classes
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            du.all_reduce_mean([p.grad for p in params if p.grad is not None])
            scaler.step(optimizer)
            scaler.update()
            top1, top5 = topk_accuracy(logits.detach(), target)
            meter.update(iteration, loss.detach(), len(target) * rt.info.world_size,
                         optimizer.param_groups[-1]['lr'], {'top1': 100 * top1, 'top5': 100 * top5})
            iteration += 1
    finally:
        batches.close()
    return meter.close(), iteration


@torch.no_grad()
def validate(model, videos, modality, args, rt, epoch):
    """Loss and top-1/top-5 (percent) of the middle window's center crop of every video."""
    model.eval()
    loader = ve.video_loader(videos, args.workers, batch_size=args.batch_size,
                             collate_fn=ve.MiddleWindowCenterCrop(args.img_dim, modality))
    positions, logits = [], []
    for batch in tqdm(loader, desc=f'validate {epoch}', disable=not rt.is_main,
                      dynamic_ncols=True):
        x = ve.to_input(batch['clips'].to(rt.device, non_blocking=True), rt.memory_format)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32,
                            enabled=rt.amp_dtype is not None):
            logits.append(model(x).float())
        positions.append(batch['position'].to(rt.device))
    logits = ve.gather_rows(torch.cat(positions), torch.cat(logits), len(videos))
    labels = torch.tensor(videos.labels, device=rt.device)
    return {'loss': F.cross_entropy(logits, labels).item(), **ve.video_accuracy(logits, labels)}


# ----------------------------------------------------------------------------------------------
# Test with crops

def run_test(args, rt):
    crops = 'ten' if args.ten_crop else 'five' if args.five_crop else 'center'
    source = f'--test {args.test}'
    ckpt = load_checkpoint(args.test, '--test')
    if checkpoint_kind(ckpt['state_dict'], source) == 'pretrain':
        raise SystemExit(f'error: {source} is a pretraining checkpoint (encoder_q.*): it has no '
                         f'classifier. Finetune or linear-probe it first, or use --retrieval')
    check_modality(ckpt, modality_of(args.dataset), source)
    test_set = build_dataset(args.dataset, 'test', **data_location(args), seq_len=args.seq_len,
                             ds=args.ds, img_dim=args.img_dim)
    model = LinearClassifier(args.net, test_set.num_classes, args.train_what, args.dropout)
    load_pretrained(model, ckpt['state_dict'], source)    # another class count: shape error
    if 'classes' in ckpt and list(ckpt['classes']) != list(test_set.classes):
        raise SystemExit(f'error: {source} was trained on other classes than the '
                         f'{len(test_set.classes)} of {args.dataset} (e.g. {ckpt["classes"][:2]} '
                         f'vs {test_set.classes[:2]})')
    model.to(rt.device, memory_format=rt.memory_format).eval()
    videos = ve.Videos(test_set, ve.spread_indices(len(test_set), args.max_videos))
    modality = ve.modality_of(test_set)
    rt.say(f'=> git {git_revision()}\n=> test {source} (epoch {ckpt.get("epoch")}) on '
           f'{args.dataset} test split {args.which_split}: {len(videos)} videos, {crops} crop(s) '
           f'of every window\n=> args:\n{format_args(args)}')

    result = ve.result_path(args, Path(args.test).resolve().parent,
                            f'{args.dataset}_split{args.which_split}_{crops}')

    def probabilities(x):
        return model(x).float().softmax(1)

    probs = ve.video_outputs(probabilities, videos, modality=modality, img_dim=args.img_dim,
                             crops=crops, device=rt.device, batch_size=args.batch_size,
                             workers=args.workers, amp_dtype=rt.amp_dtype,
                             negate_flow=not args.legacy_flow_flip,
                             memory_format=rt.memory_format, show_progress=rt.is_main)
    if not rt.is_main:
        return None
    labels = torch.tensor(videos.labels, device=probs.device)
    summaries = ve.crop_summaries(probs, crops)
    results = {name: ve.video_accuracy(p, labels) for name, p in summaries.items()}
    prob_file = result.with_name(result.stem + '_prob.pth')
    ve.save_probabilities(prob_file, names=videos.names, labels=videos.labels,
                          probs=summaries[crops], classes=test_set.classes,
                          meta={'checkpoint': ve.checkpoint_id(args.test), 'crops': crops,
                                'dataset': args.dataset, 'split': args.which_split})
    report = {'checkpoint': ve.checkpoint_id(args.test), 'epoch': ckpt.get('epoch'),
              'dataset': args.dataset, 'split': args.which_split, 'videos': len(videos),
              'crops': crops, 'results': results, 'probabilities': str(prob_file),
              'git': git_revision(), 'args': plain_args(args)}
    result.write_text(json.dumps(report, indent=1))
    lines = [f'test {args.dataset} split{args.which_split} ({len(videos)} videos)',
             f'{"crops":<8}{"top1":>8}{"top5":>8}']
    lines += [f'{name:<8}{r["top1"]:>8.2f}{r["top5"]:>8.2f}' for name, r in results.items()]
    print('\n'.join(lines))
    print(f'=> results {result}; per-video probabilities {prob_file}')
    return report


# ----------------------------------------------------------------------------------------------
# Retrieval

def run_retrieval(args, rt):
    backbone, what = retrieval.load_backbone(args)
    weights = retrieval.weights_id(args.test, args.seed)
    cache_dir = retrieval.cache_dir(args)
    videos = {part: retrieval.split_videos(args, part) for part in ('train', 'test')}
    rt.say(f'=> git {git_revision()}\n=> retrieval with the backbone of {what} on {args.dataset} '
           f'split {args.which_split}: {len(videos["test"])} test videos query '
           f'{len(videos["train"])} train videos\n=> args:\n{format_args(args)}')
    result = ve.result_path(args, retrieval.experiment_dir(args),
                            f'retrieval_{args.dataset}_split{args.which_split}')
    feats = {part: retrieval.extract_features(args, part, v, backbone, weights, rt, cache_dir)
             for part, v in videos.items()}
    if not rt.is_main:
        return None
    recall = retrieval.retrieval_recall(feats['test']['features'], feats['test']['labels'],
                                        feats['train']['features'], feats['train']['labels'])
    if len(videos['train']) < max(retrieval.KS):
        print(f'=> note: only {len(videos["train"])} train videos; R@k with a larger k counts '
              f'all of them')
    report = {'checkpoint': ve.checkpoint_id(args.test),
              'weights': weights, 'dataset': args.dataset, 'split': args.which_split,
              'queries': len(videos['test']), 'gallery': len(videos['train']),
              'recall': {f'R@{k}': v for k, v in recall.items()}, 'git': git_revision(),
              'args': plain_args(args)}
    result.write_text(json.dumps(report, indent=1))
    print(f'=> results {result}')
    if args.visualize:
        png = retrieval.save_neighbour_picture(result.with_name(result.stem + '_top5.png'),
                                               videos['test'], videos['train'], feats['test'],
                                               feats['train'], args.visualize, args.img_dim)
        print(f'=> {args.visualize} queries and their top-5 neighbours: {png}')
    print(retrieval.recall_line(args.dataset, args.which_split, recall))
    return report


if __name__ == '__main__':
    run_main(main)
