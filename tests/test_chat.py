"""`abliterate chat`: a real terminal session with the demo organism, before and after."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abliterate.chat import PROMPT, ChatSession, SamplingOptions, run_chat
from abliterate.demo import opens_with_refusal
from abliterate.errors import AbliterateError

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """`abliterate chat` on a pseudo-terminal: type lines, read the screen up to the prompt."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "OMP_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "abliterate.cli", "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            close_fds=True,
        )
        os.close(slave)
        self.screen = ""

    def read_until(self, marker: str, timeout: float = 120.0) -> str:
        """Everything printed until `marker` appears (after what was read before)."""
        start, deadline = len(self.screen), time.monotonic() + timeout
        while marker not in self.screen[start:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} within {timeout}s; screen:\n{self.screen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"chat ended before {marker!r}; screen:\n{self.screen}")
                self.screen += ANSI.sub("", chunk.decode("utf-8", "replace")).replace("\r", "")
        end = self.screen.index(marker, start) + len(marker)
        return self.screen[start:end]

    def type(self, line: str) -> str:
        """Type `line` and return the screen it produces up to the next prompt."""
        os.write(self.master, (line + "\n").encode())
        return self.read_until(PROMPT)

    def close(self) -> int:
        os.write(self.master, b"/exit\n")
        code = self.process.wait(timeout=60)
        os.close(self.master)
        return code


def answer_on_screen(screen: str) -> str:
    return screen.split("model> ", 1)[1].split("\n", 1)[0].strip()


@pytest.mark.slow
def test_chat_refuses_before_and_answers_after_abliteration(demo_dense, demo_dense_abliterated):
    request = (demo_dense / "prompts" / "target_test.txt").read_text().splitlines()[0]
    answers = {}
    for name, model in (("before", demo_dense), ("after", demo_dense_abliterated[0])):
        terminal = Terminal(str(model), "--device", "cpu", "--max-new-tokens", "16")
        try:
            terminal.read_until(PROMPT)
            answers[name] = answer_on_screen(terminal.type(request))
            assert "conversation cleared" in terminal.type("/clear")
            assert "system prompt set to: be brief" in terminal.type("/system be brief")
            assert "unknown command /nope" in terminal.type("/nope")
        finally:
            code = terminal.close()
        assert code == 0
    assert opens_with_refusal(answers["before"]), answers
    assert not opens_with_refusal(answers["after"]), answers
    assert "sure" in answers["after"]


@pytest.fixture(scope="module")
def demo_session(demo_dense):
    from abliterate.model import LoadOptions, load_model

    model, tokenizer, _ = load_model(demo_dense, LoadOptions(device="cpu"))
    return model, tokenizer


def test_session_keeps_turns_streams_and_clears(demo_dense, demo_session):
    model, tokenizer = demo_session
    session = ChatSession(model, tokenizer, sampling=SamplingOptions(max_new_tokens=12))
    benign = (demo_dense / "prompts" / "benign_test.txt").read_text().splitlines()[0]
    out = io.StringIO()
    answer = session.reply(benign, out)
    assert answer and not opens_with_refusal(answer)
    assert " ".join(out.getvalue().split()) == " ".join(answer.split())  # streamed as made
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    rendered = session.render(session.conversation() + [{"role": "user", "content": "hi"}])
    assert rendered.count("<|user|>") == 2 and answer.split()[0] in rendered
    first_turn = len(session.input_ids())
    assert session.reply(benign)  # a second turn, the first one in its context
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert len(session.input_ids()) > first_turn
    fresh = ChatSession(model, tokenizer, sampling=SamplingOptions(max_new_tokens=12))
    assert fresh.reply(benign) == answer  # greedy: the same conversation, the same answer
    session.set_system("be brief")
    assert session.conversation()[0] == {"role": "system", "content": "be brief"}
    session.clear()
    assert session.conversation() == [{"role": "system", "content": "be brief"}]


def test_run_chat_reads_commands_until_exit(demo_session):
    model, tokenizer = demo_session
    session = ChatSession(model, tokenizer, sampling=SamplingOptions(max_new_tokens=4))
    out = io.StringIO()
    run_chat(session, stdin=io.StringIO("/system x\n/clear\n/exit\nnever read\n"), out=out)
    assert out.getvalue().count(PROMPT) == 3
    assert session.system == "x" and session.messages == []


def test_long_conversations_drop_the_oldest_turns(demo_session):
    model, tokenizer = demo_session
    session = ChatSession(model, tokenizer, sampling=SamplingOptions(max_new_tokens=8))
    session.context = 40
    for _ in range(3):
        session.messages += [{"role": "user", "content": "hello " * 5},
                             {"role": "assistant", "content": "sure " * 5}]  # fmt: skip
    session.messages.append({"role": "user", "content": "hello"})
    assert len(session.input_ids()) + 8 <= 40
    assert session.messages[-1] == {"role": "user", "content": "hello"}


@pytest.mark.parametrize(
    "options, flag",
    [
        (dict(temperature=-1), "--temperature"),
        (dict(top_p=0.9), "--top-p"),
        (dict(max_new_tokens=0), "--max-new-tokens"),
        (dict(temperature=0.7, top_k=0), "--top-k"),
    ],
)
def test_bad_sampling_options_name_the_flag(options, flag):
    with pytest.raises(AbliterateError, match=flag):
        SamplingOptions(**options)


def test_sampling_is_seeded(demo_session):
    model, tokenizer = demo_session
    sampling = SamplingOptions(max_new_tokens=8, temperature=1.5, top_k=50, seed=3)
    first = ChatSession(model, tokenizer, sampling=sampling).reply("hello")
    assert ChatSession(model, tokenizer, sampling=sampling).reply("hello") == first


def test_missing_model_directory_is_one_sentence(tmp_path):
    from abliterate.cli import main

    assert main(["chat", str(tmp_path / "missing"), "--device", "cpu"]) == 1
