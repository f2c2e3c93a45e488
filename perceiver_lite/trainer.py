"""`Trainer` for PerceiverLite models: transformers' `Trainer`, with the model's Hub metadata in its model card."""

import os

from transformers import Trainer


class PerceiverLiteTrainer(Trainer):
    """`transformers.Trainer` whose model card (`create_model_card`, which `push_to_hub` runs before uploading) knows
    the model's task: transformers' training summary (datasets, evaluation results by task, hyperparameters), completed
    by `PerceiverLitePreTrainedModel.update_model_card` (`pipeline_tag`, the `perceiver` tags)."""

    def create_model_card(self, *args, **kwargs) -> None:
        model = self.accelerator.unwrap_model(self.model)
        kwargs.setdefault("tasks", model.pipeline_tag)  # transformers finds the task of its own models only
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            model.update_model_card(os.path.join(self.args.output_dir, "README.md"))
