"""Two-stream late fusion: average the per-video probabilities of an RGB and a flow test run
(``main_classifier.py --test ... --ten_crop`` writes them as ``*_prob.pth``) and report
top-1/top-5 of each stream and of the fusion.

    python eval/merge_2stream_prob.py --prob1 RGB_prob.pth --prob2 FLOW_prob.pth

The two files must hold the same videos (in any order) with the same labels and classes;
otherwise the script stops and names the difference.
"""
import argparse
import json
from pathlib import Path

import torch

from dataset.video_dataset import recorded_modality
from eval.clips import video_accuracy
from utils.checkpoint import load_checkpoint
from utils.misc import UserError, run_main


def load_probabilities(path, flag):
    data = load_checkpoint(path, flag, required=('names', 'labels', 'probs', 'classes'),
                           what='probability file of main_classifier.py --test')
    n = len(data['names'])
    if data['probs'].shape[0] != n or data['labels'].shape[0] != n:
        raise UserError(f'{flag}: {path} is inconsistent: {n} names, probabilities '
                        f'{tuple(data["probs"].shape)}, {data["labels"].shape[0]} labels')
    return data


def align(first, second):
    """Reorder ``second`` to ``first``'s video order; refuse files that disagree on videos,
    labels or classes (naming the difference)."""
    names1, names2 = list(first['names']), list(second['names'])
    for which, names in (('first', names1), ('second', names2)):
        if len(set(names)) != len(names):
            raise UserError(f'the {which} file lists a video twice')
    only1, only2 = sorted(set(names1) - set(names2)), sorted(set(names2) - set(names1))
    if only1 or only2:
        def head(names):
            return ', '.join(names[:3]) + (f' ... ({len(names)} in all)' if len(names) > 3 else '')
        parts = [f'{len(only1)} only in the first ({head(only1)})' if only1 else '',
                 f'{len(only2)} only in the second ({head(only2)})' if only2 else '']
        raise UserError('the two probability files hold different videos: '
                        + '; '.join(p for p in parts if p))
    if list(first['classes']) != list(second['classes']):
        raise UserError(f'the two files have different classes ({len(first["classes"])} vs '
                        f'{len(second["classes"])}, e.g. {list(first["classes"])[:2]} vs '
                        f'{list(second["classes"])[:2]})')
    position = {n: i for i, n in enumerate(names2)}
    order = torch.tensor([position[n] for n in names1], dtype=torch.long)
    labels2 = second['labels'][order]
    differ = (labels2 != first['labels']).nonzero().flatten().tolist()
    if differ:
        raise UserError(f'{len(differ)} video(s) have different labels in the two files, e.g. '
                        f'{names1[differ[0]]}')
    return second['probs'][order]


def fuse(probs1, probs2):
    """Late fusion: the mean of the two streams' probabilities ``[V, C]``."""
    return (probs1.float() + probs2.float()) / 2


def merge(path1, path2):
    if Path(path1).resolve() == Path(path2).resolve():
        raise UserError(f'--prob1 and --prob2 are the same file ({path1}); fusion needs the '
                        f'RGB and the flow stream')
    first = load_probabilities(path1, '--prob1')
    second = load_probabilities(path2, '--prob2')
    modalities = recorded_modality(first.get('meta')), recorded_modality(second.get('meta'))
    if modalities[0] is not None and modalities[0] == modalities[1]:
        raise UserError(f'{path1} and {path2} are both {modalities[0].upper()} streams '
                        f'(--dataset {first["meta"]["dataset"]} and '
                        f'{second["meta"]["dataset"]}); fusion needs the RGB and the flow stream')
    try:
        probs2 = align(first, second)
    except UserError as e:
        raise UserError(f'{path1} vs {path2}: {e}') from None
    labels = first['labels']
    return {'first': video_accuracy(first['probs'], labels),
            'second': video_accuracy(probs2, labels),
            'fusion': video_accuracy(fuse(first['probs'], probs2), labels),
            'videos': len(labels)}


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
        r = result[name]
        print(f'{label:<8}{r["top1"]:>8.2f}{r["top5"]:>8.2f}')
    if args.output:
        Path(args.output).write_text(json.dumps({'prob1': args.prob1, 'prob2': args.prob2,
                                                 **result}, indent=1))
    return result


if __name__ == '__main__':
    run_main(main)
