"""Linear probe on frozen video features with scikit-learn: a logistic regression on the features
of ``--test`` (one per video, the same extraction and cache as ``main_classifier.py
--retrieval``), its inverse regularisation C chosen on a held-out part of the train split (whole
source groups), then refit on the whole train split; reports test top-1/top-5.

    python eval/feature_linear_probe.py --net s3d --dataset ucf101 --seq_len 32 --ds 1 \\
        --test CKPT
"""
import argparse
import json

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from backbone import MIN_SEGMENT_FRAMES
from eval import clips, retrieval
from utils import distributed as du
from utils.config import FRACTION, POSITIVE, POSITIVE_REAL, parse_args
from utils.misc import format_args, git_revision, plain_args, run_main


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    clips.add_common_flags(p)
    g = p.add_argument_group('linear probe')
    g.add_argument('--test', required=True,
                   help='checkpoint whose backbone gives the features (pretraining or '
                        'classifier), or "random"')
    g.add_argument('--Cs', type=POSITIVE_REAL, nargs='+',
                   default=[1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0],
                   help='inverse regularisation strengths tried')
    g.add_argument('--holdout_fraction', type=FRACTION, default=0.2,
                   help='share of the train videos (whole source groups) that chooses C')
    g.add_argument('--max_iter', type=POSITIVE, default=1000, help='iterations of the lbfgs solver')
    g.add_argument('--output_dir', default=None,
                   help="where the result JSON goes (default: the checkpoint's folder; for "
                        '--test random: <output_dir or experiments/>/random_<net>/)')
    retrieval.add_feature_flags(p)
    return p


def make_probe(C, max_iter, seed):
    # Standardised with the train statistics only (unlike retrieval, which centres each set by
    # its own mean: here test features must not inform the preprocessing).
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter,
                                                              random_state=seed))


def choose_c(x, y, sources, Cs, fraction, max_iter, seed):
    """The C of ``Cs`` with the best accuracy on held-out source groups; {C: accuracy}."""
    kept, held = clips.holdout_split(list(sources), fraction, seed)
    scores = {}
    for C in Cs:
        probe = make_probe(C, max_iter, seed).fit(x[kept], y[kept])
        scores[C] = 100.0 * float((probe.predict(x[held]) == y[held]).mean())
    return max(scores, key=lambda c: (scores[c], -c)), scores   # ties: the stronger regulariser


def top_k(probe, x, y, ks=(1, 5)):
    """Percent of rows whose label is among the k most probable classes, for each k."""
    proba = probe.predict_proba(x)
    order = probe.classes_[np.argsort(-proba, axis=1)]
    return {f'top{k}': 100.0 * float((order[:, :k] == y[:, None]).any(1).mean()) for k in ks}


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.seq_len < MIN_SEGMENT_FRAMES.get(args.net, 1):
        parser.error(f'--seq_len {args.seq_len} is too short for --net {args.net}')
    clips.check_single_view(args.dataset)
    rt = clips.start(args)
    try:
        return run(args, rt)
    finally:
        du.cleanup()


def run(args, rt):
    path = clips.result_path(args, retrieval.experiment_dir(args),
                             f'feature_probe_{args.dataset}_split{args.which_split}')
    rt.say(f'=> git {git_revision()}\n=> args:\n{format_args(args)}')
    what, weights, _, feats = retrieval.features(args, rt)
    if not rt.is_main:
        return None
    x_train = feats['train']['features'].double().numpy()
    y_train = feats['train']['labels'].numpy()
    x_test = feats['test']['features'].double().numpy()
    y_test = feats['test']['labels'].numpy()
    C, scores = choose_c(x_train, y_train, feats['train']['sources'].tolist(), args.Cs,
                         args.holdout_fraction, args.max_iter, args.seed)
    print('=> held-out accuracy by C: ' + ', '.join(f'C={c:g}: {a:.1f}' for c, a in scores.items()))
    if len(scores) > 1 and len(set(scores.values())) == 1:
        print(f'=> warning: every C scored {next(iter(scores.values())):.1f} on the held-out part; '
              f'C={C:g} is an arbitrary choice (too few videos? see --holdout_fraction)')
    probe = make_probe(C, args.max_iter, args.seed).fit(x_train, y_train)
    acc = top_k(probe, x_test, y_test)
    path.write_text(json.dumps({'checkpoint': clips.checkpoint_id(args.test), 'weights': weights,
                                'backbone': what, 'protocol': args.protocol, 'C': C,
                                'holdout_accuracy': {str(c): a for c, a in scores.items()},
                                'train_videos': len(y_train), 'test_videos': len(y_test), **acc,
                                'git': git_revision(), 'args': plain_args(args)}, indent=1))
    print(f'=> results {path}')
    print(f'feature linear probe {args.dataset} split{args.which_split}: top1={acc["top1"]:.1f} '
          f'top5={acc["top5"]:.1f} (C={C:g}, protocol {args.protocol})')
    return {'C': C, **acc}


if __name__ == '__main__':
    run_main(main)
