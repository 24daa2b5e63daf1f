"""BIVA (the paper's 10-stage configuration, see configs/cifar10_biva.py) on dequantised SVHN (TFDS
'svhn_cropped'), evaluated against CIFAR10.

Variants (``--config configs/svhn_biva.py:VARIANT``): ``paper`` (default), ``cpu``, ``tiny`` as in
configs/cifar10_biva.py.
Launch: ``python train.py --config configs/svhn_biva.py --workdir runs/svhn_biva``.
Cost: 2000 epochs x 572 steps = 1,144,000 steps (73,257 training images at batch 128); the paper trained BIVA
on SVHN too (bits/dim table) but gives no time for it (a week for CIFAR10 on a GTX 1080 Ti); for this
implementation see README.
"""

from configs import cifar10_biva, common


def get_config(variant: str = "paper"):
  config = common.use_svhn(cifar10_biva.get_config("paper"))
  return cifar10_biva.apply_biva_variant(config, variant)
