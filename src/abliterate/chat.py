"""Interactive multi-turn chat with a model, for a person to feel what an edit did.

Why a module of its own: numbers from `evaluate` say how often a model refuses; talking to
it says how it refuses and how it answers instead. The session renders the whole
conversation with the model's chat template each turn (so the model sees exactly what a
chat front end would send), streams the answer as it is generated, and is greedy unless
a temperature is given, so the same conversation gives the same answers before and after
an edit. Loading goes through `abliterate.model` (devices, 4-/8-bit).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .errors import AbliterateError

PROMPT = "you> "
COMMANDS_HELP = "commands: /clear (forget the conversation), /system TEXT, /system (none), /exit"


@dataclass(frozen=True)
class SamplingOptions:
    """Greedy when `temperature` is 0 (the default); otherwise sampled, seeded by `seed`."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise AbliterateError(
                f"--max-new-tokens is {self.max_new_tokens}; expected an integer >= 1."
            )
        if self.temperature < 0:
            raise AbliterateError(f"--temperature is {self.temperature}; expected >= 0.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise AbliterateError(f"--top-p is {self.top_p}; expected a number in (0, 1].")
        if self.top_k is not None and self.top_k < 1:
            raise AbliterateError(f"--top-k is {self.top_k}; expected an integer >= 1.")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            raise AbliterateError(
                "--top-p/--top-k only apply when sampling; give --temperature > 0 as well."
            )

    @property
    def sample(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict:
        if not self.sample:
            return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        return dict(
            do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k
        )


def _streamer(tokenizer, out):
    """A transformers `TextStreamer` writing finished words to `out` as they arrive."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text)
            out.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class ChatSession:
    """One conversation: the messages so far, the system prompt, and how to answer."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        system: str | None = None,
        sampling: SamplingOptions | None = None,
        fallback_template: bool = False,
    ) -> None:
        from .prompts import has_chat_template

        if not has_chat_template(tokenizer) and not fallback_template:
            name = getattr(tokenizer, "name_or_path", "") or "the model"
            raise AbliterateError(
                f"the tokenizer of {name} has no chat template; pass --fallback-template to "
                "chat as 'User: ...\\nAssistant:' text."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.sampling = sampling or SamplingOptions()
        self.fallback_template = fallback_template
        self.messages: list[dict] = []  # user/assistant turns, without the system prompt
        config = getattr(model, "config", None)
        self.context = int(getattr(config, "max_position_embeddings", 0) or 0) or None

    # ---- conversation state

    def clear(self) -> None:
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    # ---- rendering

    def render(self, messages: list[dict]) -> str:
        """The conversation as the text the model sees, ending with the assistant's turn."""
        from .prompts import FALLBACK_SYSTEM, FALLBACK_TURN, has_chat_template

        if has_chat_template(self.tokenizer):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        text = ""
        for message in messages:
            if message["role"] == "system":
                text += FALLBACK_SYSTEM.format(system=message["content"])
            elif message["role"] == "user":
                text += FALLBACK_TURN.format(prompt=message["content"])
            else:
                text += " " + message["content"] + "\n"
        return text

    def input_ids(self) -> list[int]:
        """Token ids of the conversation; the oldest turns go when the context is full."""
        from .prompts import has_chat_template

        add_special = not has_chat_template(self.tokenizer)
        while True:
            text = self.render(self.conversation())
            ids = list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])
            fits = self.context is None or len(ids) + self.sampling.max_new_tokens <= self.context
            if fits or len(self.messages) <= 1:
                return ids
            self.messages = self.messages[2:]  # forget the oldest user/assistant exchange

    # ---- answering

    @torch.no_grad()
    def reply(self, text: str, out=None) -> str:
        """Answer the user's `text` (streamed to `out` when given) and remember both turns."""
        from .model import input_device, pad_id, stop_ids

        self.messages.append({"role": "user", "content": text})
        ids = self.input_ids()
        device = input_device(self.model)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        if self.sampling.seed is not None:
            torch.manual_seed(self.sampling.seed)
        stop = sorted(stop_ids(self.model, self.tokenizer))
        generated = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=self.sampling.max_new_tokens,
            pad_token_id=pad_id(self.tokenizer),
            eos_token_id=stop or None,
            streamer=_streamer(self.tokenizer, out) if out is not None else None,
            **self.sampling.generate_kwargs(),
        )
        new = [int(t) for t in generated[0, input_ids.shape[1] :].tolist()]
        if stop and any(t in stop for t in new):
            new = new[: min(new.index(t) for t in stop if t in new)]
        answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    # ---- the command line

    def handle(self, line: str, out) -> bool:
        """Act on one line typed by the user; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line in ("/exit", "/quit"):
            return False
        if line == "/clear":
            self.clear()
            out.write("(conversation cleared)\n")
        elif line == "/system" or line.startswith("/system "):
            self.set_system(line[len("/system") :].strip())
            shown = f"set to: {self.system}" if self.system else "removed"
            out.write(f"(system prompt {shown}; conversation cleared)\n")
            self.clear()
        elif line.startswith("/"):
            out.write(f"(unknown command {line.split()[0]}; {COMMANDS_HELP})\n")
        else:
            out.write("model> ")
            out.flush()
            self.reply(line, out)
            out.write("\n")
        out.flush()
        return True


def run_chat(session: ChatSession, *, stdin=None, out=None) -> None:
    """Read lines until /exit or end of input; each line is a command or a user turn."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    out.write(f"Chatting with the model; {COMMANDS_HELP}.\n")
    while True:
        out.write(PROMPT)
        out.flush()
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D)
            out.write("\n")
            break
        if not session.handle(line, out):
            break
    out.flush()
