"""What the two server test files share: a tiny model folder with a tokenizer, PEFT adapters for it, the
transformers reference, and an in-process server on a loopback port."""
import socket
import threading
import time

import httpx
import torch
import transformers

KEY = "test-key"
MSG = [{"role": "user", "content": "hello there"}]


def _base_folder(root, tok_files):
    """A random transformers Llama (V=258: 256 bytes + 2 specials, EOS 257) saved with the byte tokenizer."""
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model("llama", vocab_size=258, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            eos_token_id=257, bos_token_id=256, tie_word_embeddings=False)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():                      # softer logits: greedy text that is not one repeated byte
        ref.model.embed_tokens.weight.mul_(0.1)
    ref.save_pretrained(root / "base")
    for f in tok_files.iterdir():
        if f.is_file():
            (root / "base" / f.name).write_bytes(f.read_bytes())
    return root / "base"


def server_root(tmp_path_factory, name):
    """(root, base): a fresh folder with the tiny model's folder `base` (byte tokenizer) and an empty
    root / "adapters" for a module's server."""
    from tests.conftest import tok_dir          # the fixture's body builds the tokenizer folder
    root = tmp_path_factory.mktemp(name)
    (root / "tok").mkdir()
    base = _base_folder(root, tok_dir.__wrapped__(root / "tok"))
    (root / "adapters").mkdir()
    return root, base


def _peft_adapter(base, folder, seed, r=4, targets=("q_proj", "v_proj")):
    import peft
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                    init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(str(folder))


def _hf_greedy(base, messages, max_new_tokens, adapter=None, raw=None):
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    if adapter is not None:
        import peft
        model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    text = raw if raw is not None else tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=257)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class Uvicorn:
    """An ASGI app under uvicorn on a free loopback port, in a thread (`config`: uvicorn's Config by default)."""

    def __init__(self, app, config=None):
        import uvicorn
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = config or uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.uv.started:
                break
            time.sleep(0.05)
        assert self.uv.started

    def stop(self):
        self.uv.should_exit = True
        self.thread.join(timeout=10)


class Running(Uvicorn):
    """`rft serve`'s app (`server`: its Server) with the server's own connection limits."""

    def __init__(self, app, server):
        from rftkit.serve.limits import uvicorn_config
        self.server = server
        super().__init__(app, uvicorn_config(app, server.cfg, log_level="warning", timeout_graceful_shutdown=2))

    def client(self, key=KEY):
        from openai import OpenAI
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path, body=None, key=KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kw)

    def get(self, path, key=KEY):
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def metric(self, name):
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(f"rftkit_{name} "):
                return float(line.split()[1])
        raise KeyError(name)
