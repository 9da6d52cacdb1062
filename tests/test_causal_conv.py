"""causal_conv.py: the conv over a whole sequence, in pieces through its window and one step at a time, against
a depthwise convolution of the zero-padded input written out here."""
import pytest
import torch
import torch.nn as nn

from causal_conv import causal_conv1d, causal_conv1d_step


def truth(x, conv):
    """y_t = bias + Σ_j w_j x_{t-k+1+j}, zeros before the start, one channel and step at a time."""
    b, c, l = x.shape
    k = conv.kernel_size[0]
    padded = torch.cat([torch.zeros(b, c, k - 1, dtype=x.dtype), x], dim=-1)
    y = torch.zeros(b, c, l, dtype=x.dtype)
    for t in range(l):
        y[..., t] = (padded[..., t:t + k] * conv.weight[:, 0]).sum(-1) + (0 if conv.bias is None else conv.bias)
    return y


@pytest.mark.parametrize("bias", [True, False])
def test_whole_pieces_and_steps_agree_with_the_convolution(bias):
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 6, 4, groups=6, padding=3, bias=bias).double()
    x = torch.randn(2, 6, 13, dtype=torch.float64)
    with torch.no_grad():
        want = truth(x, conv)
        torch.testing.assert_close(causal_conv1d(x, conv), want)
        window, outs = torch.zeros(2, 6, 4, dtype=torch.float64), []
        for lo, hi in ((0, 2), (2, 9), (9, 13)):  # the first piece shorter than the kernel
            outs.append(causal_conv1d(x[..., lo:hi], conv, window))
        torch.testing.assert_close(torch.cat(outs, dim=-1), want)
        torch.testing.assert_close(window, x[..., -4:])
        window = torch.zeros(2, 6, 4, dtype=torch.float64)
        stepped = torch.stack([causal_conv1d_step(x[..., t], conv, window) for t in range(13)], dim=-1)
        torch.testing.assert_close(stepped, want)
