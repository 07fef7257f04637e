"""Where calibration and perplexity read their text: a local file with --data (offline), else a Hugging Face dataset
(the defaults: C4 to calibrate, WikiText-2 to evaluate), and a clear error naming both when neither is reachable.
No network here: the hub is switched off and the cache is an empty folder."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from model import ModelArgs, Transformer

TEXT = "The quick brown fox jumps over the lazy dog. " * 200  # about 2000 tokens


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached dataset to fall back on
    # the libraries read the variables when first imported, which another test may have done already
    import datasets.config
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def tiny_checkpoint(tmp_path, default_checkpoint):
    """A converted checkpoint of a tiny random model with the default model's tokenizer."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    args = ModelArgs(name="tiny", vocab_size=49152, n_layer=2, n_head=4, n_local_heads=2, dim=32, intermediate_size=64,
                     block_size=512)
    torch.manual_seed(0)
    model = Transformer(args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "model_config.json").write_text(args.to_json())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_checkpoint / name, folder / name)
    return folder


def test_calibrate_reads_a_local_file_offline(tiny_checkpoint, tmp_path, offline):
    from thresholds.calibrate import main
    from thresholds.file import ThresholdFile
    data, out = tmp_path / "text.txt", tmp_path / "tiny.safetensors"
    data.write_text(TEXT)
    main(["--checkpoint_path", str(tiny_checkpoint), "--data", str(data), "--out", str(out), "--tokens", "512",
          "--seq_len", "256", "--no_greedy", "--held_targets"])
    tf = ThresholdFile.load(out, ModelArgs.load(tiny_checkpoint / "model_config.json"))
    assert tf.provenance["data"] == str(data) and tf.provenance["tokens"] == 512


def test_perplexity_reads_a_local_file_offline(tiny_checkpoint, tmp_path, offline):
    from benchmark.perplexity import main
    data, out = tmp_path / "text.txt", tmp_path / "ppl.json"
    data.write_text(TEXT)
    main(["--checkpoint_path", str(tiny_checkpoint), "--data", str(data), "--methods", "dense", "--windows", "2",
          "--window", "64", "--prompt", "32", "--out", str(out)])
    result = json.loads(out.read_text())
    # a random model over a 49152-token vocabulary: perplexity near the vocabulary size, finite
    assert result["data"] == str(data) and 1e3 < result["rows"][0]["ppl"] < 1e6


@pytest.mark.parametrize("module, dataset", [("thresholds.calibrate", "allenai/c4:en:train"),
                                             ("benchmark.perplexity", "Salesforce/wikitext:wikitext-2-raw-v1:test")])
def test_default_dataset_unreachable_names_both_sources(module, dataset, tiny_checkpoint, tmp_path, offline):
    import importlib
    main = importlib.import_module(module).main
    argv = ["--checkpoint_path", str(tiny_checkpoint), "--out", str(tmp_path / "out")]
    argv += ["--methods", "dense"] if module == "benchmark.perplexity" else []
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value)
    assert dataset in message and "--data FILE" in message and "--dataset" in message, message
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:  # a --data file that is not there
        main(argv + ["--data", str(tmp_path / "missing.txt")])
    assert "missing.txt" in str(e.value) and "--dataset" in str(e.value)
