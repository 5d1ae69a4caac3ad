"""Streaming generation (`barkgpt generate` prints tokens as they are drawn), `barkgpt chat` and
`barkgpt export --format hf`."""

import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import barkgpt
from barkgpt import BarkGPT, GPTConfig
from barkgpt.cli import main
from barkgpt.data import BarkTokenizer, ByteTokenizer
from barkgpt.stream import TextStream
from hf_helpers import import_transformers


@pytest.fixture(scope="module")
def bark_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "bark")
    barkgpt.train(preset="bark", steps=60, out=out, progress=False, sample=False, backend="torch",
                  log=lambda m: None)
    return out


def run_cli(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "barkgpt", *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, "BARKGPT_BACKEND": "torch"}, timeout=timeout)


class _Recorder(io.StringIO):
    """stdout that notes how many model forwards had run at each write."""

    def __init__(self, counter):
        super().__init__()
        self.counter, self.at = counter, []

    def write(self, s):
        if s:
            self.at.append((self.counter[0], s))
        return super().write(s)


def _count_forwards(monkeypatch):
    counter = [0]
    forward = BarkGPT.forward

    def counted(self, *a, **kw):
        counter[0] += 1
        return forward(self, *a, **kw)

    monkeypatch.setattr(BarkGPT, "forward", counted)
    return counter


# ---- TextStream -------------------------------------------------------------------------------

def test_text_stream_holds_back_split_characters():
    tok = ByteTokenizer()
    text = "a 日本 😀 é!"
    ids = tok.encode(text)
    s = TextStream(tok)
    pieces = [s.push([i]) for i in ids]
    assert "".join(pieces) + s.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[0] == "a" and pieces[2:5] == ["", "", "日"]  # 3 bytes, shown when complete


def test_text_stream_keeps_word_separators_and_a_prefix():
    tok = BarkTokenizer()
    ids = tok.encode("User: speak Assistant: woof arf <EOS>")
    s = TextStream(tok)
    out = s.push(ids[:3]) + "".join(s.push([i]) for i in ids[3:]) + s.flush()
    assert out == tok.decode(ids)
    bad = TextStream(ByteTokenizer())  # a cut character at the very end is flushed as decode shows it
    assert bad.push([0xE6, 0x97]) == "" and bad.flush() == ByteTokenizer().decode([0xE6, 0x97])


# ---- generate streams ---------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--greedy"], ["--seed", "5", "--temperature", "1.0"]])
def test_generate_streams_each_token_as_it_is_drawn(bark_run, monkeypatch, args):
    model = barkgpt.load(bark_run, backend="torch")
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(5)
    want = model.generate(torch.tensor([tok.encode("User: speak Assistant:")]), 64, greedy="--greedy" in args,
                          temperature=1.0, eos_token_id=tok.eos_id, generator=gen)
    counter = _count_forwards(monkeypatch)
    rec = _Recorder(counter)
    monkeypatch.setattr(sys, "stdout", rec)
    assert main(["generate", bark_run, "--backend", "torch", *args]) == 0
    assert rec.getvalue() == tok.decode(want[0].tolist()) + "\n"  # what was printed before streaming
    n_new = want.shape[1] - 3
    assert counter[0] == n_new
    # the prompt before the first forward, then one piece after each forward (each new token)
    assert rec.at[0] == (0, "User: speak Assistant:")
    assert [c for c, _ in rec.at[1:-1]] == list(range(1, n_new + 1))


def test_generate_several_samples_still_prints_rows(bark_run):
    r = run_cli("generate", bark_run, "--num-samples", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(l.startswith("User: speak Assistant:") for l in lines)


def test_on_token_can_stop_generation():
    m = BarkGPT(GPTConfig.preset("bark"), backend="torch")
    seen = []
    out = m.generate(torch.tensor([[6, 8, 7]]), 10, greedy=True, on_token=lambda t: seen.append(t.clone()) or len(seen) == 4)
    assert out.shape == (1, 7) and len(seen) == 4
    assert torch.equal(torch.stack(seen, 1), out[:, 3:])


# ---- chat ------------------------------------------------------------------------------------

def test_chat_answers_each_line_until_eof(bark_run):
    model = barkgpt.load(bark_run, backend="torch")
    tok = model.tokenizer
    want = model.generate(torch.tensor([tok.encode("User: speak Assistant:")]), 64, greedy=True,
                          eos_token_id=tok.eos_id)[0, 3:].tolist()
    answer = tok.decode(want[:want.index(tok.eos_id)] if tok.eos_id in want else want)
    r = run_cli("chat", bark_run, "--greedy", stdin="speak\n\nhello there\nUser: speak Assistant:\n")
    assert r.returncode == 0, r.stderr
    # blank lines are skipped; an unknown word is reported and the chat goes on
    assert r.stdout.splitlines() == [answer, answer]
    assert "'hello' is not in the bark vocabulary" in r.stderr and "Traceback" not in r.stderr


def test_chat_ends_cleanly_on_ctrl_c_at_the_prompt(bark_run):
    p = subprocess.Popen([sys.executable, "-m", "barkgpt", "chat", bark_run, "--greedy"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "BARKGPT_BACKEND": "torch"})
    try:
        p.stdin.write("speak\n")
        p.stdin.flush()
        first = p.stdout.readline()  # answered: now it waits for the next line
        assert first.strip() and first.split()[0] in ("woof", "arf", "ruff", "grrr")
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0 and "Traceback" not in err


def test_chat_with_a_gpt2_directory(tmp_path, monkeypatch):
    transformers = import_transformers()
    from barkgpt.data import BPETokenizer

    torch.manual_seed(0)
    tok = BPETokenizer.train(["hello there, how are you? fine thanks"] * 30, 280, min_frequency=1, progress=False)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=16,
                                                              n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(tok._tk.to_str())
    model = barkgpt.load_hf(str(tmp_path), backend="torch")
    ids = tok.encode("hello there")
    out = model.generate(torch.tensor([ids]), 6, greedy=True, eos_token_id=tok.eos_id)[0, len(ids):].tolist()
    if tok.eos_id in out:
        out = out[:out.index(tok.eos_id)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n"))
    rec = io.StringIO()
    monkeypatch.setattr(sys, "stdout", rec)
    assert main(["chat", str(tmp_path), "--greedy", "--max-new-tokens", "6", "--backend", "torch"]) == 0
    assert rec.getvalue() == tok.decode(out) + "\n"
    # generate reads the same directory
    rec.seek(0)
    rec.truncate()
    assert main(["generate", str(tmp_path), "--prompt", "hello there", "--greedy", "--max-new-tokens", "6",
                 "--backend", "torch"]) == 0
    assert rec.getvalue().startswith("hello there")


# ---- export ------------------------------------------------------------------------------------

def test_export_command_writes_what_transformers_loads(bark_run, tmp_path):
    transformers = import_transformers()
    out = str(tmp_path / "hf")
    r = run_cli("export", bark_run, "--format", "hf", out)
    assert r.returncode == 0, r.stderr
    assert "GPT2LMHeadModel.from_pretrained" in r.stdout and "and tokenizer" in r.stdout
    ref = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    model = barkgpt.load(bark_run, backend="torch").eval()
    idx = torch.tensor([[6, 8, 7, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
    # the exported directory chats like the run: the bark tokenizer came along
    r = run_cli("chat", out, "--greedy", stdin="speak\n")
    assert r.returncode == 0 and r.stdout == run_cli("chat", bark_run, "--greedy", stdin="speak\n").stdout
    again = run_cli("export", bark_run, out)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    assert run_cli("export", bark_run, out, "--force").returncode == 0


def test_export_of_a_post_ln_model_is_one_line(tmp_path):
    m = BarkGPT(GPTConfig.preset("bark-article"), backend="torch")
    m.save(str(tmp_path / "article"))
    r = run_cli("export", str(tmp_path / "article"), str(tmp_path / "hf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot be written as GPT-2" in r.stderr and "norm_first=False" in r.stderr and "causal=False" in r.stderr
    assert not (tmp_path / "hf").exists()
