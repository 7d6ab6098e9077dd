"""Numerical tests for cleandiff_rl.nn: time rule, conditions, backbones (shapes, gradients,
dependence on t and condition, padding/cropping) and a tiny regression."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cleandiff_rl.nn import (
    DiT1d, DQLMlp, FourierEmbedding, HalfJannerUNet1d, IDQLMlp, IdentityCondition, JannerUNet1d, MLPCondition,
    SinusoidalEmbedding, TimeMLP, activation,
)

X_DIM, COND_DIM, BATCH = 3, 5, 4
HORIZONS = [1, 5, 7, 13, 32]

# Small but structurally complete versions of every backbone (GroupNorm(8) needs widths divisible by 8).
MLPS = {
    "dql": lambda cond_dim: DQLMlp(X_DIM, cond_dim, emb_dim=8, hidden_dim=32),
    "idql": lambda cond_dim: IDQLMlp(X_DIM, cond_dim, emb_dim=8, hidden_dim=16, n_blocks=2),
}
SEQUENCES = {
    "unet": lambda cond_dim: JannerUNet1d(X_DIM, cond_dim, model_dim=8, dim_mults=(1, 2, 4)),
    "unet_attn": lambda cond_dim: JannerUNet1d(X_DIM, cond_dim, model_dim=8, dim_mults=(1, 2), attention=True),
    "dit": lambda cond_dim: _unzero(DiT1d(X_DIM, cond_dim, d_model=16, n_heads=2, depth=2, emb_dim=8)),
}
BACKBONES = {**MLPS, **SEQUENCES}


def _unzero(model: nn.Module) -> nn.Module:
    """Give adaLN-Zero's zero-initialised layers small random weights, as after some training;
    at init a DiT is exactly 0 and most of its gradients are exactly 0 (tested separately)."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.2)
    return model


def _inputs(name: str, horizon: int = 7, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = (batch, X_DIM) if name in MLPS else (batch, horizon, X_DIM)
    return torch.randn(shape), torch.randint(0, 20, (batch,)), torch.randn(batch, COND_DIM)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- time embeddings

def test_sinusoidal_values():
    emb = SinusoidalEmbedding(4)  # frequencies 1 and 1e-4
    t = torch.tensor([0, 3])
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0],
                             [math.sin(3), math.sin(3e-4), math.cos(3), math.cos(3e-4)]])
    torch.testing.assert_close(emb(t), expected, atol=1e-6, rtol=0)


def test_fourier_values_and_init_scale():
    emb = FourierEmbedding(4096, scale=0.2)
    assert abs(emb.weight.std().item() - 0.2) < 0.02
    t = torch.tensor([2, 4])
    f = 2 * math.pi * t[:, None].double() * emb.weight.detach().double()
    expected = torch.cat([f.cos(), f.sin()], -1).float()
    torch.testing.assert_close(emb(t), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("embedding", [SinusoidalEmbedding(32), FourierEmbedding(32, scale=0.01)])
def test_integer_step_equals_float_time_over_1000(embedding: nn.Module):
    k = torch.tensor([0, 1, 7, 250, 999])
    torch.testing.assert_close(embedding(k), embedding(k.float() / 1000), atol=2e-4, rtol=0)
    assert not torch.allclose(embedding(k), embedding(k.float()), atol=1e-2)  # floats are scaled, ints not


def test_backbone_time_rule():
    net = DQLMlp(X_DIM, COND_DIM).eval()
    x, _, c = _inputs("dql")
    k = torch.tensor([0, 3, 500, 999])
    torch.testing.assert_close(net(x, k, c), net(x, k.float() / 1000, c), atol=1e-4, rtol=0)


def test_bad_names_raise():
    with pytest.raises(ValueError, match="activation"):
        activation("sigmoid-ish")
    with pytest.raises(ValueError, match="time embedding"):
        TimeMLP(8, 16, 8, embedding="learned")
    with pytest.raises(ValueError, match="even"):
        SinusoidalEmbedding(7)


# ---------------------------------------------------------------- conditions

@pytest.mark.parametrize("encoder", [IdentityCondition(COND_DIM, dropout=0.3),
                                     MLPCondition(COND_DIM, 6, hidden_dims=(16,), dropout=0.3)])
def test_mask_zeroes_rows_exactly(encoder: nn.Module):
    c = torch.randn(6, COND_DIM)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    for training in (True, False):  # an explicit mask overrides label dropout
        encoder.train(training)
        out = encoder(c, mask=mask)
        assert out.shape == (6, encoder.out_dim)
        assert torch.equal(out[mask == 0], torch.zeros(3, encoder.out_dim))
        torch.testing.assert_close(out[mask == 1], encoder.eval()(c)[mask == 1], atol=0, rtol=0)
    mlp_out = MLPCondition(COND_DIM, 6).eval()(c)
    assert (mlp_out != 0).all()  # the null embedding is produced by the mask, not by the MLP


@pytest.mark.parametrize("make", [lambda p: IdentityCondition(1, dropout=p),
                                  lambda p: MLPCondition(1, 4, hidden_dims=(8,), dropout=p)])
@pytest.mark.parametrize("p", [0.1, 0.25])
def test_label_dropout_rate(make, p: float):
    encoder, n = make(p), 20000
    c = torch.ones(n, 1)
    encoder.eval()
    assert (encoder(c).abs().sum(-1) > 0).all()  # eval: nothing dropped
    encoder.train()
    dropped = (encoder(c).abs().sum(-1) == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)  # ~0.01 for p=0.25


def test_condition_dropout_validated():
    with pytest.raises(ValueError):
        IdentityCondition(3, dropout=1.0)


# ---------------------------------------------------------------- backbones

@pytest.mark.parametrize("name", MLPS)
@pytest.mark.parametrize("cond_dim", [COND_DIM, 0])
def test_mlp_computes_its_documented_architecture(name: str, cond_dim: int):
    """Each MLP backbone equals its docstring written out with its own weights: DQL concat[x, time_emb, c] ->
    3 x (Linear + Mish) -> Linear, time sinusoidal -> Linear -> Mish -> Linear; IDQL concat -> Linear ->
    residual blocks x + Linear(act(Linear(LayerNorm(x)))) -> act -> Linear, time Fourier [cos, sin]
    -> Linear -> act -> Linear (act = SiLU, dropout off in eval). Float time is scaled by 1000."""
    import torch.nn.functional as F

    net = MLPS[name](cond_dim).eval()
    x, t, c = _inputs(name)
    t = t.float() / 20  # continuous time: the embedding sees 1000 t
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]  # time MLP first, then the body

    def dense(h: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        return h @ layer.weight.T + layer.bias

    def mish(h: torch.Tensor) -> torch.Tensor:
        return h * torch.tanh(F.softplus(h))

    if name == "dql":
        half = linears[0].in_features // 2  # emb_dim / 2 sine and as many cosine features
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1))
        emb = torch.cat([torch.sin(1000 * t[:, None] * freqs), torch.cos(1000 * t[:, None] * freqs)], -1)
        act = mish
    else:
        w = 2 * math.pi * 1000 * t[:, None] * net.time_mlp[0].weight.detach()
        emb = torch.cat([w.cos(), w.sin()], -1)
        act = F.silu
    time_emb = dense(act(dense(emb, linears[0])), linears[1])
    h = torch.cat([x, time_emb, c] if cond_dim else [x, time_emb], -1)
    if name == "dql":
        for layer in linears[2:5]:
            h = mish(dense(h, layer))
    else:
        h = dense(h, linears[2])
        norms = [m for m in net.modules() if isinstance(m, nn.LayerNorm)]
        for norm, first, second in zip(norms, linears[3:-1:2], linears[4:-1:2]):
            h = h + dense(act(dense(F.layer_norm(h, h.shape[-1:], norm.weight, norm.bias, eps=1e-6), first)), second)
        h = act(h)
    expected = dense(h, linears[-1])
    out = net(x, t, c) if cond_dim else net(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SEQUENCES)
@pytest.mark.parametrize("horizon", HORIZONS)
def test_sequence_shape_any_horizon(name: str, horizon: int):
    net = SEQUENCES[name](COND_DIM).eval()
    x, t, c = _inputs(name, horizon)
    out = net(x, t, c)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("horizon", HORIZONS)
def test_value_function_shape_any_horizon(horizon: int):
    net = HalfJannerUNet1d(X_DIM, out_dim=2, cond_dim=COND_DIM, horizon=horizon, model_dim=8, dim_mults=(1, 2, 4))
    x, t, c = _inputs("unet", horizon)
    out = net(x, t, c)
    assert out.shape == (BATCH, 2) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="horizon"):  # the flattened head fixes the horizon
        net(torch.randn(BATCH, horizon + 1, X_DIM), t, c)


def _check_gradients(net: nn.Module, out: torch.Tensor) -> None:
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, f"{pname}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname}: non-finite gradient"
        assert p.grad.abs().max() > 0, f"{pname}: zero gradient"


@pytest.mark.parametrize("name", BACKBONES)
def test_gradients_reach_every_parameter(name: str):
    net = BACKBONES[name](COND_DIM)
    x, t, c = _inputs(name, horizon=7)
    _check_gradients(net, net(x, t, c))


def test_value_function_gradients():
    net = HalfJannerUNet1d(X_DIM, cond_dim=COND_DIM, horizon=7, model_dim=8, dim_mults=(1, 2, 4))
    x, t, c = _inputs("unet", horizon=7)
    _check_gradients(net, net(x, t, c))


@pytest.mark.parametrize("name", BACKBONES)
def test_output_depends_on_t_and_condition(name: str):
    net = BACKBONES[name](COND_DIM).eval()
    x, t, c = _inputs(name)
    out = net(x, t, c)
    assert (out - net(x, t + 1, c)).abs().max() > 1e-4
    assert (out - net(x, t.float() / 20, c)).abs().max() > 1e-4
    assert (out - net(x, t, c + 1)).abs().max() > 1e-4
    assert torch.equal(net(x, t, torch.zeros_like(c)), net(x, t, None))  # None is the null condition


@pytest.mark.parametrize("name", BACKBONES)
def test_unconditional_backbone_ignores_condition(name: str):
    net = BACKBONES[name](0).eval()
    x, t, c = _inputs(name)
    assert torch.equal(net(x, t, c), net(x, t))


def test_value_function_depends_on_t_and_condition():
    net = HalfJannerUNet1d(X_DIM, cond_dim=COND_DIM, horizon=5, model_dim=8, dim_mults=(1, 2, 4))
    x, t, c = _inputs("unet", horizon=5)
    out = net(x, t, c)
    assert (out - net(x, t + 1, c)).abs().max() > 1e-5
    assert (out - net(x, t, -c)).abs().max() > 1e-5
    assert torch.equal(net(x, t, torch.zeros_like(c)), net(x, t))


def test_dit_is_zero_at_init():
    net = DiT1d(X_DIM, COND_DIM, d_model=16, n_heads=2)
    x, t, c = _inputs("dit")
    assert torch.equal(net(x, t, c), torch.zeros_like(x))


# ---------------------------------------------------------------- padding and cropping

@pytest.mark.parametrize("name", SEQUENCES)
def test_batch_rows_independent_and_deterministic(name: str):
    net = SEQUENCES[name](COND_DIM).eval()
    x, t, c = _inputs(name, horizon=7)
    out = net(x, t, c)
    assert torch.equal(out, net(x, t, c))
    torch.testing.assert_close(net(x[:1], t[:1], c[:1]), out[:1], atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[1:] = 100.0  # wild values in other rows change nothing in row 0
    torch.testing.assert_close(net(x2, t, c)[:1], out[:1], atol=1e-5, rtol=1e-5)


def test_unet_pads_by_replicating_last_step_and_crops_the_end():
    net = JannerUNet1d(X_DIM, COND_DIM, model_dim=8, dim_mults=(1, 2, 4)).eval()  # pads 7 -> 8
    x, t, c = _inputs("unet", horizon=7)
    out7 = net(x, t, c)
    out8 = net(torch.cat([x, x[:, -1:]], 1), t, c)  # horizon 8 needs no padding
    torch.testing.assert_close(out7, out8[:, :7], atol=1e-5, rtol=1e-5)
    out_zero_pad = net(torch.cat([x, torch.zeros_like(x[:, -1:])], 1), t, c)
    assert (out7 - out_zero_pad[:, :7]).abs().max() > 1e-4  # so the check above is not vacuous


# ---------------------------------------------------------------- regression

def test_dql_mlp_fits_fixed_batch():
    torch.manual_seed(0)
    net = DQLMlp(X_DIM, COND_DIM)
    x, t, c = torch.randn(64, X_DIM), torch.randint(0, 5, (64,)), torch.randn(64, COND_DIM)
    target = torch.randn(64, X_DIM)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(200):
        loss = (net(x, t, c) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_cpu_mish_matches_torch_in_value_and_gradient():
    """The one-sigmoid Mish equals F.mish to float64 rounding over the whole range, tails included, and
    its derivative equals autograd's through F.mish."""
    import torch.nn.functional as F

    from cleandiff_rl.nn import Mish
    from cleandiff_rl.utils import fast_paths

    x = torch.cat([torch.linspace(-200.0, 200.0, 40001, dtype=torch.float64), torch.tensor([-1e4, 1e4])])
    x.requires_grad_(True)
    with fast_paths(True):
        y = Mish()(x)
    assert y.grad_fn is not None and "SigmoidMish" in type(y.grad_fn).__name__  # the fast path ran
    reference = F.mish(x)
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(reference.sum(), x)[0],
                               rtol=1e-10, atol=1e-300)
    assert torch.autograd.gradcheck(Mish(), (torch.randn(64, dtype=torch.float64, requires_grad=True) * 5,))
    small = torch.randn(1000) * 10
    torch.testing.assert_close(Mish()(small), F.mish(small), rtol=2e-6, atol=1e-7)
