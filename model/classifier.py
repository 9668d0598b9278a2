"""The action classifier (docs/METHOD.md, Evaluation) and how pretrained weights enter it:
from a pretraining checkpoint (``encoder_q.0.*`` -> ``backbone.*``) or a classifier."""
import torch.nn as nn
import torch.nn.functional as F

from backbone import build_backbone
from dataset.catalog import recorded_modality
from utils import distributed as du
from utils.checkpoint import load_exact, sub_state_dict
from utils.misc import UserError

HEADS = ('ft', 'last')
PRETRAIN_PREFIX = 'encoder_q.0.'    # the query encoder's backbone in a pretraining checkpoint
BACKBONE_PREFIX = 'backbone.'


class LinearClassifier(nn.Module):
    """backbone -> global average pool -> head, with CoCLR's keys (its classifiers load
    strictly). ``ft``: ``final_fc = Sequential(Dropout(dropout), Linear)``; ``last`` (linear
    probe of the frozen backbone, kept in eval mode): L2 norm, ``final_bn = BatchNorm1d``,
    ``final_fc = Sequential(Linear)``."""

    def __init__(self, net='s3d', num_classes=101, train_what='ft', dropout=0.9):
        super().__init__()
        self.train_what, self.linear_probe = train_what, train_what == 'last'
        self.backbone = build_backbone(net)
        f = self.backbone.feature_dim
        if train_what == 'last':
            self.final_bn = nn.BatchNorm1d(f)
            self.final_fc = nn.Sequential(nn.Linear(f, num_classes))
            self.backbone.requires_grad_(False)
        else:
            self.final_fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(f, num_classes))
        nn.init.normal_(self.final_fc[-1].weight, std=0.01)   # CoCLR's head initialisation
        nn.init.zeros_(self.final_fc[-1].bias)

    def head_keys(self):   # the only keys a pretraining checkpoint may lack
        return [k for k in self.state_dict() if not k.startswith(BACKBONE_PREFIX)]

    def features(self, x):                                      # x: B x C x T x H x W
        return F.adaptive_avg_pool3d(self.backbone(x), 1).flatten(1)   # B x F

    def forward(self, x):
        feat = self.features(x)
        if self.linear_probe:
            feat = self.final_bn(F.normalize(feat, dim=1))      # CoCLR: L2 norm, then BN
        return self.final_fc(feat)                              # B x num_classes

    def train(self, mode=True):
        super().train(mode)
        if self.linear_probe:  # a frozen backbone keeps its BatchNorm statistics too
            self.backbone.eval()
        return self


def checkpoint_kind(state_dict, source):
    """'pretrain' (``encoder_q.0.*`` keys) or 'classifier' (``backbone.*``); else an error."""
    if any(k.startswith(PRETRAIN_PREFIX) for k in state_dict):
        return 'pretrain'
    if any(k.startswith(BACKBONE_PREFIX) for k in state_dict):
        return 'classifier'
    raise UserError(f'{source}: neither a pretraining checkpoint (encoder_q.0.* keys) nor a '
                    f'classifier (backbone.* keys); first key: {next(iter(state_dict), "none")!r}')


def head_layout(state_dict):
    """Which head a classifier state dict has: 'last', 'ft' or None (no head)."""
    if 'final_bn.weight' in state_dict or 'final_fc.0.weight' in state_dict:
        return 'last'
    return 'ft' if 'final_fc.1.weight' in state_dict else None


def backbone_weights(state_dict, source):
    """The backbone's own keys (no prefix) from a pretraining or a classifier state dict."""
    kind = checkpoint_kind(state_dict, source)
    return sub_state_dict(state_dict, PRETRAIN_PREFIX if kind == 'pretrain' else BACKBONE_PREFIX)


def load_pretrained(model, state_dict, source):
    """Initialise ``model`` from ``state_dict``; return its kind. A pretraining checkpoint gives
    the backbone (only the new head may be missing); a classifier must match completely."""
    if (kind := checkpoint_kind(state_dict, source)) == 'pretrain':
        weights = {BACKBONE_PREFIX + k: v for k, v in backbone_weights(state_dict, source).items()}
        load_exact(model, weights, source, allowed_missing=model.head_keys())
        return kind
    layout = head_layout(state_dict)
    if layout is not None and layout != model.train_what:
        keys = 'final_bn + final_fc.0' if layout == 'last' else 'dropout + final_fc.1'
        raise UserError(f'{source} is a classifier with the {layout!r} head ({keys}); this run '
                        f'builds the {model.train_what!r} head: pass --train_what {layout}')
    load_exact(model, state_dict, source)
    return kind


def check_modality(ckpt, modality, source):
    """An RGB network must not silently start or judge a flow run, or the other way round."""
    found = recorded_modality(ckpt.get('args'))
    if found is None and du.get_rank() == 0:
        print(f'=> note: {source} does not record what it was trained on (no --dataset in '
              f'its args); make sure it is a {modality.upper()} network')
    elif found not in (None, modality):
        args = ckpt['args']
        trained = f'--dataset {args["dataset"]}' + (' --reverse' if args.get('reverse') else '')
        raise UserError(f'{source} holds a network trained on {found.upper()} ({trained}), but '
                        f'{modality.upper()} is needed here; give a checkpoint of a '
                        f'{modality.upper()} run')
