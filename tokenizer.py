"""One tokenizer interface over sentencepiece (Llama-2, Mistral), tiktoken (Llama-3) and a
`tokenizers` JSON (SmolLM2 and other byte-level BPE models).

A converted checkpoint folder holds either `tokenizer.model` (sentencepiece or tiktoken ranks,
told apart by content) or `tokenizer.json`, and optionally `tokenizer_config.json` with the
chat template and the names of the BOS/EOS tokens.
"""
import base64
import json
from pathlib import Path

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's (and Qwen2.5's, Qwen3's) split pattern: Llama-3's with digits one at a time
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                  "<|image|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL))]


class Tokenizer:
    """encode/decode plus the ids generation needs: bos_id, stop_ids, and an optional chat template."""

    bos_id: int | None
    stop_ids: list[int]
    chat_template: str | None = None
    add_bos: bool = True
    source: str = "the tokenizer"  # the folder it was loaded from, for messages

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def chat_prompt(self, user_message: str) -> str:
        """The prompt text for one user turn, through the model's chat template. The template comes from a model
        file, so it is rendered sandboxed (as transformers renders it): it can format the messages, not reach Python."""
        if self.chat_template is None:
            return user_message
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        try:
            template = ImmutableSandboxedEnvironment().from_string(self.chat_template)
            return template.render(messages=[{"role": "user", "content": user_message}], add_generation_prompt=True,
                                   bos_token="", eos_token="")
        except jinja2.TemplateError as e:  # SecurityError included: the template tried to reach outside its data
            raise ValueError(f"the chat template of {self.source} cannot be used ({type(e).__name__}: {e}); "
                             "fix chat_template in its tokenizer_config.json, or leave --interactive off") from e


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self.sp.bos_id()
        self.stop_ids = [self.sp.eos_id()]
        self.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"

    def _encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))

    @property
    def vocab_size(self):
        return self.sp.vocab_size()


class TikTokenTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import tiktoken
        ranks = {base64.b64decode(tok): int(rank)
                 for tok, rank in (line.split() for line in Path(path).read_text().splitlines() if line)}
        self.special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL)}
        self.model = tiktoken.Encoding(name=Path(path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.stop_ids = [self.special["<|end_of_text|>"], self.special["<|eot_id|>"], self.special["<|eom_id|>"]]
        self.chat_template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                              "{{ m['content'] }}<|eot_id|>{% endfor %}"
                              "<|start_header_id|>assistant<|end_header_id|>\n\n")

    def _encode(self, text):
        # Special-token text in a prompt is encoded as the special token, as Llama-3's chat format needs.
        return self.model.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.model.decode(list(ids))

    @property
    def vocab_size(self):
        return self.model.n_vocab


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path, config: dict):
        from tokenizers import Tokenizer as _Tok
        self.tok = _Tok.from_file(str(path))
        self.bos_id = self.tok.token_to_id(config["bos_token"]) if config.get("bos_token") else None
        self.stop_ids = [self.tok.token_to_id(t) for t in config.get("stop_tokens", [config.get("eos_token")]) if t]
        self.chat_template = config.get("chat_template")
        self.add_bos = bool(config.get("add_bos_token", False))

    def _encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()


def is_tiktoken_file(path: Path) -> bool:
    head = Path(path).read_bytes()[:256]
    try:
        token, rank = head.split(b"\n")[0].split(b" ")
        base64.b64decode(token, validate=True)
        return rank.isdigit()
    except ValueError:
        return False


def load_tokenizer(folder: Path) -> Tokenizer:
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    except ValueError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); re-run convert_hf_checkpoint.py") from e
    model_file = folder / "tokenizer.model"
    if (folder / "tokenizer.json").exists():
        tok = HFTokenizer(folder / "tokenizer.json", config)
    elif not model_file.exists():
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {folder}; re-run convert_hf_checkpoint.py")
    else:
        tok = TikTokenTokenizer(model_file) if is_tiktoken_file(model_file) else SentencePieceTokenizer(model_file)
        if config.get("chat_template"):
            tok.chat_template = config["chat_template"]
    tok.source = str(folder)
    return tok


def gguf_tokenizer_json(reader) -> tuple[str, dict]:
    """Build a `tokenizers` JSON and tokenizer_config from a GGUF file's gpt2-style BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer as _Tok, decoders, models, normalizers, pre_tokenizers

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    if field("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer model {field('tokenizer.ggml.model')!r} is not supported (only gpt2-style BPE)")
    tokens, types, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type"), field("tokenizer.ggml.merges")
    if tokens is None or types is None or len(types) != len(tokens):
        raise ValueError("the GGUF's vocabulary is incomplete (tokenizer.ggml.tokens / token_type)")
    merges = merges or []
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = _Tok(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=False))
    pre = field("tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # llama.cpp's "smollm" pre-tokenizer is GPT-2's with every digit split off on its own
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("qwen2", "llama-bpe"):  # as their tokenizer.json: split by the pattern, then bytes to symbols
        pattern = QWEN2_PATTERN if pre == "qwen2" else LLAMA3_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
    elif pre in (None, "default", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (only gpt-2, smollm, qwen2 and llama-bpe)")
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(control)
    # user-defined tokens (Qwen's <think>, <tool_call>) are matched whole in text too, but are not special
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    config = {
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token")),
        "chat_template": field("tokenizer.chat_template"),
    }
    # Chat models end a turn with <|im_end|> (SmolLM2, Qwen) rather than the EOS token.
    config["stop_tokens"] = [config["eos_token"]] + [t for t in ("<|im_end|>", "<|eot_id|>") if t in vocab]
    return tok.to_str(), config
