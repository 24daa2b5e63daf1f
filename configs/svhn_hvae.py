"""The paper's HVAE on dequantised SVHN (TFDS 'svhn_cropped'), evaluated against CIFAR10: the model and
schedule of configs/cifar10_hvae.py with the datasets swapped, as the published code does for SVHN models.

Variants (``--config configs/svhn_hvae.py:VARIANT``):
* ``paper`` (default): 3 stages (conv 128 @ 16x16, conv 64 @ 8x8, dense 32), 256 channels, discretised logistic
  mixture, Adam 3e-4, batch 128, 2000 epochs, KL warm-up 200, free nats 2.
  Launch: ``python train.py --config configs/svhn_hvae.py --workdir runs/svhn``.
  Cost: 2000 epochs x 572 steps = 1,144,000 steps (73,257 training images at batch 128).
* ``cpu``: the paper's latents at half width (128 channels) with the 30-minute CPU budget of configs/common.py.
* ``tiny``: a small model for tests and CI.
"""

from configs import cifar10_hvae, common


def get_config(variant: str = "paper"):
  config = common.use_svhn(cifar10_hvae.get_config("paper"))
  return common.apply_variant(config, variant)
