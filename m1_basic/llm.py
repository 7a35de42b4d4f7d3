"""LLM: the user-facing entry point.

Introduced in M0; M1 adds `generate` and `chat`, which hand requests to the engine and
step it until every request has finished.
"""

import torch
from tqdm.auto import tqdm

from .config import EngineConfig
from .engine.llm_engine import LLMEngine
from .outputs import RequestOutput
from .request import Sequence
from .sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str = "default", config: EngineConfig | None = None,
                 **kwargs) -> None:
        """`LLM("default")`, `LLM("dummy:qwen3-0.6b", device="cuda")`, or a config."""
        self.config = config if config is not None else EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine(self.config)
        self.model_runner = self.engine.model_runner
        self.tokenizer = self.engine.tokenizer
        self._request_counter = 0

    def encode(self, prompt: Prompt) -> list[int]:
        return self.engine.encode(prompt)

    def next_token_distribution(self, prompt: Prompt,
                                top_k: int = 10) -> list[tuple[int, str, float]]:
        """The `top_k` most likely next tokens: (token id, text, probability)."""
        token_ids = self.encode(prompt)
        seq = Sequence(-1, "probe", token_ids)
        self.model_runner.allocate_kv_cache(seq, len(token_ids))
        try:
            logits = self.model_runner.forward(seq, 0)[-1]
        finally:
            self.model_runner.free_kv_cache(seq)
        top = torch.topk(torch.softmax(logits, dim=-1), top_k)
        return [(int(i), self.tokenizer.decode([int(i)], skip_special_tokens=False), float(p))
                for p, i in zip(top.values, top.indices)]

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or a list (text or token ids); outputs in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts: the list is empty")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params: {len(sampling_params)} given for "
                             f"{len(prompts)} prompts")
        ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                request_id = f"req-{self._request_counter}"
                self._request_counter += 1
                self.engine.add_request(request_id, prompt, params)
                ids.append(request_id)
        except Exception:
            for request_id in ids:  # all or nothing: drop what this call already queued
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

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
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", unit="req",
                   disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
                    bar.update()
        bar.close()
        return [finished[rid] for rid in request_ids]
