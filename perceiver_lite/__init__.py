"""perceiver-lite: the Perceiver (Jaegle et al., 2021) as a native transformers model.

Importing the package registers the config and models with transformers' Auto classes, so
`AutoModel.from_pretrained(folder)` works without `trust_remote_code`.
"""

import transformers

from .configuration_perceiver_lite import PerceiverLiteConfig
from .modeling_perceiver_lite import (
    AUTO_CLASSES,
    PerceiverBlock,
    PerceiverLayer,
    PerceiverLiteBlock,
    PerceiverLiteDecoder,
    PerceiverLiteCausalLMCache,
    PerceiverLiteSlidingCausalLMCache,
    PerceiverLiteDecoderOutput,
    PerceiverLiteForAudioClassification,
    PerceiverLiteForCausalLM,
    PerceiverLiteForDensePrediction,
    PerceiverLiteForImageClassification,
    PerceiverLiteForMaskedLM,
    PerceiverLiteForSequenceClassification,
    PerceiverLiteForTokenClassification,
    PerceiverLiteModel,
    PerceiverLitePreTrainedModel,
)

transformers.AutoConfig.register(PerceiverLiteConfig.model_type, PerceiverLiteConfig, exist_ok=True)
for _auto_class, _model_class in AUTO_CLASSES.items():
    getattr(transformers, _auto_class).register(PerceiverLiteConfig, _model_class, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "PerceiverBlock",
    "PerceiverLayer",
    "PerceiverLiteBlock",
    "PerceiverLiteConfig",
    "PerceiverLiteDecoder",
    "PerceiverLiteCausalLMCache",
    "PerceiverLiteSlidingCausalLMCache",
    "PerceiverLiteDecoderOutput",
    "PerceiverLiteForAudioClassification",
    "PerceiverLiteForCausalLM",
    "PerceiverLiteForDensePrediction",
    "PerceiverLiteForImageClassification",
    "PerceiverLiteForMaskedLM",
    "PerceiverLiteForSequenceClassification",
    "PerceiverLiteForTokenClassification",
    "PerceiverLiteModel",
    "PerceiverLitePreTrainedModel",
]
