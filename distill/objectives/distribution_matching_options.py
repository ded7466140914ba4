"""The config options of the distribution-matching family (``objective:`` in a run config): what every objective of
the family takes (``DMOptions``), the GAN term's (``GanOptions``), and each method's own."""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.engine.config import ConfigError, at_least, choice
from distill.objectives.losses import LOSS_SPACES
from distill.objectives.noise_levels import TIME_SAMPLINGS

FAKE_SCORES = ("auto", "teacher_copy", "mlp")
MULTISTEP_INPUTS = ("backward", "data")
GAN_FEATURES = ("fake_score", "teacher")
VSD_WEIGHTINGS = ("uniform", "snr", "eps")
GAN_FORMS = ("dmd2", "sida")
GAN_HEADS = ("mlp", "channel_mean")
FAKE_WEIGHTINGS = ("none", "edm")


# -- options ----------------------------------------------------------------------------------------------
def _range(default):
    return field(default_factory=lambda: list(default))


@dataclass
class DMOptions:
    """Options every objective of the family has (config ``objective:``)."""

    fake_score: str = choice("auto", FAKE_SCORES)  # auto: teacher_copy for a network teacher, mlp for an analytic one
    fake_hidden: int = at_least(128, 1)  # width of the mlp fake score
    fake_layers: int = at_least(3, 1)  # residual blocks of the mlp fake score
    fake_loss_space: str = choice("raw", LOSS_SPACES)  # fake-score denoising loss: the network's own target, or x0
    fake_loss_weighting: str = choice("none", FAKE_WEIGHTINGS)  # edm: lambda(sigma) on the x0 loss (SiD, EDM Table 1)
    sigma_data: float = at_least(0.5, 1e-6)  # sigma_d of fake_loss_weighting edm
    time_sampling: str = choice("karras", TIME_SAMPLINGS)  # u -> t of the generator loss (noise_levels.py)
    fake_time_sampling: str | None = choice(None, (None, *TIME_SAMPLINGS))  # u -> t of the fake-score loss; null: time_sampling
    rho: float = at_least(7.0, 1.0)  # Karras rho of time_sampling karras
    lognormal_mean: float = -1.2  # P_mean of log sigma/alpha for the lognormal samplings (SiD, EDM: -1.2)
    lognormal_std: float = at_least(1.2, 1e-6)  # P_std (SiD, EDM: 1.2)
    t_range: list = _range([0.02, 0.98])  # [lo, hi] of u for the generator loss (DMD: 2%-98% of the Karras grid)
    fake_t_range: list = _range([0.0, 1.0])  # [lo, hi] of u for the fake-score loss
    critic_steps: int = at_least(1, 1)  # fake-score (and head) steps per generator step (TTUR)
    generator_start_step: int = at_least(0, 0)  # the generator updates from this step on (fake-score warm-up)
    start_sigma: float | None = at_least(None, 1e-6)  # generator input time as sigma/alpha (SiD: 2.5); null: t_max
    generator_steps: int = at_least(1, 1, 4)  # k: a k-step generator (2-4: DMD2 backward simulation or noised data)
    multistep_input: str = choice("backward", MULTISTEP_INPUTS)  # inputs of the later steps of a multi-step generator
    guidance_scale: float | None = None  # classifier-free guidance of the teacher score (real score = guided teacher)

    def __post_init__(self):
        for key in ("t_range", "fake_t_range"):
            check_unit_range(getattr(self, key), f"objective.{key}")
        if self.fake_loss_weighting == "edm" and self.fake_loss_space != "x0":
            raise ConfigError(f"config key 'objective.fake_loss_weighting' is 'edm', which weights the x0 loss, but "
                              f"'objective.fake_loss_space' is {self.fake_loss_space!r}; allowed: fake_loss_space x0, or weighting none")


@dataclass
class GanOptions(DMOptions):
    gan_g_weight: float = at_least(0.0, 0.0)  # generator GAN weight (DMD2: 3e-3)
    gan_d_weight: float = at_least(0.0, 0.0)  # discriminator BCE weight in the fake-score loss (DMD2: 1e-2)
    gan_start_step: int = at_least(0, 0)  # GAN terms from this step on (DMD2 adds the GAN late)
    gan_features: str = choice("fake_score", GAN_FEATURES)  # head on the fake score's bottleneck, or the frozen teacher's
    gan_t_range: list = _range([0.0, 1.0])  # [lo, hi] of u at which real and fake are noised for the GAN
    gan_time_sampling: str = choice("karras", TIME_SAMPLINGS)  # u -> t of the GAN (DMD2: a uniform index of the Karras grid)
    head_hidden: int = at_least(64, 1)  # width of the discriminator head

    def __post_init__(self):
        super().__post_init__()
        check_unit_range(self.gan_t_range, "objective.gan_t_range")


@dataclass
class VSDOptions(DMOptions):
    weighting: str = choice("uniform", VSD_WEIGHTINGS)  # c(t): x0 space (Diff-Instruct), score space (snr), eps space
    time_sampling: str = choice("uniform", TIME_SAMPLINGS)


@dataclass
class DMDOptions(DMOptions):
    regression_weight: float = at_least(0.25, 0.0)  # lambda_reg of the (noise, teacher sample) regression (DMD, Eq. 9)


@dataclass
class DMD2Options(GanOptions):
    critic_steps: int = at_least(5, 1)  # DMD2: dfake_gen_update_ratio 5
    gan_g_weight: float = at_least(3e-3, 0.0)
    gan_d_weight: float = at_least(1e-2, 0.0)


@dataclass
class SiDOptions(GanOptions):
    alpha: float = 1.2  # SiD's alpha (1.2 in the paper's runs; 1 is the released Uni-Instruct's SIM branch, 1/2 its exact rkl)
    t_range: list = _range([0.0, 0.8])  # SiD: t ~ U[0, 800/1000] on the Karras grid
    start_sigma: float | None = at_least(2.5, 1e-6)  # SiD: G(2.5 z, sigma = 2.5)
    fake_time_sampling: str | None = choice("lognormal", (None, *TIME_SAMPLINGS))  # SID_EDMLoss: lognormal(-1.2, 1.2)
    fake_loss_space: str = choice("x0", LOSS_SPACES)  # SID_EDMLoss: lambda(sigma) ||D_fake - x||^2
    fake_loss_weighting: str = choice("edm", FAKE_WEIGHTINGS)
    gan_time_sampling: str = choice("lognormal", TIME_SAMPLINGS)  # SiDA / Uni-Instruct: the fake score's sigma
    # dmd2: the GAN on fresh noise draws (DMD2, Sec. 4.3); sida: SiDA's shared-encoder GAN (SiD.matching_loss, critic)
    gan_form: str = choice("dmd2", GAN_FORMS)
    gan_d_start_step: int | None = at_least(None, 0)  # the discriminator's BCE from this step on (SiDA: 0); null: gan_start_step
    gan_head: str = choice("mlp", GAN_HEADS)  # mlp: a learned head on the bottleneck; channel_mean: SiDA's (no parameters)

    def __post_init__(self):
        super().__post_init__()
        if self.gan_form == "sida" and self.gan_features != "fake_score":
            raise ConfigError(f"config key 'objective.gan_form' is 'sida', whose discriminator is the fake score's own "
                              f"encoder, but 'objective.gan_features' is {self.gan_features!r}; allowed: gan_features fake_score")
        if self.gan_head == "channel_mean" and self.gan_features != "fake_score":
            raise ConfigError(f"config key 'objective.gan_head' is 'channel_mean', the mean of the fake score's own features, "
                              f"but 'objective.gan_features' is {self.gan_features!r}; allowed: gan_features fake_score")


def check_unit_range(value, key: str) -> None:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    if not ok or not 0.0 <= value[0] <= value[1] <= 1.0:
        raise ConfigError(f"config key {key!r} is {value!r}; allowed: [lo, hi] with 0 <= lo <= hi <= 1")


# -- time sampling ------------------------------------------------------------------------------------------
