"""The paper's HVAE on dequantised CIFAR10.

Variants (``--config configs/cifar10_hvae.py:VARIANT``):
* ``paper`` (default): 3 stages (conv 128 @ 16x16, conv 64 @ 8x8, dense 32), 256 channels, discretised
  logistic mixture (10 components), Adam 3e-4, batch 128, 2000 epochs, KL warm-up 200, free nats 2.
  Launch: ``python train.py --config configs/cifar10_hvae.py --workdir runs/cifar10``.
  Cost: 390 steps per epoch (50,000 // 128), 780,000 steps; about 2 days on a GTX 1080 Ti for the reference.
* ``tiny``: a small model for tests and CI.
"""

from configs import common


def get_config(variant: str = "paper"):
  config = common.base_config()
  config.data.name = "cifar10"
  config.data.preprocessing = "dequantize"
  config.eval.ood_datasets = ("svhn_cropped",)
  m = config.model
  m.kernels = (5, 3, 3)
  m.channels = ((256, 256, 256),) * 3
  m.strides = ((1, 1, 2), (1, 1, 2), (1, 1, 2))
  m.latent_types = ("conv", "conv", "dense")
  m.latent_dims = (128, 64, 32)
  m.likelihood = "dlm"
  m.nr_mix = 10
  config.schedule.epochs = 2000
  return common.apply_variant(config, variant)
