"""Draws the diagrams of the README and docs/, labelled with the names the code uses:

  assets/ssm.png                 the selective SSM of one channel as a block diagram (the recurrence the scan runs)
  assets/mamba_architecture.png  the Mamba block (the paper's Figure 3) inside its pre-norm residual block
  assets/ssd_duality.png         Mamba-2's SSM as a masked attention-like matrix, and the chunks ssd_chunked cuts
                                 it into (docs/mamba2.md), computed by ssd.py on a random example

    python assets/make_figures.py [--out-dir assets]

Plain matplotlib boxes and arrows in data coordinates (1 unit = 1 inch at the figure size below), so moving a box
is editing one number. The PNGs are 1200 px wide and stay readable shown 800 px wide in a README.
"""
import argparse
import sys
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # draw into files, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ssd import _segsum, ssd_ref  # noqa: E402

DPI = 150
INK, GREY = "#222222", "#666666"
# One colour per role: projections (learnt matrices), per-channel operations, the SSM, nonlinearities.
PROJ, LOCAL, SSM, ACT, NORM = "#dbe9f6", "#e4f2dc", "#fde6c8", "#eeeeee", "#efe3f4"


def canvas(width, height):
    """A figure whose data coordinates are inches: (0, 0) bottom left, (width, height) top right."""
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(0, width), ylim=(0, height))
    ax.set_axis_off()
    return fig, ax


def box(ax, x, y, w, h, text, color, note=None, size=11):
    """A rounded box centred at (x, y) with its text; ``note`` (grey, smaller) goes under the text inside."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.08",
                                facecolor=color, edgecolor=INK, linewidth=1.2))
    if note is None:
        ax.text(x, y, text, ha="center", va="center", fontsize=size, color=INK)
    else:
        ax.text(x, y + 0.13, text, ha="center", va="center", fontsize=size, color=INK)
        ax.text(x, y - 0.16, note, ha="center", va="center", fontsize=size - 2.5, color=GREY)


def node(ax, x, y, symbol):
    """A small circle with an operator (+ or ×) in it: where two signals meet."""
    ax.add_patch(Circle((x, y), 0.17, facecolor="white", edgecolor=INK, linewidth=1.2))
    ax.text(x, y - 0.01, symbol, ha="center", va="center", fontsize=13, color=INK)


def arrow(ax, *points, head=True):
    """A polyline through ``points``, with an arrow head at the last one."""
    for start, end in zip(points[:-2], points[1:-1]):
        ax.plot(*zip(start, end), color=INK, linewidth=1.2, solid_capstyle="round")
    ax.add_patch(FancyArrowPatch(points[-2], points[-1], arrowstyle="-|>" if head else "-", mutation_scale=13,
                                 color=INK, linewidth=1.2, shrinkA=0, shrinkB=0))


def label(ax, x, y, text, size=10.5, color=INK, **kw):
    ax.text(x, y, text, fontsize=size, color=color, **{"ha": "center", "va": "center", **kw})


def draw_ssm(path):
    """The recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = C_t h_t + D u_t as a signal-flow diagram."""
    fig, ax = canvas(8, 4.6)
    label(ax, 4, 4.25, r"$h_t = \exp(\Delta_t A)\, h_{t-1} + \Delta_t B_t\, u_t \qquad y_t = C_t\, h_t + D\, u_t$",
          size=14)
    label(ax, 4, 3.85, "one channel of u (b, d_inner, l); its state h_t has d_state = n numbers", size=9.5,
          color=GREY)
    mid = 2.55  # the height of the main path u -> h -> y
    label(ax, 0.35, mid, r"$u_t$", size=14)
    box(ax, 1.75, mid, 1.3, 0.62, r"$\times\, \Delta_t B_t$", SSM, size=12)
    node(ax, 3.25, mid, "+")
    box(ax, 5.4, mid, 1.1, 0.62, r"$\cdot\, C_t$", SSM, size=12)
    node(ax, 6.6, mid, "+")
    label(ax, 7.6, mid, r"$y_t$", size=14)
    arrow(ax, (0.6, mid), (1.1, mid))
    arrow(ax, (2.4, mid), (3.08, mid))
    arrow(ax, (3.42, mid), (4.85, mid))
    label(ax, 3.95, mid + 0.22, r"$h_t$", size=13)
    arrow(ax, (5.95, mid), (6.43, mid))
    arrow(ax, (6.77, mid), (7.35, mid))

    # Skip connection over the whole SSM: y_t += D u_t.
    top = 3.35
    box(ax, 3.95, top, 0.8, 0.45, r"$D$", LOCAL, size=12)
    arrow(ax, (0.8, mid), (0.8, top), (3.55, top))
    arrow(ax, (4.35, top), (6.6, top), (6.6, mid + 0.17))

    # Feedback: h_t is delayed one step and decays by exp(Δ_t A) before the next input is added.
    low = 1.45
    box(ax, 4.85, low, 1.0, 0.6, "delay", ACT, note=r"$h_{t-1}$", size=11)
    box(ax, 3.25, low, 1.3, 0.55, r"$\times\, \exp(\Delta_t A)$", SSM, size=12)
    arrow(ax, (4.5, mid), (4.5, low + 0.3))
    arrow(ax, (4.35, low), (3.9, low))
    arrow(ax, (3.25, low + 0.275), (3.25, mid - 0.17))

    # Where each symbol comes from in model.py (MambaMixer).
    notes = [r"$\Delta_t$ = softplus(dt_proj(dt)), one step size per channel: how much of u_t to take in",
             r"$B_t, C_t$: x_proj(u_t) splits into (dt, B, C); B and C are (n,), shared by all channels",
             r"$A$ = $-$exp(A_log), (d_inner, n), negative: $0 < \exp(\Delta_t A) < 1$, large $\Delta_t$ forgets",
             r"$D$ = D, (d_inner,): the skip connection"]
    for i, text in enumerate(notes):
        label(ax, 0.3, 0.78 - 0.22 * i, text, size=9.5, ha="left")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def draw_architecture(path):
    """MambaMixer.forward inside Block.forward: x + out_proj(SSM(silu(conv1d(x))) * silu(z)), x, z = in_proj(norm)."""
    fig, ax = canvas(8, 9)
    main, gate, side, resid = 3.7, 6.3, 1.15, 7.55  # x positions of the columns
    ssm_left = main - 1.2

    # Residual stream and pre-norm: Block.forward = hidden + mixer(norm(hidden)).
    label(ax, main, 0.25, "hidden (b, l, d_model)")
    label(ax, 7.85, 0.25, "Block: hidden + mixer(norm(hidden))", size=9.5, color=GREY, ha="right")
    arrow(ax, (main, 0.45), (main, 0.9))
    box(ax, main, 1.15, 2.2, 0.5, "norm: RMSNorm", NORM)
    arrow(ax, (main, 0.62), (resid, 0.62), (resid, 8.1), (main + 0.17, 8.1))
    label(ax, resid + 0.12, 4.0, "residual", size=9.5, color=GREY, rotation=90, ha="left")
    node(ax, main, 8.1, "+")
    arrow(ax, (main, 8.27), (main, 8.55))
    label(ax, main, 8.75, "hidden (b, l, d_model)")

    # The mixer: in_proj, then two branches of width d_inner.
    ax.add_patch(FancyBboxPatch((0.3, 1.55), 6.95, 6.2, boxstyle="round,pad=0,rounding_size=0.1",
                                facecolor="none", edgecolor=GREY, linewidth=1, linestyle="--"))
    label(ax, 0.42, 1.72, "mixer: MambaMixer", size=9.5, color=GREY, ha="left")
    arrow(ax, (main, 1.4), (main, 1.75))
    box(ax, 4.9, 2.0, 4.6, 0.5, "in_proj", PROJ)
    label(ax, 6.45, 2.0, "d_model → 2·d_inner", size=9, color=GREY)

    # x branch: causal depthwise conv, SiLU -> u, the selection projections, the scan.
    label(ax, main - 0.2, 2.45, "x", size=11, color=GREY)
    arrow(ax, (main, 2.25), (main, 2.7))
    box(ax, main, 2.95, 2.2, 0.5, "conv1d", LOCAL)
    label(ax, main + 1.3, 2.95, "causal, depthwise,\nkernel d_conv", size=8.5, color=GREY, ha="left")
    arrow(ax, (main, 3.2), (main, 3.5))
    box(ax, main, 3.7, 1.1, 0.4, "SiLU", ACT)
    label(ax, main + 0.15, 4.1, "u", size=11, color=GREY)
    arrow(ax, (main, 3.9), (main, 4.85))
    arrow(ax, (main, 4.35), (side, 4.35), (side, 4.85))
    box(ax, side, 5.1, 1.3, 0.5, "x_proj", PROJ)
    arrow(ax, (side + 0.65, 5.1), (ssm_left, 5.1))
    label(ax, (side + 0.65 + ssm_left) / 2, 5.25, "B, C", size=9.5, color=GREY)
    arrow(ax, (side, 5.35), (side, 5.7))
    label(ax, side + 0.22, 5.52, "dt", size=9.5, color=GREY)
    box(ax, side, 6.0, 1.3, 0.6, "dt_proj", PROJ, note="+ softplus")
    arrow(ax, (side + 0.65, 6.0), (ssm_left, 6.0))
    label(ax, (side + 0.65 + ssm_left) / 2, 6.17, r"$\Delta$", size=11)
    ax.add_patch(FancyBboxPatch((ssm_left, 4.85), 2.4, 1.5, boxstyle="round,pad=0,rounding_size=0.08",
                                facecolor=SSM, edgecolor=INK, linewidth=1.2))
    label(ax, main, 6.12, "selective SSM", size=11.5)
    label(ax, main, 5.75, r"$h_t = e^{\Delta_t A} h_{t-1} + \Delta_t B_t u_t$", size=10)
    label(ax, main, 5.4, r"$y_t = C_t h_t + D u_t$", size=10)
    label(ax, main, 5.07, "A = −exp(A_log), D", size=9, color=GREY)

    # z branch: the gate.
    label(ax, gate + 0.2, 2.45, "z", size=11, color=GREY)
    arrow(ax, (gate, 2.25), (gate, 3.5))
    box(ax, gate, 3.7, 1.1, 0.4, "SiLU", ACT)
    arrow(ax, (gate, 3.9), (gate, 6.75), (main + 0.17, 6.75))
    label(ax, (main + gate) / 2 + 0.1, 6.92, "gate: y · silu(z)", size=9.5, color=GREY)
    arrow(ax, (main, 6.35), (main, 6.58))
    node(ax, main, 6.75, "×")
    arrow(ax, (main, 6.92), (main, 7.12))
    box(ax, main, 7.32, 1.8, 0.4, "out_proj", PROJ)
    arrow(ax, (main, 7.52), (main, 7.93))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def ssd_matrix(l=24, n=4, seed=0):
    """One head's SSD as a matrix, y = M x (paper section 3 and 6): M[t, s] = (C_t · B_s) exp(a_{s+1} + ... + a_t)
    Δ_s for s <= t, with a = Δ A; checked here against ssd_ref's recurrence. Returns (M, the causal softmax
    weights of random queries and keys, for comparison), both (l, l)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.rand(1, l, 1, generator=g, dtype=torch.float64) * 0.4 + 0.05
    A = torch.tensor([-1.0], dtype=torch.float64)
    B, C = (torch.randn(1, l, 1, n, generator=g, dtype=torch.float64) for _ in range(2))
    decay = torch.exp(_segsum(dt[0, :, 0] * A))                                        # (l, l), 0 above
    M = (C[0, :, 0] @ B[0, :, 0].T) * decay * dt[0, :, 0]
    x = torch.randn(1, l, 1, 1, generator=g, dtype=torch.float64)
    assert torch.allclose(M @ x[0, :, 0, 0], ssd_ref(x, dt, A, B, C)[0, :, 0, 0])         # the same y
    q, k = (torch.randn(l, 8, generator=g, dtype=torch.float64) for _ in range(2))
    scores = (q @ k.T / 8 ** 0.5).masked_fill(~torch.tril(torch.ones(l, l, dtype=torch.bool)), float("-inf"))
    return M, scores.softmax(-1)


def draw_duality(path, l=24, chunk=8):
    """Causal attention beside the SSD matrix of one head, with ssd_chunked's chunks drawn over the latter."""
    M, attention = ssd_matrix(l)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4), dpi=DPI)
    panels = ((attention, "attention: softmax(q_t · k_s) for s ≤ t", "RdBu_r"),
              (M, "Mamba-2: (C_t · B_s) exp(a_{s+1} + … + a_t) Δ_s", "RdBu_r"))
    for ax, (matrix, title, cmap) in zip(axes, panels):
        bound = matrix.abs().max().item()
        ax.imshow(matrix.masked_fill(matrix == 0, float("nan")).numpy(), cmap=cmap, vmin=-bound, vmax=bound)
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("s (input position)", fontsize=9)
        ax.set_ylabel("t (output position)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[1]
    for i in range(0, l, chunk):  # diagonal blocks: step 1's masked products; below them: through chunk states
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), chunk, chunk, fill=False, edgecolor=INK, linewidth=1.6))
        for j in range(0, i, chunk):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), chunk, chunk, fill=False, edgecolor=GREY, linewidth=0.8,
                                   linestyle="--"))
    fig.text(0.5, 0.04, "solid: within a chunk, one (T x T) matrix product (step 1)    dashed: across chunks, "
             "rank N, through the states (steps 2-4)", ha="center", fontsize=8.5, color=GREY)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent),
                        help="folder for the PNGs (default: this script's folder)")
    out = Path(parser.parse_args(argv).out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw_ssm(out / "ssm.png")
    draw_architecture(out / "mamba_architecture.png")
    draw_duality(out / "ssd_duality.png")
    print(f"wrote {out / 'ssm.png'}, {out / 'mamba_architecture.png'} and {out / 'ssd_duality.png'}")


if __name__ == "__main__":
    main()
