"""What a run leaves for people to read: ROC and training-curve plots, the verdict of generated
text, and the model card pushed with the model."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from thinkrec.utils.subsets import metric_cell


VERDICT_PATTERN = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def verdict_of(text: str) -> Optional[int]:
    """1 for an answer that starts with "Yes", 0 for "No", None when it starts with neither."""
    match = VERDICT_PATTERN.match(text or "")
    if match is None:
        return None
    return 1 if match.group(1).lower() == "yes" else 0


LEADING_VERDICT = re.compile(r"^\W*(yes|no)\b[\s.,:;!\-\u2013\u2014]*", re.IGNORECASE)


def reason_body(text: str) -> str:
    """The explanation of an answer: the text after its leading "Yes"/"No" and punctuation ("" if none)."""
    match = LEADING_VERDICT.match(text or "")
    return (text or "")[match.end():].strip() if match else (text or "").strip()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: os.PathLike | str) -> Path:
    """One ROC curve per named scorer (labels, scores) in one PNG; the legend carries each AUC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 5))
    for name, (labels, scores) in curves.items():
        false_positive, true_positive, _ = roc_curve(labels, scores)
        axes.plot(false_positive, true_positive, label=f"{name} (AUC {roc_auc_score(labels, scores):.4f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_training_curves(log_history: list[dict], path: os.PathLike | str) -> Optional[Path]:
    """Training loss (and its BCE / LM parts) and the validation metrics against the step."""
    train = [entry for entry in log_history if "loss" in entry]
    evals = [entry for entry in log_history if "eval_auc" in entry]
    if not train and not evals:
        return None
    plt = _pyplot()
    # One panel per kind of data present: no empty validation panel when no evaluation ran.
    panels = int(bool(train)) + int(bool(evals))
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    left = axes.pop(0) if train else None
    right = axes.pop(0) if evals else None
    for key in ("loss", "bce_loss", "lm_loss") if train else ():
        points = [(entry["step"], entry[key]) for entry in train if key in entry]
        if points:
            left.plot(*zip(*points), label=key)
    if left is not None:
        left.set_xlabel("step")
        left.set_title("training loss")
        if left.get_legend_handles_labels()[0]:
            left.legend()
    for key in ("eval_auc", "eval_uauc", "eval_ndcg_at_5") if evals else ():
        points = [(entry["step"], entry[key]) for entry in evals if key in entry and not math.isnan(entry[key])]
        if points:
            right.plot(*zip(*points), marker="o", label=key.removeprefix("eval_"))
    if right is not None:
        right.set_xlabel("step")
        right.set_title("validation")
        if right.get_legend_handles_labels()[0]:
            right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


CARD_METRICS = (("AUC", "auc"), ("UAUC", "uauc"), ("NDCG@5", "ndcg@5"), ("warm AUC", "warm/auc"), ("cold AUC", "cold/auc"))


def eval_results(metrics: dict[str, float], dataset_id: str, dataset_name: str) -> list[EvalResult]:
    """The card's test metrics as the Hub's `model-index` entries: one per metric with a value (a missing
    or NaN one, e.g. the AUC of a single-class cold split, is left out)."""
    return [
        EvalResult(task_type="text-classification", task_name="Recommendation (Yes/No click-through prediction)",
                   dataset_type=dataset_id, dataset_name=dataset_name, dataset_split="test",
                   metric_type=key, metric_name=f"test {label}", metric_value=float(metrics[key]))
        for label, key in CARD_METRICS
        if metrics.get(key) is not None and math.isfinite(metrics[key])
    ]


def model_card(
    repo_id: Optional[str],
    stage: str,
    backbone: str,
    cf_model_type: str,
    records_source: str,
    train_rows: int,
    metrics: dict[str, float],
    cf_metrics: Optional[dict[str, float]],
    template: str,
    reason_template: Optional[str] = None,
    score_type: str = "yes_logit",
    base_hub_id: Optional[str] = None,
    backbone_note: str = "",
    num_experts: int = 0,
    dataset_hub_id: Optional[str] = None,
) -> ModelCard:
    """Model card (README.md) stating data, stages, metrics and how to load the model; its metadata is
    `huggingface_hub`'s `ModelCardData` (test metrics as `eval_results`), saved with `card.save(path)`."""
    name = repo_id or "path/to/this/folder"
    header = "| metric | this model |" + (f" {cf_model_type} alone |" if cf_metrics else "")
    lines = [header, "|---|---|" + ("---|" if cf_metrics else "")]
    for label, key in CARD_METRICS:
        cells = f"| {label} | {metric_cell(metrics.get(key))} |"
        if cf_metrics:
            cells += f" {metric_cell(cf_metrics.get(key))} |"
        lines.append(cells)
    table = "\n".join(lines)
    results = eval_results(metrics, dataset_hub_id or records_source, records_source)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["recommendation", "thinkrec", "lora", "custom_code"],
        base_model=base_hub_id,
        datasets=[dataset_hub_id] if dataset_hub_id else None,
        model_name=(repo_id or f"thinkrec-{stage}") if results else None,  # the model-index needs a name
        eval_results=results or None,
    )
    score_text = 'logit("Yes") - logit("No")' if score_type == "yes_no_log_odds" else 'the logit of "Yes"'
    reason_text = f"; reasons are asked for with `{reason_template}`" if reason_template else ""
    body = f"""
# ThinkRec recommender ({stage} stage)

A causal LM recommender trained with the ThinkRec repository: it reads a prompt about a user
(liked titles{", plus " + cf_model_type + " collaborative vectors injected as soft tokens" if cf_model_type != "none" else ""})
and a target item, and answers "Yes"/"No" (optionally with a reason). The score is {score_text}
at the last prompt position.

- Backbone: `{base_hub_id or "a local backbone folder"}` (frozen){" — " + backbone_note if backbone_note else ""}. The checkpoint holds
  only what the backbone does not (`thinkrec_weights.safetensors`: the LoRA adapter{f" as {num_experts} user-cluster experts plus a general one" if num_experts else ""},
  the projector, the CF tables and the slot-token embedding rows); loading rebuilds the backbone from
  `base_model_name_or_path` in `config.json`.
- Collaborative model: `{cf_model_type}` (frozen tables saved with the model).
- Training stage: `{stage}`; prompt template: `{template}`{reason_text}.
- Data: `{records_source}`, {train_rows:,} training rows.

## Test metrics

{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoProcessor

processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
record = {{"UserID": 4, "HisItemIDs": [10, 3], "HisItemTitles": ["...", "..."], "TargetItemID": 5, "TargetItemTitle": "..."}}
p_yes = model.score(**processor(record)).item()          # P("Yes"), one forward pass
prompt = processor(record, mode="reason")                  # the prompt that asks for the reason
answer = model.generate(**prompt, max_new_tokens=128)[0, prompt["input_ids"].shape[1]:]
print(processor.decode(answer, skip_special_tokens=True))
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
