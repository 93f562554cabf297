"""The three approaches the pipeline compares, defined once.

Params, training, evaluation and reporting all read this registry; ``dvc.yaml`` names the
same approaches in its ``train_<name>`` stages and its ``evaluate`` foreach list, and a test
checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Approach:
    """One way to train a classifier: its architecture, whether its body is frozen, and its names."""

    name: str
    arch: str
    display_name: str
    frozen_body: bool = False

    @property
    def section(self) -> str:
        """Its params section, which is also the name of its training stage in ``dvc.yaml``."""
        return f"train_{self.name}"


REGISTRY: dict[str, Approach] = {
    approach.name: approach
    for approach in (
        Approach("custom", "custom_cnn", "Custom CNN"),
        Approach("extract", "resnet18", "Feature extraction (ResNet-18)", frozen_body=True),
        Approach("finetune", "resnet18", "Fine-tuning (ResNet-18)"),
    )
}
APPROACHES = tuple(REGISTRY)
ENSEMBLE = "ensemble"
DISPLAY_NAMES = {**{name: a.display_name for name, a in REGISTRY.items()}, ENSEMBLE: "Soft-voting ensemble"}
"""What reports call each model, the ensemble of the three included."""
