"""The paper's HVAE on dynamically binarised FashionMNIST.

Variants (``--config configs/fashion_mnist_hvae.py:VARIANT``):
* ``paper`` (default): 3 stages (conv 8 @ 14x14, dense 16, dense 8), 64 channels, Bernoulli likelihood,
  Adam 3e-4, batch 128, 1000 epochs, KL warm-up 200 epochs, free nats 2 (200 constant + 200 annealed).
  Launch: ``python train.py --config configs/fashion_mnist_hvae.py --workdir runs/fmnist``.
  Cost: 468 steps per epoch (60,000 // 128, the rest of each epoch dropped), 468,000 steps; about 2 days on a
  GTX 1080 Ti for the reference; see benchmarks/README.md for ours.
* ``cpu``: the paper's latents at half width (32 channels, 756,962 parameters), batch 64, with a 30-minute
  wall-clock training budget on 2 CPU cores: 2,121-2,250 steps (2.3-2.4 epochs) on the 2-core AVX2 test machine
  (configs/common.py).
  Launch: ``python train.py --config configs/fashion_mnist_hvae.py:cpu --workdir runs/fmnist_cpu``.
* ``tiny``: a small model for tests and CI; trains in well under a minute on a CPU.
"""

from configs import common


def get_config(variant: str = "paper"):
  config = common.base_config()
  config.data.name = "fashion_mnist"
  config.data.preprocessing = "binarize"
  config.eval.ood_datasets = ("mnist",)
  m = config.model
  m.kernels = (5, 3, 3)
  m.channels = ((64, 64, 64),) * 3
  m.strides = ((1, 1, 2), (1, 1, 2), (1, 1, 1))
  m.latent_types = ("conv", "dense", "dense")
  m.latent_dims = (8, 16, 8)
  m.likelihood = "bernoulli"
  config.schedule.epochs = 1000
  return common.apply_variant(config, variant)
