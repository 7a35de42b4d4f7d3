"""LLM: the user-facing entry point.

`generate` and `chat` hand requests to the engine and step it until every one of them
has finished. `LLM` talks to the engine only (`add_request`, `step`, `abort_request`):
what the model thinks of a prompt comes back through the same path, as
`SamplingParams(logprobs=..., prompt_logprobs=...)`.

Introduced in M0; changed in M1 (`generate`, `chat`).
"""

from tqdm.auto import tqdm

from .config import EngineConfig
from .engine.llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str = "default", config: EngineConfig | None = None,
                 **kwargs) -> None:
        """`LLM("default")`, `LLM("dummy:qwen3-0.6b", device="cuda")`, or a config."""
        if config is not None and kwargs:
            raise ValueError(f"config: give an EngineConfig or keyword settings, not both "
                             f"(got {sorted(kwargs)})")
        self.engine = LLMEngine(config if config is not None
                                else EngineConfig(model=model, **kwargs))
        self.config = self.engine.config  # resolved: max_model_len filled in
        self.tokenizer = self.engine.tokenizer
        self._request_counter = 0

    def encode(self, prompt: Prompt) -> list[int]:
        return self.engine.encode(prompt)

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or a list (text or token ids); outputs in input order."""
        prompts = as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params: {len(sampling_params)} given for "
                             f"{len(prompts)} prompts")
        ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                ids.append(f"req-{self._request_counter}")
                self._request_counter += 1
                self.engine.add_request(ids[-1], prompt, params)
            return self._run(ids, use_tqdm)
        except BaseException:  # a bad prompt, an error in a step, Ctrl-C: leave no trace
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(conv) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation, ready for the assistant's reply."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step the engine until these requests finish. Outputs of requests that someone
        added to the engine directly are handed back to it for the next `step`."""
        own, pending, finished = set(request_ids), set(request_ids), {}
        with tqdm(total=len(request_ids), desc="Generating", unit="req",
                  disable=not use_tqdm) as bar:
            while pending:
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError(f"requests {sorted(pending)} left the engine "
                                       "unfinished (aborted by someone else?)")
                outputs = self.engine.step()
                self.engine.hold_outputs([o for o in outputs if o.request_id not in own])
                for output in outputs:
                    if output.finished and output.request_id in pending:
                        pending.discard(output.request_id)
                        finished[output.request_id] = output
                        bar.update()
        return [finished[rid] for rid in request_ids]


def as_prompt_list(prompts) -> list[Prompt]:
    """One prompt (text or token ids) or a list of them, as a list; TypeError otherwise."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                    and isinstance(prompts[0], int)):
        return [prompts]
    if not isinstance(prompts, list):
        raise TypeError(f"prompts: must be a str, a list of token ids, or a list of those; "
                        f"got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts: the list is empty")
    return prompts
