"""The short causal depthwise convolution both Mamba blocks put before their scan, and its sliding window.

    x (b, l, c) -> y_t = bias + Σ_{j<k} weight[:, 0, j] x_{t-k+1+j}        (zeros before the first input)

The sequence is time-major, as in_proj leaves it and as the scans read it, and the convolution is written
as k shifted multiply-adds along time rather than nn.Conv1d, which wants (b, c, l): each multiply-add works
on whole rows of c channels, and no transposing copy is needed on the way in or out (on the CPU, a depthwise
convolution's backward runs several times slower). The backward is written out (_CausalConv) as k more of them
for the input and k products summed over (b, l) for the filter: autograd through the in-place slices would copy
the whole gradient at every tap.

A cache holds the window of the last k inputs (b, c, k), as the official kernel's conv_state, so that a
sequence can be read in pieces, or one token at a time, with the same outputs as one pass.
"""
import torch
from einops import rearrange


def causal_conv1d(x, conv, window=None):
    """x (b, l, c) -> (b, l, c) through the filter and bias of ``conv`` (an nn.Conv1d with groups = c, k taps).
    With a window (b, c, k), continues from the inputs it holds and leaves there the last k inputs, x's
    included."""
    k = conv.kernel_size[0]
    weight = rearrange(conv.weight, "c 1 k -> k c")
    if window is not None:  # the k - 1 inputs before x, then x: the first k - 1 outputs are the window's
        x = torch.cat((rearrange(window[..., 1:], "b c k -> b k c").to(x.dtype), x), dim=1)
        window.copy_(rearrange(x[:, -k:], "b k c -> b c k"))
    y = _CausalConv.apply(x, weight, conv.bias)
    return y if window is None else y[:, k - 1:]


def _taps(x, weight, bias):
    """y_t = bias + Σ_s weight[k-1-s] x_{t-s}: x (b, l, c), weight (k, c), bias (c,) or None -> (b, l, c)."""
    k = weight.shape[0]
    y = x * weight[k - 1] if bias is None else torch.addcmul(bias, x, weight[k - 1])  # tap 0: now
    for s in range(1, k):                                       # tap s: the input s steps back
        y[:, s:].addcmul_(x[:, :-s], weight[k - 1 - s])
    return y


class _CausalConv(torch.autograd.Function):
    """_taps with its backward: y_t = bias + Σ_s w_s x_{t-s} (w_s = weight[k-1-s]) gives
        dL/dx_t = Σ_s w_s g_{t+s},    dL/dw_s = Σ_{b,t} g_t x_{t-s},    dL/dbias = Σ_{b,t} g_t"""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _taps(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        k = weight.shape[0]
        gx = g * weight[k - 1] if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(k):
            later, earlier = (g, x) if s == 0 else (g[:, s:], x[:, :-s])   # g_t beside x_{t-s}
            if gw is not None:
                gw[k - 1 - s] = (later * earlier).sum((0, 1))
            if gx is not None and s:
                gx[:, :-s].addcmul_(later, weight[k - 1 - s])
        gb = g.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def causal_conv1d_step(x, conv, window):
    """One step: x (b, c) slides into the window (b, c, k) in place; returns the conv's output for it (b, c)."""
    window.copy_(torch.cat((window[:, :, 1:], x.unsqueeze(-1)), dim=-1))
    y = (window * conv.weight[:, 0, :]).sum(-1)  # the filter (c, 1, k) as (c, k): a plain view, once per token
    bias = conv.bias  # read once: each conv.bias is a Module.__getattr__ call, and this runs every token
    return y if bias is None else y + bias
