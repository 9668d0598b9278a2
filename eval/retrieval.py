"""Nearest-neighbour retrieval (main_classifier.py --test CKPT|random --retrieval) and the video
features it shares with feature_linear_probe.py: the mean over a video's windows of the pooled
centre-crop feature, cached by checkpoint content and settings (docs/METHOD.md, Evaluation)."""
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from backbone import build_backbone
from dataset.video_dataset import modality_of
from eval import clips
from model.classifier import backbone_weights, check_modality
from utils.checkpoint import load_checkpoint, load_exact, save_checkpoint
from utils.misc import format_args, git_revision

CACHE_VERSION = 2   # bump when the extraction changes


def center_normalize(x):
    return F.normalize(x - x.mean(0, keepdim=True), dim=1)


def nearest(query, gallery, k):   # [Q, k] indices of the most similar gallery rows, best first
    return (query @ gallery.T).topk(min(k, gallery.shape[0]), dim=1).indices


def recall_at_k(query, query_labels, gallery, gallery_labels, ks=(1, 5, 10, 20, 50)):
    hit = gallery_labels[nearest(query, gallery, max(ks))] == query_labels[:, None]
    return {k: 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks}


def split_recall(test, train, ks=(1, 5, 10, 20, 50)):   # test queries train, each centred
    return recall_at_k(center_normalize(test['features'].float()), test['labels'],
                       center_normalize(train['features'].float()), train['labels'], ks)


def video_features(backbone, videos, args, rt, desc):
    """``[len(videos), F]``: the mean over a video's windows of the pooled centre-crop feature."""
    def feature(x):
        f = F.adaptive_avg_pool3d(backbone(x), 1).flatten(1)
        return F.normalize(f, dim=1) if args.feature_l2norm else f

    return clips.video_outputs(feature, videos, clips.TestViews(args, videos.modality), 'center',
                               rt, args, desc=desc)[:, 0].cpu()


def cache_entry(args, part, weights, videos):
    """(key, file) of a part's features; the key holds everything they depend on, each LMDB as
    the real path, size and modification time of its data file."""
    flags = ('net', 'dataset', 'which_split', 'seq_len', 'ds', 'img_dim', 'feature_l2norm',
             'protocol', 'seed', 'photometric_on_flow', 'legacy_flow_flip', 'test_windows')
    lmdbs = {}
    for m, db in videos.dataset.lmdbs.items():
        path = Path(db.path).resolve()
        st = (path / 'data.mdb' if path.is_dir() else path).stat()
        lmdbs[m] = [str(path), st.st_size, st.st_mtime_ns]
    key = {'version': CACHE_VERSION, 'weights': weights, 'part': part,
           **{k: getattr(args, k) for k in flags},
           'videos': hashlib.sha256('\n'.join(videos.names).encode()).hexdigest(), 'lmdbs': lmdbs}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = clips.experiment_dir(args) / args.dirname
    return key, folder / f'{args.dataset}_split{args.which_split}_{part}_{digest}.pth'


def load_backbone(args):
    """(backbone, description, weights id) of --test (any checkpoint) or a seeded random one."""
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.net)
    if args.test == 'random':
        return backbone, f'random initialisation (seed {args.seed})', f'random-seed{args.seed}'
    ckpt, source = load_checkpoint(args.test, '--test'), f'--test {args.test}'
    check_modality(ckpt, modality_of(args.dataset), source)
    load_exact(backbone, backbone_weights(ckpt['state_dict'], source), source)
    with open(args.test, 'rb') as f:
        digest = hashlib.file_digest(f, 'sha256').hexdigest()
    return backbone, f'{args.test} (epoch {ckpt.get("epoch")})', f'sha256:{digest}'


def features(args, rt):
    """(backbone description, weights id, {part: clips.Videos}, {part: {'features': [N, F],
    'labels', 'sources', 'key'}}) of the train and test splits, cached."""
    backbone, what, weights = load_backbone(args)
    videos, feats = {part: clips.split_videos(args, part) for part in ('train', 'test')}, {}
    for part, v in videos.items():
        key, path = cache_entry(args, part, weights, v)
        cached = torch.load(path, map_location='cpu', weights_only=True) if path.exists() else {}
        if cached.get('key') == key:   # saved atomically: whole or absent
            rt.say(f'=> {part} features: cached {path}')
            feats[part] = cached
            continue
        rt.say(f'=> {part} features: computing {len(v)} videos into {path}')
        backbone.to(rt.device, memory_format=rt.memory_format).eval()
        torch.manual_seed(args.seed + rt.info.rank)   # the gallery's random clips
        feats[part] = {'key': key, 'features': video_features(backbone, v, args, rt,
                                                              f'{part} features'),
                       'labels': torch.tensor(v.labels), 'sources': torch.tensor(v.sources)}
        if rt.is_main:
            save_checkpoint(feats[part], path)
    return what, weights, videos, feats


def run(args, rt):
    result = clips.result_path(args, f'retrieval_{args.dataset}_split{args.which_split}')
    rt.say(f'=> git {git_revision()}\n=> retrieval on {args.dataset} split {args.which_split}, '
           f'protocol {args.protocol}\n=> args:\n{format_args(args)}')
    what, weights, videos, feats = features(args, rt)
    if not rt.is_main:
        return None
    test, train = feats['test'], feats['train']
    recall = split_recall(test, train)
    report = clips.write_result(result, args, {
        'weights': weights, 'backbone': what, 'protocol': args.protocol, 'dataset': args.dataset,
        'split': args.which_split, 'queries': len(videos['test']), 'gallery': len(videos['train']),
        'recall': {f'R@{k}': v for k, v in recall.items()}})
    print(f'=> results {result}\nretrieval {args.dataset} split{args.which_split} (protocol '
          f'{args.protocol}): ' + ' '.join(f'R@{k}={v:.1f}' for k, v in recall.items()))
    return report
