"""vog_ray: rank every example of an image dataset by Variance of Gradients, on Ray."""

from vog_ray.config import ScoreConfig
from vog_ray.stats import ClassStats, VogAccumulator, vog_from_gradients

__all__ = ["ClassStats", "ScoreConfig", "VogAccumulator", "score", "vog_from_gradients"]
__version__ = "0.1.0"


def score(config: ScoreConfig | None = None, **options):
    """Run one audit and return its summary; see :func:`vog_ray.driver.score`."""
    from vog_ray.driver import score as run_score

    return run_score(config, **options)
