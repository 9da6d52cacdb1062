"""The short causal depthwise convolution both Mamba blocks put before their scan, and its sliding window.

    x (b, c, l) -> y_t = bias + Σ_{j<k} weight[:, 0, j] x_{t-k+1+j}        (zeros before the first input)

A cache holds the window of the last k inputs (b, c, k), so that a sequence can be read in pieces, or one
token at a time, with the same outputs as one pass.
"""
import torch
import torch.nn.functional as F


def causal_conv1d(x, conv, window=None):
    """x (b, c, l) -> (b, c, l) through ``conv`` (an nn.Conv1d with groups = c and padding = k - 1). With a
    window (b, c, k), continues from the inputs it holds and leaves there the last k inputs, x's included."""
    if window is None:
        return conv(x)[..., :x.shape[-1]]  # padded on both sides: the first l outputs only see the past
    k = conv.kernel_size[0]
    inputs = torch.cat((window[..., 1:].to(x.dtype), x), dim=-1)  # the k - 1 inputs before x, then x
    window.copy_(inputs[..., -k:])
    return F.conv1d(inputs, conv.weight, conv.bias, groups=conv.groups)


def causal_conv1d_step(x, conv, window):
    """One step: x (b, c) slides into the window (b, c, k) in place; returns the conv's output for it (b, c)."""
    window.copy_(torch.cat((window[:, :, 1:], x.unsqueeze(-1)), dim=-1))
    y = (window * conv.weight[:, 0, :]).sum(-1)  # the filter (c, 1, k) as (c, k): a plain view, once per token
    return y if conv.bias is None else y + conv.bias
