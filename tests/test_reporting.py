"""Model cards a Hub user can act on, and training curves that only draw panels with data."""

import math
import os

import matplotlib.image
from huggingface_hub import ModelCard

from thinkrec.evaluation.reporting import model_card, plot_training_curves
from thinkrec.training.backbones import SMOLLM2_HUB_ID, hub_reference, smollm2_model_dir


def card_for(backbone, **kwargs):
    hub_id, note = hub_reference(str(backbone))
    settings = dict(repo_id="me/model", stage="lora", backbone=str(backbone), cf_model_type="none", records_source="ml-100k",
                    train_rows=10, metrics={"auc": 0.6}, cf_metrics=None, template="text_only", base_hub_id=hub_id,
                    backbone_note=note)
    return model_card(**{**settings, **kwargs})


def test_the_bundled_backbone_is_named_by_its_hub_id_not_a_local_path():
    bundled = smollm2_model_dir()
    card = card_for(bundled, score_type="yes_no_log_odds")
    assert card.data.base_model == SMOLLM2_HUB_ID
    assert str(bundled) not in str(card) and os.path.expanduser("~") not in str(card)
    assert "dequantised from the Q4_1 GGUF" in card.text
    assert 'logit("Yes") - logit("No")' in card.text


def test_a_local_backbone_gets_no_base_model_and_no_path(tmp_path):
    card = card_for(tmp_path, score_type="yes_logit")
    assert "base_model" not in card.data.to_dict() and str(tmp_path) not in str(card)
    assert 'the logit of "Yes"' in card.text
    assert card_for("meta-llama/Meta-Llama-3-8B").data.base_model == "meta-llama/Meta-Llama-3-8B"


def test_the_saved_card_loads_back_with_the_hub_metadata_and_the_test_metrics_as_eval_results(tmp_path):
    metrics = {"auc": 0.61, "uauc": 0.57, "ndcg@5": 0.42, "warm/auc": 0.63, "cold/auc": math.nan}
    card = card_for("meta-llama/Meta-Llama-3-8B", dataset_hub_id="me/ml-1m-thinkrec", metrics=metrics,
                    cf_metrics={"auc": 0.55})
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert (data.library_name, data.pipeline_tag, data.base_model) == ("transformers", "text-generation", "meta-llama/Meta-Llama-3-8B")
    assert data.datasets == ["me/ml-1m-thinkrec"] and "recommendation" in data.tags
    assert data.model_name == "me/model"
    found = {result.metric_type: result for result in data.eval_results}
    assert {name: result.metric_value for name, result in found.items()} == {"auc": 0.61, "uauc": 0.57, "ndcg@5": 0.42, "warm/auc": 0.63}
    assert {(result.dataset_type, result.dataset_name, result.dataset_split) for result in found.values()} == {
        ("me/ml-1m-thinkrec", "ml-100k", "test")}
    # The body keeps its table, NaN included as n/a, and the CF model's column.
    assert "| AUC | 0.6100 | 0.5500 |" in loaded.text and "| cold AUC | n/a | n/a |" in loaded.text


def test_a_card_without_metrics_has_no_model_index(tmp_path):
    card = card_for("meta-llama/Meta-Llama-3-8B", metrics={})
    card.save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.eval_results is None and "model-index" not in data.to_dict() and data.datasets is None


def test_training_curves_draw_only_the_panels_with_data(tmp_path):
    train_only = [{"step": 1, "loss": 0.7, "bce_loss": 0.6, "lm_loss": 0.9}, {"step": 2, "loss": 0.6}]
    with_eval = train_only + [{"step": 2, "eval_auc": 0.6, "eval_uauc": 0.55}]
    one = matplotlib.image.imread(plot_training_curves(train_only, tmp_path / "one.png"))
    two = matplotlib.image.imread(plot_training_curves(with_eval, tmp_path / "two.png"))
    assert one.shape[1] * 2 == two.shape[1]  # 5 inches per panel
    assert plot_training_curves([], tmp_path / "none.png") is None
