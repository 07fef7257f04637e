"""lm-evaluation-harness on the default model, dense and sparse: a local multiple-choice task and a local generation
task run through lm_eval, checked against the same scores computed here from the model's log-probabilities and its
decode loop; decode-faithful scoring checked against one-token decode steps."""
import json

import pytest
import torch

import lm_eval
from lm_eval.tasks import TaskManager

from benchmark.downstream import TealFastLM
from generate import generate

MC = [  # question, choices, answer
    ("The capital of France is", [" Paris", " Berlin", " Madrid"], 0),
    ("The opposite of hot is", [" loud", " cold"], 1),
    ("Two plus two equals", [" four", " seven", " nine"], 0),
]
GEN = [("Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of Germany?\nA:", " Berlin"),
       ("Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of Spain?\nA:", " Madrid")]


def write_tasks(folder):
    (folder / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                             for q, c, a in MC))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in GEN))
    for name, body in (("teal_mc", """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""), ("teal_gen", """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
""")):
        data = "mc.jsonl" if name == "teal_mc" else "gen.jsonl"
        (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / data}
test_split: test
{body}""")


def direct_logprob(model, ctx, cont):
    """log p(cont | ctx) from the model's logits: the context as one dense forward, then each continuation token
    as its own decode step (one token, through the sparse layers' single-token path)."""
    model.setup_caches(1, len(ctx) + len(cont))
    with torch.no_grad():
        logits = [model(torch.tensor([ctx]), torch.arange(len(ctx)))[0, -1]]
        for i, tok in enumerate(cont[:-1]):
            logits.append(model(torch.tensor([[tok]]), torch.tensor([len(ctx) + i]))[0, -1])
    logp = torch.log_softmax(torch.stack(logits).double(), -1)
    return float(logp.gather(1, torch.tensor(cont)[:, None]).sum())


@pytest.mark.parametrize("sparsity,mode", [(0.0, "uniform"), (0.5, "greedy")])
def test_harness_scores_match_the_models_own(tmp_path, default_checkpoint, monkeypatch, sparsity, mode):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    write_tasks(tmp_path)
    lm = TealFastLM(default_checkpoint, sparsity, mode, max_length=256)
    res = lm_eval.simple_evaluate(model=lm, tasks=["teal_mc", "teal_gen"], task_manager=TaskManager(
        include_path=str(tmp_path), include_defaults=False), log_samples=True, bootstrap_iters=0)

    model, tok = lm.model, lm.tokenizer
    correct, samples = 0, {s["doc_id"]: s for s in res["samples"]["teal_mc"]}
    for d, (q, choices, answer) in enumerate(MC):
        ctx = tok.encode(q)
        scores = [direct_logprob(model, ctx, tok.encode(q + c)[len(ctx):]) for c in choices]
        harness = [float(r[0][0]) for r in samples[d]["resps"]]
        # The adapter scores the continuation in one masked forward, decode steps one token at a time: the two round
        # differently (about 1e-6), which now and then moves an activation across its threshold and a score by about
        # 1e-2 nats; a wrong mask, position or context moves it by whole nats.
        assert harness == pytest.approx(scores, abs=5e-2)
        correct += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    assert res["results"]["teal_mc"]["acc,none"] == pytest.approx(correct / len(MC))

    matches, samples = 0, {s["doc_id"]: s for s in res["samples"]["teal_gen"]}
    for d, (prompt, target) in enumerate(GEN):
        ids = tok.encode(prompt)
        seq = generate(model, torch.tensor(ids, dtype=torch.int), 3, stop_ids=tok.stop_ids, temperature=0)
        text = tok.decode([t for t in seq[0, len(ids):].tolist() if t not in tok.stop_ids])
        text = text.split("\n")[0].split(".")[0]
        assert text and samples[d]["resps"][0][0] == text
        matches += int(text == target)
    assert res["results"]["teal_gen"]["exact_match,none"] == pytest.approx(matches / len(GEN))
    if sparsity == 0:  # the dense model knows these: the accuracy compared above is not zero by accident
        assert correct == len(MC)


def test_rolling_loglikelihood_covers_every_token_once_decode_faithfully(default_checkpoint):
    from lm_eval.api.instance import Instance
    # CATS here, TEAL through the harness above. In float64: the harness scores a window in one masked forward, the
    # reference below token by token, and on the CPU the two add their products in different orders; in float32 a
    # last-bit difference can move an activation across its threshold, in float64 that is vanishingly rare.
    lm = TealFastLM(default_checkpoint, 0.5, "cats", max_length=16, dtype="float64")
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away into the dark forest."
    ids = lm.tokenizer.encode(text, bos=False)
    assert len(ids) > 16  # several windows
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    # every token predicted once, with up to 15 tokens of context: windows of 16 starting at the prefix token
    full = [lm.prefix_id] + ids
    want = 0.0
    for start in range(0, len(ids), 16):
        n = min(16, len(ids) - start)
        ctx = full[max(0, start + n - 16): start + 1]
        want += direct_logprob(lm.model, ctx, ids[start:start + n])
    assert got == pytest.approx(want, abs=5e-2)  # rounding may flip a mask (see above); a missed token costs nats


def test_cli_writes_json_and_plot_for_local_tasks(tmp_path, default_checkpoint, monkeypatch):
    from benchmark.downstream import main
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    write_tasks(tmp_path)
    out = tmp_path / "downstream.json"
    main(["--checkpoint_path", str(default_checkpoint), "--include_path", str(tmp_path), "--tasks", "teal_mc",
          "--sparsities", "0", "0.5", "--sparsity_mode", "cats", "--max_length", "256", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["task"], r["mode"], r["sparsity"], r["metric"]) for r in rows] == [
        ("teal_mc", "dense", 0.0, "acc,none"), ("teal_mc", "cats", 0.5, "acc,none")]
    assert rows[0]["value"] == 1.0  # the dense model knows all three (as in the test above)
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("max_gen_toks", [8, 16, 40])  # below, at and above max_length
def test_generate_until_keeps_prompt_and_new_tokens_within_max_length(default_checkpoint, monkeypatch, max_gen_toks):
    import benchmark.downstream as downstream
    from lm_eval.api.instance import Instance
    calls = []

    def recording_generate(model, prompt, max_new, **kwargs):
        calls.append((prompt.tolist(), max_new))
        return generate(model, prompt, max_new, **kwargs)

    monkeypatch.setattr(downstream, "generate", recording_generate)
    lm = TealFastLM(default_checkpoint, 0.0, "uniform", max_length=16)
    context = "The quick brown fox jumps over the lazy dog, and then it runs far away into the dark forest."
    ids = lm.tokenizer.encode(context)
    assert len(ids) > 16
    lm.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": max_gen_toks}), 0)],
                      disable_tqdm=True)
    (prompt, max_new), = calls
    assert max_new == min(max_gen_toks, 15)
    assert len(prompt) == 16 - max_new and prompt == ids[-len(prompt):]  # the context's end, at least one token
