"""Linear probe on frozen video features (those of main_classifier.py --retrieval, same cache):
scikit-learn's logistic regression, its inverse regularisation C chosen on held-out source groups
of the train split, then refit on the whole train split; reports test top-1/top-5.

    python eval/feature_linear_probe.py --net s3d --dataset ucf101 --seq_len 32 --ds 1 \\
        --test CKPT
"""
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from eval import clips, retrieval
from utils.config import FRACTION, POSITIVE, POSITIVE_REAL, parse_args
from utils.misc import format_args, git_revision, run_main


def build_parser():
    p = clips.eval_parser(__doc__)
    g = p.add_argument_group('linear probe')
    g.add_argument('--test', required=True, help='checkpoint whose backbone gives the features '
                   '(pretraining or classifier), or "random"')
    g.add_argument('--Cs', type=POSITIVE_REAL, nargs='+', help='inverse regularisations tried',
                   default=[1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    g.add_argument('--holdout_fraction', type=FRACTION, default=0.2,
                   help='share of the train videos (whole source groups) that chooses C')
    g.add_argument('--max_iter', type=POSITIVE, default=1000, help='iterations of the lbfgs solver')
    return p


def main(argv=None):
    args = parse_args(build_parser(), argv)
    with clips.started(args) as rt:
        path = clips.result_path(args, f'feature_probe_{args.dataset}_split{args.which_split}')
        rt.say(f'=> git {git_revision()}\n=> args:\n{format_args(args)}')
        what, weights, _, feats = retrieval.features(args, rt)
    if not rt.is_main:
        return None
    x = {part: f['features'].double().numpy() for part, f in feats.items()}
    y = {part: f['labels'].numpy() for part, f in feats.items()}

    def probe(C, rows=slice(None)):   # standardised with the train statistics only
        model = LogisticRegression(C=C, max_iter=args.max_iter, random_state=args.seed)
        return make_pipeline(StandardScaler(), model).fit(x['train'][rows], y['train'][rows])

    # C: the best on held-out source groups of the train split (ties: the stronger regulariser).
    kept, held = clips.holdout_split(feats['train']['sources'].tolist(), args.holdout_fraction,
                                     args.seed)
    scores = {C: 100.0 * probe(C, kept).score(x['train'][held], y['train'][held]) for C in args.Cs}
    C = max(scores, key=lambda c: (scores[c], -c))
    print('=> held-out accuracy by C: ' + ', '.join(f'C={c:g}: {a:.1f}' for c, a in scores.items()))
    if len(scores) > 1 and len(set(scores.values())) == 1:
        print(f'=> warning: every C scored the same on the held-out part; C={C:g} is an arbitrary '
              f'choice (too few videos? see --holdout_fraction)')
    final = probe(C)
    order = final.classes_[np.argsort(-final.predict_proba(x['test']), axis=1)]
    acc = {f'top{k}': 100.0 * float((order[:, :k] == y['test'][:, None]).any(1).mean())
           for k in (1, 5)}
    clips.write_result(path, args, {
        'weights': weights, 'backbone': what, 'protocol': args.protocol, 'C': C,
        'holdout_accuracy': {str(c): a for c, a in scores.items()},
        'train_videos': len(y['train']), 'test_videos': len(y['test']), **acc})
    print(f'=> results {path}\nfeature linear probe {args.dataset} split{args.which_split}: '
          f'top1={acc["top1"]:.1f} top5={acc["top5"]:.1f} (C={C:g}, protocol {args.protocol})')
    return {'C': C, **acc}


if __name__ == '__main__':
    run_main(main)
