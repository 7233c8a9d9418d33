"""torch.hub entry points for the training application's model zoo, so that frameworks which
load models through torch.hub (torchdistill's ``repo_or_dir``) can build them from a checkout:

    torch.hub.load("/path/to/icd_fast", "resnet32x4", source="local", num_classes=100,
                   checkpoint="resnet32x4_vanilla/ckpt_epoch_240.pth")

``checkpoint`` is read by the application's safe loader (``train.checkpoints``: a
``weights_only`` load that knows this application's, the CRD benchmark's, mdistiller's and
bare state-dict files); ``trust_checkpoint=True`` is the ``--trust-checkpoint`` of the
command line. Give teachers' weights this way rather than through torchdistill's
``src_ckpt``, which unpickles the file with ``weights_only=False``.
"""
dependencies = ["torch", "torchvision"]

from train.checkpoints import load_model_weights  # noqa: E402
from train.models import CIFAR_MODELS, IMAGENET_MODELS, build_model  # noqa: E402


def _entry(name: str):
    def build(num_classes: int = 100, in_channels: int = 3, checkpoint=None,
              trust_checkpoint: bool = False):
        model = build_model(name, num_classes, in_channels)
        if checkpoint is not None:
            load_model_weights(model, checkpoint, trust_checkpoint, name)
        return model

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"The zoo's {name} (train.models.build_model), with the weights of "
                     f"`checkpoint` when given.")
    return build


globals().update({name: _entry(name) for name in (*CIFAR_MODELS, *IMAGENET_MODELS)})
