"""The GPU fast path, imported only when ``--cuda_graph`` or ``--decode gpu`` asks: a step
replayed from a CUDA graph with S3D's layers as 2D kernels, a prefetch thread, nvJPEG decoding.
Each computes what the plain path does (tests/test_fast_path.py, test_layout.py)."""
import queue
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _triple

from dataset import augment
from dataset.lmdb_video import decode_list, unpack_jpegs
from dataset.video_dataset import apply_views

# 2D kernels. A channels-last-3D clip [B, C, T, H, W] is stored as [B, T, H, W, C]: as 4D
# channels-last images the same memory is [B*T, C, H, W] (frames) or [B, C, T, H*W] (time by
# pixels). S3D's layers are separable, so each runs as a 2D operation over one of these views:
# on an H100 a quarter less GPU time, but more host work; hence only inside a graphed step.


def use_planes(x):   # a channels-last-3D clip on the GPU
    return x.is_cuda and x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def as_frames(x):   # [B, C, T, H, W] -> [B*T, C, H, W], a view
    return x.transpose(1, 2).flatten(0, 1)


def from_frames(y, b):   # [B*T, C', H', W'] -> [B, C', T, H', W']
    return y.unflatten(0, (b, -1)).transpose(1, 2)


def as_time(x):   # [B, C, T, H, W] -> [B, C, T, H*W], a view; back: .unflatten(3, (H, W))
    return x.flatten(3)


def conv3d_planes(x, weight, bias, stride, padding):
    """``F.conv3d`` for a (1,k,k) kernel without temporal stride or padding (2D over frames) or
    a (k,1,1) kernel without spatial stride or padding (2D over time); None otherwise."""
    kt, kh, kw = weight.shape[2:]
    if kt == 1 and stride[0] == 1 and padding[0] == 0:
        return from_frames(F.conv2d(as_frames(x), weight.squeeze(2), bias, stride[1:],
                                    padding[1:]), x.shape[0])
    if kh == kw == 1 and stride[1:] == (1, 1) and padding[1:] == (0, 0):
        y = F.conv2d(as_time(x), weight.squeeze(-1), bias, (stride[0], 1), (padding[0], 0))
        return y.unflatten(3, x.shape[3:])
    return None


class _Planes:   # the 2D path (forward_planes) for a channels-last clip on a GPU
    def forward(self, x):
        return self.forward_planes(x) if use_planes(x) else super().forward(x)


class Conv3d(_Planes, nn.Conv3d):
    def forward_planes(self, x):
        y = None
        if self.groups == 1 and self.dilation == (1, 1, 1) and self.padding_mode == 'zeros' \
                and isinstance(self.padding, tuple):   # not 'same'
            y = conv3d_planes(x, self.weight, self.bias, self.stride, self.padding)
        return nn.Conv3d.forward(self, x) if y is None else y


class BatchNorm3d(_Planes, nn.BatchNorm3d):
    def forward_planes(self, x):
        """The same statistics (over B, T, H, W) through the ``[B, C, T*H, W]`` view."""
        b, c, t, h, w = x.shape
        return nn.BatchNorm3d.forward(self, x.view(b, c, t * h, w)).view(b, c, t, h, w)

    def _check_input_dim(self, input):
        if input.dim() not in (4, 5):   # 4: the view of forward_planes
            raise ValueError(f'expected a 5D input (got {input.dim()}D input)')


class MaxPool3d(_Planes, nn.MaxPool3d):
    def forward_planes(self, x):
        """A spatial then a temporal 2D max pooling: the same maxima, each window scanned in the
        3D kernel's order, so gradients reach the same element."""
        if self.ceil_mode or self.return_indices or _triple(self.dilation) != (1, 1, 1):
            return nn.MaxPool3d.forward(self, x)
        (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = map(
            _triple, (self.kernel_size, self.stride, self.padding))
        if (kh, kw, sh, sw) != (1, 1, 1, 1):
            x = from_frames(F.max_pool2d(as_frames(x), (kh, kw), (sh, sw), (ph, pw)), x.shape[0])
        if (kt, st) != (1, 1):
            x = F.max_pool2d(as_time(x), (kt, 1), (st, 1), (pt, 0)).unflatten(3, x.shape[3:])
        return x


FAST = {nn.Conv3d: Conv3d, nn.BatchNorm3d: BatchNorm3d, nn.MaxPool3d: MaxPool3d}


def use_2d_kernels(module, enabled=True):
    """Switch the plain 3D layers of ``module`` to the 2D path (or back) by changing each one's
    class to the subclass above: parameters, buffers and state-dict keys stay as they are."""
    swap = FAST if enabled else {fast: plain for plain, fast in FAST.items()}
    for m in module.modules():
        if type(m) in swap:
            m.__class__ = swap[type(m)]


class GraphedStep:
    """The engine's eager ``step`` with its forward and backward replayed from a CUDA graph (one
    launch: the host no longer bounds the step); ``update`` stays eager. Before ``model.ready``
    eager; then ``warmup`` steps on a side stream, one captured, the rest replayed. A failed
    capture says why once and the step stays eager, with the 3D layers."""

    def __init__(self, step, forward_backward, update, model, optimizer, scaler, amp_dtype,
                 device, warmup=3):
        self.step, self.forward_backward, self.update = step, forward_backward, update
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.amp_dtype, self.device, self.warmup = amp_dtype, device, warmup
        self.graph = self.static = self.out = self.failed = None
        self.side = torch.cuda.Stream(device)
        use_2d_kernels(model)

    def __call__(self, inputs):
        if self.graph is None and (self.failed or not self.model.ready):
            return self.step(inputs)
        if self.static is None:
            self.static = {k: torch.empty_like(v) for k, v in inputs.items()}
        for k, v in inputs.items():
            self.static[k].copy_(v)
        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            current = torch.cuda.current_stream(self.device)
            self.side.wait_stream(current)
            with torch.cuda.stream(self.side):
                out = self.step(self.static)
            current.wait_stream(self.side)
            return out
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)   # the graph allocates its gradients
            graph = torch.cuda.CUDAGraph()
            try:   # thread_local: the prefetch thread keeps working on its own stream
                with torch.cuda.graph(graph, capture_error_mode='thread_local'):
                    out = self.forward_backward(self.model, self.static, self.scaler,
                                                self.amp_dtype, cache_casts=False)
            except Exception as e:   # slower, never wrong
                self.failed = f'{type(e).__name__}: {e}'.splitlines()[0]
                print(f'=> CUDA graph capture failed ({self.failed}); training continues '
                      f'without it', flush=True)
                use_2d_kernels(self.model, False)   # eagerly the 3D layers are faster
                torch.cuda.synchronize(self.device)
                return self.step(inputs)
            self.graph, self.out = graph, out
        self.graph.replay()   # after capture: the captured step's real run
        self.update(self.model, self.optimizer, self.scaler)
        return self.out


class Prefetcher:
    """``fn(batch)`` for each of ``batches``, ``depth`` ahead in a thread (on a CUDA stream of its
    own on a GPU); its errors are raised here. Always ``close()`` it: it frees the loader."""

    _END = object()

    def __init__(self, batches, fn, device, depth=2):
        self.device, self.fn, self.batches = device, fn, iter(batches)
        self.queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.stream = torch.cuda.Stream(device) if device.type == 'cuda' else None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self):   # a put blocked on a full queue ends when close() drains it
        try:
            if self.stream is not None:
                torch.cuda.set_device(self.device)   # the current device is per thread
            for batch in self.batches:
                if self.stop.is_set():
                    return
                with torch.cuda.stream(self.stream):   # None (the CPU): no stream
                    out = self.fn(batch)
                self.queue.put((out, self.stream and self.stream.record_event()))
            self.queue.put(self._END)
        except BaseException as e:   # raised in the training thread
            self.queue.put(e)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is self._END:
            self.queue.put(self._END)   # stays at the end
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        out, ready = item
        if ready is not None:   # the step's stream waits for the batch and keeps its memory
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for t in out.values():
                if t.is_cuda:
                    t.record_stream(stream)
        return out

    def close(self):
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                self.thread.join(timeout=0.05)


def decode_on_device(batch, device, img_dim, negate_flow_flip=True):
    """Decode a ``decode='device'`` batch with nvJPEG in one call per modality and apply each
    view's geometry there: adds ``batch[modality]`` uint8 ``[B, V, T, 3, img_dim, img_dim]``."""
    for m, (data, offsets, counts) in batch['jpeg'].items():
        flat = unpack_jpegs(data, offsets)
        if device.type == 'cuda':   # nvJPEG writes from its own stream without waiting for
            torch.cuda.current_stream(device).synchronize()   # this one's frees
        decoded = decode_list(flat, name='batch', source=m, device=device)
        out = augment.channels_last_empty(*batch['frame_index'].shape, size=img_dim, device=device)
        frames = iter(decoded)
        for i, count in enumerate(counts.tolist()):
            plan = {k: batch[k][i] for k in ('frame_index', 'boxes', 'flips')}   # on the host
            apply_views(torch.stack([next(frames).permute(1, 2, 0) for _ in range(count)]), plan,
                        m, img_dim, negate_flow_flip, out=out[i])
        batch[m] = out
    return batch
