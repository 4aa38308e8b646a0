"""ThinkRec model configuration: a causal LM's config plus the collaborative-filtering, projector,
slot-token, loss and expert-routing settings of the recommender around it."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


CF_MODEL_TYPES = ("none", "mf", "lightgcn", "sasrec")
SCORE_TYPES = ("yes_logit", "yes_no_log_odds")
# hard: the row's cluster expert; soft: softmax(cos / T) over the clusters; thinkrec: the published
# thresholds (one cluster when confident, the general expert when near-uniform, else the soft mix).
ROUTING_RULES = ("hard", "soft", "thinkrec")
DEFAULT_LORA_CONFIG = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
}


class ThinkRecConfig(PreTrainedConfig):
    r"""
    Configuration of [`ThinkRecForCausalLM`]: a causal LM (`text_config`) that reads prompts in which
    user/item id slots are replaced by projected collaborative-filtering (CF) vectors, and answers
    "Yes"/"No" (optionally followed by a reason).

    Args:
        text_config (`dict` or `PreTrainedConfig`): config of the wrapped causal LM (default: Llama).
        cf_model_type (`str`): source of the CF vectors: `"none"` (text only, no projector or tables),
            `"mf"`, `"lightgcn"` or `"sasrec"` (user vector = sequence encoder over the history).
        cf_embedding_dim (`int`): dimension `d` of the CF vectors (MF 256, LightGCN/SASRec 64);
            also the SASRec hidden size.
        num_users / num_items (`int`): CF table sizes *including* the padding row 0 (max id + 1).
        sasrec_num_blocks / sasrec_num_heads / sasrec_max_len / sasrec_dropout: SASRec encoder shape.
        projector_width_multiplier (`int`): projector is `Linear(d, m*d) -> act -> Linear(m*d, hidden*k)`.
        projector_hidden_act (`str`): activation between the projector's linear layers.
        tokens_per_id (`int`, alias `proj_token_num`): soft tokens `k` each id slot expands to.
        user_slot_token / item_slot_token (`str`): the dedicated special tokens marking id slots.
        user_slot_token_id / item_slot_token_id (`int`): their ids in the (resized) vocabulary.
        yes_token_id / no_token_id (`int`): ids of the answer tokens "Yes" and "No".
        reason_bce_weight / reason_lm_weight (`float`): loss weights of reasoning rows (0.1 / 0.9).
        rec_bce_weight / rec_lm_weight (`float`): loss weights of recommendation rows (0.9 / 0.1).
        score_type (`str`): `"yes_logit"` (raw logit of "Yes", the published score) or
            `"yes_no_log_odds"` (logit("Yes") - logit("No")).
        lora_config (`dict`, *optional*): LoRA adapter settings (`r`, `lora_alpha`, `lora_dropout`,
            `target_modules`) when the LM carries a LoRA adapter; `None` for none.
        num_experts (`int`): number of user-cluster LoRA experts G (0 = none); a general expert is
            added to them, so the adapted layers hold G + 1 experts.
        expert_layers (`list[int]`, *optional*): decoder layers whose LoRA becomes experts (the others keep
            the shared, frozen LoRA); `None` with experts = every layer.
        routing_rule (`str`): one of `ROUTING_RULES` ("hard", "soft", "thinkrec"), applied per row to
            the row's CF user vector at every forward.
        train_general_expert (`bool`): in training, every row also passes through the general expert
            alone (the batch is doubled), so the general expert sees every row.
        base_model_name_or_path (`str`, *optional*): Hub id or path of the frozen backbone. When set,
            `save_pretrained` writes only what the base does not hold (`thinkrec_weights.safetensors`:
            LoRA / experts, projector, CF tables, router, the added slot-token rows) and
            `from_pretrained` rebuilds the base from this reference.
        base_model_revision (`str`, *optional*): revision of that backbone on the Hub.
        base_vocab_size (`int`, *optional*): the backbone's vocabulary size before the slot tokens were added.
        routing_temperature (`float`): temperature of `softmax(cos(u, centroids) / T)` (0.1).
        routing_confidence_base / routing_confidence_scale (`float`): a single expert is used when
            `max w > base + scale / n` (0.5, 0.6).
        routing_entropy_fraction (`float`): the general expert is used when the routing entropy is at
            least this fraction of `ln n` (0.95).

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> config = ThinkRecConfig(
    ...     text_config=LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
    ...                             num_hidden_layers=2, num_attention_heads=2).to_dict(),
    ...     cf_model_type="mf", cf_embedding_dim=16, num_users=11, num_items=21,
    ...     user_slot_token_id=126, item_slot_token_id=127, yes_token_id=5, no_token_id=6)
    >>> config.projector_width_multiplier, config.proj_token_num
    (10, 1)
    ```
    """

    model_type = "thinkrec"
    attribute_map = {"proj_token_num": "tokens_per_id"}
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    cf_model_type: str = "none"
    cf_embedding_dim: int = 0
    num_users: int = 0
    num_items: int = 0
    sasrec_num_blocks: int = 2
    sasrec_num_heads: int = 1
    sasrec_max_len: int = 25
    sasrec_dropout: float = 0.2
    projector_width_multiplier: int = 10
    projector_hidden_act: str = "relu"
    tokens_per_id: int = 1
    user_slot_token: str = "<|user_slot|>"
    item_slot_token: str = "<|item_slot|>"
    user_slot_token_id: int | None = None
    item_slot_token_id: int | None = None
    yes_token_id: int | None = None
    no_token_id: int | None = None
    reason_bce_weight: float = 0.1
    reason_lm_weight: float = 0.9
    rec_bce_weight: float = 0.9
    rec_lm_weight: float = 0.1
    score_type: str = "yes_logit"
    lora_config: dict | None = None
    num_experts: int = 0
    expert_layers: list[int] | None = None
    routing_rule: str = "thinkrec"
    train_general_expert: bool = True
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    base_vocab_size: int | None = None
    cf_records_fingerprint: str | None = None
    cf_records_dir: str | None = None
    routing_temperature: float = 0.1
    routing_confidence_base: float = 0.5
    routing_confidence_scale: float = 0.6
    routing_entropy_fraction: float = 0.95
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The wrapped LM ties (or not) its own embeddings; mirror it so generic code reading the
        # top-level flag sees the LM's choice (same workaround as LLaVA).
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = self.text_config.tie_word_embeddings
        self._check_settings()

    def _check_settings(self):
        """Raise a `ValueError` naming the field, the expected and the found value."""
        if self.cf_model_type not in CF_MODEL_TYPES:
            raise ValueError(f"ThinkRecConfig.cf_model_type must be one of {CF_MODEL_TYPES}, got {self.cf_model_type!r}.")
        if self.score_type not in SCORE_TYPES:
            raise ValueError(f"ThinkRecConfig.score_type must be one of {SCORE_TYPES}, got {self.score_type!r}.")
        if self.cf_model_type != "none":
            # SASRec has no user table: its user vectors come from the sequence encoder.
            required = ("cf_embedding_dim", "num_items") if self.cf_model_type == "sasrec" else (
                "cf_embedding_dim", "num_users", "num_items")
            for name in required:
                value = getattr(self, name)
                if not isinstance(value, int) or value < (1 if name == "cf_embedding_dim" else 2):
                    raise ValueError(
                        f"ThinkRecConfig.{name} must be a positive table size (num_users/num_items include the "
                        f"padding row 0, so at least 2) when cf_model_type={self.cf_model_type!r}; got {value!r}. "
                        "Take it from the CF checkpoint (thinkrec.collaborative.models.load_cf_checkpoint) or metadata.json."
                    )
        if self.cf_model_type == "sasrec":
            for name in ("sasrec_num_blocks", "sasrec_num_heads", "sasrec_max_len"):
                if getattr(self, name) < 1:
                    raise ValueError(f"ThinkRecConfig.{name} must be >= 1 for SASRec, got {getattr(self, name)}.")
            if self.cf_embedding_dim % self.sasrec_num_heads:
                raise ValueError(
                    f"ThinkRecConfig.cf_embedding_dim ({self.cf_embedding_dim}) is the SASRec hidden size and must be "
                    f"divisible by sasrec_num_heads ({self.sasrec_num_heads})."
                )
        if self.projector_width_multiplier < 1:
            raise ValueError(f"ThinkRecConfig.projector_width_multiplier must be >= 1, got {self.projector_width_multiplier}.")
        if self.tokens_per_id < 1:
            raise ValueError(f"ThinkRecConfig.tokens_per_id (proj_token_num) must be >= 1, got {self.tokens_per_id}.")
        if self.user_slot_token == self.item_slot_token:
            raise ValueError(f"user_slot_token and item_slot_token must differ, both are {self.user_slot_token!r}.")
        vocab_size = getattr(self.text_config, "vocab_size", None)
        for name in ("user_slot_token_id", "item_slot_token_id", "yes_token_id", "no_token_id"):
            value = getattr(self, name)
            if value is not None and vocab_size is not None and not 0 <= value < vocab_size:
                raise ValueError(
                    f"ThinkRecConfig.{name}={value} is outside the LM vocabulary (0..{vocab_size - 1}); add the slot "
                    "tokens to the tokenizer and resize the embeddings (ThinkRecForCausalLM.from_language_model does both)."
                )
        if (
            self.user_slot_token_id is not None
            and self.user_slot_token_id == self.item_slot_token_id
        ):
            raise ValueError(f"user_slot_token_id and item_slot_token_id must differ, both are {self.user_slot_token_id}.")
        if self.yes_token_id is not None and self.yes_token_id == self.no_token_id:
            raise ValueError(f"yes_token_id and no_token_id must differ, both are {self.yes_token_id}.")
        for name in ("reason_bce_weight", "reason_lm_weight", "rec_bce_weight", "rec_lm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"ThinkRecConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.lora_config is not None:
            missing = set(DEFAULT_LORA_CONFIG) - set(self.lora_config)
            if missing:
                raise ValueError(
                    f"ThinkRecConfig.lora_config lacks {sorted(missing)}; expected keys {sorted(DEFAULT_LORA_CONFIG)}, "
                    f"found {sorted(self.lora_config)}."
                )
        if self.num_experts < 0:
            raise ValueError(f"ThinkRecConfig.num_experts must be >= 0, got {self.num_experts}.")
        if self.routing_rule not in ROUTING_RULES:
            raise ValueError(f"ThinkRecConfig.routing_rule must be one of {ROUTING_RULES}, got {self.routing_rule!r}.")
        if self.num_experts:
            if self.num_experts < 2:
                raise ValueError(f"ThinkRecConfig.num_experts must be 0 (none) or at least 2 clusters, got {self.num_experts}.")
            if self.lora_config is None:
                raise ValueError("ThinkRecConfig.num_experts > 0 needs lora_config: experts are LoRA adapters.")
            if self.cf_model_type == "none":
                raise ValueError(
                    "ThinkRecConfig.num_experts > 0 needs CF user vectors to route rows (cf_model_type is 'none')."
                )
        if self.routing_temperature <= 0:
            raise ValueError(f"ThinkRecConfig.routing_temperature must be > 0, got {self.routing_temperature}.")
        if not 0 < self.routing_entropy_fraction <= 1:
            raise ValueError(
                f"ThinkRecConfig.routing_entropy_fraction must be in (0, 1], got {self.routing_entropy_fraction}."
            )
        if self.num_experts > 1 and self.routing_confidence_base + self.routing_confidence_scale / self.num_experts >= 1:
            raise ValueError(
                "Expert routing would never pick a single expert: routing_confidence_base + "
                f"routing_confidence_scale / num_experts = {self.routing_confidence_base} + "
                f"{self.routing_confidence_scale}/{self.num_experts} >= 1."
            )


__all__ = ["ThinkRecConfig"]
