"""The denoiser contract and the wrappers that act on it.

A denoiser is any callable ``D(x, t, cond) -> x0_hat``: ``x`` of shape [B, ...], ``t`` a float tensor
of shape [B] in the teacher's process time, ``cond`` None, a LongTensor [B] of class labels in
which ``-1`` asks for the unconditional prediction, or a ``distill.core.conditioning.PromptCond`` (prompt
embeddings of a text-to-image teacher, with the unconditional branch beside them). It returns the data
prediction E[x0 | x_t].
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from distill.core.conditioning import UNCOND, PromptCond, cat_cond, unconditional  # noqa: F401  (UNCOND re-exported)
from distill.core.param import append_dims, both_to_x0, combine_x0, x0_coefficients
from distill.core.schedules import Schedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class CountingDenoiser:
    """Counts network function evaluations (NFE): one per call, whatever the batch size; ``bar`` (a tqdm bar, or
    anything with ``update(n)``) is advanced by one after each."""

    def __init__(self, denoiser: Denoiser, bar=None):
        self.denoiser = denoiser
        self.nfe = 0
        self.bar = bar

    def __call__(self, x, t, cond=None, **kwargs):
        self.nfe += 1
        out = self.denoiser(x, t, cond, **kwargs)  # kwargs: optional parts of the contract (return_features)
        if self.bar is not None:
            self.bar.update(1)
        return out


def classifier_free_guidance(denoiser: Denoiser, guidance_scale: float) -> Denoiser:
    """A new denoiser D_w = D(x, t, none) + w (D(x, t, c) - D(x, t, none)) (Ho & Salimans 2022, Eq. 6,
    written for x0; it is the same combination as for eps at fixed x and t).

    ``w = 1`` is the plain conditional model, ``w = 0`` the unconditional one (diffusers' convention
    for ``guidance_scale``). The conditional and unconditional halves go through the network as one
    batch, so one guided call is one NFE.
    """
    w = float(guidance_scale)

    def guided(x, t, cond=None):
        return guided_prediction(denoiser, x, t, cond, w)

    return guided


def guided_prediction(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, w) -> torch.Tensor:
    """D(x, t, none) + w (D(x, t, c) - D(x, t, none)) for a float ``w`` or one per sample ([B], as LCM's teacher
    with w drawn per sample, Luo et al. 2023, Eq. 9); both halves in one batch (1 NFE)."""
    if cond is None:
        raise ValueError("classifier-free guidance needs class labels or prompts (cond); got cond=None")
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    c2 = cat_cond([cond, unconditional(cond)])
    d_cond, d_uncond = denoiser(x2, t2, c2).chunk(2)
    w = append_dims(w.to(x.device, d_cond.dtype), x.ndim) if isinstance(w, torch.Tensor) else w
    return d_uncond + w * (d_cond - d_uncond)


# -- networks seen as denoisers -------------------------------------------------------------------------
def _submodule(net: nn.Module, paths: tuple[str, ...]) -> nn.Module | None:
    for path in paths:
        try:
            return net.get_submodule(path)
        except AttributeError:
            continue
    return None


# where an extra scalar condition is added (the time embedding), and where bottleneck features are read,
# for the network classes of this project: diffusers UNets, TimeMLP and its diffusers wrapper ToyMLP
CONDITION_SITES = ("time_embedding", "inp", "mlp.inp")
BOTTLENECK_SITES = ("mid_block", "blocks.-1", "mlp.blocks.-1")


def _site(net: nn.Module, paths: tuple[str, ...], what: str) -> nn.Module:
    for path in paths:
        head, _, last = path.rpartition(".")
        if last == "-1":
            parent = _submodule(net, (head,))
            if parent is not None and len(parent):
                return parent[-1]
            continue
        found = _submodule(net, (path,))
        if found is not None:
            return found
    raise ValueError(f"network {type(net).__name__} has no {what} site; supported: diffusers UNets, TimeMLP, ToyMLP "
                     f"(submodules {', '.join(paths)})")


class ScalarEmbedding(nn.Module):
    """A scalar per sample (SLAM's gamma, a guidance scale) -> sinusoidal features -> a zero-initialised linear
    layer whose output is added to the network's time embedding, so a fresh embedding changes nothing
    (as LCM's w-embedding, Luo et al. 2023, Sec. 4.2)."""

    def __init__(self, out_features: int, features: int = 64, scale: float = 1000.0, default: float | None = None):
        super().__init__()
        # ``default``: the value used when a call does not pass this input (SLAM's gamma = 1 at sampling)
        self.config = {"out_features": out_features, "features": features, "scale": scale, "default": default}
        self.proj = nn.Linear(features, out_features)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        half = self.config["features"] // 2
        v = value.float().reshape(-1, 1) * self.config["scale"]
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=v.device) / half)
        return self.proj(torch.cat([torch.sin(v * freqs), torch.cos(v * freqs)], 1).to(self.proj.weight.dtype))


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's sinusoidal embedding of a guidance scale for a UNet's ``timestep_cond`` (Luo et al. 2023, Sec. 4.2; the
    formula of diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``), fed w - 1 so a student
    file samples in that pipeline with ``guidance_scale=w`` (our w: D_uncond + w (D_cond - D_uncond))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10_000.0) / (half - 1)))
    emb = ((w.float() - 1) * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], 1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepCondition(nn.Module):
    """The guidance scale w of a ``UNet2DConditionModel`` given through its own ``time_cond_proj_dim`` input
    (``timestep_cond``), as LCM students take it; the trainable projection is the UNet's ``time_embedding.cond_proj``."""

    def __init__(self, features: int, default: float | None = None):
        super().__init__()
        self.config = {"kind": "timestep_cond", "features": features, "scale": 1000.0, "default": default}

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return guidance_scale_embedding(value, self.config["features"])


LCM_COND_PROJ_DIM = 256  # LCM's ``unet_time_cond_proj_dim`` for SD 1.5 students (train_lcm_distill_sd_wds.py)


def _timestep_cond_site(net: nn.Module) -> nn.Module | None:
    """The UNet's ``time_embedding`` when the network is a diffusers UNet2DConditionModel (has ``time_cond_proj_dim``)."""
    config = getattr(net, "config", None)
    if config is None or "time_cond_proj_dim" not in config or not hasattr(net, "time_embedding"):
        return None
    return net.time_embedding


def cross_attention_dim(net: nn.Module) -> int | None:
    """The width of a cross-attention network's prompt embeddings (a UNet2DConditionModel's), else None."""
    config = getattr(net, "config", None)
    dim = config.get("cross_attention_dim") if hasattr(config, "get") else None
    return dim[0] if isinstance(dim, (list, tuple)) else dim


class NetDenoiser(nn.Module):
    """A network seen through the denoiser contract: the one place that turns a raw output (``epsilon`` /
    ``sample`` / ``v_prediction`` / ``flow``) into a data prediction, for teachers, students and fake-score
    networks alike.

    The network is called as ``net(x, t * time_scale, class_labels=labels)``; labels ``-1`` become
    ``null_class_label``; a ``PromptCond`` is passed as ``encoder_hidden_states`` (cross-attention UNets). Extra
    scalar conditions (``add_condition``) are embedded and added to the network's time embedding (a guidance scale
    ``w`` of a UNet2DConditionModel goes through its ``timestep_cond`` input, LCM's way); ``features`` also returns
    the bottleneck activations (a discriminator head's input).
    """

    def __init__(self, net: nn.Module, schedule: Schedule, prediction_type: str = "sample", *, time_scale: float = 1.0,
                 null_class_label: int | None = None):
        super().__init__()
        self.net, self.schedule, self.prediction_type = net, schedule, prediction_type
        self.time_scale, self.null_class_label = time_scale, null_class_label
        self.conditions = nn.ModuleDict()
        self._pending: torch.Tensor | None = None
        self._hooked = False  # the condition hook is a bound method: deepcopy rebinds it to the copy
        self._coefficient_cache: dict = {}

    # -- extra conditions -------------------------------------------------------------------------------
    def add_condition(self, name: str, features: int | None = None, scale: float = 1000.0,
                      default: float | None = None, kind: str | None = None) -> nn.Module:
        """Add a zero-initialised embedding of the extra scalar input ``name`` (passed as a keyword; ``default`` is
        used when a call leaves it out). A network that already takes ``name`` keeps its trained embedding.

        The guidance scale ``w`` of a UNet2DConditionModel uses the UNet's ``time_cond_proj_dim`` input (kind
        ``timestep_cond``): a network without one gets a zero-initialised ``time_embedding.cond_proj`` of
        ``features`` (default 256, LCM's) inputs, recorded in its config; one that has it keeps it."""
        if name in self.conditions:
            return self.conditions[name]
        site = _timestep_cond_site(self.net)
        if kind == "timestep_cond" or (kind is None and name == "w" and site is not None):
            self.conditions[name] = self._timestep_condition(site, features, default)
            return self.conditions[name]
        features = 64 if features is None else features
        site = _site(self.net, CONDITION_SITES, "time-embedding")
        out = site.out_features if isinstance(site, nn.Linear) else site.linear_2.out_features
        self.conditions[name] = ScalarEmbedding(out, features, scale, default).to(next(self.net.parameters()))
        if not self._hooked:
            site.register_forward_hook(self._add_pending)
            self._hooked = True
        return self.conditions[name]

    def _timestep_condition(self, site: nn.Module | None, features: int | None, default) -> TimestepCondition:
        if site is None:
            raise ValueError(f"network {type(self.net).__name__} has no time_cond_proj_dim input (timestep_cond)")
        dim = self.net.config.time_cond_proj_dim
        if dim is None:
            dim = LCM_COND_PROJ_DIM if features is None else features
            ref = next(self.net.parameters())
            site.cond_proj = nn.Linear(dim, site.linear_1.in_features, bias=False).to(ref)
            nn.init.zeros_(site.cond_proj.weight)  # the network at initialisation is unchanged
            self.net.register_to_config(time_cond_proj_dim=dim)
        return TimestepCondition(dim, default)

    def _add_pending(self, module, inputs, output):
        return output if self._pending is None else output + self._pending.to(output.dtype)

    def _embed(self, extra: dict, batch: int, device) -> tuple[torch.Tensor | None, dict]:
        """(sum of the hooked embeddings or None, keyword inputs of the network: ``timestep_cond``)."""
        unknown = sorted(set(extra) - set(self.conditions))
        if unknown:
            raise ValueError(f"extra conditions {unknown} are not inputs of this network; it takes: "
                             f"{', '.join(self.conditions) or 'none'}")
        defaults = {k: emb.config.get("default") for k, emb in self.conditions.items()}
        values = {**defaults, **{k: v for k, v in extra.items() if v is not None}}
        values = {k: torch.as_tensor(v, device=device).expand(batch) for k, v in values.items() if v is not None}
        kwargs = {"timestep_cond": self.conditions[k](v) for k, v in values.items()
                  if isinstance(self.conditions[k], TimestepCondition)}
        embeds = [self.conditions[k](v) for k, v in values.items() if not isinstance(self.conditions[k], TimestepCondition)]
        return (sum(embeds) if embeds else None), kwargs

    # -- the map (x_t, t) -> x0 -------------------------------------------------------------------------
    def labels(self, cond: torch.Tensor | None, x: torch.Tensor):
        if cond is None or self.null_class_label is None:
            return cond
        cond = cond.to(x.device)
        return torch.where(cond < 0, torch.full_like(cond, self.null_class_label), cond)

    def raw(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None, **extra) -> torch.Tensor:
        """The network's own output at process times ``t`` [B] (float64), in ``x``'s dtype."""
        dtype = next(self.net.parameters()).dtype  # run the network in its own dtype
        self._pending, kwargs = self._embed(extra, x.shape[0], x.device) if extra or len(self.conditions) else (None, {})
        kwargs = {k: v.to(dtype) for k, v in kwargs.items()}
        if isinstance(cond, PromptCond):
            kwargs.update(cond.network_kwargs(dtype))
        elif cross_attention_dim(self.net) is not None:
            raise ValueError(f"this network ({type(self.net).__name__}) is prompt-conditioned: pass "
                             f"cond=teacher.encode_prompts([...]), one prompt per sample, not "
                             f"{'None' if cond is None else type(cond).__name__}")
        else:
            kwargs["class_labels"] = self.labels(cond, x)
        try:
            t_net = t if self.time_scale == 1.0 else t * self.time_scale
            # a half-precision network still gets float32 times (bf16 rounds t = 999 to 1000); diffusers UNets embed
            # them in float32 and cast the embedding, as their pipelines call them
            t_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            out = self.net(x.to(dtype), t_net.to(t_dtype), **kwargs)
        finally:
            self._pending = None
        return getattr(out, "sample", out).to(x.dtype)

    def denoise(self, x: torch.Tensor, t, cond: torch.Tensor | None = None, **extra) -> torch.Tensor:
        """D(x, t, cond) = E[x0 | x_t = x] as the network predicts it."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = self.raw(x, t, cond, **extra)
        if self.prediction_type == "sample":
            return out
        if self.prediction_type == "both":  # two outputs (x, eps) mixed by their weights, in one place
            log_a, log_s = self.schedule.log_alpha_sigma(t.cpu())
            return both_to_x0(out, x, log_a.exp(), log_s.exp())
        return combine_x0(out, x, *self.x0_coefficients(t, x.ndim))

    def forward(self, x: torch.Tensor, t, cond: torch.Tensor | None = None, *, raw: bool = False, **extra) -> torch.Tensor:
        """The data prediction, or with ``raw=True`` the network's own output (call the module, not ``raw``, where
        DDP must see the call)."""
        if raw:
            t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
            return self.raw(x, t.expand(x.shape[0]) if t.ndim == 0 else t, cond, **extra)
        return self.denoise(x, t, cond, **extra)

    def features(self, x: torch.Tensor, t, cond: torch.Tensor | None = None, **extra) -> tuple[torch.Tensor, torch.Tensor]:
        """(D(x, t, cond), bottleneck activations) from one network call."""
        site, seen = _site(self.net, BOTTLENECK_SITES, "bottleneck"), []
        handle = site.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
        try:
            return self.denoise(x, t, cond, **extra), seen[-1]
        finally:
            handle.remove()

    def x0_coefficients(self, t: torch.Tensor, ndim: int):
        """Conversion coefficients at times ``t``; computed once per distinct time when the whole batch shares
        one (a stride-0 tensor, as solvers pass), which saves a dozen small tensor ops per network call."""
        shared = t.ndim == 1 and len(t) > 0 and t.stride(0) == 0
        key = (float(t[0]), ndim) if shared else None
        if key is not None and key in self._coefficient_cache:
            return self._coefficient_cache[key]
        log_a, log_s = self.schedule.log_alpha_sigma(t[:1].cpu() if shared else t.cpu())
        coefficients = x0_coefficients(self.prediction_type, log_a.exp(), log_s.exp(), ndim)
        if key is not None:
            if len(self._coefficient_cache) > 4096:
                self._coefficient_cache.clear()
            self._coefficient_cache[key] = coefficients
        return coefficients
