"""Observation models p(x|z). The decoder outputs the distribution's natural parameter per pixel; the
log-likelihood is summed over pixels (nats per image), in the training loss and in the ELBO alike.

Images on a grid of ``levels`` intensities are stored as x = k / (levels - 1), k = 0 .. levels - 1. The
Bernoulli and the discretised heads give the probability of those values (``discrete = True``); the Gaussian
head gives a density, which is a likelihood of the discrete data only through dequantisation
(``benchmark.metrics.likelihood.bits_per_dim``). Heads are registered by name (``LIKELIHOODS``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, constraints

from benchmark.errors import UsageError

LIKELIHOODS: dict[str, type["Likelihood"]] = {}


def register_likelihood(name: str) -> Callable[[type], type]:
    """Add a head to ``LIKELIHOODS`` under ``name``; a duplicate name or a class that is no ``Likelihood``
    is an error at import time, not a silently shadowed head."""
    def wrap(cls):
        if name in LIKELIHOODS:
            raise KeyError(f"likelihood {name!r} is already registered (by {LIKELIHOODS[name].__name__})")
        if not (isinstance(cls, type) and issubclass(cls, Likelihood)):
            raise TypeError(f"likelihood {name!r} must subclass Likelihood, got {cls!r}")
        LIKELIHOODS[name] = cls
        return cls
    return wrap


def on_grid(x: Tensor, levels: int, atol: float = 1e-4) -> bool:
    """Whether every value is k / (levels - 1) for an integer k in [0, levels - 1]. ``atol`` is in units of
    k: float32 pixels k/255 are exact to about 1e-5 k."""
    k = x * (levels - 1)
    return bool(((k - k.round()).abs() <= atol).all() and (k >= -atol).all() and (k <= levels - 1 + atol).all())


class Likelihood(nn.Module):
    """A head: decoder output -> p(x|z) over the image event. ``discrete``: its ``log_prob`` is a
    log-probability of the grid values (else a density); ``binary``: of {0, 1} pixels only. ``build`` takes
    the model's likelihood arguments."""

    discrete: bool = False
    binary: bool = False

    @classmethod
    def build(cls, sigma: float, learn_sigma: bool, levels: int) -> "Likelihood":
        return cls()

    def check(self, x: Tensor):
        """Refuse data this head cannot model, with a UsageError naming the fix."""


@register_likelihood("bernoulli")
class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli pixels, parametrised by logits: for binarised data."""

    discrete = binary = True

    def forward(self, logits: Tensor) -> Distribution:
        return Independent(Bernoulli(logits=logits, validate_args=False), 3)

    def check(self, x: Tensor):
        if not torch.all((x == 0) | (x == 1)):
            raise UsageError("the Bernoulli likelihood needs binary data but the images are continuous; "
                             "set data.binarize to dynamic or static, or use likelihood: discretized_gaussian")


class IsotropicNormal(Distribution):
    """N(loc, sigma^2 I) over images (the last three dimensions are the event), with one scalar sigma.

    Equal to ``Independent(Normal(loc, sigma), 3)``, but its log-density is one pass over the pixels:
    the general Normal takes the log and square of a per-pixel scale, several times slower on a CPU where
    the importance-sampled likelihood evaluates it millions of times."""

    arg_constraints = {"loc": constraints.real}
    support = constraints.independent(constraints.real, 3)
    has_rsample = True

    def __init__(self, loc: Tensor, log_scale: Tensor, validate_args=None):
        self.loc, self.log_scale = loc, log_scale
        super().__init__(loc.shape[:-3], loc.shape[-3:], validate_args=validate_args)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return (2 * self.log_scale).exp().expand_as(self.loc)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.log_scale.exp() * eps

    def log_prob(self, value: Tensor) -> Tensor:
        n = self.event_shape.numel()
        sq = (value - self.loc).square().sum((-3, -2, -1))
        return -0.5 * sq * (-2 * self.log_scale).exp() - n * (self.log_scale + 0.5 * math.log(2 * math.pi))


class ScalarSigma(Likelihood):
    """A head with one scalar scale sigma, fixed (a buffer) or learned (log-parametrised)."""

    def __init__(self, sigma: float = 1.0, learn_sigma: bool = False):
        super().__init__()
        if sigma <= 0:
            raise UsageError(f"sigma must be positive, got {sigma}")
        log_sigma = torch.tensor(float(sigma)).log()
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)


@register_likelihood("gaussian")
class GaussianLikelihood(ScalarSigma):
    """Independent Gaussian pixels with one scalar sigma, fixed or learned: a density on R^D."""

    @classmethod
    def build(cls, sigma: float, learn_sigma: bool, levels: int) -> "GaussianLikelihood":
        return cls(sigma, learn_sigma)

    def forward(self, loc: Tensor) -> Distribution:
        # unchecked: ``loc == loc`` over every decoded image was 13% of the IWAE on a CPU, and a GPU sync
        return IsotropicNormal(loc, self.log_sigma, validate_args=False)


# --- discretised likelihoods (Salimans et al. 2017, PixelCNN++, Section 2.1) -------------------------------

# e^-20 < sigma < e^20 keeps the standardised bin edges, their squares and the bin width finite in float32
# (a bin is 1/255 wide: these are far beyond any scale a decoder learns)
LOG_SCALE_RANGE = (-20.0, 20.0)
# The open side of an edge bin, in pixel units: finite (an infinite edge makes 0 * inf = NaN), beyond any
# location, and still finite in float32 once standardised by the largest 1/sigma (1e28 e^20 < 3e38).
OPEN_EDGE = 1e28


def _blend(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """b where mask is 1, a where it is 0 (mask is 0/1 in a's dtype; both finite): one fused op, cheaper on a
    CPU than ``torch.where`` and its boolean mask."""
    return torch.lerp(a, b, mask)


def _step(x: Tensor) -> Tensor:
    """1 where x > 0, else 0, in x's dtype (consumes x)."""
    return x.sign_().clamp_(min=0)


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


class _DiscretizedLogProb(torch.autograd.Function):
    """log P(bin) per pixel, and its derivatives in the same pass: autograd over the branch formulas would
    store and replay every one of their temporaries (a dozen full-size tensors a pixel), the closed-form
    derivatives are two. Inputs: the law (``Discretized._law``), the location (any shape), the log scale
    (scalar or broadcast) and the bins as ``Discretized._edges`` gives them at the data's shape. Everything
    here runs without autograd, so the forms are computed in place in a few reused buffers: a new full-size
    temporary costs more on a CPU than the arithmetic that fills it."""

    @staticmethod
    def forward(ctx, law, loc, log_scale, e_lo, e_hi, interior, n):
        grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        with torch.no_grad():
            inv_s = (-log_scale).exp()
            shape = torch.broadcast_shapes(loc.shape, e_lo.shape, inv_s.shape)
            # Reflect each bin into the half below the mean (both laws are symmetric): with d1 = lower edge -
            # loc and d2 = loc - upper edge, its edges become lo = min(d1, d2) / s <= hi = -max(d1, d2) / s and
            # their midpoint is <= 0. Two neighbours share the float of their common edge, so the bins still
            # telescope to one however small the scale; an open edge always lands on lo, far below.
            d1, d2 = (e_lo - loc).expand(shape).contiguous(), (loc - e_hi).expand(shape).contiguous()
            flip = torch.sub(d1, d2).sign_() if grads else None  # -1: kept, +1: reflected (midpoint > 0)
            nhi = torch.maximum(d1, d2)
            lo = torch.minimum(d1, d2, out=d1)
            log_p, g_shift, g_scale = law(lo, nhi, d2, inv_s, inv_s / n, interior, grads)
        if grads:
            # d/dloc = -(d/d alpha + d/d beta) / s, d/dlog s = -(alpha d/d alpha + beta d/d beta)
            ctx.save_for_backward(loc, log_scale, g_shift.mul_(flip).mul_(inv_s), g_scale)
        return log_p

    @staticmethod
    def backward(ctx, grad):
        loc, log_scale, d_loc, d_scale = ctx.saved_tensors
        g_loc = _sum_to(grad * d_loc, loc) if ctx.needs_input_grad[1] else None
        g_ls = _sum_to((grad * d_scale).neg_(), log_scale) if ctx.needs_input_grad[2] else None
        return None, g_loc, g_ls, None, None, None, None


class Discretized(Distribution):
    """A continuous law (loc, scale) per pixel integrated over the bins of a ``levels``-value grid.

    Pixel value x_k = k / (levels - 1) owns the bin [x_k - h, x_k + h], h = 1 / (2 (levels - 1)); the first
    and last bins extend to -inf and +inf, so the ``levels`` probabilities sum to one (PixelCNN++, Eq. 2).
    ``log_scale`` is a scalar or per pixel (broadcast to ``loc``). Subclasses give log P(bin) and its
    derivatives from the bin reflected below the mean (``_law``), in log space so that tiny scales and far
    tails stay finite. ``log_prob`` sums over the image (the last three dimensions)."""

    arg_constraints = {"loc": constraints.real}
    has_rsample = False

    def __init__(self, loc: Tensor, log_scale: Tensor, levels: int, validate_args=None):
        if levels < 2:
            raise UsageError(f"a discretised likelihood needs at least 2 levels, got {levels}")
        self.loc, self.levels = loc, levels
        self.log_scale = torch.as_tensor(log_scale, dtype=loc.dtype, device=loc.device).clamp(*LOG_SCALE_RANGE)
        super().__init__(loc.shape[:-3], loc.shape[-3:], validate_args=validate_args)

    @property
    def support(self):
        return constraints.independent(constraints.unit_interval, 3)

    @property
    def mean(self) -> Tensor:
        """The location clamped to [0, 1]: what sample and FID code shows as the decoded image. (The exact
        mean sums ``levels`` bins a pixel; the two agree as the scale shrinks below the bin width.)"""
        return self.loc.clamp(0, 1)

    @staticmethod
    def _law(lo: Tensor, nhi: Tensor, spare: Tensor, inv_s: Tensor, w: Tensor, interior: Tensor, grads: bool):
        """(log P, d log P / d shift, d log P / d log-dilation; the last two None unless ``grads``) of the
        bins [lo, -nhi] * inv_s, given in pixel units with midpoint <= 0. w = inv_s / n is the interior bins'
        standardised width, ``interior`` 0 on the two edge bins. lo, nhi and spare (same shape) are the
        caller's buffers, free to overwrite."""
        raise NotImplementedError

    def _standard_sample(self, shape: torch.Size) -> Tensor:
        raise NotImplementedError

    def _edges(self, value: Tensor, dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The bin's lower and upper edge in pixel units, each the same float for both bins it separates,
        the open side of an edge bin at -+``OPEN_EDGE``; and 1 on interior bins, 0 on the two edge bins. At
        the data's shape: the K decoded samples scored against one image share them."""
        n = self.levels - 1
        with torch.no_grad():
            k = (value.to(dtype) * n).round_().clamp_(0, n)
            first, last = (1 - k).clamp_(min=0), (k - (n - 1)).clamp_(min=0)  # 1 on bin 0, on bin n
            e_lo = torch.sub(k, 0.5).div_(n).add_(first, alpha=-OPEN_EDGE)
            e_hi = k.add_(0.5).div_(n).add_(last, alpha=OPEN_EDGE)
            return e_lo, e_hi, first.add_(last).neg_().add_(1)

    def pixel_log_prob(self, value: Tensor) -> Tensor:
        """log P(pixel = value) for every pixel (the batch and event shape of ``loc``, broadcast)."""
        dtype = torch.promote_types(self.loc.dtype, torch.float32)
        e_lo, e_hi, interior = self._edges(value, dtype)
        return _DiscretizedLogProb.apply(self._law, self.loc.to(dtype), self.log_scale.to(dtype), e_lo, e_hi,
                                         interior, self.levels - 1)

    def log_prob(self, value: Tensor) -> Tensor:
        return self.pixel_log_prob(value).sum((-3, -2, -1))

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            y = self.loc + self.log_scale.exp() * self._standard_sample(shape)
            n = self.levels - 1
            return (y * n).round().clamp(0, n) / n  # the bin y falls in: edges are the midpoints


class DiscretizedLogistic(Discretized):
    """Logistic(loc, s) per pixel, discretised: P(k) = sigmoid(beta) - sigmoid(alpha) (PixelCNN++, Eq. 2)."""

    @staticmethod
    def _law(lo, nhi, spare, inv_s, w, interior, grads):
        # sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - e^(a - b)): no difference of two probabilities,
        # so the log is accurate at any scale; log(1 - e^-w) is one number per image, and 0 on an edge bin.
        # With t = -hi and lo <= 0: log P = -max(t, 0) - log((1 + e^-|t|)(1 + e^lo)) + log(1 - e^-w).
        lo, t = lo.mul_(inv_s), nhi.mul_(inv_s)
        a, b = t.abs().neg_().exp_(), lo.exp()
        log_p = torch.add(a, b, out=spare).addcmul_(a, b).log1p_().add_(torch.clamp(t, min=0, out=a)).neg_()
        log_p.addcmul_(interior, torch.log(-torch.expm1(-w)))
        if not grads:
            return log_p, None, None
        # d/d hi = sigmoid(t) + c, d/d lo = -sigmoid(lo) - c on interior bins, c = 1 / (e^w - 1): the shift
        # d/d hi + d/d lo cancels c, the dilation hi d/d hi + lo d/d lo = -t sigmoid(t) - lo sigmoid(lo) + w c
        sig_t, sig_lo = t.sigmoid(), torch.sigmoid(lo, out=b)
        g_scale = torch.mul(t, sig_t, out=a).add_(lo.mul_(sig_lo)).neg_().addcmul_(interior, w / torch.expm1(w))
        return log_p, sig_t.sub_(sig_lo), g_scale

    def _standard_sample(self, shape):
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
        return torch.logit(u)


_SQRT2, _SQRT_PI = math.sqrt(2), math.sqrt(math.pi)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
NARROW = 0.2  # a bin is narrow when w max(|m|, 1) < NARROW: the midpoint series' next term is below 1e-9


def _erfcx_tail(t: Tensor, r: Tensor, out: Tensor) -> Tensor:
    """sqrt(pi) e^(t^2) erfc(t) for t >= 7 from its asymptotic series 1/t (1 - v/2 + 3 v^2/4 - 15 v^3/8),
    v = 1/t^2 (Abramowitz & Stegun 7.1.23), to 1e-6 there (4e-9 past 14, where float64 uses it), into
    ``out``; r is a scratch buffer of t's shape."""
    torch.reciprocal(t, out=r)
    v = torch.square(r, out=t)
    s = torch.add(_const(t), v, alpha=-15 / 8, out=out)  # Horner
    s = torch.addcmul(_const(t, -0.5), s, v, out=s)
    return torch.addcmul(_const(t, 1.0), s, v, out=s).mul_(r)


def _const(t: Tensor, c: float = 0.75) -> Tensor:
    """c as a 0-dim tensor of t's dtype and device: the constant term of a fused multiply-add."""
    return torch.tensor(c, dtype=t.dtype, device=t.device)


class DiscretizedNormal(Discretized):
    """N(loc, s^2) per pixel, discretised: P(k) = Phi(beta) - Phi(alpha), in log space.

    Three forms, each accurate where it is used (m, w the reflected bin's midpoint and width in standard
    units, u = -hi / sqrt 2 and v = -lo / sqrt 2 >= u): a narrow bin, w max(|m|, 1) < 0.2, by the midpoint
    rule with its Taylor terms, log phi(m) + log w + (m^2 - 1) w^2 / 24 - (m^4 + 4 m^2 - 2) w^4 / 2880; a
    wide one by P = (erfc(u) - erfc(v)) / 2, no difference of nearly equal numbers; and a wide one where
    erfc(u) is near underflow (beyond 10 standard deviations, 20 in float64) by P = e^(-u^2) (erfcx(u) -
    e^(u^2 - v^2) erfcx(v)) / 2, erfcx from its asymptotic series. Every form is computed for every pixel
    (no data-dependent shapes) and blended by masks, so each stays finite where it is not used."""

    @staticmethod
    def _law(lo, nhi, spare, inv_s, w, interior, grads):
        far, x_min = (10.0, 1e-30) if lo.dtype != torch.float64 else (20.0, 1e-280)
        far = far / _SQRT2  # in units of u
        v, u = lo.mul_(inv_s * -(1 / _SQRT2)), nhi.mul_(inv_s * (1 / _SQRT2))  # -lo / sqrt 2, -hi / sqrt 2
        s = torch.add(u, v, out=spare)  # -sqrt 2 m >= 0
        # narrow: a polynomial in q = m^2 = s^2 / 2; w and s capped where the bin is not narrow, so that this
        # form stays small and finite there (the blend multiplies it by 0)
        wn = w.clamp(max=NARROW)
        w2 = wn.square()
        w4 = w2.square()
        c0 = -_HALF_LOG_2PI + w.log() - w2 / 24 + w4 / 1440
        c1, c2 = -0.5 + w2 / 24 - w4 / 720, -w4 / 2880
        sn = s.clamp(max=_SQRT2 * NARROW / wn)
        q = sn.square().mul_(0.5)
        log_p_narrow = torch.addcmul(c1, q, c2).mul_(q).add_(c0)
        narrow = _step(torch.where(w < NARROW, _SQRT2 * NARROW / w, -1.0) - s)  # s < that: scalar or per pixel
        # wide: erfc difference, or in the far tail the scaled form (tail = 1 where u > far)
        tail = _step(u - far)
        e = torch.mul(s, -w / _SQRT2).exp_()  # e^(u^2 - v^2) = phi(lo) / phi(hi)
        r, t = torch.empty_like(u), torch.clamp(u, min=far)
        x_tail = _erfcx_tail(t, r, torch.empty_like(u))
        x = _erfcx_tail(torch.clamp(v, min=far, out=t), r, torch.empty_like(u))
        x_tail.sub_(x.mul_(e)).mul_(1 / _SQRT_PI)
        x = torch.erfc(u, out=x).sub_(torch.erfc(v, out=t)).lerp_(x_tail, tail).clamp_(min=x_min)
        u2 = torch.square(u, out=r)
        tail_u2 = tail * u2
        log_p = torch.log(x, out=t).sub_(tail_u2).sub_(math.log(2)).lerp_(log_p_narrow, narrow)
        if not grads:
            return log_p, None, None
        # wide: d/d hi = phi(hi) / P = sqrt(2 / pi) e^(-u^2 (1 - tail)) / x, d/d lo = -e d/d hi
        d_hi = u2.sub_(tail_u2).neg_().exp_().mul_(math.sqrt(2 / math.pi)).div_(x)
        g_scale = v.mul_(e).neg_().add_(u).mul_(d_hi).mul_(-_SQRT2)  # hi d/d hi + lo d/d lo
        g_shift = e.neg_().add_(1).mul_(d_hi)
        # narrow: d/dm = m (2 c1 + 4 c2 q), w d/dw = (1 - w^2/12 + w^4/360) + q (w^2/12 - w^4/180 - q w^4/720)
        dq = torch.mul(q, 4 * c2, out=x).add_(2 * c1)
        g_shift.lerp_(sn.mul_(dq).mul_(-1 / _SQRT2), narrow)
        w_dw = torch.mul(q, -w4 / 720, out=tail_u2).add_(w2 / 12 - w4 / 180).mul_(q).add_(1 - w2 / 12 + w4 / 360)
        g_scale.lerp_(dq.mul_(q).add_(w_dw), narrow)
        return log_p, g_shift, g_scale

    def _standard_sample(self, shape):
        return torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)


class DiscretizedHead(ScalarSigma):
    """A discretised head on the data's grid of ``levels`` values, with one scalar scale, fixed or learned."""

    discrete = True
    distribution: type[Discretized]

    def __init__(self, sigma: float = 1.0, learn_sigma: bool = False, levels: int = 256):
        super().__init__(sigma, learn_sigma)
        if levels < 2:
            raise UsageError(f"model.init_args.levels must be at least 2, got {levels}")
        self.levels = levels

    @classmethod
    def build(cls, sigma: float, learn_sigma: bool, levels: int) -> "DiscretizedHead":
        return cls(sigma, learn_sigma, levels)

    def forward(self, loc: Tensor) -> Distribution:
        return self.distribution(loc, self.log_sigma, self.levels, validate_args=False)

    def check(self, x: Tensor):
        if not on_grid(x, self.levels):
            raise UsageError(f"the discretised likelihood needs pixels on the grid k/{self.levels - 1} but the "
                             "images are not (dequantised?); set data.dequantize false, or use likelihood: gaussian")


@register_likelihood("discretized_logistic")
class DiscretizedLogisticLikelihood(DiscretizedHead):
    distribution = DiscretizedLogistic


@register_likelihood("discretized_gaussian")
class DiscretizedGaussianLikelihood(DiscretizedHead):
    distribution = DiscretizedNormal


def make_likelihood(name: str, sigma: float = 1.0, learn_sigma: bool = False, levels: int = 256) -> Likelihood:
    if name not in LIKELIHOODS:
        raise UsageError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name].build(sigma, learn_sigma, levels)
