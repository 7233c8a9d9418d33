"""Runs a short ICD+KD distillation with train.engine.fit, as one process or under torchrun,
and saves rank 0's history and final student weights to argv[1].

The models have no batch norm: with batch norm, each rank normalises by its own half batch,
which genuinely differs from one process normalising the whole batch.
"""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train import distributed, engine  # noqa: E402
from train.data.digits import NUM_CLASSES, digits_datasets, stratified_subset  # noqa: E402
from train.data.labels import dataset_labels  # noqa: E402
from train.distillers import build_distiller  # noqa: E402


def small_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(),
                         nn.Linear(width, NUM_CLASSES))


def main(out: str, method: str, batch_size: int = 32) -> None:
    device = distributed.init_from_env("cpu")
    torch.use_deterministic_algorithms(True)
    train, test = digits_datasets(image_size=8)
    train, test = stratified_subset(train, 0.1, 0), stratified_subset(test, 0.2, 0)
    # Each rank draws other initial weights (and CRD banks): fit must start them all from
    # rank 0's, as the single process (seed 0) does.
    torch.manual_seed(distributed.rank())
    teacher, student = small_net(16), small_net(8)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    options = {"num_negatives": 64} if method == "crd" else {}  # K = 16384 would be slow
    distiller = build_distiller(method, student, teacher, num_samples=len(train),
                                labels=dataset_labels(train), **options).to(device)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    config = engine.LoopSettings(epochs=4, batch_size=batch_size, seed=5,
                                out_dir=Path(out) / "run")
    history = engine.fit(distiller, train, test, optimizer, None, config)
    if method == "crd":  # every rank's memory banks, to compare
        torch.save({"memory_s": distiller.memory_s, "memory_t": distiller.memory_t,
                    "rows": history.rows}, Path(out) / f"banks{distributed.rank()}.pt")
    elif distributed.is_main():
        torch.save({"rows": history.rows, "student": distiller.student.state_dict(),
                    "initial": initial, "log_scale": distiller.criterion.log_scale.detach().clone()},
                   Path(out) / "result.pt")
    distributed.shutdown()
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
