"""diffusers' ``UnCLIPScheduler`` settings <-> unclip's :class:`~unclip.config.DiffusionConfig`.

Karlo samples every stage with ``UnCLIPScheduler``; unclip's ``karlo`` sampler
(:mod:`unclip.diffusion.karlo`) takes the same steps from a ``DiffusionConfig``:

=======================  ====================================================
UnCLIPScheduler          DiffusionConfig
=======================  ====================================================
num_train_timesteps      timesteps
beta_schedule            schedule: ``squaredcos_cap_v2`` is ``cosine``
variance_type            learn_sigma: ``learned_range`` true (the decoder),
                         ``fixed_small_log`` false (prior, super-resolution)
prediction_type          prediction: ``epsilon`` eps, ``sample`` x0 (the prior)
clip_sample              clip_denoised
clip_sample_range        clip_range (5 for Karlo's prior)
=======================  ====================================================
"""

from __future__ import annotations

from typing import Any

from unclip.config import ConfigError, DiffusionConfig

SCHEDULER_CLASS = "UnCLIPScheduler"
_PREDICTIONS = {"epsilon": "eps", "sample": "x0"}
_VARIANCES = {"fixed_small_log": False, "learned_range": True}
_KEYS = {
    "num_train_timesteps", "variance_type", "clip_sample", "clip_sample_range",
    "prediction_type", "beta_schedule",
}  # fmt: skip


def diffusion_from_scheduler(doc: dict[str, Any], where: str) -> DiffusionConfig:
    """The :class:`DiffusionConfig` of a scheduler_config.json (``where`` names it in errors);
    any other scheduler class, an unknown option or an unsupported value is a ConfigError
    naming the field."""
    cls = doc.get("_class_name")
    if cls != SCHEDULER_CLASS:
        raise ConfigError(
            f"{where}: scheduler {cls!r} is not supported (unclip runs {SCHEDULER_CLASS})"
        )
    for key in doc:
        if not key.startswith("_") and key not in _KEYS:
            raise ConfigError(f"{where}: unknown {SCHEDULER_CLASS} option {key!r}")

    def pick(key: str, table: dict[str, Any], default: str) -> Any:
        value = doc.get(key, default)
        if value not in table:
            raise ConfigError(f"{where}: {key}={value!r} is not supported ({', '.join(table)})")
        return table[value]

    schedule = pick("beta_schedule", {"squaredcos_cap_v2": "cosine"}, "squaredcos_cap_v2")
    clip_range = doc.get("clip_sample_range", 1.0)
    timesteps = doc.get("num_train_timesteps", 1000)
    if not isinstance(timesteps, int) or timesteps < 2:
        raise ConfigError(f"{where}: num_train_timesteps={timesteps!r} must be an integer >= 2")
    if not isinstance(clip_range, (int, float)) or not clip_range > 0:
        raise ConfigError(f"{where}: clip_sample_range={clip_range!r} must be positive")
    return DiffusionConfig(
        schedule=schedule,
        timesteps=timesteps,
        prediction=pick("prediction_type", _PREDICTIONS, "epsilon"),
        learn_sigma=pick("variance_type", _VARIANCES, "fixed_small_log"),
        clip_denoised=bool(doc.get("clip_sample", True)),
        clip_range=float(clip_range),
    )


def scheduler_from_diffusion(cfg: DiffusionConfig, where: str = "diffusion.json") -> dict[str, Any]:
    """The ``UnCLIPScheduler`` scheduler_config.json of a :class:`DiffusionConfig` (the
    inverse of :func:`diffusion_from_scheduler`); a setting it cannot express is an error."""
    if cfg.schedule != "cosine":
        raise ConfigError(
            f"{where}: UnCLIPScheduler has the cosine schedule only, not {cfg.schedule!r}"
        )
    if cfg.dynamic_threshold:
        raise ConfigError(f"{where}: UnCLIPScheduler has no dynamic thresholding")
    prediction = {v: k for k, v in _PREDICTIONS.items()}.get(cfg.prediction)
    if prediction is None:
        raise ConfigError(
            f"{where}: UnCLIPScheduler predicts epsilon or sample, not {cfg.prediction!r}"
        )
    return {
        "_class_name": SCHEDULER_CLASS,
        "num_train_timesteps": cfg.timesteps,
        "variance_type": "learned_range" if cfg.learn_sigma else "fixed_small_log",
        "clip_sample": cfg.clip_denoised,
        "clip_sample_range": cfg.clip_range,
        "prediction_type": prediction,
        "beta_schedule": "squaredcos_cap_v2",
    }
