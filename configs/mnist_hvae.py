"""The paper's HVAE on dynamically binarised MNIST, evaluated against FashionMNIST: the model and schedule of
configs/fashion_mnist_hvae.py with the datasets swapped, as the published code does for MNIST models.

Variants (``--config configs/mnist_hvae.py:VARIANT``):
* ``paper`` (default): 3 stages (conv 8 @ 14x14, dense 16, dense 8), 64 channels, Bernoulli likelihood,
  Adam 3e-4, batch 128, 1000 epochs, KL warm-up 200 epochs, free nats 2 (200 constant + 200 annealed).
  Launch: ``python train.py --config configs/mnist_hvae.py --workdir runs/mnist``.
  Cost: 1000 epochs x 468 steps = 468,000 steps, as the FashionMNIST model; see benchmarks/README.md.
* ``cpu``: the paper's latents at half width (32 channels) with a 30-minute wall-clock training budget on 2 CPU
  cores (configs/common.py).
  Launch: ``python train.py --config configs/mnist_hvae.py:cpu --workdir runs/mnist_cpu``.
* ``tiny``: a small model for tests and CI.
"""

from configs import common, fashion_mnist_hvae


def get_config(variant: str = "paper"):
  config = fashion_mnist_hvae.get_config("paper")
  config.data.name = "mnist"
  config.eval.ood_datasets = ("fashion_mnist",)
  return common.apply_variant(config, variant)
