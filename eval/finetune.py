"""Training a classifier (main_classifier.py --pretrain CKPT|random, or --resume): finetune the
whole network (--train_what ft) or a linear probe of the frozen backbone (--train_what last);
validation each --eval_freq epochs picks best.pth.tar (docs/METHOD.md, Evaluation)."""
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm import tqdm

from dataset.augment import (DeviceAugment, Photometric, box_pixels, flip_frames, resize,
                             sample_crop)
from dataset.loader import make_loader
from dataset.catalog import build_dataset, data_location, modality_of
from eval import clips
from model.classifier import LinearClassifier, check_modality, checkpoint_kind, load_pretrained
from utils.checkpoint import load_checkpoint
from utils.misc import PROJECT_ROOT, UserError, learning_rate, seed_everything, topk_accuracy
from utils.run import (EpochMeter, Preemption, auto_resume, begin_epoch, broadcast_state,
                       check_resume, disk_use, end_epoch, open_run, optimizer_step,
                       resume_mid_epoch, resume_or_start)

VAL_SEED, VAL_SHARE = 666, 0.3   # CoCLR validates on this random share of the test split


def coclr_validation_rows(n):
    """CoCLR's validation rows of a test split of ``n`` videos, in its order: pandas'
    ``sample(frac=0.3, random_state=666)``, which is numpy's ``permutation(n)[:round(0.3 n)]``
    (at least one row)."""
    rows = np.random.RandomState(VAL_SEED).permutation(n)
    return rows[:max(1, round(VAL_SHARE * n))].tolist()


def validation_videos(args, train_set, positions):
    """(positions trained on, validation clips.Videos or None, a description)."""
    if args.val_set == 'none':
        return positions, None, 'none'
    coclr, k = args.protocol == 'coclr', args.which_split
    options = dict(stored_size=True, test_windows='random') if coclr else {}
    if args.val_set == 'test':
        videos = clips.split_videos(args, 'test')
        if coclr:   # CoCLR's val mode: its rows of the test split, one random clip each
            videos = clips.Videos(videos.dataset, [videos.indices[i] for i in
                                                   coclr_validation_rows(len(videos))],
                                  test_windows='random')
        return positions, videos, (
            f'TEST split {k} ({len(videos)} videos; the reference validates on the test split, '
            f'so the best checkpoint is selected on test data)')
    kept, held = clips.holdout_split([train_set.sources[i] for i in positions], args.val_fraction,
                                     args.seed)
    videos = clips.Videos(train_set, [positions[i] for i in held], **options)
    return [positions[i] for i in kept], videos, (
        f'held-out part of train split {k} ({len(held)} videos in {len(set(videos.sources))} '
        f'source groups, not trained on)')


def train(args, rt):
    info, device, say = rt.info, rt.device, rt.say
    modality = modality_of(args.dataset)
    exp_dir = Path(args.output_dir or PROJECT_ROOT / 'experiments') / (
        f'{args.name_prefix}lincls-{args.train_what}_{args.dataset}_split{args.which_split}_'
        f'{args.net}_bs{args.batch_size}_lr{args.lr:g}_len{args.seq_len}_ds{args.ds}'
        f'_dim{args.img_dim}')
    # Checkpoints are read first: a wrong path fails before any data is touched.
    resume = load_checkpoint(args.resume, '--resume') if auto_resume(args, exp_dir) else None
    pretrained = None
    if resume is not None:
        if checkpoint_kind(resume['state_dict'], f'--resume {args.resume}') == 'pretrain':
            raise UserError(f'--resume {args.resume} is a pretraining checkpoint; start a '
                            f'classifier from it with --pretrain {args.resume}')
        check_resume(resume, args, info.world_size)
    elif not args.pretrain:   # --resume auto without a checkpoint yet
        raise UserError('--pretrain CHECKPOINT|random is required to start a run')
    elif args.pretrain != 'random':
        pretrained = load_checkpoint(args.pretrain, '--pretrain')
        check_modality(pretrained, modality, f'--pretrain {args.pretrain}')
    seed_everything(args.seed + info.rank)
    train_set = build_dataset(args.dataset, 'train', **data_location(args), seq_len=args.seq_len,
                              ds=args.ds, img_dim=args.img_dim, strong_prob=args.color_jitter_prob,
                              negate_flow_flip=not args.legacy_flow_flip, crop_retry=True,
                              flip_prob=0.5 if args.flip == 'clip' else 0.0)
    positions, val_videos, val_desc = validation_videos(
        args, train_set, clips.spread_indices(len(train_set), args.max_videos))
    loader = make_loader(Subset(train_set, positions), args, info)   # no batch: an error

    torch.manual_seed(args.seed)   # the same initial head on every process
    model = LinearClassifier(args.net, train_set.num_classes, args.train_what, args.dropout)
    if pretrained is not None:
        kind = load_pretrained(model, pretrained['state_dict'], f'--pretrain {args.pretrain}')
        say(f'=> initialised from {args.pretrain} ({kind} checkpoint, epoch '
            f'{pretrained.get("epoch")}); newly initialised: '
            + (', '.join(model.head_keys()) if kind == 'pretrain' else 'nothing'))
    model.to(device, memory_format=rt.memory_format)
    torch.backends.cudnn.benchmark = True
    head = [p for n, p in model.named_parameters() if not n.startswith('backbone.')]
    groups = [{'params': head, 'lr_mult': 1.0, 'name': 'head'}]
    if not model.linear_probe:
        groups.insert(0, {'params': list(model.backbone.parameters()),
                          'lr_mult': args.backbone_lr_mult, 'name': 'backbone'})
    optimizer = (torch.optim.Adam(groups, lr=args.lr, weight_decay=args.wd) if args.optim == 'adam'
                 else torch.optim.SGD(groups, lr=args.lr, weight_decay=args.wd, momentum=0.9))
    scaler = torch.amp.GradScaler(device.type, enabled=rt.amp_dtype == torch.float16)
    exp_dir, start_epoch, iteration, best_acc, previous = resume_or_start(
        resume, exp_dir, model, optimizer, scaler, args, say)
    best_epoch = resume.get('best_epoch', -1) if resume is not None else -1
    broadcast_state(model)
    frozen = ({k: v.clone() for k, v in model.backbone.state_dict().items()}
              if model.linear_probe else None)
    # Colour jitter alone, on --color_jitter_prob of the clips, as the reference.
    augment = DeviceAugment(args.photometric_on_flow, rt.memory_format,
                            Photometric(jitter_prob=1.0, gray_prob=0.0, blur_prob=0.0))
    with open_run(exp_dir, args, info, say, rt.amp_dtype,
                  f'\n=> train: {len(positions)} videos of train split {args.which_split} '
                  f'({len(train_set.dropped)} too short, dropped)\n'
                  f'=> validation: {val_desc}, protocol {args.protocol}\n=> '
                  + disk_use(model, args.epochs, args.keep_every,
                             slots=2 if args.optim == 'adam' else 1, best=True)) as writer, \
            Preemption(args.save_signal) as stop:
        for epoch in range(start_epoch, args.epochs):
            lr = learning_rate(args.lr, epoch, args.schedule)
            begin_epoch(args.seed, epoch, info.rank, augment, optimizer, lr)
            meter = EpochMeter(epoch, loader.steps, rt.device, rt.is_main, writer, args.print_freq)
            first_step, resume = resume_mid_epoch(resume, info.rank, device, meter, augment), None
            iteration, stopped = train_one_epoch(model, loader.epoch(epoch, first_step), augment,
                                                 modality, optimizer, scaler, args, rt, meter,
                                                 iteration, stop)
            if stopped:
                stop.save_and_exit(exp_dir, model, optimizer, scaler, args, info, epoch,
                                   iteration, meter, augment.generator.get_state(),
                                   best_acc=best_acc, best_epoch=best_epoch)
            stats = meter.close()
            record = {'epoch': epoch, 'iteration': iteration, 'lr': lr,
                      **{f'train_{k}': v for k, v in stats.items()}}
            last = epoch + 1 == args.epochs
            is_best = False
            if val_videos is not None and ((epoch + 1) % args.eval_freq == 0 or last):
                val = validate(model, val_videos, args, rt, epoch)
                record.update({f'val_{k}': v for k, v in val.items()}, val_set=args.val_set)
                if is_best := val['top1'] > best_acc or best_epoch < 0:
                    best_acc, best_epoch = val['top1'], epoch
                for k, v in val.items() if writer is not None else ():
                    writer.add_scalar(f'val_{args.val_set}/{k}', v, epoch)
            say(f'=> epoch {epoch}: ' + ' '.join(f'{k}={v:.4g}' for k, v in record.items()
                                                 if isinstance(v, float))
                + (f' (best so far, {args.val_set} top1 {best_acc:.2f})' if is_best else ''))
            previous = end_epoch(exp_dir, record, model, optimizer, scaler, args, info, previous,
                                 best=is_best, best_acc=best_acc, best_epoch=best_epoch,
                                 val_set=val_desc, classes=list(train_set.classes))
        if frozen is not None:   # once, at the end, as MoCo's sanity check
            check_frozen(model.backbone, frozen)
    return exp_dir


def check_frozen(backbone, frozen):
    """A linear probe leaves its backbone (weights and BatchNorm statistics) bit-identical."""
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, frozen[k])]
    if changed:
        raise RuntimeError(f'linear probe: the frozen backbone changed ({len(changed)} tensors, '
                           f'e.g. {changed[0]})')


def train_one_epoch(model, batches, augment, modality, optimizer, scaler, args, rt, meter,
                    iteration, stop):
    """Returns the iteration count and whether the processes agreed to ``stop`` at a step
    boundary (the first is before the first step: a signal during validation stops there)."""
    model.train()              # a linear probe's backbone stays in eval mode (LinearClassifier)
    for batch in batches:
        if stop.agreed():
            return iteration, True
        if args.flip == 'batch' and bool(torch.rand((), generator=augment.generator) < 0.5):
            # CoCLR flips all clips of a batch or none (docs/METHOD.md, Evaluation)
            batch[modality] = flip_frames(batch[modality].to(rt.device), modality == 'flow',
                                          not args.legacy_flow_flip)
        x = augment(batch, rt.device)[modality][:, 0]                    # B x 3 x T x H x W
        target = batch['label'].to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(x).float()                                    # B x classes
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        optimizer_step(model, optimizer, scaler)
        top1, top5 = topk_accuracy(logits.detach(), target)
        meter.update(iteration, loss.detach(), len(target) * rt.info.world_size,
                     optimizer.param_groups[-1]['lr'], {'top1': 100 * top1, 'top5': 100 * top5})
        iteration += 1
    return iteration, stop.agreed()


def validation_clips(batch, args, modality):
    """Validation's collate, a clip per video. coclr: its one random window, a random crop (20-100%
    of the area) scaled to --img_dim, CoCLR's val mode; clean: the middle window's centre crop."""
    out, s = [], args.img_dim
    for item in batch:
        frames = item[modality][len(item[modality]) // 2]             # T x 3 x h x w
        h, w = frames.shape[-2:]
        if args.protocol == 'coclr':
            top, left, hh, ww = box_pixels(sample_crop(h, w, retry=True), h, w)
            out.append(resize(frames[..., top:top + hh, left:left + ww], (s, s)))
        else:
            top, left = clips.crop_offsets(h, w, s)[0]
            out.append(frames[..., top:top + s, left:left + s])
    return {'clips': torch.stack(out),
            'position': torch.tensor([item['position'] for item in batch])}


@torch.no_grad()
def validate(model, videos, args, rt, epoch):
    """Loss and top-1/top-5 (percent) of one clip per validation video (validation_clips)."""
    model.eval()
    collate = partial(validation_clips, args=args, modality=videos.modality)
    loader = clips.video_loader(videos, args.workers, args.batch_size, collate)
    positions, logits = [], []
    for batch in tqdm(loader, desc=f'validate {epoch}', disable=not rt.is_main, dynamic_ncols=True):
        x = clips.to_input(batch['clips'].to(rt.device).float().div_(255), rt.memory_format)
        with rt.autocast():
            logits.append(model(x).float())
        positions.append(batch['position'].to(rt.device))
    logits = clips.gather_rows(torch.cat(positions), torch.cat(logits), len(videos))
    labels = torch.tensor(videos.labels, device=rt.device)
    return {'loss': F.cross_entropy(logits, labels).item(), **clips.video_accuracy(logits, labels)}
