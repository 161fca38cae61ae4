"""Each settings mistake fails before any compute: exit code 2, one paragraph naming the setting, no files.

Each case runs the CLI's entry point (``lm_lightning.__main__.main``, what ``python -m lm_lightning`` runs) on
its own command line; one also runs as a real subprocess, for the process's exit code and stderr (as does
test_cli's block-size case).
Running every case in a fresh interpreter would cost ~10 s of imports each on a 2-core machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import run_cli, write_tiny_config

from lm_lightning.__main__ import main
from lm_lightning.data.tokenizer import load_tokenizer


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: its size and modification time (folders: -1, 0)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
        for p in root.rglob("*")
    }


@pytest.fixture
def run_dir(tmp_path, bpe_tokenizer_path, doc_texts, tiny_gpt2, monkeypatch) -> Path:
    """A folder with a tiny config (``tiny.yaml``), a tiny Hugging Face model folder (``hf``) and data files
    of every kind of mistake; ``datasets`` caches under it too (``hf_datasets``)."""
    monkeypatch.chdir(tmp_path)
    for name, folder in (
        ("HF_DATASETS_CACHE", "hf_datasets"),
        ("DOWNLOADED_DATASETS_PATH", "hf_datasets/downloads"),
        ("EXTRACTED_DATASETS_PATH", "hf_datasets/downloads/extracted"),
    ):
        monkeypatch.setattr(datasets.config, name, tmp_path / folder)
    tiny_gpt2.save_pretrained(tmp_path / "hf")
    load_tokenizer(bpe_tokenizer_path).save_pretrained(tmp_path / "hf")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Too short.\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    (tmp_path / "notackpt.ckpt").write_text("this is not a checkpoint\n")
    torch.save({"state_dict": {}, "hyper_parameters": {"hidden_dim": 8}}, tmp_path / "other_module.ckpt")
    pairs = [{"prompt": f"Question {i}?\n", "completion": f"Answer {i}."} for i in range(4)]
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    jsonl = {
        "pc.jsonl": pairs,
        "pc_empty.jsonl": [*pairs[:2], {"prompt": "Q?", "completion": ""}],
        "completion_only.jsonl": [{"completion": "An answer."}],
        "chat.jsonl": [{"messages": chat}] * 3,
        "chat_prompt.jsonl": [{"messages": chat[:1]}],
        "chat_no_assistant.jsonl": [{"messages": chat}, {"messages": chat[:1]}],
        "chat_role.jsonl": [{"messages": [{"role": "wizard", "content": "Hi"}, chat[1]]}],
        "body.jsonl": [{"body": "A text."}, {"body": "Another one."}],
        "null_text.jsonl": [{"text": "A text."}, {"text": "Another one."}, {"text": None}, {"text": None}],
    }
    for name, rows in jsonl.items():
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "chatml.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    (tmp_path / "broken.jinja").write_text("{{ raise_exception('Conversation roles must alternate') }}")
    (tmp_path / "typo.yaml").write_text("data:\n  blok_size: 32\n")
    (tmp_path / "old_export").mkdir()
    (tmp_path / "old_export" / "lm_lightning_export.json").write_text(
        '{"files": [], "run": "runs/old/version_3"}'
    )
    write_tiny_config(tmp_path, bpe_tokenizer_path, doc_texts)
    return tmp_path


PC = ["fit", "--data.data_files.validation", "pc.jsonl", "--data.data_files.train"]
CHAT = ["fit", "--data.data_files.validation", "chat.jsonl", "--data.chat_template", "chatml.jinja"]
HF = ["--model.model_name_or_path", "hf", "--model.model_config", "null", "--data.tokenizer", "hf"]
SAMPLER = ["--trainer.callbacks+=lm_lightning.TextGenerationCallback", "--trainer.callbacks.prompts=[The]"]

# (id, command line after the config, what the message must say)
CASES = [
    (
        "typo in a flag",
        ["fit", "--data.batchsize", "8"],
        "unknown option --data.batchsize; did you mean --data.batch_size",
    ),
    (
        "typo in a config file",
        ["fit", "--config", "typo.yaml"],
        "typo.yaml: unknown key data.blok_size; did you mean data.block_size",
    ),
    ("typo in the subcommand", ["fitt"], "unknown subcommand 'fitt'; did you mean fit?"),
    (
        "unknown column",
        ["fit", "--data.text_column", "body"],
        "text_column='body' is not a column of the 'train' split; its columns are ['text']",
    ),
    (
        "unknown column in a JSON lines file",
        ["fit", "--data.data_files.train", "body.jsonl"],
        "text_column='text' is not a column of the 'train' split; its columns are ['body']",
    ),
    (
        "predict without prompts",
        ["predict", *HF],
        "predict needs prompts: set --data.prompts",
    ),
    (
        "chat prompts without a template",
        ["predict", *HF, "--data.prompts_file", "chat_prompt.jsonl"],
        "Chat data needs a chat template, and the tokenizer 'hf' has none",
    ),
    (
        "missing file",
        ["fit", "--data.data_files.train", "nope.txt"],
        "data_files['train']='nope.txt': no such file",
    ),
    ("empty file", ["fit", "--data.data_files.train", "empty.txt"], "'empty.txt' is empty"),
    ("not UTF-8", ["fit", "--data.data_files.train", "latin1.txt"], "is not valid UTF-8"),
    (
        "split shorter than a block",
        ["fit", "--data.data_files.validation", "short.txt"],
        "tokens, fewer than one block (block_size=32): lower --data.block_size",
    ),
    (
        "null text",
        ["fit", "--data.data_files.validation", "null_text.jsonl"],
        "The 'validation' split, row 2 (counting from 0): text_column='text' holds null, not a string; 2 "
        "such row(s) in the split. Fix the data, or set --data.skip_empty true to skip them.",
    ),
    (
        "block_size above positions",
        ["fit", "--data.block_size", "100"],
        "block_size=100 is larger than the model's context of 64 positions",
    ),
    (
        "tokenizer larger than embeddings",
        ["fit", "--model.model_config.vocab_size", "100"],
        "The tokenizer has 512 tokens but the model's embedding has 100 rows",
    ),
    (
        "greedy with several sequences",
        ["fit", *SAMPLER, "--trainer.callbacks.decodings=[{do_sample: false, num_return_sequences: 2}]"],
        "num_return_sequences=2 with num_beams=1 and do_sample=False is invalid",
    ),
    (
        "sampling at temperature 0",
        ["fit", *SAMPLER, "--trainer.callbacks.decodings=[{preset: top_k, temperature: 0}]"],
        "temperature=0",
    ),
    (
        "unknown preset",
        ["fit", *SAMPLER, "--trainer.callbacks.decodings=[nucleus]"],
        "nucleus",
    ),
    (
        "missing checkpoint",
        ["validate", "--ckpt_path", "missing.ckpt"],
        "--ckpt_path='missing.ckpt': no such checkpoint file",
    ),
    (
        "checkpoint that is not one",
        ["validate", "--ckpt_path", "notackpt.ckpt"],
        "--ckpt_path='notackpt.ckpt' is not a PyTorch Lightning checkpoint",
    ),
    (
        "checkpoint of another module",
        ["fit", "--ckpt_path", "other_module.ckpt"],
        "is a Lightning checkpoint but not of a CausalLMModule",
    ),
    (
        "no last checkpoint to validate",
        ["validate", "--ckpt_path", "last"],
        "--ckpt_path last: no last*.ckpt under runs/tiny",
    ),
    (
        "no best checkpoint to validate",
        ["validate", "--ckpt_path", "best"],
        "--ckpt_path best: no run with checkpoints under runs/tiny",
    ),
    (
        "export folder of another run",
        ["fit", "--model.export_dir", "old_export"],
        "--model.export_dir='old_export' holds the export of run runs/old/version_3: this fit would replace",
    ),
    (
        "fp16 mixed precision on CPU",
        ["fit", "--trainer.precision", "16-mixed"],
        "trainer.precision='16-mixed' needs a CUDA GPU",
    ),
    ("unknown precision", ["fit", "--trainer.precision", "8-mixed"], "8-mixed"),
    ("unknown scheduler", ["fit", "--model.lr_scheduler", "exp"], "'constant', 'linear', 'cosine'"),
    ("bad batch size", ["fit", "--data.batch_size", "0"], "batch_size=0 must be at least 1"),
    (
        "empty prompts file",
        ["predict", "--data.prompts_file", "empty.txt"],
        "prompts_file='empty.txt' holds no prompts",
    ),
    (
        "missing prompts file",
        ["predict", "--data.prompts_file", "prompts.txt"],
        "prompts_file='prompts.txt': no such file",
    ),
    (
        "validate without a checkpoint",
        ["validate"],
        "validate without --ckpt_path would run the model of this config with random weights",
    ),
    (
        "predict without a checkpoint",
        ["predict", "--data.prompts", "[The]"],
        "Give --ckpt_path last (the newest checkpoint of this config's runs)",
    ),
    ("test with no test split", ["test"], "The data source has no 'test' split (its splits are ['train', "),
    (
        "empty completion",
        [*PC, "pc_empty.jsonl"],
        "The 'train' split, row 2 (counting from 0): the completion is empty ('')",
    ),
    (
        "missing column",
        [*PC, "completion_only.jsonl"],
        "The 'train' split has a 'completion' column but no 'prompt' column",
    ),
    (
        "format without its column",
        ["fit", "--data.format", "chat"],
        "format='chat' needs the column(s) ['messages'], missing from the 'train' split",
    ),
    (
        "chat with no assistant turn",
        [*CHAT, "--data.data_files.train", "chat_no_assistant.jsonl"],
        "The 'train' split, row 1 (counting from 0): the chat has no assistant turn",
    ),
    (
        "unknown role",
        [*CHAT, "--data.data_files.train", "chat_role.jsonl"],
        "row 0 (counting from 0): message 0 has the unknown role 'wizard'",
    ),
    (
        "chat template that does not render",
        [*CHAT[:3], "--data.data_files.train", "chat.jsonl", "--data.chat_template", "broken.jinja"],
        "row 0 (counting from 0): the chat template does not render: TemplateError: Conversation roles must",
    ),
    (
        "chat without a template",
        [*CHAT[:3], "--data.data_files.train", "chat.jsonl"],
        "has none: give a Jinja template file with --data.chat_template FILE",
    ),
    (
        "missing chat template file",
        [*CHAT[:3], "--data.chat_template", "nope.jinja"],
        "chat_template='nope.jinja': no such file",
    ),
    (
        "streaming chats",
        [*CHAT, "--data.data_files.train", "chat.jsonl", "--data.streaming", "true"],
        "--data.streaming true works on text data; this is 'chat' data",
    ),
    (
        "streaming a chat format",
        ["fit", "--data.streaming", "true", "--data.format", "chat"],
        "streaming=True works on text data, not format='chat'",
    ),
    (
        "decaying schedule, no epoch limit",
        ["fit", "--trainer.max_steps", "-1", "--trainer.max_epochs", "-1"],
        "--model.lr_scheduler='linear' needs the number of training steps",
    ),
    (
        "warm-up ratio, time limit only",
        [
            "fit",
            "--trainer.max_steps",
            "-1",
            "--trainer.max_time",
            "00:00:10:00",
            "--model.lr_scheduler",
            "constant",
            "--model.warmup_ratio",
            "0.1",
        ],
        "set --trainer.max_steps",
    ),
    (
        "two data sources",
        ["fit", "--data.corpus", "python-docs"],
        "Give exactly one data source, got ['data_files', 'corpus']: keep one of",
    ),
    (
        "two data sources, the fix",
        ["fit", "--data.corpus", "python-docs"],
        "set the others to null (--data.data_files null or --data.corpus null)",
    ),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_fast_clearly_and_writes_nothing(run_dir, args, message, capfd, monkeypatch):
    before = tree(run_dir)
    monkeypatch.setattr(sys, "argv", ["lm_lightning", args[0], "--config", "tiny.yaml", *args[1:]])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capfd.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert message in err
    assert "Traceback" not in err and "usage:" not in err  # one paragraph, not a stack or the usage
    # Nothing written: no log or checkpoint folder, no cache of ours or of datasets, no config rewritten.
    assert tree(run_dir) == before
    if "unknown" not in message:  # a typo's suggestions are checked by the typo cases themselves
        check_hints(
            ["fit" if args[0] == "fitt" else args[0], "--config", "tiny.yaml", *args[1:]],
            err,
            capfd,
            monkeypatch,
        )


def test_validate_and_test_need_only_their_split(run_dir, monkeypatch, capsys):
    for verb, split, key in (
        ("validate", "validation", "val/perplexity"),
        ("test", "test", "test/perplexity"),
    ):
        files = f"{{{split}: valid.txt}}"
        code = run_cli(monkeypatch, verb, "--config", "tiny.yaml", *HF, "--data.data_files", files, *SAMPLER)
        out = capsys.readouterr().out
        assert code == 0 and key in out
        assert "Samples at" not in out  # the fit's sampling callback: not in an evaluation
    # Outside weights: runs/NAME/validate/version_N, not a version_N of a fit.
    assert sorted(p.name for p in (run_dir / "runs" / "tiny").iterdir()) == ["test", "validate"]
    assert (run_dir / "runs" / "tiny" / "validate" / "version_0").is_dir()


def test_predict_into_a_given_file_writes_that_file_alone(run_dir, monkeypatch):
    before = tree(run_dir)
    args = ["--data.prompts", "[The]", "--predictions.output_path", "out.jsonl", "--model.predict_decodings"]
    assert run_cli(monkeypatch, "predict", "--config", "tiny.yaml", *HF, *args, "[{max_new_tokens: 3}]") == 0
    assert set(tree(run_dir)) - set(before) == {"out.jsonl"}
    assert len((run_dir / "out.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [c[1:] for c in CASES if c[0] == "checkpoint that is not one"],
)
def test_bad_input_in_a_subprocess(run_dir, args, message):
    out = subprocess.run(
        [sys.executable, "-m", "lm_lightning", args[0], "--config", "tiny.yaml", *args[1:]],
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (run_dir / "runs").exists()


def test_debug_env_shows_the_traceback(run_dir, capfd, monkeypatch):
    monkeypatch.setenv("LM_LIGHTNING_DEBUG", "1")
    argv = ["lm_lightning", "fit", "--config", "tiny.yaml", "--data.block_size", "100"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" in err and "block_size=100" in err


# ----------------------------------------------------------------------------- untrusted checkpoints
class _RunsCode:
    """Unpickling it creates a file: what a malicious checkpoint would do (with os.system, say)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize(
    "command",
    [
        ["validate", "--config", "tiny.yaml", "--ckpt_path", "evil.ckpt"],
        ["test", "--config", "tiny.yaml", "--ckpt_path", "evil.ckpt"],
        ["predict", "--config", "tiny.yaml", "--ckpt_path", "evil.ckpt", "--data.prompts", "[The]"],
        ["fit", "--config", "tiny.yaml", "--ckpt_path", "evil.ckpt"],
        ["export", "--ckpt_path", "evil.ckpt", "--output_dir", "exported"],
        ["validate", "--config", "tiny.yaml", "--ckpt_path", "last"],  # found in the run folder
    ],
    ids=["validate", "test", "predict", "fit", "export", "last"],
)
def test_a_checkpoint_that_would_run_code_is_refused_unopened(run_dir, command, capfd, monkeypatch):
    pwned = run_dir / "pwned"
    evil = {"state_dict": {}, "hyper_parameters": {"model_config": {}, "x": _RunsCode(str(pwned))}}
    torch.save(evil, run_dir / "evil.ckpt")
    last = run_dir / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save(evil, last)
    monkeypatch.setattr(sys, "argv", ["lm_lightning", *command])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capfd.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "holds objects that are not tensors or plain data, so it is not loaded" in err
    assert "Traceback" not in err
    assert not pwned.exists()  # the code in the file never ran
    assert not (run_dir / "exported").exists() and [
        p.name for p in (run_dir / "runs" / "tiny").iterdir()
    ] == ["version_0"]


# ----------------------------------------------------------------------------- hints that work when pasted
HINT = re.compile(r"(--[a-z_][\w.]*)(?![\w.=])(?: ('[^']*'|[\w./-]*\w))?")
PROSE = {"to", "or", "for", "would", "is", "accordingly", "when", "and", "with", "it", "after", "then", "a"}
PLACEHOLDERS = {"FILE": "x.txt", "DIR": "hf", "N": "2", "CKPT": "x.ckpt"}
_HELP: dict[str, str] = {}


def hints(message: str) -> list[list[str]]:
    """The ``--key VALUE`` (or ``--key``) settings a message suggests, placeholders filled in."""
    found = []
    for flag, value in HINT.findall(message):
        if value in PROSE or not value:
            found.append([flag])
        else:
            found.append([flag, PLACEHOLDERS.get(value, value.strip("'"))])
    return found


def check_hints(command: list[str], err: str, capfd, monkeypatch) -> None:
    """Every setting the error suggests is one the command accepts, with the value it shows."""
    for hint in hints(err.split("(set LM_LIGHTNING_DEBUG")[0]):
        if len(hint) == 1:  # a key alone ('set --trainer.max_steps'): one the command lists in its --help
            if command[0] not in _HELP:
                assert run_cli(monkeypatch, command[0], "--help") == 0
                _HELP[command[0]] = capfd.readouterr().out
            assert f"{hint[0]} " in _HELP[command[0]], hint
        else:
            code = run_cli(monkeypatch, *command, *hint, "--print_config")
            assert code == 0, (hint, capfd.readouterr().err[-1000:])
        capfd.readouterr()


def test_the_export_hint_to_overwrite_parses(run_dir, capfd, monkeypatch):
    (run_dir / "theirs").mkdir()
    (run_dir / "theirs" / "notes.txt").write_text("mine")
    command = ["export", "--ckpt_path", "x.ckpt", "--output_dir", "theirs"]
    assert run_cli(monkeypatch, *command) == 2
    err = capfd.readouterr().err
    assert "add --overwrite true to replace only its model and tokenizer files" in err
    check_hints(command, err, capfd, monkeypatch)


def test_the_readmes_chat_predict_command_runs_offline(run_dir, monkeypatch):
    """The README's chat example, as written, on a model folder without a chat template of its own."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("**Chat prompts for predict.**") :]
    echo, command = [line for line in section.split("```bash\n", 1)[1].split("```")[0].splitlines() if line]
    chat = echo.removeprefix("echo '").split("' > ")
    (run_dir / chat[1]).write_text(chat[0] + "\n")
    (run_dir / "configs").mkdir()
    (run_dir / "configs" / "chat-template.jinja").write_text(
        (Path(__file__).parents[1] / "configs" / "chat-template.jinja").read_text()
    )
    args = command.replace("DIR", "hf").split()[3:]  # after 'python -m lm_lightning'
    assert run_cli(monkeypatch, *args, "--model.predict_decodings", "[{max_new_tokens: 3}]") == 0
    written = sorted(run_dir.glob("runs/lm_lightning/version_0/predictions.jsonl"))
    assert len(written) == 1 and json.loads(written[0].read_text())["prompt"].startswith("Explain")


def test_from_python_a_block_longer_than_the_model_fails_before_the_cache(run_dir, bpe_tokenizer_path):
    from conftest import quiet_trainer

    from lm_lightning import CausalLMDataModule, CausalLMModule
    from lm_lightning.errors import RunError

    data = CausalLMDataModule(
        tokenizer=bpe_tokenizer_path, data_files={"train": "train.txt"}, block_size=100, cache_dir="cache"
    )
    module = CausalLMModule(model_config={"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64})
    with pytest.raises(RunError, match=r"set block_size \(--data.block_size\) to at most 64"):
        quiet_trainer(run_dir, max_steps=1).fit(module, data)
    assert not (run_dir / "cache").exists()
