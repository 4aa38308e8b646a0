"""ThinkRec: a causal LM that reads collaborative-filtering vectors as soft tokens at dedicated slot
tokens, scores "Yes"/"No" without generating, mixes recommendation and reasoning losses per row,
and generates reasons.

Two classes, LLaVA's shape in transformers 5: `ThinkRecModel` (the backbone: embed the prompt, inject
the projected CF vectors at the slot tokens, route rows to their LoRA experts, run the LM's decoder,
return `last_hidden_state`) and `ThinkRecForCausalLM` (`self.model` + the LM's output head + the mixed
losses and scoring). Trainers that run `model.base_model(...)` and project its hidden states with
`get_output_embeddings()` (trl's fused LM head) get the CF vectors and the routing too.

Checkpoint layout (`save_pretrained`): `config.json` (ThinkRecConfig with the LM's `text_config`,
`lora_config` and the reference to the frozen base, `base_model_name_or_path`),
`thinkrec_weights.safetensors` (what the base does not hold, named as in `ThinkRecModel`: LoRA or
experts, projector, frozen CF tables and SASRec encoder, router, and the embedding rows of the added
slot tokens — megabytes, not the backbone), `generation_config.json`, and the code files
(`configuration_thinkrec.py`, `modeling_thinkrec.py` and the files it imports) for `trust_remote_code`.
`from_pretrained` loads the base from its reference (any precision, 4-bit included) and applies the
saved parts. `save_pretrained(dir, full_weights=True)` writes one self-contained `model.safetensors`
instead (also what a model built around an in-memory LM, with no base reference, writes). A LoRA
adapter stays *unmerged* (PEFT's `base_layer` / `lora_A.default` names) and is rebuilt from
`config.lora_config`, so stage 2 can keep training the projector on top of the stage-1 adapter. Save
the `ThinkRecProcessor` (templates and the tokenizer with its slot tokens) into the same folder (Trainer
does this for its `processing_class`); `AutoProcessor.from_pretrained(dir, trust_remote_code=True)` loads it.
"""

import functools
import os
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import ModelOutput, cached_file, logging


# This file is imported two ways: as part of a checkpoint's remote code (a package made by
# transformers, where the files next to it are imported relatively) and as a top-level module of the
# repository. Only the second kind of failure falls back; a real import error inside a sibling file
# surfaces as itself. The processor is imported so that save_pretrained copies its file with the
# model's code (AutoProcessor loads it from there).
try:
    from .configuration_thinkrec import DEFAULT_LORA_CONFIG, ThinkRecConfig
    from .decoder_thinkrec import cache_argument_name, cache_kwargs, keep_positions, output_cache
    from .experts_thinkrec import ExpertLoraLinear, UserRouter, inject_experts
    from .prefix_thinkrec import PACKED_ROW_TOKENS, pack, plan_groups, sharing_problem, token_codes
    from .processing_thinkrec import ThinkRecProcessor  # noqa: F401
    from .sasrec_thinkrec import SASRec
    from .validation_thinkrec import IGNORE_INDEX, check_batch, prompt_length
except ImportError:
    if __package__:
        raise
    from configuration_thinkrec import DEFAULT_LORA_CONFIG, ThinkRecConfig
    from decoder_thinkrec import cache_argument_name, cache_kwargs, keep_positions, output_cache
    from experts_thinkrec import ExpertLoraLinear, UserRouter, inject_experts
    from prefix_thinkrec import PACKED_ROW_TOKENS, pack, plan_groups, sharing_problem, token_codes
    from processing_thinkrec import ThinkRecProcessor  # noqa: F401
    from sasrec_thinkrec import SASRec
    from validation_thinkrec import IGNORE_INDEX, check_batch, prompt_length


logger = logging.get_logger(__name__)

TRAINING_STAGES = ("lora", "projector", "joint", "experts")
MODE_REC = 0
MODE_REASON = 1
TRAINED_WEIGHTS_NAME = "thinkrec_weights.safetensors"
# Keys of the added slot-token rows in that file (the rest of the embedding matrices is the base's).
ADDED_INPUT_ROWS = "added_rows.input_embeddings"
ADDED_OUTPUT_ROWS = "added_rows.output_embeddings"
# from_pretrained arguments that go to the backbone's own from_pretrained.
_BASE_LOAD_KWARGS = ("dtype", "torch_dtype", "quantization_config", "device_map", "attn_implementation", "low_cpu_mem_usage",
                     "max_memory", "trust_remote_code")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


@dataclass
class ThinkRecOutput(ModelOutput):
    """
    Output of [`ThinkRecForCausalLM.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): batch mean of the per-row weighted losses.
        scores (`torch.FloatTensor` of shape `(batch_size,)`): per-row score logit at the last prompt
            position (raw "Yes" logit, or "Yes" - "No" log-odds); `sigmoid(scores)` is P(Yes).
        bce_loss (`torch.FloatTensor` of shape `(batch_size,)`): per-row BCE of the score (unweighted).
        lm_loss (`torch.FloatTensor` of shape `(batch_size,)`): per-row mean token cross-entropy of the
            answer, EOS included (unweighted).
        logits (`torch.FloatTensor`): without labels, the vocabulary logits of the kept positions
            (`logits_to_keep`, default the last: `(batch_size, 1, vocab_size)`, what generation reads);
            with labels, only with `return_logits=True` (every position).
        cache / past_key_values (`Cache`): the LM's key/value cache when `use_cache`, under the name the
            installed transformers uses (`cache` from 5.2x, `past_key_values` before).
        cf_scores (`torch.FloatTensor` of shape `(batch_size,)`): with `return_cf_scores=True`, the
            collaborative model's own score of each row (user vector · target item vector, float32).
        routing_weights (`torch.FloatTensor` of shape `(batch_size, num_experts + 1)`): for a model with
            experts, the weights each row was served with (last column: the general expert).
    """

    loss: torch.FloatTensor | None = None
    scores: torch.FloatTensor | None = None
    bce_loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    past_key_values: object | None = None
    cf_scores: torch.FloatTensor | None = None
    routing_weights: torch.FloatTensor | None = None


@dataclass
class ThinkRecModelOutput(ModelOutput):
    """
    Output of [`ThinkRecModel.forward`]: transformers' `BaseModelOutputWithPast`, plus the routing.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): the
            decoder's last hidden states, the CF vectors injected at the slot tokens.
        cache / past_key_values (`Cache`): the decoder's key/value cache when `use_cache`, under the name the
            installed transformers uses (`cache` from 5.2x, `past_key_values` before).
        hidden_states / attentions: the decoder's, when asked for (`output_hidden_states` / `output_attentions`).
        routing_weights (`torch.FloatTensor` of shape `(batch_size, num_experts + 1)`): for a model with
            experts, the weights each row was served with (last column: the general expert).
    """

    last_hidden_state: torch.FloatTensor | None = None
    # This order: transformers 5.2x maps an assignment to `past_key_values` onto `cache`.
    past_key_values: object | None = None
    cache: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    routing_weights: torch.FloatTensor | None = None


class ThinkRecProjector(nn.Module):
    """Maps a CF vector [n, d] to `tokens_per_id` soft tokens [n, tokens_per_id * hidden]; kept in float32."""

    def __init__(self, config: ThinkRecConfig):
        super().__init__()
        width = config.cf_embedding_dim * config.projector_width_multiplier
        out_features = config.text_config.hidden_size * config.tokens_per_id
        self.linear_1 = nn.Linear(config.cf_embedding_dim, width, dtype=torch.float32)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(width, out_features, dtype=torch.float32)

    def forward(self, cf_vectors: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linear_1(cf_vectors.to(self.linear_1.weight.dtype))
        hidden_states = self.act(hidden_states)
        return self.linear_2(hidden_states)


class ThinkRecPreTrainedModel(PreTrainedModel):
    config_class = ThinkRecConfig
    config: ThinkRecConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # The projector, the CF tables/encoder and LoRA are small and numerically sensitive: they stay
    # float32 when the LM is loaded in bf16/fp16.
    _keep_in_fp32_modules_strict = ["projector", "user_table", "item_table", "sequence_encoder", "lora_", "router"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class ThinkRecModel(ThinkRecPreTrainedModel):
    """
    The backbone: embeds the prompt, replaces every slot token (`input_ids == config.user_slot_token_id` /
    `item_slot_token_id`) by `projector(cf_vector)`, sets each row's expert mixture, runs the causal LM's
    decoder (`language_model.base_model`) and returns its last hidden states. Everything a checkpoint
    trains lives here (LoRA or experts inside `language_model`, projector, router) next to the frozen CF
    tables / SASRec encoder; the output head stays in `language_model` (`get_output_embeddings()`).
    """

    def __init__(self, config: ThinkRecConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            # A pretrained LM handed in must not be re-initialised by `post_init`.
            for module in language_model.modules():
                module._is_hf_initialized = True
        self.language_model = language_model
        # One config object for the LM, so resizing its vocabulary updates ours.
        self.config.text_config = language_model.config

        self.projector = None
        self.user_table = None
        self.item_table = None
        self.sequence_encoder = None
        if config.cf_model_type != "none":
            self.projector = ThinkRecProjector(config)
            self.item_table = nn.Embedding(config.num_items, config.cf_embedding_dim, dtype=torch.float32)
            if config.cf_model_type == "sasrec":
                self.sequence_encoder = SASRec(
                    config.num_items,
                    hidden_size=config.cf_embedding_dim,
                    num_blocks=config.sasrec_num_blocks,
                    num_heads=config.sasrec_num_heads,
                    max_len=config.sasrec_max_len,
                    dropout=config.sasrec_dropout,
                ).float()
            else:
                self.user_table = nn.Embedding(config.num_users, config.cf_embedding_dim, dtype=torch.float32)
        if config.lora_config is not None:
            self.inject_lora(config.lora_config)
        self.router = None
        self.routing_state = None
        if config.num_experts:
            self.inject_experts()
        self.post_init()
        self.freeze_collaborative_modules()

    # ------------------------------------------------------------------------------------ parts

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @property
    def has_experts(self) -> bool:
        return self.router is not None

    @staticmethod
    def is_base_weight(name: str) -> bool:
        """True for a weight of the frozen backbone (everything under the LM except its adapters)."""
        return name.startswith("language_model.") and "lora_" not in name

    def inject_lora(self, lora_config: dict) -> None:
        """Inject a float32 LoRA adapter (PEFT, unmerged) into the LM."""
        inject_adapter_in_model(LoraConfig(bias="none", **lora_config), self.language_model)
        for name, parameter in self.language_model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()

    def inject_experts(self) -> None:
        """Turn the LoRA of `config.expert_layers` into `config.num_experts` + 1 experts with their router."""
        config = self.config
        self.router = UserRouter(config.num_experts, config.cf_embedding_dim)
        self.routing_state = inject_experts(self.language_model, config.num_experts + 1, config.expert_layers)

    @torch.no_grad()
    def load_cf_tables(self, cf_checkpoint) -> None:
        """Copy the frozen user/item tables (and SASRec encoder) of a `CFCheckpoint` into the model."""
        config = self.config
        if cf_checkpoint.model_type != config.cf_model_type:
            raise ValueError(
                f"CF checkpoint is {cf_checkpoint.model_type!r} but the model was built for {config.cf_model_type!r}."
            )
        expected = (config.num_items, config.cf_embedding_dim)
        if tuple(cf_checkpoint.item_table.shape) != expected:
            raise ValueError(f"CF item_table: expected shape {expected}, found {tuple(cf_checkpoint.item_table.shape)}.")
        self.item_table.weight.copy_(cf_checkpoint.item_table)
        if config.cf_model_type == "sasrec":
            self.sequence_encoder.load_state_dict(cf_checkpoint.sequence_encoder.state_dict())
        else:
            expected = (config.num_users, config.cf_embedding_dim)
            if tuple(cf_checkpoint.user_table.shape) != expected:
                raise ValueError(
                    f"CF user_table: expected shape {expected}, found {tuple(cf_checkpoint.user_table.shape)}."
                )
            self.user_table.weight.copy_(cf_checkpoint.user_table)
        self.freeze_collaborative_modules()

    def freeze_collaborative_modules(self) -> None:
        for module in (self.user_table, self.item_table, self.sequence_encoder):
            if module is not None:
                module.requires_grad_(False)
        if self.sequence_encoder is not None:
            self.sequence_encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        # The CF encoder is frozen: its dropout must stay off while the LM trains.
        if self.sequence_encoder is not None:
            self.sequence_encoder.eval()
        return self

    # ------------------------------------------------------------------------- CF vectors

    def user_vectors(self, user_ids, history_item_ids) -> torch.Tensor:
        """Each row's CF user vector: its table row, or for SASRec the encoding of its liked history."""
        if self.config.cf_model_type == "sasrec":
            return self.sequence_encoder.encode(history_item_ids)
        return self.user_table(user_ids)

    def cf_scores(self, user_ids, history_item_ids, item_ids) -> torch.Tensor:
        """The CF model's own score of each row: user vector · target item vector, in float32."""
        return (self.user_vectors(user_ids, history_item_ids).float() * self.item_table(item_ids).float()).sum(-1)

    def route(self, user_ids=None, history_item_ids=None, check_inputs: bool = True) -> torch.Tensor:
        """Expert weights [B, G + 1] of each row (the last column is the general expert) under
        `config.routing_rule`, from the row's CF user vector."""
        if check_inputs:
            check_batch(self.config, self.router, user_ids=user_ids, history_item_ids=history_item_ids, routes=True)
        config = self.config
        return self.router(
            self.user_vectors(user_ids, history_item_ids),
            rule=config.routing_rule,
            temperature=config.routing_temperature,
            confidence_base=config.routing_confidence_base,
            confidence_scale=config.routing_confidence_scale,
            entropy_fraction=config.routing_entropy_fraction,
            check=False,
        )

    def embed_prompt(self, input_ids, user_slot_ids=None, item_slot_ids=None, history_item_ids=None,
                     check_inputs: bool = True) -> torch.Tensor:
        """Token embeddings of `input_ids` with every slot token replaced by its projected CF vector.

        `user_slot_ids` / `item_slot_ids`: [batch, max_slots] ids in order of appearance in each row,
        right-padded with 0 (ids are 1-based). For SASRec, a user slot takes the encoding of the row's
        `history_item_ids` ([batch, length], left-padded with 0) instead of a table row. No host sync
        beyond the checks: every slot id (padding included) is looked up and projected, present ones are
        moved first, and `masked_scatter` takes them in slot order.
        """
        if check_inputs:
            check_batch(self.config, input_ids=input_ids, user_slot_ids=user_slot_ids, item_slot_ids=item_slot_ids,
                        history_item_ids=history_item_ids)
        inputs_embeds = self.get_input_embeddings()(input_ids)
        config = self.config
        if config.cf_model_type == "none":
            return inputs_embeds
        if user_slot_ids is not None and user_slot_ids.shape[1]:
            if config.cf_model_type == "sasrec":
                # Every slot of a row holds that row's history encoding.
                vectors = self.sequence_encoder.encode(history_item_ids)[:, None].expand(-1, user_slot_ids.shape[1], -1)
            else:
                vectors = self.user_table(user_slot_ids)
            inputs_embeds = self._inject(inputs_embeds, input_ids == config.user_slot_token_id, user_slot_ids, vectors)
        if item_slot_ids is not None and item_slot_ids.shape[1]:
            inputs_embeds = self._inject(inputs_embeds, input_ids == config.item_slot_token_id, item_slot_ids,
                                         self.item_table(item_slot_ids))
        return inputs_embeds

    def _inject(self, inputs_embeds, slot_mask, slot_ids, vectors) -> torch.Tensor:
        """Replace the slot tokens (`slot_mask` [B, T]) by the projected vectors [B, S, d] of the non-zero
        `slot_ids` [B, S], in order of appearance (counts were checked by `check_batch`)."""
        present_first = torch.argsort((slot_ids == 0).flatten().to(torch.int8), stable=True)
        soft_tokens = self.projector(vectors.reshape(-1, vectors.shape[-1])[present_first])
        soft_tokens = soft_tokens.reshape(-1, inputs_embeds.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(slot_mask.unsqueeze(-1), soft_tokens)

    # ---------------------------------------------------------------------------------- forward

    @functools.cached_property
    def cache_name(self) -> str:
        """The key/value cache's argument name of the decoder (`cache` in transformers 5.2x)."""
        return cache_argument_name(self.language_model.base_model)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        user_slot_ids: torch.LongTensor | None = None,
        item_slot_ids: torch.LongTensor | None = None,
        history_item_ids: torch.LongTensor | None = None,
        user_ids: torch.LongTensor | None = None,
        routing_weights: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        use_cache: bool | None = None,
        check_inputs: bool = True,
        **kwargs,
    ) -> ThinkRecModelOutput:
        r"""
        input_ids / attention_mask: [B, T]; slot tokens are found in `input_ids` (left padding, prompt +
            completion concatenation and decode steps without slots all work).
        user_slot_ids / item_slot_ids / history_item_ids: CF ids, see [`~ThinkRecModel.embed_prompt`].
        user_ids: [B] CF user ids that route rows to experts (SASRec routes by `history_item_ids`).
        routing_weights: [B, G + 1] expert weights to use instead of routing by `user_ids`.
        position_ids: default, from the mask (left padding: positions count real tokens only).
        check_inputs: run `check_batch` on the CF inputs (one host sync); off when the caller checked them.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        routes = self.has_experts and routing_weights is None
        if check_inputs:
            check_batch(self.config, self.router, input_ids=input_ids, user_slot_ids=user_slot_ids,
                        item_slot_ids=item_slot_ids, history_item_ids=history_item_ids, user_ids=user_ids, routes=routes)
        if inputs_embeds is None:
            inputs_embeds = self.embed_prompt(input_ids, user_slot_ids, item_slot_ids, history_item_ids, check_inputs=False)
        cache = cache if cache is not None else past_key_values
        if attention_mask is None and cache is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None and attention_mask is not None and cache is None:
            # Left padding: positions count real tokens only, so a row's positions do not depend on
            # how much padding the other rows forced on it.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # With a cache and no mask (GenerationMixin drops an all-ones mask), the decoder builds both from
        # the cache: a mask made here would cover the new tokens only and hide the cached ones.
        if routes:
            routing_weights = self.route(user_ids, history_item_ids, check_inputs=False)
        if self.has_experts:
            self.routing_state.weights = routing_weights
        outputs = self.language_model.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                                 position_ids=position_ids,
                                                 **cache_kwargs(self.cache_name, cache, use_cache), **kwargs)
        return ThinkRecModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            routing_weights=routing_weights,
            # Under the one name this transformers release reads back into the next generation step.
            **{self.cache_name: output_cache(outputs)},
        )


class ThinkRecForCausalLM(ThinkRecPreTrainedModel, GenerationMixin):
    """
    A causal LM recommender: [`ThinkRecModel`] (`self.model`: prompt embedding, CF vectors at the slot
    tokens, expert routing, decoder) and the LM's output head, with the mixed recommendation / reasoning
    losses and scoring. The score is read at the last prompt position (prompts are left-padded, so it is
    the same column for every row).

    Build one from a pretrained LM with [`ThinkRecForCausalLM.from_language_model`]; reload with
    `from_pretrained` (or `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`).
    """

    # The loss is a per-row mean averaged over the batch, not a sum normalised by the number of items
    # in the accumulated batch, so Trainer must divide it by the accumulation steps itself.
    accepts_loss_kwargs = False
    prompt_length = staticmethod(prompt_length)

    def __init__(self, config: ThinkRecConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.model = ThinkRecModel(config, language_model)
        self.post_init()

    # The backbone's parts, where callers found them before the backbone was its own module (as LLaVA does).
    language_model = property(lambda self: self.model.language_model, doc="The wrapped causal LM (decoder and head).")
    projector = property(lambda self: self.model.projector)
    user_table = property(lambda self: self.model.user_table)
    item_table = property(lambda self: self.model.item_table)
    sequence_encoder = property(lambda self: self.model.sequence_encoder)
    router = property(lambda self: self.model.router)
    routing_state = property(lambda self: self.model.routing_state)

    # ----------------------------------------------------------------------------------------- build

    @classmethod
    def from_language_model(
        cls,
        language_model: PreTrainedModel,
        tokenizer,
        cf_checkpoint=None,
        generation_config: GenerationConfig | None = None,
        **config_kwargs,
    ) -> "ThinkRecForCausalLM":
        """Wrap a pretrained causal LM: add the slot tokens to `tokenizer` (in place), resize the LM's
        embeddings, copy the frozen CF tables of `cf_checkpoint` (a `thinkrec.collaborative.models.CFCheckpoint`,
        or None for a text-only model) and set an explicit generation config."""
        user_slot_token = config_kwargs.get("user_slot_token", ThinkRecConfig.user_slot_token)
        item_slot_token = config_kwargs.get("item_slot_token", ThinkRecConfig.item_slot_token)
        base_vocab_size = language_model.get_input_embeddings().num_embeddings
        base_reference = language_model.config._name_or_path or None
        user_slot_token_id, item_slot_token_id = add_slot_tokens(tokenizer, user_slot_token, item_slot_token)
        if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
            language_model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        yes_token_id = single_token_id(tokenizer, "Yes")
        no_token_id = single_token_id(tokenizer, "No")

        cf_kwargs = {"cf_model_type": "none"}
        if cf_checkpoint is not None:
            cf_kwargs = {
                "cf_model_type": cf_checkpoint.model_type,
                "cf_embedding_dim": int(cf_checkpoint.embedding_dim),
                "num_users": int(cf_checkpoint.num_users),
                "num_items": int(cf_checkpoint.num_items),
                # Which records the tables index (checked against the records a stage trains on).
                "cf_records_fingerprint": cf_checkpoint.config.get("records_fingerprint"),
                "cf_records_dir": cf_checkpoint.config.get("records_dir"),
            }
            if cf_checkpoint.model_type == "sasrec":
                encoder = cf_checkpoint.sequence_encoder
                cf_kwargs.update(
                    sasrec_num_blocks=encoder.num_blocks,
                    sasrec_num_heads=encoder.num_heads,
                    sasrec_max_len=encoder.max_len,
                    sasrec_dropout=encoder.dropout_rate,
                )
        config = ThinkRecConfig(
            text_config=language_model.config,
            # The config setter pushes its attention implementation down to `text_config`: keep the LM's.
            attn_implementation=language_model.config._attn_implementation,
            user_slot_token_id=user_slot_token_id,
            item_slot_token_id=item_slot_token_id,
            yes_token_id=yes_token_id,
            no_token_id=no_token_id,
            # An LM built in memory has no reference to rebuild it from: its checkpoints hold every weight.
            # (A caller re-wrapping an already wrapped LM passes the original reference in config_kwargs.)
            **{"base_model_name_or_path": base_reference, "base_vocab_size": base_vocab_size, **cf_kwargs, **config_kwargs},
        )
        model = cls(config, language_model=language_model)
        if cf_checkpoint is not None:
            model.load_cf_tables(cf_checkpoint)
        model.to(language_model.device)
        model.generation_config = generation_config or default_generation_config(tokenizer, config)
        return model

    def load_cf_tables(self, cf_checkpoint) -> None:
        """Copy the frozen user/item tables (and SASRec encoder) of a `CFCheckpoint` into the model."""
        self.model.load_cf_tables(cf_checkpoint)

    # ------------------------------------------------------------------------------ save and load

    def trained_state_dict(self, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
        """What a checkpoint holds beyond the base: adapters, projector, CF tables, router (named as in
        [`ThinkRecModel`], the layout every small checkpoint has had), and the embedding rows of the added
        tokens. `state_dict` (e.g. gathered by Trainer under ZeRO-3 / FSDP) defaults to this model's."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        prefix = self.base_model_prefix + "."
        trained = {name.removeprefix(prefix): tensor for name, tensor in state_dict.items()
                   if not ThinkRecModel.is_base_weight(name.removeprefix(prefix))}
        base_vocab = self.config.base_vocab_size
        input_name = next(n for n, p in self.named_parameters() if p is self.get_input_embeddings().weight)
        trained[ADDED_INPUT_ROWS] = state_dict[input_name][base_vocab:]
        output = self.get_output_embeddings()
        if output is not None and output.weight is not self.get_input_embeddings().weight:
            output_name = next(n for n, p in self.named_parameters() if p is output.weight)
            trained[ADDED_OUTPUT_ROWS] = state_dict[output_name][base_vocab:]
        return {name: tensor.detach().cpu().contiguous() for name, tensor in trained.items()}

    def save_pretrained(self, save_directory, *args, full_weights: bool = False, state_dict: dict | None = None,
                        is_main_process: bool = True, **kwargs):
        """Write the checkpoint. By default only what the base does not hold, next to the reference to the
        base (see the module docstring); `full_weights=True` writes every weight in one self-contained file."""
        if full_weights or not self.config.base_model_name_or_path or self.config.base_vocab_size is None:
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, is_main_process=is_main_process, **kwargs)
        unknown = set(kwargs) - {"safe_serialization", "max_shard_size", "save_peft_format"}
        if args or unknown:
            raise TypeError(f"save_pretrained of the small format takes no {sorted(unknown) or list(args)}; pass full_weights=True.")
        trained = self.trained_state_dict(state_dict)
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        if self._auto_class is not None:
            custom_object_save(self, save_directory, config=self.config)
        self.config.save_pretrained(save_directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)
        target = os.path.join(save_directory, TRAINED_WEIGHTS_NAME)
        temporary = target + ".tmp"
        save_file(trained, temporary, metadata={"format": "pt"})
        os.replace(temporary, target)
        # A full-weights file left by an earlier save would shadow the new weights for other loaders.
        stale = os.path.join(save_directory, "model.safetensors")
        if os.path.isfile(stale):
            os.unlink(stale)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a checkpoint. A small one (`thinkrec_weights.safetensors`) rebuilds the base from
        `config.base_model_name_or_path` (override it with `base_model_name_or_path=`) with the given
        `dtype` / `quantization_config` / `device_map` / `attn_implementation` (a 4-bit base is loaded
        4-bit again unless told otherwise), then applies the saved parts; a full one loads as usual (one
        saved before the backbone was `self.model`, with no `model.` prefix, too: transformers adds the
        base-model prefix a key lacks)."""
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        weights_file = cached_file(pretrained_model_name_or_path, TRAINED_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False,
                                   **hub_kwargs)
        if weights_file is None:
            kwargs.pop("base_model_name_or_path", None)
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        config = kwargs.pop("config", None)
        if not isinstance(config, ThinkRecConfig):
            config = ThinkRecConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        base = kwargs.pop("base_model_name_or_path", None) or config.base_model_name_or_path
        base_kwargs = {key: kwargs.pop(key) for key in _BASE_LOAD_KWARGS if key in kwargs}
        if "torch_dtype" in base_kwargs:
            base_kwargs["dtype"] = base_kwargs.pop("torch_dtype")
        saved_quantization = getattr(config.text_config, "quantization_config", None)
        if "quantization_config" not in base_kwargs and saved_quantization:
            from transformers import BitsAndBytesConfig

            base_kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(dict(saved_quantization))
        language_model = AutoModelForCausalLM.from_pretrained(base, revision=config.base_model_revision, **base_kwargs)
        found = language_model.get_input_embeddings().num_embeddings
        if found != config.base_vocab_size:
            raise ValueError(
                f"{pretrained_model_name_or_path} was trained on a base with {config.base_vocab_size} embedding rows, but {base} "
                f"has {found}: not the same backbone (pass base_model_name_or_path= to point at the right one)."
            )
        language_model.resize_token_embeddings(config.text_config.vocab_size, mean_resizing=False)
        model = cls(config, language_model=language_model)
        model.load_trained_weights(weights_file)
        try:
            model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except OSError:
            pass  # no generation_config.json: keep the default
        model.eval()
        return model

    @torch.no_grad()
    def load_trained_weights(self, path: str) -> None:
        """Apply a `thinkrec_weights.safetensors` file (or a folder holding one) to this model; the
        frozen base weights are left as they are. Every trained part of the model must be in the file."""
        if os.path.isdir(path):
            path = os.path.join(path, TRAINED_WEIGHTS_NAME)
        try:
            saved = load_file(path)
        except SafetensorError as error:
            # This file is also a checkpoint's remote code, without the repository: its own message names the file.
            # (The repository's commands check the folder first: thinkrec.training.loading.load_checkpoint.)
            raise OSError(f"{path}: not a valid safetensors file ({error}); truncated, empty or another format.") from None
        base_vocab = self.config.base_vocab_size
        for key, embeddings in ((ADDED_INPUT_ROWS, self.get_input_embeddings()), (ADDED_OUTPUT_ROWS, self.get_output_embeddings())):
            rows = saved.pop(key, None)
            if rows is not None:
                weight = embeddings.weight
                if weight.shape[0] != base_vocab + rows.shape[0]:
                    raise ValueError(f"{path}: {rows.shape[0]} added {key} rows do not fit a vocabulary of {weight.shape[0]} "
                                     f"(base {base_vocab}).")
                weight[base_vocab:] = rows.to(device=weight.device, dtype=weight.dtype)
        own = {name for name in self.model.state_dict() if not ThinkRecModel.is_base_weight(name)}
        missing, unexpected = sorted(own - set(saved)), sorted(set(saved) - own)
        if missing or unexpected:
            raise ValueError(f"{path} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                             f"({len(missing)} / {len(unexpected)} in all).")
        self.model.load_state_dict(saved, strict=False)
        self.model.freeze_collaborative_modules()
        device = self.get_input_embeddings().weight.device
        for module in (self.projector, self.user_table, self.item_table, self.sequence_encoder, self.router):
            if module is not None:
                module.to(device)

    # ------------------------------------------------------------------------------ LoRA and stages

    def add_lora(
        self,
        r: int = DEFAULT_LORA_CONFIG["r"],
        lora_alpha: int = DEFAULT_LORA_CONFIG["lora_alpha"],
        lora_dropout: float = DEFAULT_LORA_CONFIG["lora_dropout"],
        target_modules: list[str] | tuple[str, ...] = tuple(DEFAULT_LORA_CONFIG["target_modules"]),
    ) -> None:
        """Inject a float32 LoRA adapter into the wrapped LM and record its settings in the config."""
        if self.config.lora_config is not None:
            raise ValueError(f"The model already carries a LoRA adapter: {self.config.lora_config}.")
        lora_config = {
            "r": r,
            "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout,
            "target_modules": list(target_modules),
        }
        self.model.inject_lora(lora_config)
        self.config.lora_config = lora_config

    @property
    def has_lora(self) -> bool:
        return self.config.lora_config is not None

    @property
    def has_experts(self) -> bool:
        return self.model.has_experts

    def add_experts(
        self,
        scaler_mean,
        scaler_scale,
        centroids,
        expert_layers: list[int] | None = None,
        routing_rule: str | None = None,
    ) -> None:
        """Turn the LoRA of `expert_layers` (None = every layer) into G + 1 experts, each starting as a
        copy of that LoRA, and store the user scaler and the G standardised cluster centroids for
        routing (`thinkrec.experts.clusters.fit_user_clusters` fits them)."""
        if self.has_experts:
            raise ValueError(f"The model already has {self.config.num_experts} experts.")
        if not self.has_lora:
            raise ValueError("Experts start from a LoRA adapter but the model has none: start from a stage-1 or stage-2 folder.")
        if self.config.cf_model_type == "none":
            raise ValueError("Experts are routed by CF user vectors but the model has none: load a CF checkpoint first.")
        num_clusters = len(centroids)
        num_layers = self.config.text_config.num_hidden_layers
        if expert_layers is not None:
            bad = [index for index in expert_layers if not -num_layers <= index < num_layers]
            if bad:
                raise ValueError(f"expert_layers {bad} outside the LM's {num_layers} decoder layers.")
            expert_layers = sorted({index % num_layers for index in expert_layers})
        previous = (self.config.num_experts, self.config.expert_layers, self.config.routing_rule)
        self.config.num_experts = num_clusters
        self.config.expert_layers = expert_layers
        if routing_rule is not None:
            self.config.routing_rule = routing_rule
        try:
            self.config._check_settings()
            self.model.inject_experts()
        except ValueError:
            self.config.num_experts, self.config.expert_layers, self.config.routing_rule = previous
            raise
        self.router.set_clusters(scaler_mean, scaler_scale, centroids)
        self.router.to(self.device)

    def route(self, user_ids: torch.LongTensor | None = None, history_item_ids: torch.LongTensor | None = None) -> torch.Tensor:
        """Expert weights [B, G + 1] of each row (the last column is the general expert) under
        `config.routing_rule`, from the row's CF user vector (table row, or SASRec history encoding)."""
        if not self.has_experts:
            raise ValueError("The model has no experts to route to.")
        return self.model.route(user_ids, history_item_ids)

    def set_training_stage(self, stage: str, train_projector: bool = False) -> list[str]:
        """Make only the parameters of `stage` trainable: "lora" (LoRA only), "projector" (projector only),
        "joint" (both) or "experts" (the expert layers' LoRA; with `train_projector`, the projector
        too). The base LM, CF tables, SASRec encoder and router are always frozen. Returns the names
        of the trainable parameters."""
        if stage not in TRAINING_STAGES:
            raise ValueError(f"stage must be one of {TRAINING_STAGES}, got {stage!r}.")
        projector_prefix, lm_prefix = "model.projector.", "model.language_model."
        if stage == "experts":
            if not self.has_experts:
                raise ValueError("stage 'experts' trains the experts but the model has none; call add_experts() first.")
            if train_projector and self.projector is None:
                raise ValueError("train_projector=True but the model has no projector.")
            expert_modules = {name for name, module in self.named_modules() if isinstance(module, ExpertLoraLinear)}
            trainable = []
            for name, parameter in self.named_parameters():
                module_name = name.rpartition(".")[0]
                is_expert = module_name in expert_modules and name.rpartition(".")[2] in ("lora_A", "lora_B")
                parameter.requires_grad_(is_expert or (train_projector and name.startswith(projector_prefix)))
                if parameter.requires_grad:
                    trainable.append(name)
            return trainable
        if stage in ("lora", "joint") and not self.has_lora:
            raise ValueError(f"stage {stage!r} trains the LoRA adapter but the model has none; call add_lora() first.")
        if stage in ("projector", "joint") and self.projector is None:
            raise ValueError(f"stage {stage!r} trains the projector but cf_model_type='none' has no projector.")
        train_lora = stage in ("lora", "joint")
        train_projector = stage in ("projector", "joint")
        trainable = []
        for name, parameter in self.named_parameters():
            is_lora = name.startswith(lm_prefix) and "lora_" in name
            is_projector = name.startswith(projector_prefix)
            parameter.requires_grad_((is_lora and train_lora) or (is_projector and train_projector))
            if parameter.requires_grad:
                trainable.append(name)
        return trainable

    # ------------------------------------------------------------------------------- embeddings

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def embed_prompt(self, input_ids, user_slot_ids=None, item_slot_ids=None, history_item_ids=None) -> torch.Tensor:
        """Token embeddings with the slot tokens replaced by projected CF vectors ([`ThinkRecModel.embed_prompt`])."""
        return self.model.embed_prompt(input_ids, user_slot_ids, item_slot_ids, history_item_ids)

    # ---------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        mode: torch.LongTensor | None = None,
        target_labels: torch.Tensor | None = None,
        user_slot_ids: torch.LongTensor | None = None,
        item_slot_ids: torch.LongTensor | None = None,
        history_item_ids: torch.LongTensor | None = None,
        user_ids: torch.LongTensor | None = None,
        item_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        past_key_values=None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor | None = None,
        return_logits: bool = False,
        return_cf_scores: bool = False,
        shared_prefix: bool = False,
        **kwargs,
    ) -> ThinkRecOutput:
        r"""
        input_ids / attention_mask: left-padded prompts followed by right-padded answers ([B, T]).
        labels: answer token ids (EOS included), -100 on prompt and padding. With labels the score is
            read at the column before the first answer token, else at the last column.
        mode: [B] 0 = recommendation row, 1 = reasoning row (picks the row's loss weights).
        target_labels: [B] 1.0 liked / 0.0 not, the BCE target of the score.
        user_slot_ids / item_slot_ids / history_item_ids: CF ids, see [`~ThinkRecModel.embed_prompt`].
        user_ids / item_ids: CF ids of each row (metrics; `user_ids` also routes rows to experts).
        cache / past_key_values / use_cache: the LM's key/value cache, as `GenerationMixin` passes it.
        logits_to_keep: without labels, which positions get vocabulary logits (int: the last n; default 1).
        return_logits: also return the full vocabulary logits (memory heavy; off for training/eval).
        return_cf_scores: also return the CF model's own score of each row (needs `item_ids`, and
            `user_ids` or, for SASRec, `history_item_ids`); computed here so that it runs wherever the
            model's tables are (sharded under FSDP / ZeRO-3), not from tables read on one rank.
        shared_prefix: score only (no loss, no logits), encoding once the prompt tokens that rows share
            (a user's candidates): see prefix_thinkrec.py. Answers, if the batch has them, are cut off.
            Same scores as without it; backbones whose attention takes no 4-D mask score per row.
        """
        cache = cache if cache is not None else past_key_values
        self._check_arguments(input_ids, inputs_embeds, labels, mode, target_labels, item_ids, cache, return_cf_scores,
                              shared_prefix)
        if shared_prefix and labels is not None:  # scores only: the answers are cut off
            (input_ids, attention_mask), labels = self._prompts(input_ids, attention_mask, labels), None
        # Every per-row check (slots, id ranges, routing ids, label layout, padding side) in one host sync.
        item_ids = item_ids if return_cf_scores else None
        check_batch(self.config, self.router, input_ids, attention_mask, labels, user_slot_ids, item_slot_ids,
                    history_item_ids, user_ids, routes=self.has_experts, item_ids=item_ids)
        if shared_prefix and self._sharing_problem is None:
            return self._shared_prefix_output(input_ids, attention_mask, user_slot_ids, item_slot_ids, history_item_ids,
                                              user_ids, item_ids)

        cf_scores = self.model.cf_scores(user_ids, history_item_ids, item_ids) if return_cf_scores else None
        served_by = self.model.route(user_ids, history_item_ids, check_inputs=False) if self.has_experts else None
        inputs = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                  "position_ids": position_ids, "user_slot_ids": user_slot_ids, "item_slot_ids": item_slot_ids,
                  "history_item_ids": history_item_ids, "routing_weights": served_by}
        rows, targets = (input_ids if input_ids is not None else inputs_embeds).shape[0], (labels, mode, target_labels)
        if served_by is not None and labels is not None and self.training and self.config.train_general_expert:
            inputs, targets = self._with_general_expert_rows(inputs, targets)
        outputs = self.model(**inputs, cache=cache, use_cache=use_cache, check_inputs=False, **kwargs)

        if labels is None:
            logits = self._logits(outputs.last_hidden_state, 0 if return_logits else 1 if logits_to_keep is None else logits_to_keep)
            scores, loss, bce_loss, lm_loss = self._score_logits(logits[:, -1]), None, None, None
        else:
            logits, (scores, loss, bce_loss, lm_loss) = self._answer_logits_and_losses(outputs.last_hidden_state, *targets,
                                                                                      return_logits)
        return ThinkRecOutput(loss=loss, scores=scores[:rows], bce_loss=bce_loss, lm_loss=lm_loss, logits=logits,
                              cf_scores=cf_scores, routing_weights=served_by,
                              **{self._cache_name: getattr(outputs, self._cache_name)})

    def _check_arguments(self, input_ids, inputs_embeds, labels, mode, target_labels, item_ids, cache,
                         return_cf_scores, shared_prefix) -> None:
        """forward's checks of which arguments go together (no tensor is read)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if labels is not None and (mode is None or target_labels is None):
            raise ValueError("labels need `mode` (0 rec / 1 reason) and `target_labels` (0/1) for every row.")
        if return_cf_scores and (self.config.cf_model_type == "none" or item_ids is None):
            raise ValueError("return_cf_scores needs a model with CF tables and the rows' item_ids (target item CF ids).")
        if shared_prefix:
            if self.training and torch.is_grad_enabled():
                raise ValueError("shared_prefix scores rows; it computes no loss. Train without it.")
            if inputs_embeds is not None or cache is not None:
                raise ValueError("shared_prefix scores whole prompts from input_ids; it takes no inputs_embeds or cache.")

    def _prompts(self, input_ids, attention_mask, labels):
        """`input_ids` and `attention_mask` cut at the first answer column: (input_ids, attention_mask)."""
        prompt_end = self.prompt_length(labels)
        return input_ids[:, :prompt_end], attention_mask[:, :prompt_end] if attention_mask is not None else None

    @staticmethod
    def _with_general_expert_rows(inputs: dict, targets: tuple) -> tuple[dict, tuple]:
        """The batch twice, so that the general expert sees every row: once under the routing rule, once
        through the general expert alone."""
        routed = inputs["routing_weights"]
        general = torch.zeros_like(routed)
        general[:, -1] = 1.0
        doubled = {name: None if tensor is None else torch.cat([tensor, tensor]) for name, tensor in inputs.items()}
        doubled["routing_weights"] = torch.cat([routed, general])
        return doubled, tuple(torch.cat([tensor, tensor]) for tensor in targets)

    def _logits(self, hidden_states: torch.Tensor, keep) -> torch.Tensor:
        """Vocabulary logits of the kept positions (`keep` as transformers' `logits_to_keep`, see
        decoder_thinkrec.keep_positions), capped as the LM caps them (`final_logit_softcapping`)."""
        logits = self.get_output_embeddings()(keep_positions(hidden_states, keep))
        softcap = getattr(self.config.text_config, "final_logit_softcapping", None)
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    def _score_logits(self, position_logits: torch.Tensor) -> torch.Tensor:
        """Score logit per row from vocabulary logits [batch, vocab] at the last prompt position."""
        scores = position_logits[:, self.config.yes_token_id].float()
        if self.config.score_type == "yes_no_log_odds":
            scores = scores - position_logits[:, self.config.no_token_id].float()
        return scores

    def _answer_logits_and_losses(self, hidden_states, labels, mode, target_labels, return_logits):
        """(returned logits, (scores, loss, bce_loss, lm_loss)) of a batch with answers. Vocabulary logits are
        computed only where they are used: the positions that predict an answer token, the first of which
        in each row is the last prompt position, where the score is read (all of them with `return_logits`)."""
        shifted_labels = labels[:, 1:]
        answer_mask = shifted_labels != IGNORE_INDEX
        predicts_answer = F.pad(answer_mask, (0, 1), value=False)
        full_logits = self._logits(hidden_states, 0) if return_logits else None
        logits = full_logits[predicts_answer] if return_logits else self._logits(hidden_states, predicts_answer)
        # `logits` is [n_answer_tokens, vocab], rows in batch order; each row's first entry is its score position.
        batch_size = labels.shape[0]
        tokens_per_row = predicts_answer.sum(-1)
        row_of_token = torch.repeat_interleave(torch.arange(batch_size, device=logits.device), tokens_per_row,
                                               output_size=logits.shape[0])
        first_token = tokens_per_row.cumsum(0) - tokens_per_row
        scores = self._score_logits(logits[first_token])
        bce_loss = F.binary_cross_entropy_with_logits(scores, target_labels.float(), reduction="none")
        token_loss = F.cross_entropy(logits.float(), shifted_labels[answer_mask], reduction="none")
        lm_loss = torch.zeros(batch_size, dtype=token_loss.dtype, device=token_loss.device)
        lm_loss = lm_loss.index_add(0, row_of_token, token_loss) / tokens_per_row
        is_reason = mode == MODE_REASON
        config = self.config
        bce_weight = torch.where(is_reason, config.reason_bce_weight, config.rec_bce_weight)
        lm_weight = torch.where(is_reason, config.reason_lm_weight, config.rec_lm_weight)
        loss = (bce_weight * bce_loss + lm_weight * lm_loss).mean()
        return full_logits, (scores, loss, bce_loss, lm_loss)

    @property
    def _cache_name(self) -> str:
        return self.model.cache_name

    # Suffix tokens per packed row of shared-prefix scoring (see prefix_thinkrec.py).
    packed_row_tokens: int = PACKED_ROW_TOKENS

    @functools.cached_property
    def _sharing_problem(self) -> str | None:
        """Why this backbone scores per row even when asked to share prefixes (said once in the log)."""
        problem = sharing_problem(self.language_model.config)
        if problem is not None:
            logger.warning("shared-prefix scoring is off: %s; rows are scored one prompt each.", problem)
        return problem

    def _shared_prefix_output(self, input_ids, attention_mask, user_slot_ids, item_slot_ids, history_item_ids,
                              user_ids, item_ids) -> ThinkRecOutput:
        """Scores of left- or right-padded prompts from two backbone passes: the groups' shared prefixes
        into a cache, then every row's remaining tokens packed one row per group (prefix_thinkrec.py).
        Inputs were checked by forward."""
        config = self.config
        inputs_embeds = self.model.embed_prompt(input_ids, user_slot_ids, item_slot_ids, history_item_ids,
                                                check_inputs=False)
        codes, real_columns = token_codes(input_ids, attention_mask, [(config.user_slot_token_id, user_slot_ids),
                                                                      (config.item_slot_token_id, item_slot_ids)])
        sasrec = config.cf_model_type == "sasrec" and history_item_ids is not None
        histories = history_item_ids.tolist() if sasrec else None
        routing = self.model.route(user_ids, history_item_ids, check_inputs=False) if self.has_experts else None
        routes = routing.tolist() if routing is not None else None
        keys = [(tuple(histories[row]) if sasrec else None, tuple(routes[row]) if routes is not None else None)
                for row in range(len(codes))]
        packed = pack(inputs_embeds, real_columns, plan_groups(codes, keys), self.packed_row_tokens)
        prefix_routing = routing[packed.first_rows] if routing is not None else None
        prefix = self.model(inputs_embeds=packed.prefix_embeds, attention_mask=packed.prefix_mask,
                            position_ids=packed.prefix_positions, routing_weights=prefix_routing, use_cache=True,
                            check_inputs=False)
        cache = output_cache(prefix)
        cache.batch_select_indices(packed.chunk_groups)  # one cache row per packed row
        suffix = self.model(inputs_embeds=packed.suffix_embeds, attention_mask=packed.suffix_mask,
                            position_ids=packed.suffix_positions, cache=cache, use_cache=True, check_inputs=False,
                            routing_weights=prefix_routing[packed.chunk_groups] if routing is not None else None)
        logits = self._logits(suffix.last_hidden_state, packed.score_positions)
        scores = torch.empty(input_ids.shape[0], dtype=torch.float32, device=logits.device)
        scores[packed.score_rows] = self._score_logits(logits)
        cf_scores = self.model.cf_scores(user_ids, history_item_ids, item_ids) if item_ids is not None else None
        return ThinkRecOutput(scores=scores, cf_scores=cf_scores, routing_weights=routing)

    def prepare_inputs_for_generation(self, input_ids, *args, user_slot_ids=None, item_slot_ids=None, **kwargs):
        """GenerationMixin's inputs, with the CF slot ids on the first step only: later steps feed the
        new tokens alone (never slot tokens) and reuse the cache built from the injected prompt."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        # The slots are passed whenever the prompt itself is fed: the first step, or every step without a
        # cache (transformers 5.2x marks decode steps with `next_sequence_length`; earlier releases with
        # a `cache_position` that does not start at 0).
        cache_position = kwargs.get("cache_position")
        if cache_position is not None:
            feeds_prompt = int(cache_position[0]) == 0
        else:
            feeds_prompt = bool(kwargs.get("is_first_iteration")) or kwargs.get("next_sequence_length") is None
        if feeds_prompt:
            model_inputs["user_slot_ids"] = user_slot_ids
            model_inputs["item_slot_ids"] = item_slot_ids
        return model_inputs

    @torch.no_grad()
    def score(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        user_slot_ids: torch.LongTensor | None = None,
        item_slot_ids: torch.LongTensor | None = None,
        history_item_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        shared_prefix: bool = False,
        **batch_metadata,
    ) -> torch.Tensor:
        """P("Yes") per row [B] from one forward pass over the prompts only (answers, if the batch has
        them, are cut off at the first label column; no vocabulary logits are kept).
        `batch_metadata` takes the collator's other fields (mode, target_labels, user_ids, item_ids).
        `shared_prefix`: encode the prompt tokens rows share (a user's candidates) once; same scores."""
        unknown = set(batch_metadata) - {"mode", "target_labels", "user_ids", "item_ids"}
        if unknown:
            raise TypeError(f"score() got unexpected fields {sorted(unknown)}.")
        if labels is not None:
            prompt_end = self.prompt_length(labels)
            input_ids = input_ids[:, :prompt_end]
            attention_mask = attention_mask[:, :prompt_end] if attention_mask is not None else None
        # Scores are deterministic: LoRA/attention dropout is off even if called mid-training.
        was_training = self.training
        self.eval()
        outputs = self.forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            user_slot_ids=user_slot_ids,
            item_slot_ids=item_slot_ids,
            history_item_ids=history_item_ids,
            user_ids=batch_metadata.get("user_ids"),
            shared_prefix=shared_prefix,
        )
        self.train(was_training)
        return torch.sigmoid(outputs.scores)

    def recommend(self, processor, user, candidates, **kwargs):
        """The top-k of `candidates` for `user` ([`ThinkRecProcessor.recommend`], same arguments)."""
        return processor.recommend(self, user, candidates, **kwargs)



def add_slot_tokens(tokenizer, user_slot_token: str, item_slot_token: str) -> tuple[int, int]:
    """Add the user/item slot tokens as special tokens (idempotent); return their ids. They never
    reuse an existing token (unk/pad/eos), so a slot is found by its id alone."""
    existing = set(tokenizer.get_vocab())
    new_tokens = [token for token in (user_slot_token, item_slot_token) if token not in existing]
    if new_tokens:
        tokenizer.add_special_tokens({"extra_special_tokens": new_tokens}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids([user_slot_token, item_slot_token])
    reserved = {tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id} - {None}
    for token, token_id in zip((user_slot_token, item_slot_token), ids):
        if token_id in reserved:
            raise ValueError(f"slot token {token!r} maps to id {token_id}, which the tokenizer uses for unk/pad/eos/bos.")
        if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            raise ValueError(f"slot token {token!r} does not tokenize to the single id {token_id}.")
    return ids[0], ids[1]


def single_token_id(tokenizer, text: str) -> int:
    """Id of `text` when the tokenizer encodes it as exactly one token (the answer words "Yes"/"No")."""
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    if len(token_ids) != 1:
        raise ValueError(f"answer word {text!r} must be one token for scoring, found {len(token_ids)}: {token_ids}.")
    return token_ids[0]


def default_generation_config(tokenizer, config: ThinkRecConfig, max_new_tokens: int = 400) -> GenerationConfig:
    """Greedy decoding up to ~400 tokens (the length of published reasons), stopping at EOS and never
    emitting a slot token."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id,
        suppress_tokens=[config.user_slot_token_id, config.item_slot_token_id],
    )


ThinkRecConfig.register_for_auto_class()
ThinkRecForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register("thinkrec", ThinkRecConfig, exist_ok=True)
AutoModelForCausalLM.register(ThinkRecConfig, ThinkRecForCausalLM, exist_ok=True)


__all__ = [
    "ThinkRecForCausalLM",
    "ThinkRecModel",
    "ThinkRecModelOutput",
    "ThinkRecOutput",
    "ThinkRecPreTrainedModel",
    "ThinkRecProjector",
    "add_slot_tokens",
    "default_generation_config",
    "single_token_id",
]
