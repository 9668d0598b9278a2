"""The crop test (main_classifier.py --test CKPT --center_crop|--five_crop|--ten_crop): video-level
top-1/top-5 of the softmax averaged over windows and crops (ten also reports centre and five);
writes the result JSON and the per-video probabilities that merge_2stream_prob.py fuses."""
import torch

from dataset.catalog import modality_of
from eval import clips
from model.classifier import (LinearClassifier, check_modality, checkpoint_kind, head_layout,
                              load_pretrained)
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.misc import UserError, format_args, git_revision


def run(args, rt):
    crops = 'ten' if args.ten_crop else 'five' if args.five_crop else 'center'
    source, ckpt = f'--test {args.test}', load_checkpoint(args.test, '--test')
    if checkpoint_kind(ckpt['state_dict'], source) == 'pretrain':
        raise UserError(f'{source} is a pretraining checkpoint (encoder_q.*): it has no '
                        f'classifier. Finetune or linear-probe it first, or use --retrieval')
    check_modality(ckpt, modality_of(args.dataset), source)
    videos = clips.split_videos(args, 'test')
    classes = videos.dataset.classes
    # The head the checkpoint has (ft or a linear probe's), whatever --train_what says
    head = head_layout(ckpt['state_dict']) or args.train_what
    model = LinearClassifier(args.net, len(classes), head, args.dropout)
    load_pretrained(model, ckpt['state_dict'], source)    # another class count: shape error
    if list(ckpt.get('classes', classes)) != classes:
        raise UserError(f'{source} was trained on other classes than the {len(classes)} of '
                        f'{args.dataset} (e.g. {ckpt["classes"][:2]} vs {classes[:2]})')
    model.to(rt.device, memory_format=rt.memory_format).eval()
    result = clips.result_path(args, f'{args.dataset}_split{args.which_split}_{crops}')
    rt.say(f'=> git {git_revision()}\n=> test {source} (epoch {ckpt.get("epoch")}) on '
           f'{args.dataset} test split {args.which_split}: {len(videos)} videos, {crops} crop(s) '
           f'of every window, protocol {args.protocol}\n=> args:\n{format_args(args)}')
    probs = clips.video_outputs(lambda x: model(x).float().softmax(1), videos,
                                clips.TestViews(args, videos.modality), crops, rt, args)
    if not rt.is_main:
        return None
    labels = torch.tensor(videos.labels, device=probs.device)
    # Ten crops contain five, five the centre: the mean of each such first n.
    summaries = {name: probs[:, :n].mean(1) for name, n in clips.NUM_CROPS.items()
                 if n <= probs.shape[1]}
    results = {name: clips.video_accuracy(p, labels) for name, p in summaries.items()}
    prob_file = result.with_name(result.stem + '_prob.pth')
    meta = {'checkpoint': clips.checkpoint_id(args.test), 'crops': crops, 'dataset': args.dataset,
            'split': args.which_split, 'protocol': args.protocol}
    save_checkpoint({'names': videos.names, 'labels': torch.tensor(videos.labels),
                     'probs': summaries[crops].cpu(), 'classes': classes, 'meta': meta},
                    prob_file)
    report = clips.write_result(result, args, {**meta, 'epoch': ckpt.get('epoch'),
                                               'videos': len(videos), 'results': results,
                                               'probabilities': str(prob_file)})
    lines = [f'test {args.dataset} split{args.which_split} ({len(videos)} videos, protocol '
             f'{args.protocol})', f'{"crops":<8}{"top1":>8}{"top5":>8}']
    lines += [f'{name:<8}{r["top1"]:>8.2f}{r["top5"]:>8.2f}' for name, r in results.items()]
    print('\n'.join(lines) + f'\n=> results {result}; per-video probabilities {prob_file}')
    return report
