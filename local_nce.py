"""Local InfoNCE pretraining (docs/METHOD.md, Losses): MoCo on one modality (RGB or flow) with a
global clip-level InfoNCE loss plus the inter and intra local temporal losses.

    python local_nce.py --config configs/demo_rgb.toml
    python -m torch.distributed.launch --nproc_per_node=2 local_nce.py --net s3d --model infonce \
        --moco-k 2048 --dataset ucf101-2clip --seq_len 32 --ds 1 --batch_size 8 --epochs 300 \
        --schedule 250 280 -j 16
"""
from dataset.catalog import modality_of
import engine_pretrain as engine
from model.moco import LocalInfoNCE
from utils.config import parse_args
from utils.misc import run_main


def build_model(args):
    return LocalInfoNCE(args.net, dim=args.moco_dim, K=args.moco_k, m=args.moco_m,
                        tau=args.moco_t, num_segments=args.num_segments, bn_splits=args.bn_splits,
                        weights={t: getattr(args, f'w_{t}') for t in LocalInfoNCE.WEIGHTS},
                        local_keys=args.local_keys)


def load_pretrained(model, args):
    if args.pretrain:
        epoch = engine.load_encoder(model.encoder_q, args.pretrain, '--pretrain',
                                    modality_of(args.dataset))
        print(f'=> initialised from {args.pretrain} (epoch {epoch})')


def inputs(views, batch, device, args):
    return engine.view_inputs(views, modality_of(args.dataset), args)


def get_parser():
    parser = engine.pretrain_parser(__doc__.split('\n\n')[0], dataset='ucf101-2clip',
                                    weights=LocalInfoNCE.WEIGHTS, tau=0.1, lr=5e-4,
                                    warmup=[0.01, 0.05, 0.1, 0.5], batch_size=8, epochs=300,
                                    schedule=[250, 280], local_aug='shared')
    parser.add_argument('--model', default='infonce', choices=['infonce'],
                        help='infonce: global + inter + intra (set --w_inter 0 --w_intra 0 for '
                             'plain MoCo)')
    parser.add_argument('--pretrain', default='',
                        help='pretraining checkpoint whose query encoder initialises both encoders')
    return parser


def main(argv=None):
    args = parse_args(get_parser(), argv)
    return engine.train(args, engine.Task('infonce', build_model, load_pretrained, inputs,
                                          two_stream=False))


if __name__ == '__main__':
    run_main(main)
