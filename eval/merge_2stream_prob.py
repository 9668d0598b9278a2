"""Two-stream late fusion: top-1/top-5 of the mean of the per-video probabilities of an RGB and a
flow test run (``*_prob.pth`` of ``main_classifier.py --test``) and of each stream alone. The
files must hold the same videos (any order), labels and classes.

    python eval/merge_2stream_prob.py --prob1 RGB_prob.pth --prob2 FLOW_prob.pth
"""
import argparse
import json
from pathlib import Path

import torch

from dataset.catalog import recorded_modality
from eval.clips import video_accuracy
from utils.checkpoint import load_checkpoint
from utils.misc import UserError, run_main


def load_probabilities(path, flag):
    data = load_checkpoint(path, flag, required=('names', 'labels', 'probs', 'classes'),
                           what='probability file of main_classifier.py --test')
    names, probs, labels = data['names'], data['probs'], data['labels']
    if not len(set(names)) == len(names) == len(probs) == len(labels):
        raise UserError(f'{flag}: {path} is inconsistent: {len(names)} names ({len(set(names))} '
                        f'different), {len(probs)} probabilities, {len(labels)} labels')
    return data


def merge(path1, path2):
    """Top-1/top-5 of each stream and of the mean of their probabilities."""
    first, second = load_probabilities(path1, '--prob1'), load_probabilities(path2, '--prob2')
    modality = [recorded_modality(f.get('meta')) for f in (first, second)]
    same_file = Path(path1).resolve() == Path(path2).resolve()
    if same_file or modality[0] is not None and modality[0] == modality[1]:
        raise UserError(f'--prob1 {path1} and --prob2 {path2} are '
                        + ('the same file' if same_file else f'both {modality[0].upper()} streams')
                        + '; fusion needs the RGB and the flow stream')
    names1, names2 = list(first['names']), list(second['names'])
    only = [sorted(set(a) - set(b)) for a, b in ((names1, names2), (names2, names1))]
    if any(only):
        raise UserError(f'{path1} vs {path2}: the files hold different videos: ' + '; '.join(
            f'{len(o)} only in the {which} ({", ".join(o[:3])})'
            for o, which in zip(only, ('first', 'second')) if o))
    if list(first['classes']) != list(second['classes']):
        raise UserError(f'{path1} vs {path2}: different classes ({len(first["classes"])} vs '
                        f'{len(second["classes"])})')
    order = torch.tensor([names2.index(n) for n in names1])
    labels, probs1, probs2 = first['labels'], first['probs'].float(), second['probs'][order].float()
    if differ := (second['labels'][order] != labels).nonzero().flatten().tolist():
        raise UserError(f'{path1} vs {path2}: {len(differ)} video(s) have different labels, '
                        f'e.g. {names1[differ[0]]}')
    return {'first': video_accuracy(probs1, labels), 'second': video_accuracy(probs2, labels),
            'fusion': video_accuracy((probs1 + probs2) / 2, labels), 'videos': len(labels)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--prob1', required=True, help='probability file of the first stream (RGB)')
    p.add_argument('--prob2', required=True, help='probability file of the second stream (flow)')
    p.add_argument('--output', default=None, help='also write the numbers to this JSON file')
    args = p.parse_args(argv)
    result = merge(args.prob1, args.prob2)
    print(f'{result["videos"]} videos\n{"stream":<8}{"top1":>8}{"top5":>8}')
    for name, label in (('first', 'prob1'), ('second', 'prob2'), ('fusion', 'fusion')):
        print(f'{label:<8}{result[name]["top1"]:>8.2f}{result[name]["top5"]:>8.2f}')
    if args.output:
        Path(args.output).write_text(json.dumps({'prob1': args.prob1, 'prob2': args.prob2,
                                                 **result}, indent=1))
    return result


if __name__ == '__main__':
    run_main(main)
