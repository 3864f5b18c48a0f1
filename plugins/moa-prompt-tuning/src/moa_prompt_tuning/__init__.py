"""moa-prompt-tuning: prompt tuning (``PROMPT_TUNING``) and prefix tuning (``PREFIX_TUNING``) for moa.

Both are input-level adapters: prompt tuning puts learned virtual token embeddings before a
row's tokens, prefix tuning puts learned keys and values before them in every layer's
attention. Rows with different ones (or LoRA adapters, or none) share a batch.

Example::

    from moa_prompt_tuning import PrefixTuningConfig, PromptTuningConfig

    model.add_adapter("polite", PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                                   prompt_tuning_init_text="Answer politely:"))
    model.add_adapter("terse", PrefixTuningConfig(num_virtual_tokens=4))
    out = model(input_ids, adapter_names=["polite", "terse", None])
"""

from moa_prompt_tuning.prefix_tuning import PrefixTuningAdapter, PrefixTuningConfig
from moa_prompt_tuning.prompt_tuning import PromptTuningAdapter, PromptTuningConfig

__version__ = "0.1.0"

__all__ = ["PrefixTuningAdapter", "PrefixTuningConfig", "PromptTuningAdapter", "PromptTuningConfig", "__version__"]
