"""causal_conv.py: the conv over a whole sequence, in pieces through its window and one step at a time, against
a depthwise convolution of the zero-padded input written out here."""
import pytest
import torch
import torch.nn as nn

from causal_conv import causal_conv1d, causal_conv1d_step


def truth(x, conv):
    """y_t = bias + Σ_j w_j x_{t-k+1+j}, zeros before the start, a step at a time; x (b, l, c) time-major."""
    b, l, c = x.shape
    k = conv.kernel_size[0]
    padded = torch.cat([torch.zeros(b, k - 1, c, dtype=x.dtype), x], dim=1)
    steps = [(padded[:, t:t + k].transpose(1, 2) * conv.weight[:, 0]).sum(-1) for t in range(l)]
    return torch.stack(steps, dim=1) + (0 if conv.bias is None else conv.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_whole_pieces_and_steps_agree_with_the_convolution(bias):
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 6, 4, groups=6, padding=3, bias=bias).double()
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    with torch.no_grad():
        want = truth(x, conv)
        torch.testing.assert_close(causal_conv1d(x, conv), want)
        window, outs = torch.zeros(2, 6, 4, dtype=torch.float64), []
        for lo, hi in ((0, 2), (2, 9), (9, 13)):  # the first piece shorter than the kernel
            outs.append(causal_conv1d(x[:, lo:hi], conv, window))
        torch.testing.assert_close(torch.cat(outs, dim=1), want)
        torch.testing.assert_close(window, x[:, -4:].transpose(1, 2))
        window = torch.zeros(2, 6, 4, dtype=torch.float64)
        stepped = torch.stack([causal_conv1d_step(x[:, t], conv, window) for t in range(13)], dim=1)
        torch.testing.assert_close(stepped, want)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gradients_equal_pytorchs_depthwise_convolution(k):
    """Backward through the shifted multiply-adds (in-place slices) gives nn.Conv1d's gradients of the input,
    the filter and the bias, on a time-major view of the input as the block passes it."""
    torch.manual_seed(1)
    conv = nn.Conv1d(5, 5, k, groups=5, padding=k - 1).double()
    x = torch.randn(3, 11, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 11, 5, dtype=torch.float64)
    ours = torch.autograd.grad((causal_conv1d(x, conv) * g).sum(), (x, conv.weight, conv.bias))
    theirs = conv(x.transpose(1, 2))[..., :11].transpose(1, 2)    # PyTorch's convolution, first l outputs
    torch.testing.assert_close(theirs, truth(x, conv))
    for a, b in zip(ours, torch.autograd.grad((theirs * g).sum(), (x, conv.weight, conv.bias))):
        torch.testing.assert_close(a, b)
