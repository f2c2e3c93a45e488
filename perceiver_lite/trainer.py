"""`Trainer` for PerceiverLite models: transformers' `Trainer`, with the model's Hub metadata in its model card, and a
warning where FSDP was asked for but accelerate does not shard."""

import os
import warnings

from transformers import Trainer


class PerceiverLiteTrainer(Trainer):
    """`transformers.Trainer` whose model card (`create_model_card`, which `push_to_hub` runs before uploading) knows
    the model's task: transformers' training summary (datasets, evaluation results by task, hyperparameters), completed
    by `PerceiverLitePreTrainedModel.update_model_card` (`pipeline_tag`, the `perceiver` tags).

    Asked for FSDP (`fsdp=...`, or `accelerate launch --use_fsdp`) where accelerate does not shard (on the CPU its
    several processes are `MULTI_CPU`, which accelerate runs as DDP, whatever the FSDP plugin), it warns: the run is
    data-parallel, each process holding the whole model and optimizer state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        asked = self.args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if asked and not self.is_fsdp_enabled and not self.is_fsdp_xla_enabled:
            warnings.warn(
                f"FSDP was asked for, but accelerate runs this as {self.accelerator.distributed_type}, which it never "
                "shards (its FSDP needs accelerator processes): each process holds the whole model and optimizer "
                "state, data-parallel (DDP) across processes on the CPU. To shard on the CPU, apply "
                "`torch.distributed.fsdp.fully_shard` to each PerceiverLiteLayer and to the model, and launch with "
                "torchrun (see the README).",
                stacklevel=2,
            )

    def create_model_card(self, *args, **kwargs) -> None:
        model = self.accelerator.unwrap_model(self.model)
        kwargs.setdefault("tasks", model.pipeline_tag)  # transformers finds the task of its own models only
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            model.update_model_card(os.path.join(self.args.output_dir, "README.md"))
