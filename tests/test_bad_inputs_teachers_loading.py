"""Bad inputs of the teachers and of the one load path (issue #23, part 5): a teacher that cannot be
reached, or that gives no usable answer at all, stops extract_keywords.py and reflect.py with one line
naming the server, and nothing already there (the item table, an earlier reason file, the cache) is
replaced; a model path that does not exist, a safetensors file that is truncated, empty or a pickle in
disguise, and a checkpoint folder without its weights or its tokenizer are one line naming the file or
folder. Every case also checks that each input file is byte-identical afterwards and that no output,
whole or half-written, was left."""

import json
import os
import re
import shutil
import socket
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from _bad_inputs import assert_inputs_unchanged, assert_one_line_error, file_hashes, leftovers, run_main
from _run_fixtures import write_backbone, write_mf, write_records
from _scripted_server import ScriptedServer
from transformers import AutoModelForCausalLM, AutoTokenizer

import extract_keywords
import reflect
from modeling_thinkrec import TRAINED_WEIGHTS_NAME, ThinkRecForCausalLM
from thinkrec.collaborative.models import load_cf_checkpoint
from thinkrec.reasons import judge
from thinkrec.training import loading
from thinkrec.utils.errors import MissingInputError
from thinkrec.utils.files import LOCK_NAME, MANIFEST_NAME


SECRET = "sk-bad-inputs-0123456789"  # the API key: it must never appear in a message
KEY_VARIABLE = "THINKREC_BAD_INPUTS_API_KEY"
TEACHER = "teacher-model"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Records whose items already have keywords, a tiny backbone folder, a small-format ThinkRec
    checkpoint built on it, an earlier reason split written by reflect.py, and an MF checkpoint."""
    root = tmp_path_factory.mktemp("teachers_loading")
    write_records(root / "records")
    extract_keywords.main(["--records_dir", str(root / "records"), "--method", "tfidf"])
    backbone = write_backbone(root / "backbone")
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = ThinkRecForCausalLM.from_language_model(AutoModelForCausalLM.from_pretrained(backbone), tokenizer, None)
    model.add_lora()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    assert (root / "model" / TRAINED_WEIGHTS_NAME).is_file()
    reflect.main(["--model_dir", str(root / "model"), "--records_dir", str(root / "records"), "--max_train_samples", "16",
                  "--max_eval_samples", "12", "--output_path", str(root / "reasons" / "reasons.parquet")])
    write_mf(root / "mf", 17, 25)
    return root


@dataclass
class Case:
    """What a case runs (a command's main or a loading function, through run_command), the inputs that
    must stay byte-identical, and what the one error line must name."""

    run: Callable[[], object]
    inputs: list
    needles: tuple


class Context:
    def __init__(self, tmp_path: Path, assets: Path, stack: ExitStack):
        self.tmp, self.assets, self.stack = tmp_path, assets, stack

    def copy(self, name: str) -> Path:
        target = self.tmp / name
        shutil.copytree(self.assets / name, target)
        return target

    def server(self, answer) -> str:
        """The URL of a scripted server answering every request with `answer`."""
        return self.server_then(answer)

    def server_then(self, *answers) -> str:
        """The URL of a scripted server giving `answers` in turn, the last one to every later request."""
        return self.stack.enter_context(ScriptedServer({"Film": list(answers)})).url


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again on exit: nothing listens there
    return f"http://127.0.0.1:{port}/v1"


def write_cache(path: Path, model: str) -> Path:
    path.write_text(json.dumps({"ItemID": 1, "model": model, "text": "heist, crime"}) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- keyword teacher


def remote_keywords(ctx: Context, url: str, *flags: str, cached_model: str = TEACHER) -> Case:
    """extract_keywords.py --method remote --overwrite true over records that already have keywords, with
    a keyword cache from an earlier run (one entry that this run reuses)."""
    records = ctx.copy("records")
    cache = write_cache(ctx.tmp / "keywords.cache.jsonl", cached_model)
    argv = ["--records_dir", str(records), "--method", "remote", "--base_url", url, "--remote_model", TEACHER,
            "--overwrite", "true", "--cache_path", str(cache), "--api_key_env", KEY_VARIABLE, *flags]
    return Case(lambda: extract_keywords.main(argv), [records, cache], ("127.0.0.1",))


def keywords_server_down(ctx):
    case = remote_keywords(ctx, closed_port_url(), "--max_retries", "1")
    return Case(case.run, case.inputs, ("127.0.0.1", "unreachable", "refused"))


def keywords_5xx_on_every_try(ctx):
    case = remote_keywords(ctx, ctx.server(("status", 503)), "--max_retries", "1")
    return Case(case.run, case.inputs, ("127.0.0.1", "unreachable", "HTTP 503"))


def keywords_timeouts_after_the_retries(ctx):
    case = remote_keywords(ctx, ctx.server(("sleep", 1.5)), "--max_retries", "0", "--request_timeout", "0.2")
    return Case(case.run, case.inputs, ("127.0.0.1", "unreachable", "timed out"))


def keywords_unknown_model(ctx):
    case = remote_keywords(ctx, ctx.server(("status", 404)), "--max_retries", "0")
    return Case(case.run, case.inputs, ("127.0.0.1", "unreachable", "404", TEACHER))


def keywords_no_usable_answer(ctx):
    # The server answers, but never with a keyword (each row is counted as failed): 0 keywords in all is an error.
    case = remote_keywords(ctx, ctx.server(("ok", "???")), "--max_retries", "0", cached_model="an-earlier-teacher")
    records = case.inputs[0]
    return Case(case.run, case.inputs, (str(records), "no item got a keyword"))


def keywords_server_stops_answering(ctx):
    # The first request is answered, then every one fails: two waves (of one request) in a row are an outage.
    case = remote_keywords(ctx, ctx.server_then(("ok", "heist, crime"), ("status", 503)), "--max_retries", "0", "--concurrency", "1")
    return Case(case.run, case.inputs, ("127.0.0.1", "became unreachable", "2 requests in a row", "HTTP 503", "not sent"))


def keywords_url_without_scheme(ctx):
    case = remote_keywords(ctx, "localhost:8080/v1")
    return Case(case.run, case.inputs, ("base_url='localhost:8080/v1'", "http://"))


# ------------------------------------------------------------------------------- reason teacher


def remote_reasons(ctx: Context, url: str, *flags: str) -> Case:
    """reflect.py --source remote --overwrite true where an earlier reason split, its summary and a
    teacher cache already are."""
    reasons = ctx.copy("reasons")
    output = reasons / "reasons.parquet"
    (reasons / "reasons.cache.jsonl").write_text(
        json.dumps({"UserID": 10**6, "TargetItemID": 1, "model": TEACHER, "text": "Yes. An earlier answer."}) + "\n")
    argv = ["--model_dir", str(ctx.assets / "model"), "--records_dir", str(ctx.assets / "records"), "--output_path", str(output),
            "--overwrite", "true", "--max_train_samples", "16", "--max_eval_samples", "12", "--max_reasons", "4",
            "--source", "remote", "--base_url", url, "--remote_model", TEACHER, "--api_key_env", KEY_VARIABLE, *flags]
    return Case(lambda: reflect.main(argv), [reasons, ctx.assets / "records", ctx.assets / "model"], ("127.0.0.1",))


def reasons_server_down(ctx):
    case = remote_reasons(ctx, closed_port_url(), "--max_retries", "0", "--fallback_to_synthesised", "true")
    return Case(case.run, case.inputs, ("127.0.0.1", "unreachable", "refused"))


def reasons_unknown_model(ctx):
    case = remote_reasons(ctx, ctx.server(("status", 404)), "--max_retries", "0")
    return Case(case.run, case.inputs, ("127.0.0.1", "unreachable", "404", TEACHER))


def reasons_no_usable_answer(ctx):
    case = remote_reasons(ctx, ctx.server(("ok", "The user might like it.")), "--max_retries", "0")
    output = case.inputs[0] / "reasons.parquet"
    return Case(case.run, case.inputs, ("none of the", "usable reason", str(output)))


def reasons_server_stops_answering(ctx):
    # Its one answer is cached (the rerun resumes from it): the cache is the only file that may change.
    case = remote_reasons(ctx, ctx.server_then(("ok", "Yes. It fits."), ("status", 503)), "--max_retries", "0",
                          "--concurrency", "1")
    reasons = case.inputs[0]
    inputs = [path for path in reasons.iterdir() if path.name != "reasons.cache.jsonl"] + case.inputs[1:]
    return Case(case.run, inputs, ("127.0.0.1", "became unreachable", "HTTP 503", "reasons.cache.jsonl", "again"))


def reasons_url_without_scheme(ctx):
    case = remote_reasons(ctx, "localhost:8080/v1")
    return Case(case.run, case.inputs, ("base_url='localhost:8080/v1'", "http://"))


# ----------------------------------------------------------------------------------- model paths


def backbone_path_missing(ctx):
    path = str(ctx.tmp / "no-such-backbone")
    return Case(lambda: loading.load_language_model(path, "model_name_or_path"), [], ("model_name_or_path", f"no such folder {path}"))


def relative_backbone_path_missing_offline(ctx):
    # Shaped like a Hub id ("outputs/stage1"): with HF_HUB_OFFLINE=1 it is a folder that is not there.
    return Case(lambda: loading.load_language_model("outputs/stage1", "model_name_or_path"), [],
                ("model_name_or_path", "no such folder outputs/stage1", "HF_HUB_OFFLINE"))


def online(run: Callable[[], object]) -> Callable[[], object]:
    """`run` with HF_HUB_OFFLINE off (the case runner turns it on; it restores it afterwards)."""
    import huggingface_hub.constants

    def call():
        huggingface_hub.constants.HF_HUB_OFFLINE = False
        return run()
    return call


def relative_backbone_path_missing_online(ctx):
    # Without HF_HUB_OFFLINE, "outputs/stage1" is still a folder that is not there when outputs/ is a local folder.
    (ctx.tmp / "outputs").mkdir()
    return Case(online(lambda: loading.load_language_model("outputs/stage1", "model_name_or_path")), [],
                ("model_name_or_path", "no such folder outputs/stage1", "outputs/"))


def init_from_missing(ctx):
    path = str(ctx.tmp / "runs" / "stage1")
    return Case(lambda: loading.load_checkpoint(path, "init_from"), [], ("init_from", f"no such folder {path}"))


def teacher_model_missing(ctx):
    records = ctx.copy("records")
    path = str(ctx.tmp / "no-such-teacher")
    argv = ["--records_dir", str(records), "--method", "local", "--teacher_model", path, "--overwrite", "true"]
    return Case(lambda: extract_keywords.main(argv), [records], ("teacher_model", f"no such folder {path}"))


# ------------------------------------------------------------------------------ safetensors files


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


class Tripwire:
    """Unpickling this makes the folder `path`: proof that a file was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def pickled(path: Path) -> None:
    """A torch.save file renamed .safetensors, which would run code if it were unpickled."""
    torch.save({"weight": torch.zeros(2), "tripwire": Tripwire(str(path.parent.parent / "unpickled"))}, path)


def reflect_on(ctx: Context, model: Path) -> Case:
    output = ctx.tmp / "out" / "reasons.parquet"
    argv = ["--model_dir", str(model), "--records_dir", str(ctx.assets / "records"), "--output_path", str(output),
            "--max_train_samples", "16", "--max_eval_samples", "12"]
    return Case(lambda: reflect.main(argv), [model, ctx.assets / "records"], ())


def trained_weights(spoil):
    def case(ctx):
        model = ctx.copy("model")
        weights = model / TRAINED_WEIGHTS_NAME
        spoil(weights)
        return Case(reflect_on(ctx, model).run, [model, ctx.assets / "records"], (str(weights), "not a valid safetensors file"))
    return case


def backbone_weights_truncated(ctx):
    # The local keyword teacher's weights (a backbone's model.safetensors).
    records, backbone = ctx.copy("records"), ctx.copy("backbone")
    truncate(backbone / "model.safetensors")
    argv = ["--records_dir", str(records), "--method", "local", "--teacher_model", str(backbone), "--overwrite", "true"]
    return Case(lambda: extract_keywords.main(argv), [records, backbone],
                (str(backbone / "model.safetensors"), "not a valid safetensors file"))


def base_weights_empty(ctx):
    # init_from's small checkpoint rebuilds its base from another folder, whose weights are empty.
    backbone, model = ctx.copy("backbone"), ctx.copy("model")
    empty(backbone / "model.safetensors")
    return Case(lambda: loading.load_checkpoint(str(model), "init_from", base_model_name_or_path=str(backbone)), [backbone, model],
                (str(backbone / "model.safetensors"), "not a valid safetensors file"))


def cf_tables(spoil):
    def case(ctx):
        folder = ctx.copy("mf")
        spoil(folder / "model.safetensors")
        return Case(lambda: load_cf_checkpoint(str(folder)), [folder], (str(folder / "model.safetensors"), "not a valid safetensors file"))
    return case


# -------------------------------------------------------------------------- incomplete checkpoints


def checkpoint_without_weights(ctx):
    model = ctx.copy("model")
    (model / TRAINED_WEIGHTS_NAME).unlink()
    return Case(reflect_on(ctx, model).run, [model], (f"model_dir={model}", TRAINED_WEIGHTS_NAME))


def checkpoint_without_tokenizer(ctx):
    model = ctx.copy("model")
    for name in os.listdir(model):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.unlink(model / name)
    return Case(reflect_on(ctx, model).run, [model], (f"model_dir={model}", "tokenizer.json"))


def stopped_while_publishing(load):
    def case(ctx):
        # A run stopped between moving its first and its last final file in: the folder may mix two runs.
        model = ctx.copy("model")
        names = sorted(entry.name for entry in model.iterdir())
        (model / MANIFEST_NAME).write_text(json.dumps({"files": {name: "run_thinkrec" for name in names}, "state": "publishing"}))
        run = reflect_on(ctx, model).run if load == "reflect" else lambda: loading.load_checkpoint(str(model), "init_from")
        field = "model_dir" if load == "reflect" else "init_from"
        return Case(run, [model], (f"{field}={model}", "manifest state 'publishing'", "two runs", "again to finish it"))
    return case


CASES = [
    pytest.param(keywords_server_down, id="keywords-remote-connection-refused"),
    pytest.param(keywords_5xx_on_every_try, id="keywords-remote-http-503-on-every-try"),
    pytest.param(keywords_timeouts_after_the_retries, id="keywords-remote-timeouts"),
    pytest.param(keywords_unknown_model, id="keywords-remote-unknown-model-404"),
    pytest.param(keywords_no_usable_answer, id="keywords-remote-no-keyword-in-any-answer"),
    pytest.param(keywords_server_stops_answering, id="keywords-remote-stops-answering"),
    pytest.param(keywords_url_without_scheme, id="keywords-remote-base_url-without-scheme"),
    pytest.param(reasons_server_down, id="reflect-remote-connection-refused-even-with-fallback"),
    pytest.param(reasons_unknown_model, id="reflect-remote-unknown-model-404"),
    pytest.param(reasons_no_usable_answer, id="reflect-remote-no-usable-reason"),
    pytest.param(reasons_server_stops_answering, id="reflect-remote-stops-answering"),
    pytest.param(reasons_url_without_scheme, id="reflect-remote-base_url-without-scheme"),
    pytest.param(backbone_path_missing, id="model_name_or_path-no-such-folder"),
    pytest.param(relative_backbone_path_missing_offline, id="model_name_or_path-relative-no-such-folder-offline"),
    pytest.param(relative_backbone_path_missing_online, id="model_name_or_path-relative-no-such-folder-online"),
    pytest.param(init_from_missing, id="init_from-no-such-folder"),
    pytest.param(teacher_model_missing, id="teacher_model-no-such-folder"),
    pytest.param(trained_weights(truncate), id="thinkrec-weights-truncated"),
    pytest.param(trained_weights(empty), id="thinkrec-weights-empty"),
    pytest.param(trained_weights(pickled), id="thinkrec-weights-pickled-bin-renamed"),
    pytest.param(backbone_weights_truncated, id="teacher-backbone-model-safetensors-truncated"),
    pytest.param(base_weights_empty, id="init_from-base-model-safetensors-empty"),
    pytest.param(cf_tables(truncate), id="cf-checkpoint-tables-truncated"),
    pytest.param(cf_tables(pickled), id="cf-checkpoint-tables-pickled"),
    pytest.param(checkpoint_without_weights, id="checkpoint-folder-without-weights"),
    pytest.param(checkpoint_without_tokenizer, id="checkpoint-folder-without-tokenizer"),
    pytest.param(stopped_while_publishing("reflect"), id="checkpoint-folder-stopped-while-publishing-reflect"),
    pytest.param(stopped_while_publishing("init_from"), id="checkpoint-folder-stopped-while-publishing-init_from"),
]


@pytest.mark.parametrize("make_case", CASES)
def test_bad_teacher_or_model_input_is_one_line_and_changes_nothing(make_case, assets, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv(KEY_VARIABLE, SECRET)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with ExitStack() as stack:
        case = make_case(Context(tmp_path, assets, stack))
        watched = [tmp_path, assets]
        # The folder lock a command holds on the records it rewrites is the project's, not an input: it names the run.
        before = {path: digest for path, digest in file_hashes(case.inputs).items() if Path(path).name != LOCK_NAME}
        files_before = set(file_hashes(watched))
        outcome = run_main(lambda argv: case.run(), [], capsys)
    assert_one_line_error(outcome, *case.needles)
    assert SECRET not in outcome.stderr
    assert_inputs_unchanged(before)
    assert all(leftovers(folder) == [] for folder in watched)
    assert set(file_hashes(watched)) == files_before, "a new output file was written"
    assert not (tmp_path / "unpickled").exists(), "a weights file was unpickled"


def test_from_pretrained_alone_names_a_broken_weights_file(assets, tmp_path):
    """ThinkRecForCausalLM.from_pretrained is also a checkpoint's remote code, which cannot use the
    repository's load path: its own error names the file (safetensors' header error did not)."""
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    truncate(model / TRAINED_WEIGHTS_NAME)
    before = file_hashes([model])
    with pytest.raises(OSError, match=f"{model / TRAINED_WEIGHTS_NAME}: not a valid safetensors file"):
        ThinkRecForCausalLM.from_pretrained(str(model))
    assert_inputs_unchanged(before)


def test_a_hub_id_stays_a_hub_id_unless_it_is_shaped_like_a_local_path(tmp_path, monkeypatch):
    """Online, a missing path is 'no such folder' when it starts with '.', '/' or '~' or its first part is a local
    folder; otherwise it is a Hub id, left to from_pretrained."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "notes").write_text("a file, not a folder")
    assert loading.model_source("HuggingFaceTB/SmolLM2-135M", "model_name_or_path") == "HuggingFaceTB/SmolLM2-135M"
    assert loading.model_source("notes/model", "model_name_or_path") == "notes/model"
    for path in ("outputs/stage1", "./stage1", ".hidden/stage1", "/no/such/stage1", "~/no-such-stage1"):
        with pytest.raises(MissingInputError, match=f"model_name_or_path={re.escape(path)}: no such folder"):
            loading.model_source(path, "model_name_or_path")


# Files transformers' tokenizers ship alone (VOCAB_FILES_NAMES across its models), and pairs that go together.
TOKENIZERS_ALONE = [("tokenizer.json",), ("tokenizer.model",), ("spiece.model",), ("sentencepiece.bpe.model",), ("spm.model",),
                    ("tekken.json",), ("vocab.txt",), ("vocab.json", "merges.txt")]


@pytest.mark.parametrize("names", TOKENIZERS_ALONE, ids=["+".join(names) for names in TOKENIZERS_ALONE])
def test_a_folder_with_any_tokenizer_file_holds_a_tokenizer(names, tmp_path):
    for name in names:
        (tmp_path / name).write_text("{}")
    loading.check_tokenizer(tmp_path, "model_dir")


def test_a_bpe_vocabulary_without_its_merges_is_no_tokenizer(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(MissingInputError, match=rf"model_dir={re.escape(str(tmp_path))}: no tokenizer.*vocab.json without merges.txt"):
        loading.check_tokenizer(tmp_path, "model_dir")


def test_the_judge_encoder_loads_through_the_one_load_path(assets, monkeypatch):
    """The sentence encoder is an AutoModel loaded by load_language_model, with its checks (not a second copy of them)."""
    from transformers import AutoModel

    calls = []
    original = loading.load_language_model
    monkeypatch.setattr(loading, "load_language_model", lambda *args, **kwargs: calls.append((args, kwargs)) or original(*args, **kwargs))
    tokenizer, model = judge._encoder.__wrapped__(str(assets / "backbone"))
    assert calls == [((str(assets / "backbone"), "embedding_model"), {"model_class": AutoModel})]
    assert not hasattr(model, "lm_head") and not model.training and tokenizer is not None
