"""Checkpoints: atomic writes, safe loading, and loads that say which keys mismatch."""
import io
import os
import re
import tempfile
from pathlib import Path

import torch

from .misc import UserError


def save_checkpoint(state, path, *copies):
    """``state`` serialised once, then written atomically to ``path`` and each of ``copies``
    (e.g. ``last.pth.tar``)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for target in (path, *copies):
        atomic_write(target, buffer.getbuffer())


def atomic_write(path, data):
    """Write the bytes ``data`` to a temporary file in the folder of ``path``, then rename it:
    ``path`` is never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + '.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path, flag='checkpoint', required=('state_dict',), what='checkpoint'):
    """A ``torch.save``d dict holding the ``required`` keys, loaded ``weights_only``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{flag}: no {what} at {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:   # pickle, zip and unpickler errors all mean an unreadable file
        text = str(e)   # the unpickler's reason, not its advice to load with weights_only=False
        reason = re.search(r'WeightsUnpickler error:\s*(.+?)(?:\n\n|$)', text, re.S)
        text = reason.group(1).split('. ')[0].strip() if reason else text.split('\n')[0]
        raise UserError(f'{flag}: {path} is not a readable {what} ({type(e).__name__}: '
                        f'{text})') from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f'{flag}: {path} has no {", ".join(missing)}; is it a {what}?')
    return ckpt


def sub_state_dict(state_dict, prefix):   # 'encoder_q.' -> the query encoder's own keys
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_exact(module, state_dict, source, allowed_missing=()):
    """Any key but ``allowed_missing`` missing, unexpected or of another shape is an error."""
    own = module.state_dict()
    problems = {
        'missing': [k for k in own if k not in state_dict and k not in allowed_missing],
        'unexpected': [k for k in state_dict if k not in own],
        'shape mismatch': [f'{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}'
                           for k, v in own.items()
                           if k in state_dict and state_dict[k].shape != v.shape]}
    listed = [f'{name}: ' + ', '.join(keys[:8]) + (f' ... ({len(keys)} in all)' * (len(keys) > 8))
              for name, keys in problems.items() if keys]
    if listed:
        raise UserError(f'{source} does not fit this model (another architecture or dataset?); '
                        + '; '.join(listed))
    module.load_state_dict(state_dict, strict=False)
