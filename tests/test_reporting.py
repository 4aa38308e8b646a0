"""Model cards a Hub user can act on, and training curves that only draw panels with data."""

import os

import matplotlib.image

from thinkrec.evaluation.reporting import model_card, plot_training_curves
from thinkrec.training.backbones import SMOLLM2_HUB_ID, hub_reference, smollm2_model_dir


def card_for(backbone, **kwargs):
    hub_id, note = hub_reference(str(backbone))
    return model_card(repo_id="me/model", stage="lora", backbone=str(backbone), cf_model_type="none", records_source="ml-100k",
                      train_rows=10, metrics={"auc": 0.6}, cf_metrics=None, template="text_only", base_hub_id=hub_id,
                      backbone_note=note, **kwargs)


def test_the_bundled_backbone_is_named_by_its_hub_id_not_a_local_path():
    bundled = smollm2_model_dir()
    card = card_for(bundled, score_type="yes_no_log_odds")
    front = card.split("---")[1]
    assert f'base_model: "{SMOLLM2_HUB_ID}"' in front
    assert str(bundled) not in card and os.path.expanduser("~") not in card
    assert "dequantised from the Q4_1 GGUF" in card
    assert 'logit("Yes") - logit("No")' in card


def test_a_local_backbone_gets_no_base_model_and_no_path(tmp_path):
    card = card_for(tmp_path, score_type="yes_logit")
    assert "base_model:" not in card.split("---")[1] and str(tmp_path) not in card
    assert 'the logit of "Yes"' in card
    assert card_for("meta-llama/Meta-Llama-3-8B").split("---")[1].count('base_model: "meta-llama/Meta-Llama-3-8B"') == 1


def test_training_curves_draw_only_the_panels_with_data(tmp_path):
    train_only = [{"step": 1, "loss": 0.7, "bce_loss": 0.6, "lm_loss": 0.9}, {"step": 2, "loss": 0.6}]
    with_eval = train_only + [{"step": 2, "eval_auc": 0.6, "eval_uauc": 0.55}]
    one = matplotlib.image.imread(plot_training_curves(train_only, tmp_path / "one.png"))
    two = matplotlib.image.imread(plot_training_curves(with_eval, tmp_path / "two.png"))
    assert one.shape[1] * 2 == two.shape[1]  # 5 inches per panel
    assert plot_training_curves([], tmp_path / "none.png") is None
