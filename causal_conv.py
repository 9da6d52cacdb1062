"""The short causal depthwise convolution both Mamba blocks put before their scan, and its sliding window.

    x (b, l, c) -> y_t = bias + Σ_{j<k} weight[:, 0, j] x_{t-k+1+j}        (zeros before the first input)

The sequence is time-major, as in_proj leaves it and as the scans read it, and the convolution is written
as k shifted multiply-adds along time rather than nn.Conv1d, which wants (b, c, l): each multiply-add works
on whole rows of c channels, no transposing copy is needed on the way in or out, and autograd's backward is
k more of them (on the CPU, a depthwise convolution's backward runs several times slower).

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
    y = x * weight[k - 1] if conv.bias is None else torch.addcmul(conv.bias, x, weight[k - 1])  # tap 0: now
    for s in range(1, k):                                       # tap s: the input s steps back
        y[:, s:].addcmul_(x[:, :-s], weight[k - 1 - s])
    return y if window is None else y[:, k - 1:]


def causal_conv1d_step(x, conv, window):
    """One step: x (b, c) slides into the window (b, c, k) in place; returns the conv's output for it (b, c)."""
    window.copy_(torch.cat((window[:, :, 1:], x.unsqueeze(-1)), dim=-1))
    y = (window * conv.weight[:, 0, :]).sum(-1)  # the filter (c, 1, k) as (c, k): a plain view, once per token
    return y if conv.bias is None else y + conv.bias
