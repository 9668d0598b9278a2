"""CVTCL pretraining (docs/METHOD.md, Losses): cross-view co-training. A frozen network of the
other modality (the sampler: flow for RGB, RGB for flow with --reverse) mines top-k extra
positives for CoCLR's multi-positive loss, plus the inter and intra local temporal losses.

    python local_coclr.py --config configs/demo_coclr_rgb.toml
    python -m torch.distributed.launch --nproc_per_node=2 local_coclr.py --net s3d --topk 5 \
        --moco-k 2048 --dataset ucf101-2stream-2clip --seq_len 32 --ds 1 --batch_size 32 \
        --epochs 100 --schedule 80 --name_prefix Cycle1-FlowMining_ -j 8 \
        --pretrain {rgb_infoNCE_checkpoint.pth.tar} {flow_infoNCE_checkpoint.pth.tar}
"""
import argparse

import engine_pretrain as engine
from model.moco import LocalCoCLR
from utils.config import NON_NEGATIVE, PROBABILITY, parse_args
from utils.misc import UserError, run_main


def build_model(args):
    return LocalCoCLR(net=args.net, dim=args.moco_dim, K=args.moco_k, m=args.moco_m,
                      tau=args.moco_t, num_segments=args.num_segments, bn_splits=args.bn_splits,
                      weights={t: getattr(args, f'w_{t}') for t in LocalCoCLR.WEIGHTS},
                      topk=args.topk, self_mask_prob=args.self_mask_prob,
                      local_keys=args.local_keys)


def load_pretrained(model, args):
    main, other = ('flow', 'rgb') if args.reverse else ('rgb', 'flow')
    if not args.pretrain:   # --resume auto without a checkpoint yet
        raise UserError('--pretrain TRAINED SAMPLER is required to start a run')
    roles = ((model.encoder_q, 'trained network', main), (model.sampler, 'sampler', other))
    for path, (encoder, role, modality) in zip(args.pretrain, roles):
        if path == 'random':
            print(f'=> --pretrain: {role} left randomly initialised (asked with "random")')
            continue
        epoch = engine.load_encoder(encoder, path, f'--pretrain ({role}, {modality.upper()})',
                                    modality)
        print(f'=> {role} initialised from {path} (epoch {epoch})')


def inputs(views, batch, device, args):
    main, other = ('flow', 'rgb') if args.reverse else ('rgb', 'flow')
    return {**engine.view_inputs(views, main, args), 'other_view2': views[other][:, 1],
            'source': batch['source'].to(device, non_blocking=True),
            'label': batch['label'].to(device, non_blocking=True)}


def get_parser():
    parser = engine.pretrain_parser(__doc__.split('\n\n')[0], dataset='ucf101-2stream-2clip',
                                    weights=LocalCoCLR.WEIGHTS, tau=0.07, lr=1e-3, warmup=[],
                                    batch_size=32, epochs=100, schedule=[80],
                                    local_aug='independent')
    g = parser.add_argument_group('CVTCL (cross-view co-training)')
    g.add_argument('--model', default='coclr', choices=['coclr'],
                   help='coclr: CoCLR loss + inter + intra (set --w_inter 0 --w_intra 0 for '
                        'plain CoCLR)')
    g.add_argument('--pretrain', nargs=2, metavar=('TRAINED', 'SAMPLER'),
                   help='checkpoints (or "random") initialising the trained network (query and '
                        'key encoder) and the frozen sampler of the other modality')
    g.add_argument('--reverse', action=argparse.BooleanOptionalAction, default=False,
                   help='train the flow network with RGB mining (default: RGB with flow mining)')
    g.add_argument('--topk', type=NON_NEGATIVE, default=5,
                   help='positives mined per sample by the sampler (0: siblings only)')
    g.add_argument('--self_mask_prob', type=PROBABILITY, default=0.9,
                   help='probability that a batch drops the self positive where mined ones exist')
    return parser


def main(argv=None):
    parser = get_parser()
    args = parse_args(parser, argv)
    if not args.resume and not args.pretrain:   # (nargs=2: given, it is two words)
        parser.error('--pretrain TRAINED SAMPLER is required (a path or "random" each)')
    if args.topk > args.moco_k:
        parser.error(f'--topk {args.topk} mines more positives than the queue holds '
                     f'(--moco-k {args.moco_k})')
    return engine.train(args, engine.Task('coclr', build_model, load_pretrained, inputs,
                                          two_stream=True))


if __name__ == '__main__':
    run_main(main)
