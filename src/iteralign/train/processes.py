"""The one Accelerator set-up every reference and train job uses (1 or N processes, CPU or GPU).

Run plainly (``iteralign train ...``) it is a single process; under ``accelerate
launch`` (``iteralign.launch.launcher``) the process group, FSDP or DDP, and the
mixed precision come from the launch and its config file (configs/accelerate/).
"""

from __future__ import annotations


def make_accelerator(training: dict):
    """An Accelerator on the GPUs when training.gpus > 0 and CUDA is present, else on CPU.

    Mixed precision (training.mixed_precision) applies on GPU only: CPU runs float32.
    """
    from accelerate import Accelerator

    from iteralign.modeling import default_device

    use_cpu = default_device(use_gpu=training["gpus"] > 0).type == "cpu"
    return Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else training["mixed_precision"])
